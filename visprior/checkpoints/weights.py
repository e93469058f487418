"""Reading weights out of checkpoint folders, and loading them into a model, without running pickled code.

Released checkpoints come as one or several safetensors files, or (older releases) as pickled `pytorch_model*.bin` files,
optionally with an index naming the shards. Pickles are read with `torch.load(weights_only=True)`, which refuses anything but
tensors and plain containers: a checkpoint that needs more is refused with a message, never unpickled.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointFormatError(ValueError):
    """A checkpoint visprior cannot read as it is; the message names the file or folder, the key, and what to do."""


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of an HF-style folder: the shards an index names, else the single file, else every safetensors."""
    folder = Path(folder)
    for index in (SAFETENSORS_INDEX, BIN_INDEX):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing or not files:
                raise CheckpointFormatError(f"{folder / index} names shards that are not there: {missing or 'none'}")
            return files
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    raise CheckpointFormatError(
        f"{folder}: no weights found (looked for {', '.join(SINGLE_FILES)}, {SAFETENSORS_INDEX}, {BIN_INDEX}, *.safetensors)"
    )


def torch_load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A pickled state dict read with `weights_only=True` (memory-mapped when the file allows it)."""
    path = Path(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # the legacy (pre-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointFormatError(
            f"{path}: holds pickled objects other than tensors; visprior reads pickles only with "
            f"torch.load(weights_only=True), which refused it ({first}). Convert the file to safetensors with a tool you trust."
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFormatError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """One safetensors or pickled weight file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch_load_tensors(path)


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF-style folder, under the names the files use."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        state.update(read_weight_file(f))
    return state


def tied_keys(model: nn.Module) -> set[str]:
    """Parameter names (relative to `model`) that share storage with another one and may be absent from a file."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
            tied.add(seen[id(p)])
        else:
            seen[id(p)] = name
    return tied


def vocabulary_keys(model: nn.Module, prefix: str = "") -> set[str]:
    """State-dict names of the input and output embedding matrices of every HF model inside `model`."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        getters = [getattr(module, g, None) for g in ("get_input_embeddings", "get_output_embeddings")]
        if not all(callable(g) for g in getters) or not hasattr(module, "config"):
            continue
        for get in getters:
            emb = get()
            if emb is None:
                continue
            for sub, m in module.named_modules():
                if m is emb:
                    keys.add(f"{prefix}{name + '.' if name else ''}{sub}.weight")
    return keys


def grow_vocabulary(state: dict[str, torch.Tensor], model: nn.Module, keys: Iterable[str]) -> list[str]:
    """Pad embedding matrices that have fewer rows than the model's (a token such as `<image>` was added on import).

    The new rows get the mean of the loaded ones (LLaVA's own choice for added tokens); returns the keys grown.
    """
    target = model.state_dict()
    grown = []
    for key in keys:
        have, want = state.get(key), target.get(key)
        if have is None or want is None or have.shape == want.shape:
            continue
        if have.dim() != 2 or have.shape[1] != want.shape[1] or have.shape[0] > want.shape[0]:
            continue
        rows = torch.empty(want.shape, dtype=have.dtype)
        rows[: have.shape[0]] = have
        rows[have.shape[0] :] = have.float().mean(0).to(have.dtype)
        state[key] = rows
        grown.append(key)
    return grown


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load `state` into `model` exactly: every weight present (tied copies excepted), nothing left over, shapes equal."""
    state = dict(state)
    grow_vocabulary(state, model, vocabulary_keys(model))
    target = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in state.items()
             if k in target and v.shape != target[k].shape]  # fmt: skip
    if wrong:
        raise CheckpointFormatError(f"{where}: tensor shapes differ from the model built from its config: {wrong[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_keys(model)]
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{where}: weights do not match the model built from its config: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
