"""Shared test fixtures: pinned threads, seeds, and one smoke-size toy world + tokenizer per test session."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toyworld_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset of the toy world, generated once per session (seed 0)."""
    from visprior.data.toyworld import generate

    out = tmp_path_factory.mktemp("toyworld")
    generate(out, preset="smoke", seed=0)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(toyworld_dir: Path) -> Path:
    """A BPE tokenizer trained on the smoke toy world, saved as a PreTrainedTokenizerFast folder."""
    from visprior.data.tokenizer import train_tokenizer

    out = toyworld_dir / "tokenizer"
    if not (out / "tokenizer.json").exists():
        train_tokenizer(toyworld_dir, out, vocab_size=2048)
    return out
