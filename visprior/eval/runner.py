"""Run named evaluation tasks on one model and write `results.json`; and a Lightning callback that does so during training.

Task names are what `visprior eval --tasks` takes: `mle_bench`, `vqa`, `fewshot`, `caption`, `text`, `probe`. Each reads its
part of a toy-world folder (layout in docs/contracts.md); `mle_bench_path` points MLE-Bench at a local copy of the real
benchmark instead. `limit` caps the items per task (the training callback uses it to stay cheap).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from visprior.eval.captioning import evaluate_captioning, load_captions
from visprior.eval.fewshot import SHOTS, evaluate_fewshot
from visprior.eval.mle_bench import balanced_subset, evaluate_mle_bench, load_mle_bench
from visprior.eval.probe import evaluate_probe
from visprior.eval.results import DatasetInfo, TaskResult, local_metrics, results_dict, write_results
from visprior.eval.text import evaluate_text
from visprior.eval.vqa import evaluate_vqa, load_vqa


@dataclass
class EvalOptions:
    """Knobs shared by the tasks."""

    limit: int | Mapping[str, int] | None = None
    """At most this many items per task (None: all), or per task by name (`{fewshot: 400}`; tasks not named: all), so a
    budget can cap the costly tasks and keep every item of the one a claim reads."""
    batch_size: int = 8
    seed: int = 0
    shots: Sequence[int] = SHOTS
    mle_bench_path: str | None = None
    """A local MLE-Bench copy (imagefolder, parquet or save_to_disk); default: the toy world's `eval/mle_bench`."""
    blind_baseline: bool = True
    """Also score MLE-Bench with grey images (`blind/*` metrics), to show how much of the score is the image; doubles its
    cost."""
    vqa_blind: bool = False
    """Also score VQA with grey images (`vqa/blind/*`): how much of its accuracy needs the image; doubles its cost."""
    caption_prompt: str | None = None
    """None: a chat instruction; "<image>" for a pre-trained (non-SFT) model."""

    def limit_for(self, task: str) -> int | None:
        """The item cap of one task."""
        return self.limit.get(task) if isinstance(self.limit, Mapping) else self.limit


def _mle(model: nn.Module, data: Path, o: EvalOptions) -> TaskResult:
    path = Path(o.mle_bench_path) if o.mle_bench_path else data / "eval" / "mle_bench"
    items = load_mle_bench(path)
    n = o.limit_for("mle_bench")
    items = balanced_subset(items, n) if n else items
    info = DatasetInfo.of("mle_bench" if o.mle_bench_path else "toyworld-mle_bench", path, len(items))
    return evaluate_mle_bench(
        model, items, dataset=info, batch_size=o.batch_size, seed=o.seed, blind_baseline=o.blind_baseline
    )


def _vqa(model: nn.Module, data: Path, o: EvalOptions) -> TaskResult:
    items = load_vqa(data / "eval" / "vqa", o.limit_for("vqa"))
    info = DatasetInfo.of("toyworld-vqa", data / "eval" / "vqa", len(items))
    return evaluate_vqa(model, items, dataset=info, batch_size=o.batch_size, blind=o.vqa_blind)


def _fewshot(model: nn.Module, data: Path, o: EvalOptions) -> TaskResult:
    support = load_vqa(data / "eval" / "vqa")
    n = o.limit_for("fewshot")
    queries = support[:n] if n else support
    info = DatasetInfo.of("toyworld-vqa", data / "eval" / "vqa", len(queries))
    return evaluate_fewshot(model, queries, support, dataset=info, shots=o.shots, seed=o.seed,
                            batch_size=max(1, o.batch_size // 2))  # fmt: skip


def _caption(model: nn.Module, data: Path, o: EvalOptions) -> TaskResult:
    items = load_captions(data / "eval" / "captions", o.limit_for("caption"))
    info = DatasetInfo.of("toyworld-captions", data / "eval" / "captions", len(items))
    return evaluate_captioning(
        model, items, dataset=info, prompt=o.caption_prompt, batch_size=o.batch_size, seed=o.seed
    )


def _text(model: nn.Module, data: Path, o: EvalOptions) -> TaskResult:
    return evaluate_text(model, data, limit=o.limit_for("text"), batch_size=o.batch_size, seed=o.seed)


def _probe(model: nn.Module, data: Path, o: EvalOptions) -> TaskResult:
    if getattr(model, "vision_tower", None) is None:
        raise ValueError("the probe task needs a model with a vision tower")
    return evaluate_probe(model.vision_tower, model.image_transform, data / "eval" / "shapes", seed=o.seed)


TASKS: dict[str, Callable[[nn.Module, Path, EvalOptions], TaskResult]] = {
    "mle_bench": _mle,
    "vqa": _vqa,
    "fewshot": _fewshot,
    "caption": _caption,
    "text": _text,
    "probe": _probe,
}


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """`"mle_bench,vqa"` or a list -> validated task names, in the given order."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; choose from {sorted(TASKS)}")
    return names


def evaluate(
    model: nn.Module,
    tasks: str | Sequence[str],
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    model_name: str = "model",
    checkpoint: str | None = None,
    options: EvalOptions | None = None,
) -> dict[str, Any]:
    """Run `tasks` on `model` (eval mode, no grad) and return the results document; also write `out_dir/results.json`."""
    options = options or EvalOptions()
    names = parse_tasks(tasks)
    start = time.perf_counter()
    modes = {m: m.training for m in model.modules()}  # restored one by one: stages keep frozen parts in eval mode
    model.eval()
    try:
        with torch.no_grad():
            results = [TASKS[name](model, Path(data_dir), options) for name in names]
    finally:
        for m, training in modes.items():
            m.training = training
    doc = results_dict(results, model=model_name, checkpoint=checkpoint, seed=options.seed,
                       wall_time_s=time.perf_counter() - start)  # fmt: skip
    if out_dir is not None:
        write_results(doc, out_dir)
    return doc


def flat_metrics(doc: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """`{eval/<task>/<metric>: value}` for loggers."""
    return {
        f"{prefix}/{task}/{name}": m["value"]
        for task, body in doc["tasks"].items()
        for name, m in body["metrics"].items()
    }


class EvaluationCallback(L.Callback):
    """Every `every_n_steps` optimizer steps, evaluate `tasks` on rank 0 and log the values to the trainer's loggers.

    The model is taken from `pl_module.<model_attr>` (the stages keep the VisionLanguageModel there). Evaluation is local to
    rank 0 (no metric sync), so other ranks never wait on a collective; keep `limit` small, it runs inside the training loop.
    """

    def __init__(
        self,
        tasks: str | list[str],
        data_dir: str,
        every_n_steps: int = 500,
        limit: int | None = 32,
        model_attr: str = "model",
        out_dir: str | None = None,
    ) -> None:
        self.tasks = parse_tasks(tasks)
        self.data_dir, self.every_n_steps, self.model_attr, self.out_dir = data_dir, every_n_steps, model_attr, out_dir
        self.options = EvalOptions(limit=limit)
        self.last: dict[str, Any] | None = None
        self._last_step = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step  # with gradient accumulation several batches end on the same step
        model = getattr(pl_module, self.model_attr)
        out = Path(self.out_dir) / f"step-{step:07d}" if self.out_dir else None
        with local_metrics():
            self.last = evaluate(
                model, self.tasks, self.data_dir, out, model_name=type(model).__name__, options=self.options
            )
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(self.last), step=step)
