"""Checkpoint the data position of the batch being trained, not of the batch Lightning prefetched.

For a loader without ``__len__`` (our infinite streams), Lightning 2.6.6's ``_PrefetchDataFetcher`` fetches one batch ahead,
and ``FitLoop.on_save_checkpoint`` stores ``loader.state_dict()`` as it is at save time. A StatefulDataLoader's state then
already counts the prefetched batch, so a resumed run silently skips one batch per restart (measured: the resumed run
started at batch 5 instead of 4). This callback wraps the fetcher's iterator, snapshots the loaders' state right after each
batch is produced, and at save time puts the snapshot that belongs to the batch in training into
``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``, where Lightning's restore reads it. It touches two private Lightning
attributes (``fit_loop._data_fetcher``, ``fit_loop._combined_loader``); the exact-resume tests catch any change there.

Under DDP/FSDP only rank 0's checkpoint dict is written, so Lightning would give every rank rank 0's loader state on
resume (the streams refuse it: "state was saved by split 0/2, this reader is 1/2"). The callback gathers every rank's
state into ``checkpoint["loader_state_per_rank"]`` (a collective; Lightning calls ``save_checkpoint`` on every rank) and
puts each rank's own back before Lightning restores the loops.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

PER_RANK_KEY = "loader_state_per_rank"
"""Checkpoint key of every rank's loader state (Lightning keeps rank 0's under ``loops``)."""


def loader_states(trainer: pl.Trainer) -> list[dict[str, Any]]:
    """The stateful train loaders' ``state_dict``s, in the order Lightning saves them."""
    combined = trainer.fit_loop._combined_loader
    return copy.deepcopy(combined._state_dicts()) if combined is not None else []


class _SnapshotIterator:
    """Yields what ``inner`` yields and records the loaders' state just after each batch."""

    def __init__(self, inner: Iterator, owner: ExactLoaderResume, trainer: pl.Trainer) -> None:
        self.inner, self.owner, self.trainer = inner, owner, trainer

    def __iter__(self) -> _SnapshotIterator:
        return self

    def __next__(self) -> Any:
        item = next(self.inner)
        self.owner._pending.append(loader_states(self.trainer))
        return item


class ExactLoaderResume(Callback):
    """Makes ``ckpt_path="last"`` resume the data stream at the batch after the last trained one."""

    def __init__(self) -> None:
        self._pending: deque[list[dict[str, Any]]] = deque()
        self._current: list[dict[str, Any]] | None = None
        self._wrapped: _SnapshotIterator | None = None

    def _ensure_wrapped(self, trainer: pl.Trainer, where: str) -> bool:
        """Wrap the fetcher's iterator if it is a new one; returns whether it wrapped."""
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is None or fetcher.iterator is None or fetcher.iterator is self._wrapped:
            return False
        buffered = len(getattr(fetcher, "batches", []))
        if buffered > 1 or (buffered and where == "batch_start"):
            # a new iterator made after our hooks ran (a finite loader's later epoch): the batch in training was
            # fetched unobserved, so its checkpointed position may be one batch ahead
            log.warning("ExactLoaderResume: %d batches fetched before wrapping; data position may be ahead", buffered)
        self._pending = deque(loader_states(trainer) for _ in range(buffered))
        self._wrapped = _SnapshotIterator(fetcher.iterator, self, trainer)
        fetcher.iterator = self._wrapped
        return True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._current, self._wrapped = None, None
        self._ensure_wrapped(trainer, "train_start")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_wrapped(trainer, "epoch_start")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._ensure_wrapped(trainer, "batch_start") or not self._pending:
            self._current = loader_states(trainer)
        else:
            self._current = self._pending.popleft()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if "combined_loader" not in fit_state:
            return
        if self._current is not None:
            fit_state["combined_loader"] = self._current
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # only rank 0's checkpoint dict is written, and each rank reads its own part of the data: keep them all
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, fit_state["combined_loader"])
            checkpoint[PER_RANK_KEY] = ranks

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Before Lightning restores the loops: this rank's own loader state in place of rank 0's."""
        ranks = checkpoint.get(PER_RANK_KEY)
        fit_state = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if not ranks or "combined_loader" not in fit_state:
            return
        if len(ranks) != trainer.world_size:
            log.warning(
                "ExactLoaderResume: the checkpoint holds the data positions of %d ranks, this run has %d; "
                "every rank gets rank 0's",
                len(ranks),
                trainer.world_size,
            )
            return
        fit_state["combined_loader"] = ranks[trainer.global_rank]
