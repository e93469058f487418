"""One `results.json` schema for every evaluation, metric accumulation with torchmetrics, and confidence intervals.

A task returns a `TaskResult`: its dataset (name, path, count, sha256 of the data files) and metrics, each with value, sample
count and a 95 % interval — Wilson for accuracies (exact-enough at small n, never outside [0, 1]), a seeded percentile bootstrap
for anything else. Per-sample values are accumulated in torchmetrics `CatMetric`s (one per metric), so the same code syncs across
ranks when evaluation runs distributed, and the bootstrap sees every sample.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.aggregation import CatMetric

SCHEMA_VERSION = 1
Z95 = 1.959963984540054


SCORING_REVISION = 2
"""Bumped when a change alters what an evaluation returns for the same model and data (2: few-shot answers end at the
chat end token too), so `visprior reproduce` does not reuse evaluations cached before it."""


def visprior_version() -> str:
    """The installed distribution's version (the package may be imported as a namespace in editable installs)."""
    try:
        return importlib.metadata.version("visprior")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact ends: no float dust past the observed extreme
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def bootstrap_interval(
    values: np.ndarray, weights: np.ndarray | None = None, *, seed: int = 0, draws: int = 1000
) -> tuple[float, float]:
    """Seeded 95 % percentile bootstrap of the (weighted) mean over samples."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(draws, len(values)))
    means = (values[idx] * weights[idx]).sum(1) / np.maximum(weights[idx].sum(1), 1e-12)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class Metric:
    """A metric value with the number of samples behind it and its 95 % interval."""

    value: float
    n: int
    ci95: tuple[float, float]
    ci_method: str


def accuracy_metric(correct: Iterable[float]) -> Metric:
    c = np.asarray(list(correct), dtype=np.float64)
    n = len(c)
    return Metric(float(c.mean()) if n else float("nan"), n, wilson_interval(float(c.sum()), n), "wilson")


def mean_metric(values: Iterable[float], weights: Iterable[float] | None = None, *, seed: int = 0) -> Metric:
    """Weighted mean with a bootstrap interval; n counts samples (not weights)."""
    v = np.asarray(list(values), dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(list(weights), dtype=np.float64)
    value = float((v * w).sum() / w.sum()) if len(v) else float("nan")
    return Metric(value, len(v), bootstrap_interval(v, w, seed=seed), "bootstrap")


_SYNC = {"on": True}


@contextmanager
def local_metrics() -> Iterator[None]:
    """Compute metrics from this process's samples only (e.g. an evaluation run on rank 0 alone during training)."""
    before = _SYNC["on"]
    _SYNC["on"] = False
    try:
        yield
    finally:
        _SYNC["on"] = before


class Accumulator:
    """Per-sample values under named groups, kept in torchmetrics CatMetrics so `compute` syncs across ranks.

    Under `local_metrics()` nothing is synced. When syncing, every rank must create the same names in the same order.
    """

    def __init__(self) -> None:
        self._values: dict[str, CatMetric] = {}
        self._weights: dict[str, CatMetric] = {}
        self._sync = _SYNC["on"]

    def update(self, name: str, value: float, weight: float = 1.0) -> None:
        if name not in self._values:
            self._values[name] = CatMetric(sync_on_compute=self._sync)
            self._weights[name] = CatMetric(sync_on_compute=self._sync)
        self._values[name].update(torch.tensor([float(value)], dtype=torch.float64))
        self._weights[name].update(torch.tensor([float(weight)], dtype=torch.float64))

    def names(self) -> list[str]:
        return list(self._values)

    def values(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        v, w = self._values[name].compute(), self._weights[name].compute()
        return np.atleast_1d(v.cpu().numpy()), np.atleast_1d(w.cpu().numpy())

    def accuracy(self, name: str) -> Metric:
        return accuracy_metric(self.values(name)[0])

    def mean(self, name: str, seed: int = 0) -> Metric:
        v, w = self.values(name)
        return mean_metric(v, w, seed=seed)


def macro_average(metrics: list[Metric]) -> Metric:
    """Unweighted mean of group metrics; interval from combining the groups' normal half-widths (independent groups)."""
    k = len(metrics)
    value = sum(m.value for m in metrics) / k
    half = math.sqrt(sum(((m.ci95[1] - m.ci95[0]) / 2) ** 2 for m in metrics)) / k
    return Metric(value, sum(m.n for m in metrics), (max(0.0, value - half), min(1.0, value + half)), "macro")


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One sha256 over the sorted files' relative names and bytes, so a changed or renamed data file changes the hash."""
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def data_files(path: str | os.PathLike) -> list[Path]:
    """Every regular file under a dataset path (the path itself if it is a file)."""
    p = Path(path)
    return [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())


@dataclass
class DatasetInfo:
    name: str
    path: str
    count: int
    sha256: str

    @classmethod
    def of(cls, name: str, path: str | os.PathLike, count: int) -> DatasetInfo:
        return cls(name, str(path), count, sha256_files(data_files(path)))


@dataclass
class TaskResult:
    """What one evaluation task returns: its dataset, metrics by name, and free-form extras (e.g. example outputs)."""

    task: str
    dataset: DatasetInfo
    metrics: dict[str, Metric]
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def results_dict(
    tasks: list[TaskResult], *, model: str, checkpoint: str | None, seed: int, wall_time_s: float
) -> dict[str, Any]:
    """The `results.json` document."""
    return {
        "schema_version": SCHEMA_VERSION,
        "visprior_version": visprior_version(),
        "model": model,
        "checkpoint": checkpoint,
        "seed": seed,
        "wall_time_s": round(wall_time_s, 3),
        "tasks": {t.task: _task_dict(t) for t in tasks},
    }


def _task_dict(t: TaskResult) -> dict[str, Any]:
    d = asdict(t)
    d.pop("task")
    d["metrics"] = {k: {**asdict(m), "ci95": list(m.ci95)} for k, m in t.metrics.items()}
    return d


def write_results(results: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path


def format_table(results: dict[str, Any], *, tasks: list[str] | None = None) -> str:
    """A markdown table (task, metric, value, n, 95 % CI), readable as-is in a terminal and in report.md."""
    lines = ["| task | metric | value | n | 95% CI |", "|---|---|---:|---:|---|"]
    for task, body in results["tasks"].items():
        if tasks is not None and task not in tasks:
            continue
        for name, m in body["metrics"].items():
            lo, hi = m["ci95"]
            lines.append(f"| {task} | {name} | {m['value']:.4g} | {m['n']} | [{lo:.3g}, {hi:.3g}] |")
    return "\n".join(lines)
