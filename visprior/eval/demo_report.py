"""The evaluation step of `make demo`: MLE-Bench on the toy set for the last stage's checkpoint (the `visprior eval` path)."""

from __future__ import annotations

import os
from pathlib import Path

from visprior.eval.command import evaluate_checkpoint


def evaluate_demo(
    checkpoint: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike, limit: int | None = None
) -> Path:
    """Evaluate `checkpoint` on MLE-Bench, print the small / medium / large / average table, return results.json's path."""
    return evaluate_checkpoint(
        str(checkpoint),
        tasks="mle_bench",
        data=str(data_dir),
        out=str(out_dir),
        limit=limit,
        model_name="toy-vlm (demo)",
    )
