"""The original LLaVA layout (haotian-liu/LLaVA, `LlavaLlamaForCausalLM`) and the VILA folder layout (NVlabs/VILA).

Original LLaVA: one LLaMA-style folder whose `config.json` adds `mm_vision_tower` (a hub id or path), `mm_hidden_size`,
`mm_projector_type`, `mm_vision_select_layer`, `mm_vision_select_feature`; its state dict carries the projector as
`model.mm_projector.*` (an `nn.Sequential` for mlp2x_gelu, a bare `nn.Linear` for linear) and, only when the tower was
trained, the tower as `model.vision_tower.vision_tower.*`. The tower's config (and usually its weights) live in the folder
`mm_vision_tower` names, so that folder must be local; the tokenizer has no `<image>` token (LLaVA splices features at a
placeholder index), so one is added and its embedding rows start at the mean of the others.

VILA: a root `config.json` (`llm_cfg`, `vision_tower_cfg`, `mm_projector_cfg`, `mm_vision_select_layer`,
`mm_vision_select_feature`) and three HF folders `llm/`, `vision_tower/`, `mm_projector/` (the projector's `config.json`
has `model_type: v2l_projector` and `mm_projector_type`; its weights are `layers.*`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig

from visprior.checkpoints.common import (
    Layout,
    architecture,
    connector_for,
    load_config,
    read_json,
    select_for,
    sequential_projector,
    tokenizer_folder,
    tower_config,
    tower_keys,
)
from visprior.checkpoints.weights import CheckpointFormatError, read_weights
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.models.vlm import VLMSpec

# LLaVA's model_type -> the HF causal LM it extends
LLAVA_LM_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
_LLAVA_ONLY_KEYS = {"architectures", "image_aspect_ratio", "image_grid_pinpoints", "freeze_mm_mlp_adapter",
                    "tune_mm_mlp_adapter", "tokenizer_padding_side", "tokenizer_model_max_length", "use_mm_proj",
                    "unfreeze_mm_vision_tower", "_name_or_path", "transformers_version", "torch_dtype", "dtype"}  # fmt: skip


def is_original_llava(config: dict) -> bool:
    return "text_config" not in config and any(
        k in config for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")
    )


def _check_plain(config: dict, where: str) -> None:
    """Refuse LLaVA options whose inputs visprior's model does not build (image start/end tokens, anyres tiling)."""
    if config.get("mm_use_im_start_end"):
        raise CheckpointFormatError(
            f"{where}: mm_use_im_start_end=true (<im_start>/<im_end> around images) is not supported"
        )
    merge = config.get("mm_patch_merge_type", "flat")
    if merge != "flat":
        raise CheckpointFormatError(
            f"{where}: mm_patch_merge_type {merge!r} (LLaVA-NeXT tiling) is not supported; only 'flat'"
        )
    if config.get("s2") or config.get("dynamic_s2"):
        raise CheckpointFormatError(f"{where}: S2 multi-scale vision towers are not supported")


class OriginalLlavaLayout(Layout):
    format = "llava"
    description = "original LLaVA checkpoint (LlavaLlamaForCausalLM with model.mm_projector.*)"

    def __init__(self, path: str | Path, vision_tower: str | os.PathLike | None = None) -> None:
        super().__init__(path)
        self.raw = read_json(self.path / "config.json", "the LLaVA config")
        self.where = f"original LLaVA checkpoint {self.path}"
        if not is_original_llava(self.raw):
            raise CheckpointFormatError(f"{self.where}: config.json has no mm_vision_tower / mm_projector_type")
        self.tower_dir = self._tower_folder(vision_tower)
        if self.raw.get("image_aspect_ratio") == "pad":
            self.notes.append("LLaVA pads images to a square with the mean colour before resizing; visprior's processor "
                              "resizes and centre-crops, so non-square images are preprocessed differently")  # fmt: skip

    def _tower_folder(self, given: str | os.PathLike | None) -> Path:
        named = self.raw.get("mm_vision_tower")
        candidates = [Path(given)] if given else []
        if named:
            candidates += [
                Path(named),
                self.path / named,
                self.path.parent / Path(named).name,
                self.path / Path(named).name,
            ]
        for c in candidates:
            if (c / "config.json").is_file():
                return c
        if given:
            raise CheckpointFormatError(f"{self.where}: vision tower folder {given} has no config.json")
        raise CheckpointFormatError(
            f"{self.where} names its vision tower {named!r} (mm_vision_tower), which is not a local folder: download it and "
            "pass its folder (`--vision_tower DIR` to eval/export, `init_from: {path: ..., vision_tower: DIR}` in a stage)"
        )

    def spec(self) -> VLMSpec:
        _check_plain(self.raw, self.where)
        lm_type = LLAVA_LM_TYPES.get(self.raw.get("model_type", ""))
        if lm_type is None:
            raise CheckpointFormatError(f"{self.where}: model_type {self.raw.get('model_type')!r} is not one of "
                                        f"{sorted(LLAVA_LM_TYPES)}")  # fmt: skip
        lm = {k: v for k, v in self.raw.items() if not k.startswith("mm_") and k not in _LLAVA_ONLY_KEYS}
        lm["model_type"] = lm_type
        lm_config = AutoConfig.for_model(**lm)
        tcfg = tower_config(self.tower_dir)
        select = select_for(tcfg.model_type, self.raw.get("mm_vision_select_feature", "patch") == "patch", self.where)
        tower = VisionTowerSpec(config=architecture(tcfg), feature_layer=self.raw.get("mm_vision_select_layer", -2),
                                select=select)  # fmt: skip
        connector = connector_for(self.raw.get("mm_projector_type", "linear"), self.where)
        tokenizer = tokenizer_folder(self.path, where=self.where)
        language = LanguageModelSpec(config=architecture(lm_config), tokenizer=tokenizer, add_image_token=True)
        return VLMSpec(language, tower, connector)

    def state(self) -> dict[str, torch.Tensor]:
        sd = read_weights(self.path)
        kind = self.raw.get("mm_projector_type", "linear")
        out = sequential_projector(sd, "model.mm_projector.", kind, self.where)
        tower_prefix = "model.vision_tower.vision_tower."
        if any(k.startswith(tower_prefix) for k in sd):
            out.update(tower_keys(sd, tower_prefix))
        else:
            out.update(tower_keys(read_weights(self.tower_dir)))
        for key, value in sd.items():
            if not key.startswith(("model.mm_projector.", "model.vision_tower.")):
                out["language_model." + key] = value
        return out

    def image_processor(self) -> str | None:
        return str(self.tower_dir) if (self.tower_dir / "preprocessor_config.json").is_file() else None


class VilaLayout(Layout):
    format = "vila"
    description = "VILA folder (llm/, vision_tower/, mm_projector/)"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.where = f"VILA checkpoint {self.path}"
        for sub in ("llm", "vision_tower", "mm_projector"):
            if not (self.path / sub / "config.json").is_file():
                raise CheckpointFormatError(f"{self.where}: no {sub}/config.json (the VILA layout has llm/, vision_tower/, "
                                            "mm_projector/)")  # fmt: skip
        self.raw = read_json(self.path / "config.json", "the VILA config")
        self.projector = read_json(self.path / "mm_projector" / "config.json", "the projector config")

    def _projector_type(self) -> str:
        kind = self.projector.get("mm_projector_type")
        if kind == "mlp_downsample":
            raise CheckpointFormatError(
                f"{self.where}: projector 'mlp_downsample' (VILA-1.5: 2x2 token merge with a LayerNorm) has no visprior "
                "connector yet; VILA checkpoints with a 'linear' or 'mlp2x_gelu' projector import"
            )
        return kind

    def spec(self) -> VLMSpec:
        _check_plain(self.raw, self.where)
        tcfg = tower_config(self.path / "vision_tower")
        select = select_for(tcfg.model_type, self.raw.get("mm_vision_select_feature", "patch") == "patch", self.where)
        tower = VisionTowerSpec(config=architecture(tcfg), feature_layer=self.raw.get("mm_vision_select_layer", -2),
                                select=select)  # fmt: skip
        connector = connector_for(self._projector_type(), self.where)
        llm = self.path / "llm"
        tokenizer = tokenizer_folder(llm, self.path, where=self.where)
        language = LanguageModelSpec(config=architecture(load_config(llm)), tokenizer=tokenizer, add_image_token=True)
        return VLMSpec(language, tower, connector)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"language_model." + k: v for k, v in read_weights(self.path / "llm").items()}
        out.update(tower_keys(read_weights(self.path / "vision_tower")))
        projector = read_weights(self.path / "mm_projector")
        kind = self._projector_type()
        prefix = "layers." if kind == "mlp2x_gelu" or any(k.startswith("layers.") for k in projector) else ""
        out.update(sequential_projector(projector, prefix, kind, self.where))
        return out

    def image_processor(self) -> str | None:
        folder = self.path / "vision_tower"
        return str(folder) if (folder / "preprocessor_config.json").is_file() else None
