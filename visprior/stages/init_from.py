"""Weights-only initialisation of named components from an earlier stage or a released model.

This is deliberately not resuming: it loads tensors into some components and nothing else (no optimizer, step or data
position). Sources are read without unpickling code: safetensors, or `torch.load(weights_only=True)` for Lightning `.ckpt`
and pickled `pytorch_model.bin` files. A source is
- a Lightning `.ckpt` (keys `model.<component>.<...>`, so a component is found by the name it has in the new stage), or a
  `.safetensors` / `.pt` state dict with the same keys;
- a whole-VLM folder `visprior.checkpoints` imports (llava-hf, original LLaVA, VILA, `visprior export`), read under the same
  `model.<component>.` names;
- an HF folder holding one component (a causal LM or a vision tower), loaded into that component.

`init_from: PATH` (a string) is the one-key form: every component of the model from that checkpoint, and, when the stage
names no `language_model` / `vision_tower` / `connector`, the architecture too (`resolve_model_specs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class InitFrom:
    """Load `components` of this stage's model from `path` (weights only)."""

    path: str
    """A Lightning `.ckpt`, a `.safetensors` / `.pt` state dict, a whole-VLM folder (llava-hf, LLaVA, VILA, visprior
    export) or an HF folder holding one component."""
    components: list[str] | None = None
    """Component names in this stage's model, e.g. `[language_model]` or `[vision_tower, connector]`; None: every
    component of the model that the source holds (the folder's own component for a single-component HF folder)."""
    prefix: str | None = None
    """Key prefix of the component in the source; default `model.<component>.` for checkpoints, none for HF folders."""
    vision_tower: str | None = None
    """Local tower folder for an original LLaVA checkpoint whose `mm_vision_tower` is a hub id."""


def as_init_list(init_from: str | os.PathLike | InitFrom | dict | list | None) -> list[InitFrom]:
    """`init_from` as YAML gives it (a path, one spec, or a list of specs / dicts) as a list of `InitFrom`."""
    if init_from is None:
        return []
    if isinstance(init_from, str | os.PathLike):
        return [InitFrom(str(init_from))]
    items = init_from if isinstance(init_from, list | tuple) else [init_from]
    return [i if isinstance(i, InitFrom) else InitFrom(i) if isinstance(i, str) else InitFrom(**i) for i in items]


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a torch file loaded with `weights_only=True`."""
    if not path.is_file():
        raise FileNotFoundError(f"init_from: checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def read_source(spec: InitFrom) -> tuple[dict[str, torch.Tensor], str | None]:
    """`(state, single)`: `single` names the component of a one-component HF folder (keys are its own), else None (keys
    carry `model.<component>.`)."""
    path = Path(spec.path)
    if path.is_dir():
        from visprior.checkpoints.load import component_kind, component_weights

        state, whole = component_weights(path, spec.vision_tower)
        return state, None if whole else component_kind(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from: checkpoint not found: {path}")
    return load_state_dict_file(path), None


def load_component(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, where: str) -> int:
    """Load the keys under `prefix` into `module`: every weight (tied copies excepted), nothing left over.

    Embedding matrices with fewer rows than the module's (an `<image>` token added on import) are padded with the mean row.
    """
    from visprior.checkpoints.weights import grow_vocabulary, tied_keys, vocabulary_keys

    sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise KeyError(f"init_from: no keys with prefix {prefix!r} in {where}")
    grow_vocabulary(sub, module, vocabulary_keys(module))
    target = module.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in sub.items()
        if k in target and v.shape != target[k].shape
    ]
    if wrong:
        raise KeyError(f"init_from {where} ({prefix!r}): shapes differ from this stage's model: {wrong[:3]}")
    missing, unexpected = module.load_state_dict(sub, strict=False)
    missing = [k for k in missing if k not in tied_keys(module)]
    if missing or unexpected:
        raise KeyError(f"init_from {where} ({prefix!r}): missing {missing[:5]}, unexpected {unexpected[:5]}")
    return sum(v.numel() for v in sub.values())


def apply_init_from(model: nn.Module, specs: list[InitFrom]) -> None:
    """Apply each `InitFrom` in order (later ones win)."""
    for spec in as_init_list(specs):
        state, single = read_source(spec)
        components = spec.components
        if components is None:
            held = {k.split(".", 2)[1] for k in state if k.startswith("model.") and k.count(".") >= 2}
            components = [single] if single else [name for name, _ in model.named_children() if name in held]
            if not components:
                raise ValueError(
                    f"init_from: {spec.path} holds none of this model's components {[n for n, _ in model.named_children()]}"
                )
        if single and len(components) != 1 and spec.prefix is None:
            raise ValueError(f"init_from: an HF folder ({spec.path}) holds one component, got {components}")
        for comp in components:
            try:
                module = model.get_submodule(comp)
            except AttributeError as e:
                raise ValueError(f"init_from: unknown component {comp!r} in {type(model).__name__}") from e
            prefix = spec.prefix if spec.prefix is not None else ("" if single else f"model.{comp}.")
            load_component(module, state, prefix, str(spec.path))


def resolve_model_specs(
    language_model: Any, vision_tower: Any, connector: Any, init_from: Any, needs_tower: bool = True
) -> tuple[Any, Any, Any, list[InitFrom]]:
    """Fill the model specs a stage leaves out from the checkpoint `init_from` names (configs only, no weights read).

    `InstructionTuning(init_from="path/to/llava-1.5-7b-hf")` alone builds the released architecture and loads its weights.
    Specs the stage gives win (e.g. a fresh connector: give `connector` and list the other components in `init_from`);
    the checkpoint is consulted only when `language_model` or `vision_tower` is missing.
    """
    inits = as_init_list(init_from)
    if language_model is not None and (vision_tower is not None or not needs_tower):
        return language_model, vision_tower, connector, inits
    source = next((i for i in inits if Path(i.path).is_dir() or Path(i.path).suffix == ".ckpt"), None)
    if source is None:
        if language_model is None or (needs_tower and vision_tower is None):
            raise ValueError("the stage needs `language_model` and `vision_tower` specs, or `init_from: PATH` naming a "
                             "whole checkpoint (llava-hf, LLaVA, VILA, visprior export, or a VLM stage's .ckpt) to take them from")  # fmt: skip
        return language_model, vision_tower, connector, inits
    from visprior.checkpoints.load import open_checkpoint

    spec = open_checkpoint(source.path, source.vision_tower).spec()
    language_model = language_model if language_model is not None else spec.language_model
    vision_tower = vision_tower if vision_tower is not None else spec.vision_tower
    connector = connector if connector is not None else spec.connector
    if needs_tower and vision_tower is None:
        raise ValueError(f"init_from {source.path} is a text-only checkpoint: give the stage a `vision_tower` spec")
    return language_model, vision_tower, connector, inits
