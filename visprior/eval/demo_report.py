"""The evaluation step of `make demo`: load the last stage's checkpoint, run MLE-Bench on the toy set, print its table.

Kept apart from `runner` so the demo's console output (the paper-style small / medium / large / average table, and the path
of `results.json`) is decided in one place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from visprior.eval.load import load_vlm
from visprior.eval.mle_bench import format_mle_table
from visprior.eval.results import format_table
from visprior.eval.runner import EvalOptions, evaluate


def evaluate_demo(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tasks: Sequence[str] = ("mle_bench",),
    limit: int | None = None,
) -> Path:
    """Evaluate `checkpoint` on `tasks`, print the tables, write and return `out_dir/results.json`."""
    model = load_vlm(checkpoint)
    doc = evaluate(model, list(tasks), data_dir, out_dir, model_name="toy-vlm (demo)", checkpoint=str(checkpoint),
                   options=EvalOptions(limit=limit))  # fmt: skip
    if "mle_bench" in doc["tasks"]:
        print("\n[demo] MLE-Bench (toy world), accuracy %:\n" + format_mle_table(doc))
    others = [t for t in doc["tasks"] if t != "mle_bench"]
    if others:
        print("\n" + format_table(doc, tasks=others))
    return Path(out_dir) / "results.json"
