"""Make skipped samples visible, and stop the run on a broken source whatever the loader-worker and rank layout.

The loader skips bad samples instead of crashing (see ``visprior/data``); each batch carries
``skips = {source: {reason: count}}``, the skips since that worker's previous batch. This callback sums them in the main
process, logs ``data/skips/<reason>`` (all sources) and ``data/skips/<source>/<reason>`` every step, and writes
``data_skips.json`` into the run's log folder at every epoch end, at the end of training and when the run dies of an
exception (a skip-rate threshold stop is exactly when the file is wanted). Under DDP the file sums all ranks; the
per-step logs are rank 0's. Totals are part of the checkpoint, so a resumed run keeps counting.

The skip-rate threshold is decided here, not in each loader worker: every `check_every` batches the per-source counts of
all workers (`batch["reads"]`: samples read, skips per shard) are summed over ranks, and every rank raises the same
`DataQualityError` at the same step when `should_stop` says so. A per-worker check could not see a source that is broken
in a small share per worker, would start late (its minimum counted per worker) and would stop one rank alone (the others
then wait in their next collective).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from visprior.training.checkpointing import atomic_write_text

Skips = dict[str, dict[str, int]]
MIN_SKIPS_EARLY = 5
Z_EARLY = 3.29  # 99.9 % one-sided: a healthy source just under the threshold is (almost) never stopped early


def wilson_lower(k: int, n: int, z: float = Z_EARLY) -> float:
    """Lower end of the Wilson score interval for a rate of k in n."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def should_stop(seen: int, skipped: int, max_skip_rate: float, min_samples: int) -> bool:
    """A source is broken when its skip rate passes `max_skip_rate` over at least `min_samples` samples, or earlier when
    at least `MIN_SKIPS_EARLY` skips put even the 99.9 % lower bound of its rate above the threshold (a badly broken
    small dataset then stops after tens of samples, not hundreds)."""
    if seen >= min_samples and skipped > max_skip_rate * seen:
        return True
    return skipped >= MIN_SKIPS_EARLY and wilson_lower(skipped, max(seen, skipped)) > max_skip_rate


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

    def __init__(
        self,
        filename: str = "data_skips.json",
        max_skip_rate: float | None = None,
        min_samples_for_skip_rate: int | None = None,
        check_every: int = 1,
    ) -> None:
        """
        Args:
            filename: the totals file in the log folder.
            max_skip_rate: stop threshold; None: the data module's `max_skip_rate` (no check if it has none).
            min_samples_for_skip_rate: samples (all workers and ranks) before the plain rate applies; None: the data
                module's, else 200.
            check_every: batches between checks (each check gathers a few numbers per source across ranks).
        """
        self.filename = filename
        self.max_skip_rate, self.min_samples, self.check_every = max_skip_rate, min_samples_for_skip_rate, check_every
        self.totals: Skips = {}
        self.seen: dict[str, int] = {}
        self.shards: Skips = {}
        self.examples: dict[str, dict[str, str]] = {}
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
        for source, read in ((batch.get("reads") if isinstance(batch, dict) else None) or {}).items():
            self.seen[source] = self.seen.get(source, 0) + int(read.get("seen", 0))
            merge_skips(self.shards, {source: read.get("shards", {})})
            for reason, example in read.get("examples", {}).items():
                self.examples.setdefault(source, {}).setdefault(reason, example)
        for reason, count in by_reason(self.totals).items():
            pl_module.log(f"data/skips/{reason}", float(count), on_step=True, reduce_fx="max")
        for source, reasons in self.totals.items():
            for reason, count in reasons.items():
                pl_module.log(f"data/skips/{source}/{reason}", float(count), on_step=True, reduce_fx="max")

        if self.batches % self.check_every == 0:
            self.check_quality(trainer)

    def thresholds(self, trainer: pl.Trainer) -> tuple[float | None, int]:
        data = getattr(trainer, "datamodule", None)
        rate = self.max_skip_rate if self.max_skip_rate is not None else getattr(data, "max_skip_rate", None)
        minimum = self.min_samples if self.min_samples is not None else getattr(data, "min_samples_for_skip_rate", 200)
        return rate, int(minimum)

    def check_quality(self, trainer: pl.Trainer) -> None:
        """Raise `DataQualityError` on every rank when a source's counts, summed over workers and ranks, say it is broken.

        A collective under several processes: every rank calls it at the same batch.
        """
        rate, minimum = self.thresholds(trainer)
        if rate is None:
            return
        local = {"seen": self.seen, "skips": self.totals, "shards": self.shards, "examples": self.examples}
        parts = [local]
        world = 1
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            parts = [None] * world
            dist.all_gather_object(parts, local)
        seen: dict[str, int] = defaultdict(int)
        skips: Skips = {}
        shards: Skips = {}
        examples: dict[str, dict[str, str]] = {}
        for part in parts:
            for source, n in part["seen"].items():
                seen[source] += n
            merge_skips(skips, part["skips"])
            merge_skips(shards, part["shards"])
            for source, ex in part["examples"].items():
                for reason, text in ex.items():
                    examples.setdefault(source, {}).setdefault(reason, text)
        for source in sorted(set(seen) | set(skips)):
            skipped = sum(skips.get(source, {}).values())
            if not should_stop(seen[source], skipped, rate, minimum):
                continue
            from visprior.data.stream import DataQualityError

            shard, shard_n = max(shards.get(source, {"?": 0}).items(), key=lambda kv: kv[1])
            reason, reason_n = max(skips[source].items(), key=lambda kv: kv[1])
            total = max(seen[source], skipped)
            raise DataQualityError(
                f"source {source!r}: {skipped} of {total} samples skipped ({skipped / total:.1%} > max_skip_rate "
                f"{rate:.1%}; all loader workers of {world} rank(s), step {trainer.global_step}); worst shard {shard} "
                f"({shard_n} skips); most common reason {reason!r} ({reason_n}), e.g. "
                f"{examples.get(source, {}).get(reason, '?')}"
            )

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
        """This rank's counts and, under several processes, every rank's (``ranks``; a collective: Lightning calls
        ``save_checkpoint`` on every rank but writes rank 0's dict only, and each rank counts its own batches)."""
        mine = {"totals": self.totals, "batches": self.batches, "seen": self.seen, "shards": self.shards,
                "examples": self.examples}  # fmt: skip
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            return {**mine, "ranks": ranks}
        return mine

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Each rank takes back its own counts. Resumed on another number of ranks, rank 0 takes the sum of all ranks'
        (so the totals over ranks stay right) and the others start from zero; every rank keeps the batch count, which
        decides when the collective skip-rate check runs."""
        ranks = state_dict.get("ranks")
        live = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if live else (0, 1)
        if ranks and len(ranks) == world:
            state_dict = ranks[rank]
        elif ranks:
            state_dict = summed(ranks) if rank == 0 else {"batches": state_dict.get("batches", 0)}
        self.totals = merge_skips({}, state_dict.get("totals", {}))
        self.batches = int(state_dict.get("batches", 0))
        self.seen = {k: int(v) for k, v in state_dict.get("seen", {}).items()}
        self.shards = merge_skips({}, state_dict.get("shards", {}))
        self.examples = {k: dict(v) for k, v in state_dict.get("examples", {}).items()}


def summed(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Several ranks' DataHealthCallback states as one (counts added, the first example of each reason kept)."""
    out: dict[str, Any] = {key: {} for key in ("totals", "seen", "shards", "examples")}
    out["batches"] = ranks[0].get("batches", 0)
    for part in ranks:
        merge_skips(out["totals"], part.get("totals", {}))
        merge_skips(out["shards"], part.get("shards", {}))
        for source, n in part.get("seen", {}).items():
            out["seen"][source] = out["seen"].get(source, 0) + int(n)
        for source, ex in part.get("examples", {}).items():
            for reason, text in ex.items():
                out["examples"].setdefault(source, {}).setdefault(reason, text)
    return out
