"""Fail before the first step: checks on paths and settings that the CLI, the data modules and the model loaders call
while building a run (`ckpt_path`, `data.sources[i].path`, `data.train`/`data.val`, a language model folder's code).

A missing shard folder or a truncated checkpoint found hours into a run, after the model was built and the loader
workers started, costs the allocation; these checks cost milliseconds. Every error names the config key, the value,
and what was expected, so the fix is obvious from the message alone. Unknown keys and wrong types are left to
jsonargparse, which already rejects them with the key's name.
"""

from __future__ import annotations

import json
import os
import zipfile
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


def check_remote_code_allowed(folder: str | os.PathLike, key: str, trust_remote_code: bool) -> None:
    """A model folder that needs its own code loads only with ``trust_remote_code`` set; refused before transformers,
    which would otherwise stop to ask on the terminal (``input()`` with a 15 s alarm) or fail with a multi-line error.

    The code is needed when config.json has ``auto_map`` and a ``model_type`` transformers does not implement; a folder
    of a type transformers implements that also ships code (Phi-3 folders keep an `auto_map` for older transformers)
    loads transformers' own classes and runs none of it.
    """
    config_path = check_path_exists(folder, key, "hf_model") / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{key}: {config_path} is not valid JSON ({err})") from err
    if "auto_map" in config and not trust_remote_code and not _known_model_type(config.get("model_type")):
        raise PermissionError(
            f"{key}: {str(folder)!r} needs its own Python code (config.json has auto_map and model_type "
            f"{config.get('model_type')!r}, which transformers does not implement); it will not run unless the config "
            f"sets {key}.trust_remote_code: true"
        )


def _known_model_type(model_type: Any) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING
