"""What every checkpoint layout shares: the `Layout` interface, config and key translation, and the feature-selection and
projector vocabularies of LLaVA-family checkpoints mapped onto visprior's towers and connectors."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from visprior.checkpoints.weights import CheckpointFormatError
from visprior.models.connectors import ConnectorSpec
from visprior.models.vlm import VLMSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
TOWERS_WITH_CLS = ("clip_vision_model", "vit")
FULL_DUAL_ENCODERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
_NOT_ARCHITECTURE = {"architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "auto_map",
                     "_commit_hash", "quantization_config"}  # fmt: skip


class Layout(ABC):
    """A checkpoint holding a whole VLM, opened but not read: the model its configs describe, and its weights on demand."""

    format: str = ""
    description: str = ""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.notes: list[str] = []

    @abstractmethod
    def spec(self) -> VLMSpec:
        """The architecture (configs, tokenizer folder, tower layer, connector), as plain specs; no weights are read."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Every weight, named as in `VisionLanguageModel.state_dict()`."""

    def image_processor(self) -> str | None:
        """A folder whose `preprocessor_config.json` gives the image preprocessing, if the checkpoint ships one."""
        return None


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointFormatError(f"{path.parent}: no {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointFormatError(f"{path}: not valid JSON ({err})") from None


def architecture(config: PretrainedConfig | dict[str, Any]) -> dict[str, Any]:
    """A config as the plain dict `LanguageModelSpec.config` / `VisionTowerSpec.config` take: shapes only, no dtype or paths.

    The saved dtype is dropped on purpose: visprior builds fp32 parameters and lets the trainer decide the compute precision.
    """
    d = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    return {k: v for k, v in d.items() if k not in _NOT_ARCHITECTURE and not k.startswith("_")}


def load_config(folder: Path) -> PretrainedConfig:
    read_json(folder / "config.json", "the model's config")
    return AutoConfig.from_pretrained(str(folder), local_files_only=True)


def tower_config(folder: Path) -> PretrainedConfig:
    """The vision config of a tower folder; a full CLIP / SigLIP dual encoder gives its vision half."""
    config = load_config(folder)
    if config.model_type in FULL_DUAL_ENCODERS:
        config = config.vision_config
    return config


def tower_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A vision model's tensors (keys after `prefix`) under `vision_tower.model.*`: both transformers 4's `vision_model.`
    nesting and transformers 5's flat names; the text half and projections of a full dual encoder are left out."""
    dual = any(
        k[len(prefix) :].startswith(("text_model.", "text_projection", "logit_scale"))
        for k in state
        if k.startswith(prefix)
    )
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if dual and not rest.startswith("vision_model."):
            continue
        out["vision_tower.model." + rest.removeprefix("vision_model.")] = value
    return out


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_folder(*candidates: Path, where: str) -> str:
    for folder in candidates:
        if has_tokenizer(folder):
            return str(folder)
    raise CheckpointFormatError(
        f"{where}: no tokenizer (looked for {', '.join(TOKENIZER_FILES)} in {', '.join(map(str, candidates))})"
    )


def select_for(tower_type: str, drops_first_token: bool, where: str) -> str:
    """visprior's `VisionTowerSpec.select` for a checkpoint that does / does not drop the first token of the layer it reads.

    LLaVA's `patch` / llava-hf's `default` drop token 0, meant to be CLIP's CLS; `cls_patch` / `full` keep every token.
    """
    if tower_type in TOWERS_WITH_CLS:
        return "patch" if drops_first_token else "cls_patch"
    if drops_first_token:
        raise CheckpointFormatError(
            f"{where}: drops the first token of a {tower_type} tower, which has no CLS token, so it drops a real patch; "
            "visprior's towers keep every patch of a tower without CLS and cannot reproduce that"
        )
    return "patch"


def drops_first_token(tower_type: str, select: str) -> bool:
    """The inverse of `select_for`: does our `select` correspond to dropping token 0 of the layer?"""
    return tower_type in TOWERS_WITH_CLS and select == "patch"


PROJECTORS = {"linear": "linear", "mlp2x_gelu": "mlp2x_gelu"}


def connector_for(projector_type: str, where: str) -> ConnectorSpec:
    """Our connector for a LLaVA / VILA `mm_projector_type` (one token per patch)."""
    if projector_type not in PROJECTORS:
        raise CheckpointFormatError(
            f"{where}: projector type {projector_type!r} has no visprior connector; supported: {sorted(PROJECTORS)}"
        )
    return ConnectorSpec(PROJECTORS[projector_type])


def sequential_projector(state: dict[str, torch.Tensor], prefix: str, kind: str, where: str) -> dict[str, torch.Tensor]:
    """LLaVA's / VILA's projector (`nn.Linear`, or `nn.Sequential(Linear, GELU, Linear)`) under `connector.proj.*`."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise CheckpointFormatError(f"{where}: no projector weights under {prefix!r}")
    if kind == "linear":
        names = {"weight", "bias"}
        if set(sub) - names:
            raise CheckpointFormatError(f"{where}: a linear projector has {sorted(sub)} under {prefix!r}")
        return {f"connector.proj.{k}": v for k, v in sub.items()}
    if set(sub) - {"0.weight", "0.bias", "2.weight", "2.bias"}:
        raise CheckpointFormatError(f"{where}: an mlp2x_gelu projector has {sorted(sub)} under {prefix!r}")
    return {f"connector.proj.{k}": v for k, v in sub.items()}
