"""Make skipped samples visible: totals per source and reason, in tensorboard and in the run folder.

The loader skips bad samples instead of crashing (see ``visprior/data``); each batch carries
``skips = {source: {reason: count}}``, the skips since that worker's previous batch. This callback sums them in the main
process, logs ``data/skips/<reason>`` (all sources) and ``data/skips/<source>/<reason>`` every step, and writes
``data_skips.json`` into the run's log folder at every epoch end, at the end of training and when the run dies of an
exception (a skip-rate threshold stop is exactly when the file is wanted). Under DDP the file sums all ranks; the
per-step logs are rank 0's. Totals are part of the checkpoint, so a resumed run keeps counting.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from visprior.training.checkpointing import atomic_write_text

Skips = dict[str, dict[str, int]]


def merge_skips(into: Skips, more: Skips) -> Skips:
    """Add ``more`` into ``into`` (both ``{source: {reason: count}}``) and return ``into``."""
    for source, reasons in (more or {}).items():
        bucket = into.setdefault(str(source), {})
        for reason, count in reasons.items():
            bucket[str(reason)] = bucket.get(str(reason), 0) + int(count)
    return into


def by_reason(skips: Skips) -> dict[str, int]:
    """Totals per reason over all sources."""
    totals: dict[str, int] = defaultdict(int)
    for reasons in skips.values():
        for reason, count in reasons.items():
            totals[reason] += count
    return dict(sorted(totals.items()))


class DataHealthCallback(Callback):
    """Accumulates ``batch["skips"]``, logs the totals and writes ``data_skips.json`` (``filename``) to the log folder."""

    def __init__(self, filename: str = "data_skips.json") -> None:
        self.filename = filename
        self.totals: Skips = {}
        self.batches = 0
        self._path: str | None = None

    @property
    def state_key(self) -> str:
        return "DataHealthCallback"

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1
        skips = batch.get("skips") if isinstance(batch, dict) else None
        if skips:
            merge_skips(self.totals, skips)
        for reason, count in by_reason(self.totals).items():
            pl_module.log(f"data/skips/{reason}", float(count), on_step=True, reduce_fx="max")
        for source, reasons in self.totals.items():
            for reason, count in reasons.items():
                pl_module.log(f"data/skips/{source}/{reason}", float(count), on_step=True, reduce_fx="max")

    def global_totals(self) -> Skips:
        """Totals summed over ranks (a collective: every rank must call it)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.totals
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.totals)
        merged: Skips = {}
        for part in gathered:
            merge_skips(merged, part)
        return merged

    def output_path(self, trainer: pl.Trainer) -> str:
        """``data_skips.json`` in the logger's folder, else the trainer's root folder.

        ``trainer.log_dir`` broadcasts under DDP, so every rank must call this (calling it on rank 0 only hung the run).
        """
        folder = trainer.log_dir or trainer.default_root_dir
        return os.path.join(folder, self.filename)

    def write(self, trainer: pl.Trainer, when: str, collective: bool = True) -> Skips:
        """Write the totals (and a summary line at epoch ends) on rank 0; returns what was written."""
        totals = self.global_totals() if collective else self.totals
        path = self._path or os.path.join(trainer.default_root_dir, self.filename)
        if trainer.is_global_zero:
            payload = {
                "when": when,
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "by_reason": by_reason(totals),
                "by_source": totals,
            }
            atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
        return totals

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._path = self.output_path(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        totals = self.write(trainer, "epoch_end")
        if trainer.is_global_zero:
            reasons = by_reason(totals)
            summary = ", ".join(f"{r}={c}" for r, c in reasons.items()) or "none"
            print(f"data skips after epoch {trainer.current_epoch} (step {trainer.global_step}): {summary}", flush=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, "train_end")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._path is None:  # failed before training started (a refused resume, say): nothing was counted
            return
        self.write(trainer, f"exception: {type(exception).__name__}", collective=False)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals, "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.totals = merge_skips({}, state_dict.get("totals", {}))
        self.batches = int(state_dict.get("batches", 0))
