"""Turn SIGTERM / SIGUSR1 (SLURM's warning signal) into a resumable checkpoint and a clean exit.

The signal handler only sets a flag: saving a checkpoint, or running a collective, inside a handler can hang (Lightning
issue 21406; Lightning's own SIGTERM handler broadcasts a tensor from inside the handler). At the next
``on_train_batch_end`` the flag is all-reduced, so every DDP rank stops at the same step; the checkpoint is then written
through ``trainer.save_checkpoint`` (model, optimizer, scheduler, loops and StatefulDataLoader position) to ``last.ckpt``
in the ``ModelCheckpoint`` folder, where ``ckpt_path="last"`` finds it, and ``trainer.should_stop`` ends the fit.

Lightning installs its own SIGTERM handler just before the training stage starts (it raises ``SIGTERMException``, a
``SystemExit`` with no checkpoint); this callback installs its handlers in ``on_train_start``, after Lightning's, and does
not chain to it, so a preempted run exits 0 with a checkpoint. Previous handlers are restored at teardown.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class PreemptionCallback(Callback):
    """Saves ``last.ckpt`` and stops training at the first batch end after one of ``signals`` arrives."""

    def __init__(self, signals: list[str] | tuple[str, ...] = DEFAULT_SIGNALS, filename: str = "last.ckpt") -> None:
        self.signals = [signal.Signals[name] if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.filename = filename
        self.received: signal.Signals | None = None
        self.saved_path: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a preemption signal arrived in this process."""
        return self.received is not None

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self.saved_path = None, None
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionCallback: not on the main thread, signal handlers not installed")
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """``last.ckpt`` beside the ModelCheckpoint's files (so ``ckpt_path="last"`` resumes it), else under the root dir."""
        cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        folder = cb.dirpath if cb is not None and cb.dirpath else os.path.join(trainer.default_root_dir, "checkpoints")
        return str(Path(folder) / self.filename)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.requested, all=False)
        if not stop or self.saved_path:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        trainer.should_stop = True
        what = self.received.name if self.received is not None else "another rank's signal"
        msg = (
            f"preemption ({what}): saved {path} at step {trainer.global_step}; stopping. Relaunch with ckpt_path=last."
        )
        rank_zero_info(msg)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
