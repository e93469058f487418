"""A few-parameter LightningModule on a stateful, deterministic, infinite batch stream, for the robustness tests.

Batch number ``g`` is a pure function of ``(seed, g)``. Under DDP rank r of W reads g = i * W + r for its i-th batch
(i counted in the round-robin order a StatefulDataLoader yields its workers' batches), so the ranks read different data,
any worker count gives the same sequence, and a resumed loader must continue at exactly the next ``g``. Batches carry
``keys`` and fake ``skips`` as the real loader's do; ``nan_at`` poisons chosen batches with NaN. ``TinyModule(dropout=p)``
draws a dropout mask every step, from a generator seeded per rank, so a resume is exact only if RNG state is restored.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from visprior.training.nonfinite import find_guard, skip_nonfinite


class TinyStream(IterableDataset):
    """Infinite batches ``{"x", "y", "keys", "skips"}``; ``state_dict`` is this worker's batch index."""

    def __init__(self, seed: int = 0, batch_size: int = 4, nan_at: tuple[int, ...] = (), skips_every: int = 0) -> None:
        self.seed, self.batch_size, self.nan_at, self.skips_every = seed, batch_size, set(nan_at), skips_every
        self.index = 0

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])

    def make(self, g: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
        x = torch.randn(self.batch_size, 3, generator=gen)
        y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(self.batch_size, generator=gen)
        if g in self.nan_at:
            x[0, 0] = float("nan")
        skips = {}
        if self.skips_every and g % self.skips_every == 0:
            skips = {"src_a": {"bad_image": 1}, "src_b": {"too_long": 2}}
        return {"x": x, "y": y, "keys": [f"b{g}-s{i}" for i in range(self.batch_size)], "skips": skips, "g": g}

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        while True:
            g = (self.index * nw + wid) * world + rank
            self.index += 1
            yield self.make(g)


def tiny_loader(num_workers: int = 0, **stream_kwargs: Any) -> StatefulDataLoader:
    """A StatefulDataLoader yielding TinyStream's whole batches."""
    return StatefulDataLoader(TinyStream(**stream_kwargs), batch_size=None, num_workers=num_workers)


class TinyModule(pl.LightningModule):
    """Linear regression with AdamW, (optionally) a scheduler sized by ``estimated_stepping_batches``, input dropout."""

    def __init__(self, scheduler: bool = True, lr: float = 0.05, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = torch.nn.Linear(3, 1)
        self.losses: dict[int, float] = {}
        self.seen: dict[int, int] = {}

    def on_train_start(self) -> None:
        if self.hparams.dropout:  # ranks draw different masks (a restore that mixed up the ranks' states would show)
            torch.manual_seed(1000 + self.global_rank)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        x = torch.nn.functional.dropout(batch["x"], self.hparams.dropout, training=self.training)  # [B, 3]
        pred = self.linear(x).squeeze(-1)  # [B]
        loss = torch.nn.functional.mse_loss(pred, batch["y"])
        loss = skip_nonfinite(self, loss, batch)
        guard = find_guard(self._trainer)
        if loss is not None and not (guard and guard.skipped_this_step):  # under DDP a skipped step returns the loss
            self.losses[self.global_step] = loss.item()
            self.seen[self.global_step] = int(batch["g"])
            self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        if not self.hparams.scheduler:
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1)  # Lightning issue 20550 trigger
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (total + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
