"""Random-number state in the checkpoint, per rank, so a resumed run draws the same dropout masks as an unbroken one.

Lightning 2.6.6 does not save RNG state in checkpoints (only its multiprocessing launcher moves it between processes), so a
resumed run redraws dropout, drop-path and mixup from a fresh seed: losses after the resume differ from the uninterrupted
run's. :class:`RNGStateCallback` stores the torch (CPU and CUDA), Python and NumPy global generators of every rank in the
callback state and puts each rank's back just before the first batch after the restore, not at load time: between the
two Lightning builds the loader iterator, which draws its base seed from the torch generator (so does the uninterrupted
run, but at its start).

What this covers is randomness drawn from the global generators in the main process during the training step. Loader
workers are reseeded by the loader when it starts; randomness inside them must come from the data position (as the
stream's shard order and shuffles do) to resume exactly.

Saving under DDP/FSDP gathers the states of all ranks (``all_gather_object``, a collective): Lightning calls
``trainer.save_checkpoint`` on every rank, as it requires. The state is plain data (lists of ints, a uint8 tensor), so the
checkpoint still loads with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's global generator states as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCallback(Callback):
    """Saves every rank's RNG state with the checkpoint and restores it on resume, before the first trained batch."""

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCallback"

    def state_dict(self) -> dict[str, Any]:
        mine = rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict.get("ranks", [])) or None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) != trainer.world_size:
            log.warning(
                "RNG state not restored: the checkpoint holds %d ranks' states, this run has %d ranks",
                len(ranks),
                trainer.world_size,
            )
            return
        set_rng_state(ranks[trainer.global_rank])
