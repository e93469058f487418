"""Skip steps whose loss or gradient norm is not finite, count them, and stop when they keep coming.

One NaN batch (a degenerate sample, an overflow) should cost one step, not the run; a run that produces nothing but NaNs is
broken and must stop loudly instead of burning compute. Two checks, one counter:

* loss: the stage's ``training_step`` returns ``skip_nonfinite(self, loss, batch)``. The decision is all-reduced, so
  every rank skips the same steps. In one process it returns ``None``: Lightning's automatic optimization skips backward,
  every gradient stays ``None`` and the optimizer moves no parameter (Lightning still calls ``optimizer.step``, so
  ``global_step`` advances: a skipped step is a no-op step; the stages' ``lr_scheduler_step`` asks ``step_skipped`` and
  leaves the schedule where it is). Under DDP/FSDP Lightning refuses
  ``None`` ("Skipping the `training_step` by returning None in distributed training is not supported") and the
  gradient all-reduce needs every rank's backward, so there the loss is returned, backward runs on every rank, and the
  guard drops every gradient in ``on_before_optimizer_step``: the same no-op step.
* gradient norm: ``on_before_optimizer_step`` sets every gradient to ``None`` when the total norm is not finite, so the
  optimizer leaves every parameter and its moments untouched (``global_step`` advances, the stages' schedule does not).

``max_consecutive`` skips in a row raise ``FloatingPointError`` naming the step, the batch's sample keys and the last good
checkpoint. The total is logged as ``train/skipped_nonfinite`` and kept in the callback's checkpoint state.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from visprior.training.checkpointing import last_checkpoint_path

log = logging.getLogger(__name__)


def _batch_keys(batch: Any) -> list[str]:
    keys = batch.get("keys") if isinstance(batch, dict) else None
    return [str(k) for k in keys] if keys is not None else []


class NonFiniteGuard(Callback):
    """Skips and counts non-finite steps; ``max_consecutive`` in a row stop the run with a precise error."""

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total_skipped = 0
        self.consecutive = 0
        self._skipped_this_batch = False
        self._batch: Any = None

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    @property
    def skipped_this_step(self) -> bool:
        """Whether the step in progress is being skipped (on every rank: the decision is all-reduced)."""
        return self._skipped_this_batch

    def record_skip(self, trainer: pl.Trainer, what: str, batch: Any = None) -> None:
        """Count one skipped step; raise once ``max_consecutive`` skips happened in a row."""
        batch = self._batch if batch is None else batch
        if not self._skipped_this_batch:
            self.total_skipped += 1
            self.consecutive += 1
            self._skipped_this_batch = True
        keys = _batch_keys(batch)
        log.warning("skipping step %d: non-finite %s (batch keys %s)", trainer.global_step, what, keys)
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive non-finite steps (last: non-finite {what}) at step {trainer.global_step}; "
                f"batch keys: {keys}; last good checkpoint: {last_checkpoint_path(trainer) or 'none saved yet'}"
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._skipped_this_batch = False
        self._batch = batch

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._skipped_this_batch:  # a non-finite loss under DDP/FSDP: backward ran (see skip_nonfinite), drop it
            for p in pl_module.parameters():
                p.grad = None
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # one foreach kernel, not a Python loop of norms
        finite = trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(norm)), all=True)
        if finite:
            return
        for p in pl_module.parameters():
            p.grad = None
        self.record_skip(trainer, "gradient norm")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._skipped_this_batch:
            self.consecutive = 0
        pl_module.log("train/skipped_nonfinite", float(self.total_skipped), on_step=True, reduce_fx="max")
        self._batch = None

    def state_dict(self) -> dict[str, Any]:
        return {"total_skipped": self.total_skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_skipped = int(state_dict.get("total_skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def find_guard(trainer: pl.Trainer | None) -> NonFiniteGuard | None:
    """The run's ``NonFiniteGuard``, if one is attached."""
    if trainer is None:
        return None
    return next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), None)


def step_skipped(trainer: pl.Trainer | None) -> bool:
    """Whether the guard is skipping the step in progress (the stages then leave the learning-rate schedule where it is)."""
    guard = find_guard(trainer)
    return guard is not None and guard.skipped_this_step


def skip_nonfinite(module: pl.LightningModule, loss: torch.Tensor, batch: Any) -> torch.Tensor | None:
    """Return ``loss``, or ``None`` (skip this step) when it is not finite on any rank.

    Under several processes a skipped step returns ``loss`` itself (Lightning refuses ``None`` there, and every rank must
    run backward for the gradient all-reduce); the guard then drops the gradients before the optimizer step. Without a
    ``NonFiniteGuard`` on the trainer a non-finite loss raises at once: it is never silently trained on.
    """
    trainer = module._trainer
    finite = bool(torch.isfinite(loss.detach()).all())
    if trainer is not None:
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if finite:
        return loss
    guard = find_guard(trainer)
    if guard is None:
        step = trainer.global_step if trainer is not None else "?"
        raise FloatingPointError(
            f"non-finite loss {loss.detach().float().mean().item()} at step {step}; batch keys: {_batch_keys(batch)} "
            "(add visprior.training.NonFiniteGuard to skip such steps)"
        )
    guard.record_skip(trainer, f"loss ({loss.detach().float().mean().item()})", batch)
    return loss if trainer.world_size > 1 else None


__all__ = ["NonFiniteGuard", "find_guard", "skip_nonfinite", "step_skipped"]
