"""Non-finite losses and gradients: one bad batch is skipped, counted and leaves the weights alone; N in a row stop the run
with the step, the batch's sample keys and the last good checkpoint in the message."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from visprior.training.checkpointing import AtomicCheckpointIO, AtomicModelCheckpoint
from visprior.training.nonfinite import NonFiniteGuard

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny import TinyModule, tiny_loader  # noqa: E402


class Snapshots(pl.Callback):
    """Parameters before and after every batch, keyed by the batch's global index ``g``."""

    def __init__(self) -> None:
        self.before: dict[int, list[torch.Tensor]] = {}
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[batch["g"]] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[batch["g"]] = [p.detach().clone() for p in pl_module.parameters()]


class NaNGradModule(TinyModule):
    """Finite loss, but the gradient of chosen batches is poisoned after backward."""

    def __init__(self, bad: tuple[int, ...]) -> None:
        super().__init__(scheduler=False)
        self.bad = set(bad)
        self._g = -1

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._g = batch["g"]
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        if self._g in self.bad:
            self.linear.weight.grad[0, 0] = float("inf")


def fit(root: Path, steps: int, model: pl.LightningModule, callbacks: list, nan_at: tuple[int, ...] = ()) -> pl.Trainer:
    trainer = pl.Trainer(
        default_root_dir=root,
        max_steps=steps,
        plugins=[AtomicCheckpointIO()],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, AtomicModelCheckpoint) for c in callbacks),
    )
    trainer.fit(model, train_dataloaders=tiny_loader(nan_at=nan_at))
    return trainer


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_one_nan_loss_is_skipped_and_counted(tmp_path: Path) -> None:
    guard, snaps = NonFiniteGuard(max_consecutive=3), Snapshots()
    model = TinyModule(scheduler=False)
    trainer = fit(tmp_path, 5, model, [guard, snaps], nan_at=(2,))
    assert guard.total_skipped == 1 and guard.consecutive == 0
    assert trainer.global_step == 5  # training continued; the skipped batch still counts as a (no-op) step
    assert_same(snaps.before[2], snaps.after[2])  # the NaN batch did not move the weights
    assert not all(torch.equal(x, y) for x, y in zip(snaps.before[3], snaps.after[3]))  # a normal batch does
    assert sorted(model.seen.values()) == [0, 1, 3, 4]
    assert trainer.callback_metrics["train/skipped_nonfinite"].item() == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_gradient_is_skipped(tmp_path: Path) -> None:
    guard, snaps = NonFiniteGuard(max_consecutive=2), Snapshots()
    model = NaNGradModule(bad=(1,))
    fit(tmp_path, 4, model, [guard, snaps])
    assert guard.total_skipped == 1
    assert_same(snaps.before[1], snaps.after[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_consecutive_nans_stop_with_message(tmp_path: Path) -> None:
    ckpt = AtomicModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(FloatingPointError) as info:
        fit(tmp_path, 10, TinyModule(scheduler=False), [guard, ckpt], nan_at=(2, 3, 4))
    msg = str(info.value)
    assert "3 consecutive non-finite steps" in msg
    assert "at step 4" in msg  # batches 2, 3, 4 ran as steps 2, 3, 4
    assert "b4-s0" in msg and "b4-s3" in msg  # the keys of the batch that tripped it
    assert f"last good checkpoint: {tmp_path / 'ckpt' / 'last.ckpt'}" in msg


def test_two_then_good_resets_the_streak(tmp_path: Path) -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    trainer = fit(tmp_path, 7, TinyModule(scheduler=False), [guard], nan_at=(1, 2, 4, 5))
    assert guard.total_skipped == 4 and trainer.global_step == 7


def test_without_guard_a_nan_loss_raises(tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 1; batch keys: \['b1-s0'"):
        fit(tmp_path, 3, TinyModule(scheduler=False), [], nan_at=(1,))


class PlainLossModule(TinyModule):
    """A stage that returns its loss without ``skip_nonfinite``: the gradient check must still catch a NaN batch."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.linear(batch["x"]).squeeze(-1), batch["y"])


def test_nan_loss_without_helper_is_caught_by_the_gradient_check(tmp_path: Path) -> None:
    guard, snaps = NonFiniteGuard(max_consecutive=2), Snapshots()
    model = PlainLossModule(scheduler=False)
    fit(tmp_path, 4, model, [guard, snaps], nan_at=(1,))
    assert guard.total_skipped == 1
    assert_same(snaps.before[1], snaps.after[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())
