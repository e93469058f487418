"""Fail before the first step: checks on paths and settings that the CLI and the stages call while building a run.

A missing shard folder or a truncated checkpoint found hours into a run, after the model was built and the loader
workers started, costs the allocation; these checks cost milliseconds. Every error names the config key, the value,
and what was expected, so the fix is obvious from the message alone. Unknown keys and wrong types are left to
jsonargparse, which already rejects them with the key's name.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

Expect = Literal["any", "file", "dir", "dataset", "hf_model", "checkpoint"]

_WHAT = {
    "any": "an existing file or folder",
    "file": "an existing file",
    "dir": "an existing folder",
    "dataset": "a dataset folder containing manifest.json (written by `visprior data ...`)",
    "hf_model": "a Hugging Face model folder containing config.json",
    "checkpoint": "a Lightning .ckpt file (or a distributed checkpoint folder)",
}


def check_path_exists(path: str | os.PathLike | None, key: str, expect: Expect = "any") -> Path:
    """Return ``path`` as a Path, or raise ``FileNotFoundError`` naming ``key``, the path and what was expected."""
    if path is None or str(path) == "":
        raise FileNotFoundError(f"{key}: no path given; expected {_WHAT[expect]}")
    p = Path(path).expanduser()
    problem = None
    if not p.exists():
        problem = "does not exist"
    elif expect == "file" and not p.is_file():
        problem = "is not a file"
    elif expect in ("dir", "dataset", "hf_model") and not p.is_dir():
        problem = "is not a folder"
    elif expect == "dataset" and not (p / "manifest.json").is_file():
        problem = "has no manifest.json"
    elif expect == "hf_model" and not (p / "config.json").is_file():
        problem = "has no config.json"
    if problem:
        raise FileNotFoundError(f"{key}: {str(path)!r} {problem}; expected {_WHAT[expect]}")
    return p


def check_checkpoint(path: str | os.PathLike | None, key: str = "ckpt_path") -> Path:
    """A resumable checkpoint: exists, and if a file, is a complete torch zip archive (a truncated one is not)."""
    p = check_path_exists(path, key, "checkpoint")
    if p.is_dir():
        if not any(p.iterdir()):
            raise FileNotFoundError(f"{key}: {str(path)!r} is an empty folder; expected {_WHAT['checkpoint']}")
        return p
    if p.stat().st_size == 0 or not zipfile.is_zipfile(p):
        raise ValueError(
            f"{key}: {str(path)!r} is not a complete checkpoint (empty, truncated or not written by torch.save); "
            f"expected {_WHAT['checkpoint']}. A partial write would sit at a '.tmp-<pid>' name, not here."
        )
    return p


def check_trust_remote_code(config: Mapping[str, Any], key: str) -> bool:
    """``trust_remote_code`` is honoured only when the config sets it to the boolean ``true``.

    Strings such as ``"false"`` (truthy in Python) or numbers are refused rather than guessed at.
    """
    value = config.get("trust_remote_code", False)
    if not isinstance(value, bool):
        raise TypeError(f"{key}.trust_remote_code: expected true or false, got {value!r} ({type(value).__name__})")
    return value


def check_remote_code_allowed(folder: str | os.PathLike, key: str, trust_remote_code: bool) -> None:
    """A model folder that ships its own code (``auto_map`` in config.json) loads only with trust_remote_code set."""
    config_path = check_path_exists(folder, key, "hf_model") / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{key}: {config_path} is not valid JSON ({err})") from err
    if "auto_map" in config and not trust_remote_code:
        raise PermissionError(
            f"{key}: {str(folder)!r} needs its own Python code (config.json has auto_map); it will not run unless the "
            f"config sets {key}.trust_remote_code: true"
        )


def check_image_size(
    got: int | tuple[int, int], expected: int, patch_size: int | None = None, key: str = "image_size"
) -> None:
    """The image size fed to a vision tower must be the size it was built for (position embeddings are fixed)."""
    hw = (got, got) if isinstance(got, int) else tuple(got)
    if hw != (expected, expected):
        patches = f", patch size {patch_size}" if patch_size else ""
        raise ValueError(f"{key}: the vision tower takes {expected}x{expected} images{patches}; got {hw[0]}x{hw[1]}")
    if patch_size and expected % patch_size:
        raise ValueError(f"{key}: image size {expected} is not a multiple of the tower's patch size {patch_size}")
