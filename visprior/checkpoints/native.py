"""visprior's own hand-off format, for every model (also those llava-hf cannot express), and its Lightning checkpoints.

Folder layout (each part a plain HF folder, usable on its own; safetensors only):

```
DIR/visprior.json          {"format": "visprior-vlm", "version": 1, "vision_tower": {feature_layer, select, image_size},
                            "connector": {name, num_tokens, options}, "language_model": {add_image_token, attn_implementation}}
DIR/language_model/        the causal LM (save_pretrained) and its tokenizer
DIR/vision_tower/          the HF vision model and its image processor   (absent for a text-only model)
DIR/connector.safetensors  the connector's state dict                    (absent for a text-only model)
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PosixPath, WindowsPath
from typing import Any

import torch

from visprior.checkpoints.common import Layout, architecture, load_config, read_json, tower_config, tower_keys
from visprior.checkpoints.weights import CheckpointFormatError, read_weight_file, read_weights
from visprior.models.connectors import ConnectorSpec
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.models.visual_words import VisualWordsSpec
from visprior.models.vlm import VisionLanguageModel, VLMSpec
from visprior.stages.init_from import InitFrom

MANIFEST = "visprior.json"
FORMAT_NAME, FORMAT_VERSION = "visprior-vlm", 1


class VispriorLayout(Layout):
    format = "visprior"
    description = "visprior export folder (visprior.json, language_model/, vision_tower/, connector.safetensors)"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.manifest = read_json(self.path / MANIFEST, "the visprior export manifest")
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("version", 0) > FORMAT_VERSION:
            raise CheckpointFormatError(f"{self.path / MANIFEST}: format {self.manifest.get('format')!r} version "
                                        f"{self.manifest.get('version')}; this visprior reads {FORMAT_NAME} <= {FORMAT_VERSION}")  # fmt: skip

    def spec(self) -> VLMSpec:
        lm_dir = self.path / "language_model"
        lm_opts = self.manifest.get("language_model", {})
        language = LanguageModelSpec(config=architecture(load_config(lm_dir)), tokenizer=str(lm_dir), **lm_opts)
        if self.manifest.get("vision_tower") is None:
            return VLMSpec(language)
        tower = VisionTowerSpec(
            config=architecture(tower_config(self.path / "vision_tower")), **self.manifest["vision_tower"]
        )
        return VLMSpec(language, tower, ConnectorSpec(**self.manifest["connector"]))

    def state(self) -> dict[str, torch.Tensor]:
        out = {"language_model." + k: v for k, v in read_weights(self.path / "language_model").items()}
        if self.manifest.get("vision_tower") is not None:
            out.update(tower_keys(read_weights(self.path / "vision_tower")))
            out.update({"connector." + k: v for k, v in read_weight_file(self.path / "connector.safetensors").items()})
        return out

    def image_processor(self) -> str | None:
        folder = self.path / "vision_tower"
        return str(folder) if (folder / "preprocessor_config.json").is_file() else None


def save_visprior(model: VisionLanguageModel, out: Path) -> None:
    """Write `model` in visprior's own format (see the module docstring)."""
    from safetensors.torch import save_file

    lm_dir = out / "language_model"
    model.language_model.save_pretrained(lm_dir)
    model.tokenizer.save_pretrained(lm_dir)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "language_model": {"attn_implementation": model.language_model.config._attn_implementation or "sdpa"},
        "vision_tower": None,
        "connector": None,
    }
    tower = model.vision_tower
    if tower is not None:
        tower.model.save_pretrained(out / "vision_tower")
        tower.image_transform.processor.save_pretrained(out / "vision_tower")
        state = {k: v.detach().contiguous() for k, v in model.connector.state_dict().items()}
        save_file(state, str(out / "connector.safetensors"))
        manifest["vision_tower"] = {"feature_layer": tower.feature_layer, "select": tower.select,
                                    "image_size": tower.image_size if tower.image_size != tower.model.config.image_size else None}  # fmt: skip
        manifest["connector"] = connector_spec(model)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def connector_spec(model: VisionLanguageModel) -> dict[str, Any]:
    """The `ConnectorSpec` that rebuilds `model.connector` (name, token count and options, read off the module)."""
    from visprior.models.connectors import CONNECTORS

    conn = model.connector
    name = next(n for n, cls in CONNECTORS.items() if type(conn) is cls)
    options: dict[str, Any] = {}
    if name == "avg_pool":
        options["projector"] = "linear" if isinstance(conn.proj, torch.nn.Linear) else "mlp2x_gelu"
    elif name == "attention_pool":
        options["num_heads"] = conn.attn.num_heads
    elif name == "c_abstractor":
        options["depth"] = len(conn.stage1)
        options["hidden_dim"] = conn.stem.out_channels
    num_tokens = conn.num_tokens if conn.num_tokens != model.vision_tower.num_tokens else None
    return {"name": name, "num_tokens": num_tokens, "options": options}


# ---------------------------------------------------------------------------------------------- Lightning checkpoints

# Classes a VLM stage's hyper-parameters may hold; loading stays `weights_only=True` with these allow-listed.
SAFE_GLOBALS = [
    VLMSpec, LanguageModelSpec, VisionTowerSpec, ConnectorSpec, VisualWordsSpec, InitFrom, PosixPath, WindowsPath
]  # fmt: skip


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A `.ckpt` file as is; a run directory -> its `last.ckpt` (searched under `checkpoints/` and `run/checkpoints/`)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p / "checkpoints" / "last.ckpt", p / "run" / "checkpoints" / "last.ckpt", p / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{p}: not a checkpoint file, and no checkpoints/last.ckpt under it")


def spec_from_hparams(hparams: dict) -> VLMSpec:
    """The `VLMSpec` a VLM stage saved in its hyper-parameters (plain dicts or, in old checkpoints, the dataclasses)."""
    spec = hparams.get("spec")
    if isinstance(spec, VLMSpec):
        return spec
    src = spec if isinstance(spec, dict) else hparams
    if "language_model" not in src:
        raise ValueError("checkpoint hyper-parameters hold no VLM spec (is this a VLM stage's checkpoint?)")

    def as_spec(cls, value):
        return value if value is None or isinstance(value, cls) else cls(**value)

    tower = src.get("vision_tower")
    return VLMSpec(
        as_spec(LanguageModelSpec, src["language_model"]),
        as_spec(VisionTowerSpec, tower),
        as_spec(ConnectorSpec, src.get("connector")) if tower is not None else None,
        as_spec(VisualWordsSpec, src.get("visual_words")) if tower is not None else None,  # vm_head (PIF reads it)
    )


class LightningLayout(Layout):
    format = "lightning"
    description = "visprior Lightning checkpoint (.ckpt, or a run folder with checkpoints/last.ckpt)"

    def __init__(self, path: str | Path, trusted: bool = False) -> None:
        super().__init__(resolve_checkpoint(path))
        self.trusted = trusted
        self._ckpt: dict[str, Any] | None = None

    def checkpoint(self) -> dict[str, Any]:
        if self._ckpt is None:
            from visprior.training.checkpointing import safe_load

            if self.trusted:
                self._ckpt = torch.load(self.path, map_location="cpu", weights_only=False)
            else:
                self._ckpt = safe_load(self.path, map_location="cpu", safe_globals=SAFE_GLOBALS)
        return self._ckpt

    def spec(self) -> VLMSpec:
        return spec_from_hparams(self.checkpoint().get("hyper_parameters", {}))

    def state(self) -> dict[str, torch.Tensor]:
        return {k[len("model.") :]: v for k, v in self.checkpoint()["state_dict"].items() if k.startswith("model.")}
