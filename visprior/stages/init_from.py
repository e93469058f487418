"""Weights-only initialisation of named components from an earlier stage or a released model.

This is deliberately not resuming: it loads tensors into some components and nothing else (no optimizer, step or data
position). Sources are read without unpickling code: safetensors, or `torch.load(weights_only=True)` for Lightning `.ckpt`
files. A Lightning checkpoint's keys are `model.<component>.<...>`, so a component is found in it by the same name it
has in the new stage (override with `prefix`); an HF folder holds one component's own state dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class InitFrom:
    """Load `components` of this stage's model from `path` (weights only)."""

    path: str
    """A Lightning `.ckpt`, a `.safetensors` / `.pt` state dict, or an HF model folder (`*.safetensors` inside)."""
    components: list[str]
    """Component names in this stage's model, e.g. `[language_model]` or `[vision_tower, connector]`."""
    prefix: str | None = None
    """Key prefix of the component in the source; default `model.<component>.` for checkpoints, none for HF folders."""


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, a folder of them, or a torch file loaded with `weights_only=True`."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"init_from: no *.safetensors in HF folder {path}")
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"init_from: checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def _tied_keys(module: nn.Module) -> set[str]:
    """Keys HF omits from saved files because they share storage (only when the config really ties them)."""
    if not getattr(getattr(module, "config", None), "tie_word_embeddings", False):
        return set()
    tied = getattr(module, "_tied_weights_keys", None) or {}
    return set(tied) if isinstance(tied, dict | list | set) else set()


def load_component(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, where: str) -> int:
    """Load the keys under `prefix` into `module`; missing keys are an error unless they are tied weights."""
    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise KeyError(f"init_from: no keys with prefix {prefix!r} in {where}")
    missing, unexpected = module.load_state_dict(sub, strict=False)
    missing = [k for k in missing if k not in _tied_keys(module)]
    if missing or unexpected:
        raise KeyError(f"init_from {where} ({prefix!r}): missing {missing[:5]}, unexpected {unexpected[:5]}")
    return sum(v.numel() for v in sub.values())


def apply_init_from(model: nn.Module, specs: list[InitFrom]) -> None:
    """Apply each `InitFrom` in order (later ones win)."""
    for spec in specs:
        path = Path(spec.path)
        state = load_state_dict_file(path)
        folder = path.is_dir()
        if folder and len(spec.components) != 1 and spec.prefix is None:
            raise ValueError(f"init_from: an HF folder ({path}) holds one component, got {spec.components}")
        for comp in spec.components:
            try:
                module = model.get_submodule(comp)
            except AttributeError as e:
                raise ValueError(f"init_from: unknown component {comp!r} in {type(model).__name__}") from e
            prefix = spec.prefix if spec.prefix is not None else ("" if folder else f"model.{comp}.")
            load_component(module, state, prefix, str(path))
