"""Recipe YAML composition: `_base_:` fragment lists, fragment references and paths that mean the same from any folder.

jsonargparse has no include key, and LightningCLI merges repeated `--config` in order, so a file's bases (depth first,
relative to the file) are passed before the file itself. Four rules keep that composition safe:

- **Each fragment is applied once.** When several `--config` files share a base (a stage and a trainer fragment both built
  on some file), the base is applied where it first appears and never again, so a later file cannot silently bring an
  earlier fragment's settings back over the stage's own.
- **Trainer fragments hold hardware only.** A file inside a `trainers/` folder may set only `trainer.{accelerator, devices,
  num_nodes, strategy, precision}` and may not have `_base_`; anything else (run name, steps, callbacks) is an error naming
  the file and the key. So adding `--config recipes/_base/trainers/fsdp-bf16.yaml` to a stage changes the hardware and
  nothing else, and the run directory always comes from the stage (or the recipe arm).
- **Relative paths are relative to the project root**, the folder that holds `recipes/` (for a file outside any `recipes/`
  tree: the file's own folder). Values of the path keys in `PATH_KEYS`, and any value starting with `./` or `../`, are made
  absolute before jsonargparse sees them, so `data/toyworld/pairs` means the same from every working directory.
- **A string ending in `.yaml` that names an existing file is a fragment reference** (`language_model:
  recipes/_base/models/toy-lm.yaml`): it is read, its own paths resolved against *its* root, and inlined, so
  `--print_config` shows the whole model spec that runs.

The `_base_` key is removed from what jsonargparse sees; every other key goes through jsonargparse's own validation, so an
unknown key or a wrong type still fails before any work starts. `fragment_of_key` says which file set a key, for errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "_base_"
TRAINER_FRAGMENT_DIR = "trainers"
HARDWARE_KEYS = frozenset({"accelerator", "devices", "num_nodes", "strategy", "precision"})
"""The only `trainer` keys a trainer fragment may set: where and in which precision a run executes, never what it is."""
PATH_KEYS = frozenset(
    {"path", "tokenizer", "train", "val", "save_dir", "dirpath", "default_root_dir", "mle_bench", "images", "root"}
    | {"checkpoint"}  # LM4VE's frozen_block.checkpoint (a LanguagePretraining .ckpt)
)
"""Keys whose relative string values are paths (sources, model folders, tokenizers, logger and checkpoint folders)."""
YAML_SUFFIXES = (".yaml", ".yml")


class RecipeError(ValueError):
    """A recipe file that cannot be composed (missing fragment, cycle, malformed `_base_`, a trainer key out of place)."""


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


def absolute(path: str | Path) -> Path:
    """An absolute, normalised path *without* following symlinks (a linked `recipes/` keeps its own project root)."""
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def project_root(path: str | Path) -> Path:
    """The folder that holds the `recipes/` tree `path` lives in; for a file outside any `recipes/`, its own folder."""
    p = absolute(path)
    for parent in p.parents:
        if parent.name == "recipes":
            return parent.parent
    return p.parent


def _is_relative_path(value: str) -> bool:
    return bool(value) and "://" not in value and not Path(value).expanduser().is_absolute()


def resolve_paths(content: Any, root: Path, key: str | None = None) -> Any:
    """`content` with path values made absolute against `root` and `.yaml` fragment references inlined."""
    if isinstance(content, dict):
        return {k: resolve_paths(v, root, k) for k, v in content.items()}
    if isinstance(content, list):
        return [resolve_paths(v, root, key) for v in content]
    if not isinstance(content, str):
        return content
    if content.endswith(YAML_SUFFIXES) and key != BASE_KEY:
        candidate = absolute(root / content) if _is_relative_path(content) else absolute(content)
        if candidate.is_file():
            return inline_fragment(candidate)
    if (key in PATH_KEYS or content.startswith(("./", "../"))) and _is_relative_path(content):
        return str(absolute(root / content))
    if content.startswith("~"):
        return str(Path(content).expanduser())
    return content


def inline_fragment(path: Path) -> dict[str, Any]:
    """A referenced fragment (a model spec, say), its paths resolved against its own project root."""
    data = load_yaml(path)
    if BASE_KEY in data:
        raise RecipeError(f"{path}: a fragment referenced as a value cannot have '{BASE_KEY}'")
    return resolve_paths(data, project_root(path))


def _bases(path: Path, data: dict[str, Any]) -> list[Path]:
    raw = data.get(BASE_KEY, [])
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(b, str) for b in raw):
        raise RecipeError(f"{path}: '{BASE_KEY}' must be a path or a list of paths relative to the file")
    return [absolute(path.parent / b) for b in raw]


def _flat_keys(content: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(content, dict) and content:
        for k, v in content.items():
            yield from _flat_keys(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1]


def check_trainer_fragment(path: Path, data: dict[str, Any]) -> None:
    """A file in a `trainers/` folder sets hardware keys only (see the module docstring)."""
    if path.parent.name != TRAINER_FRAGMENT_DIR:
        return
    if BASE_KEY in data:
        raise RecipeError(
            f"{path}: a trainer fragment may not have '{BASE_KEY}' (it would re-apply another fragment's run settings); "
            f"list every hardware key it needs instead"
        )
    for key in _flat_keys(data):
        top, _, rest = key.partition(".")
        name = rest.split(".", 1)[0]
        if top != "trainer" or name not in HARDWARE_KEYS:
            raise RecipeError(
                f"{path}: '{key}' is not a hardware key; a trainer fragment sets only trainer.{{"
                f"{', '.join(sorted(HARDWARE_KEYS))}}}. Run settings (name, steps, logging, callbacks) belong in the "
                f"stage YAML or on the command line"
            )


def expand_config(
    path: str | Path, _stack: tuple[Path, ...] = (), _applied: set[Path] | None = None
) -> list[tuple[Path, dict[str, Any]]]:
    """The files a config stands for, bases first, each once, each with its paths resolved and without `_base_`.

    `_applied` carries the files already applied by earlier `--config` arguments of the same command line: they are
    skipped here (a shared base is applied where it first appears).
    """
    p = absolute(path)
    if p in _stack:
        cycle = " -> ".join(str(s) for s in (*_stack, p))
        raise RecipeError(f"'{BASE_KEY}' cycle: {cycle}")
    applied = set() if _applied is None else _applied
    if p in applied:
        return []
    data = load_yaml(p)
    check_trainer_fragment(p, data)
    out: list[tuple[Path, dict[str, Any]]] = []
    for base in _bases(p, data):
        if not base.is_file():
            raise RecipeError(f"{p}: '{BASE_KEY}' fragment not found: {base}")
        out.extend(expand_config(base, (*_stack, p), applied))
    applied.add(p)
    content = {k: v for k, v in data.items() if k != BASE_KEY}
    out.append((p, resolve_paths(content, project_root(p))))
    return out


def config_values(argv: list[str]) -> Iterator[tuple[int, str | None, int]]:
    """(start index, `--config` value or None, number of argv items) for each item of a command line."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            yield i, argv[i + 1], 2
            i += 2
        elif arg.startswith("--config="):
            yield i, arg.split("=", 1)[1], 1
            i += 1
        else:
            yield i, None, 1
            i += 1


def expand_config_args(argv: list[str], fragments: list[tuple[Path, dict[str, Any]]] | None = None) -> list[str]:
    """Rewrite each `--config X.yaml` into one `--config <yaml>` per fragment, bases first, each fragment once.

    `fragments`, when given, receives every (file, resolved content) in the order applied, so errors can name the file
    that set a key (`fragment_of_key`).
    """
    out: list[str] = []
    applied: set[Path] = set()
    for i, value, _ in config_values(argv):
        if value is None:
            out.append(argv[i])
            continue
        if not value.endswith(YAML_SUFFIXES) or not Path(value).is_file():
            out += ["--config", value]  # let jsonargparse report it (a YAML string, or a missing file it names)
            continue
        for path, content in expand_config(value, _applied=applied):
            if fragments is not None:
                fragments.append((path, content))
            if content:
                out += ["--config", yaml.safe_dump(content, sort_keys=False)]
    return out


def fragment_of_key(fragments: list[tuple[Path, dict[str, Any]]], dotted: str) -> Path | None:
    """The last fragment (the one that wins) that sets `dotted` (`model.init_args.connector`) or a key under it."""
    found = None
    for path, content in fragments:
        if any(k == dotted or k.startswith(dotted + ".") for k in _flat_keys(content)):
            found = path
    return found
