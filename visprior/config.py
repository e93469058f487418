"""Recipe YAML composition: `_base_:` fragment lists, expanded into repeated `--config` arguments.

jsonargparse has no include key, and LightningCLI merges repeated `--config` in order, so a file's bases (depth first, relative
to the file) are passed before the file itself. The `_base_` key is removed from what jsonargparse sees; every other key goes
through jsonargparse's own validation, so an unknown key or a wrong type still fails before any work starts, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "_base_"


class RecipeError(ValueError):
    """A recipe file that cannot be composed (missing fragment, cycle, malformed `_base_`)."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _bases(path: Path, data: dict[str, Any]) -> list[Path]:
    raw = data.get(BASE_KEY, [])
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(b, str) for b in raw):
        raise RecipeError(f"{path}: '{BASE_KEY}' must be a path or a list of paths relative to the file")
    return [(path.parent / b).resolve() for b in raw]


def expand_config(path: str | Path, _stack: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The files a config stands for, bases first, each with its content minus `_base_`."""
    p = Path(path).resolve()
    if p in _stack:
        cycle = " -> ".join(str(s) for s in (*_stack, p))
        raise RecipeError(f"'{BASE_KEY}' cycle: {cycle}")
    data = load_yaml(p)
    out: list[tuple[Path, dict[str, Any]]] = []
    for base in _bases(p, data):
        if not base.is_file():
            raise RecipeError(f"{p}: '{BASE_KEY}' fragment not found: {base}")
        out.extend(expand_config(base, (*_stack, p)))
    out.append((p, {k: v for k, v in data.items() if k != BASE_KEY}))
    return out


def expand_config_args(argv: list[str]) -> list[str]:
    """Rewrite `--config X.yaml` / `-c X.yaml` / `--config=X.yaml` into one `--config <yaml>` per fragment, bases first."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if not value.endswith((".yaml", ".yml")) or not Path(value).is_file():
            out += ["--config", value]  # let jsonargparse report it (a YAML string, or a missing file it names)
            continue
        for path, content in expand_config(value):
            if BASE_KEY not in load_yaml(path):
                out += ["--config", str(path)]  # a plain file: jsonargparse can name it in its messages
            elif content:
                out += ["--config", yaml.safe_dump(content, sort_keys=False)]
    return out
