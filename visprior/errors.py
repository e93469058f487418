"""Errors a user can fix, printed as one line: what was wrong, where (file, key, path), what to do.

jsonargparse reports a bad value inside a `class_path` union (a stage or data module whose constructor refused its
arguments) as a 30-line dump: every subtype tried, the whole namespace given. The message the user needs is one bullet
of it; `one_line` digs it out and names the config key. The CLI prints that line and exits 2, and keeps the traceback
for `--debug`. Anything that is not a user error (a bug) keeps its full traceback.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    argparse.ArgumentError,
)
"""Exception types whose message is written for the user (our own checks raise these, naming key and path)."""

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
    "tip: For details",
)
_UNION_KEY = {"LightningModule": "model", "LightningDataModule": "data", "Logger": "trainer.logger"}


def _clean(line: str) -> str:
    line = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", line)
    line = re.sub(r"^Expected a (.+)\. Got value: (.*)$", r"expected \1, got '\2'", line)
    line = re.sub(
        r"^(?:Subcommand '(\w+)' does not accept option|Key) '([^']+)'(?: is not expected)?",
        r"unknown key '\2' (see `visprior \1 --help` for the keys)",
        line,
    ).replace("`visprior  --help`", "`--help`")
    return line[:-1] if line.endswith(":") else line


def one_line(err: BaseException) -> str:
    """The informative part of an error message, prefixed with the config key it concerns when one is known."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    text = str(err).strip()
    keys = re.findall(r'Parser key "([^"]+)"', text)
    union = re.search(r"Subtypes: \[<class '[\w.]+\.(\w+)'>", text)
    where = ".".join(keys) or (_UNION_KEY.get(union.group(1), "") if union else "")
    messages = []
    for raw in text.splitlines():
        line = raw.strip()
        line = line[2:].strip() if line.startswith("- ") else line
        if not line or line.startswith(_NOISE) or re.fullmatch(r'Parser key "[^"]+":', line):
            continue
        messages.append(_clean(line))
    message = messages[0] if messages else _clean(text.splitlines()[0] if text else type(err).__name__)
    if where and not message.startswith(where):
        return f"{where}: {message}"
    return message


def with_fragment(message: str, key: str | None, fragment: Path | None) -> str:
    """Add which recipe file set `key`, when composition knows it."""
    if key and fragment is not None:
        return f"{message} (set in {fragment})"
    return message


def unknown_key(err: BaseException) -> str | None:
    """The dotted key of an 'unknown option' error, if the message names one."""
    m = re.search(r"does not accept option '([^']+)'|Key '([^']+)' is not expected", str(err))
    return (m.group(1) or m.group(2)) if m else None


def is_user_error(err: Any) -> bool:
    return isinstance(err, USER_ERRORS)
