"""Load a `VisionLanguageModel` for evaluation from a Lightning checkpoint or a run directory.

A VLM stage saves its `VLMSpec` in the checkpoint's hyper-parameters (`save_hyperparameters`), so the model is rebuilt from
the spec and the `model.*` weights are loaded into it; no stage, optimizer or `init_from` is re-run. A run directory
resolves to its `checkpoints/last.ckpt` (the layout the trainer fragments write: `<save_dir>/<name>/run/checkpoints/`).
"""

from __future__ import annotations

import os
from pathlib import Path, PosixPath, WindowsPath

import torch

from visprior.models.connectors import ConnectorSpec
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.models.vlm import VisionLanguageModel, VLMSpec, build_vlm
from visprior.stages.init_from import InitFrom
from visprior.training.checkpointing import safe_load


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A `.ckpt` file as is; a run directory -> its `last.ckpt` (searched under `checkpoints/` and `run/checkpoints/`)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p / "checkpoints" / "last.ckpt", p / "run" / "checkpoints" / "last.ckpt", p / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{p}: not a checkpoint file, and no checkpoints/last.ckpt under it")


def _spec(hparams: dict) -> VLMSpec:
    spec = hparams.get("spec")
    if isinstance(spec, VLMSpec):
        return spec
    src = spec if isinstance(spec, dict) else hparams
    if "language_model" not in src:
        raise ValueError("checkpoint hyper-parameters hold no VLM spec (is this a VLM stage's checkpoint?)")

    def as_spec(cls, value):
        return value if value is None or isinstance(value, cls) else cls(**value)

    return VLMSpec(
        as_spec(LanguageModelSpec, src["language_model"]),
        as_spec(VisionTowerSpec, src.get("vision_tower")),
        as_spec(ConnectorSpec, src.get("connector")) if src.get("vision_tower") is not None else None,
    )


# Classes a VLM stage's hyper-parameters may hold; loading stays `weights_only=True` with these allow-listed.
SAFE_GLOBALS = [VLMSpec, LanguageModelSpec, VisionTowerSpec, ConnectorSpec, InitFrom, PosixPath, WindowsPath]


def load_vlm(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", trusted: bool = False
) -> VisionLanguageModel:
    """The stage's `model` with its trained weights, in eval mode; every model weight must be in the checkpoint.

    Checkpoints load with `weights_only=True` (the spec classes allow-listed); `trusted=True` unpickles anything.
    """
    ckpt_path = resolve_checkpoint(path)
    if trusted:
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=False)
    else:
        ckpt = safe_load(ckpt_path, map_location=map_location, safe_globals=SAFE_GLOBALS)
    model = build_vlm(_spec(ckpt.get("hyper_parameters", {})))
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{ckpt_path} lacks {len(missing)} model weights, e.g. {missing[:3]}")
    return model.eval()
