"""`visprior data ...`: typed functions that jsonargparse turns into subcommands (their docstrings are the `--help`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal


def toyworld(out: str = "data/toyworld", preset: Literal["smoke", "toy"] = "toy", seed: int = 0) -> None:
    """Generate the procedural toy world as WebDataset shards with a manifest per dataset.

    Args:
        out: folder to write (replaced dataset by dataset).
        preset: `smoke` (tests, seconds) or `toy` (the main job, minutes).
        seed: same seed, same bytes.
    """
    from visprior.data.toyworld import generate

    start = time.perf_counter()
    summary = generate(Path(out), preset=preset, seed=seed)
    print(json.dumps(summary, indent=2, default=str))
    print(f"toy world ({preset}, seed {seed}) written to {out} in {time.perf_counter() - start:.1f} s")


def tokenizer(data: str = "data/toyworld", out: str | None = None, vocab_size: int = 8192) -> None:
    """Train the byte-level BPE tokenizer on a toy world's text corpora; saved as a PreTrainedTokenizerFast folder.

    Args:
        data: toy world folder (from `visprior data toyworld`).
        out: tokenizer folder; default `<data>/tokenizer`.
        vocab_size: BPE vocabulary size, special tokens included.
    """
    from visprior.data.tokenizer import train_tokenizer

    target = Path(out) if out else Path(data) / "tokenizer"
    train_tokenizer(Path(data), target, vocab_size=vocab_size)
    print(f"tokenizer written to {target}")


def _convert_commands() -> dict:
    from visprior.data.convert import CONVERT_COMMANDS

    return CONVERT_COMMANDS


DATA_COMMANDS = {"toyworld": toyworld, "tokenizer": tokenizer, "convert": _convert_commands()}
