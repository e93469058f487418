"""Callbacks and plugins that make a training run survive: atomic checkpoints, exact resume, preemption, bad numbers,
bad data and bad configs. `visprior fit` adds them to every run (`visprior/stage_cli.py`); in plain Python, pass
``robust_callbacks()`` and ``AtomicCheckpointIO()`` to the Trainer."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from visprior.training.checkpointing import (
    AtomicCheckpointIO,
    AtomicModelCheckpoint,
    atomic_torch_save,
    last_checkpoint_path,
    safe_load,
)
from visprior.training.data_health import DataHealthCallback
from visprior.training.loader_state import ExactLoaderResume
from visprior.training.nonfinite import NonFiniteGuard, skip_nonfinite
from visprior.training.preemption import PreemptionCallback
from visprior.training.rng_state import RNGStateCallback


def robust_callbacks(max_consecutive_nonfinite: int = 5) -> list[Callback]:
    """The callbacks every stage wants (add an ``AtomicModelCheckpoint(save_last=True)`` beside them)."""
    return [
        ExactLoaderResume(),
        PreemptionCallback(),
        NonFiniteGuard(max_consecutive_nonfinite),
        DataHealthCallback(),
        RNGStateCallback(),
    ]


__all__ = [
    "AtomicCheckpointIO",
    "AtomicModelCheckpoint",
    "DataHealthCallback",
    "ExactLoaderResume",
    "NonFiniteGuard",
    "PreemptionCallback",
    "RNGStateCallback",
    "atomic_torch_save",
    "last_checkpoint_path",
    "robust_callbacks",
    "safe_load",
    "skip_nonfinite",
]
