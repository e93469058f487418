"""The image definition, read as files (no container engine runs here): the build context leaves local state out, the base
is a CUDA PyTorch image whose torch pip may not replace, and the entry point is `visprior`."""

from __future__ import annotations

import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a pattern also covers everything below it."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes):
            result = not negate
    return result


def test_build_context_leaves_local_state_out():
    patterns = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    for path in (".git", ".venv/bin/python", "data/toyworld/world.json", "runs/sft/run/checkpoints/last.ckpt",
                 "checkpoints/smollm2/model.safetensors", "visprior/__pycache__/cli.cpython-311.pyc", "x.tar"):  # fmt: skip
        assert ignored(path, patterns), path
    for path in (
        "visprior/cli.py",
        "pyproject.toml",
        "recipes/_base/stages/sft.yaml",
        "data/manifests/llava.yaml",
        "README.md",
    ):
        assert not ignored(path, patterns), path


def test_image_is_cuda_pytorch_with_visprior_as_entry_point():
    text = (REPO / "Dockerfile").read_text()
    base = next(ln for ln in text.splitlines() if ln.startswith("ARG BASE="))
    assert base.startswith("ARG BASE=pytorch/pytorch:") and "cuda" in base and "runtime" in base
    assert "--constraint /etc/visprior-torch-constraint.txt" in text  # pip keeps the base image's torch
    assert 'ENTRYPOINT ["visprior"]' in text
