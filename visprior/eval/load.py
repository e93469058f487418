"""Load a `VisionLanguageModel` for evaluation from any checkpoint visprior reads.

A VLM stage's Lightning checkpoint (or its run directory, resolved to `checkpoints/last.ckpt`) is rebuilt from the `VLMSpec`
in its hyper-parameters; a released or exported folder (llava-hf, original LLaVA, VILA, visprior's own) is imported by
`visprior.checkpoints`. Either way no stage, optimizer or `init_from` runs, and nothing is unpickled beyond tensors.
"""

from __future__ import annotations

import os

import torch

from visprior.checkpoints.load import load_pretrained
from visprior.checkpoints.native import SAFE_GLOBALS, resolve_checkpoint
from visprior.checkpoints.weights import CheckpointFormatError
from visprior.models.vlm import VisionLanguageModel

__all__ = ["SAFE_GLOBALS", "load_vlm", "resolve_checkpoint"]


def load_vlm(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    trusted: bool = False,
    vision_tower: str | os.PathLike | None = None,
) -> VisionLanguageModel:
    """The model with its trained weights, in eval mode; every model weight must be in the checkpoint.

    Lightning checkpoints load with `weights_only=True` (the spec classes allow-listed); `trusted=True` unpickles anything.
    `vision_tower` is the local tower folder of an original LLaVA checkpoint that names its tower by hub id.
    """
    try:
        model = load_pretrained(path, vision_tower=vision_tower, trusted=trusted)
    except CheckpointFormatError as err:
        if "missing" in str(err):  # keep the old, grep-able wording for an incomplete Lightning checkpoint
            raise ValueError(f"{path} lacks model weights: {err}") from err
        raise
    return model.to(map_location)
