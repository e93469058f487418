"""Atomic checkpoint files and safe loading.

Lightning 2.6.6 serialises the whole checkpoint into memory and writes it through an fsspec transaction, without
fsync (Lightning issue 19970 is the history). A checkpoint that a kill, a full disk or a power cut leaves half-written must never
take the place of a good one, so :class:`AtomicCheckpointIO` streams ``torch.save`` into ``<path>.tmp-<pid>``, fsyncs
it, ``os.replace``s it onto the final name and fsyncs the folder. ``ModelCheckpoint(save_last=True)`` saves ``last.ckpt``
through this plugin, so ``last.ckpt`` is always either the previous complete file or the new complete file.
:class:`AtomicModelCheckpoint` does the same for ``save_last="link"``, whose stock version deletes ``last.ckpt`` before
creating the symlink.

Loading is ``torch.load(weights_only=True)`` unless a caller explicitly passes ``weights_only=False``: every Lightning
checkpoint of plain modules, optimizers, schedulers and StatefulDataLoader state loads that way. What it rejects are
pickled Python objects in ``hyper_parameters`` (dataclasses, callables); allow-list such classes with
``safe_globals`` instead of turning the check off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the new directory entry must reach the disk, not only the file's bytes."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (JSON reports) so readers never see it half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` (relative), replacing any existing file or link in one rename."""
    link = Path(link)
    tmp = link.with_name(f"{link.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def safe_load(
    path: str | os.PathLike, map_location: Any = "cpu", safe_globals: Iterable[Any] = (), key: str = "checkpoint"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a rejected object raises naming the file and how to allow it.

    A file that is not a complete torch archive (truncated, empty, garbage) raises ``ValueError`` naming ``key`` and the
    path: torch's own error for it reads like a refused Python object and suggests ``weights_only=False``, which is wrong.
    """
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on the object
        from visprior.training.validation import check_checkpoint

        if isinstance(path, str | os.PathLike):
            check_checkpoint(path, key)  # raises for a truncated / non-archive file; passes for a complete one
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            raise
        raise RuntimeError(
            f"checkpoint {path} holds a Python object that weights_only=True refuses to unpickle. If you trust the file, "
            "allow-list the class (AtomicCheckpointIO(safe_globals=[...])) or pass weights_only=False explicitly. "
            f"torch said: {str(err).splitlines()[0]}"
        ) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint IO whose writes are all-or-nothing and whose loads default to ``weights_only=True``."""

    def __init__(self, safe_globals: list[Any] | None = None) -> None:
        super().__init__()
        self.safe_globals = list(safe_globals or [])

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (local filesystems only)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load with ``weights_only=True`` unless the caller passed ``False`` on purpose."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        map_location = map_location if map_location is not None else "cpu"
        if weights_only is False:
            log.warning("loading %s with weights_only=False: only do this for checkpoints you trust", path)
            return torch.load(path, map_location=map_location, weights_only=False)
        return safe_load(path, map_location=map_location, safe_globals=self.safe_globals, key="ckpt_path")


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``save_last="link"`` swaps the link in one rename instead of delete-then-link."""

    @staticmethod
    def _link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            try:
                atomic_symlink(filepath, linkpath)
            except OSError:
                shutil.copy(filepath, f"{linkpath}.tmp-{os.getpid()}")
                os.replace(f"{linkpath}.tmp-{os.getpid()}", linkpath)
        trainer.strategy.barrier()


def last_checkpoint_path(trainer: Any) -> str | None:
    """The newest complete checkpoint this run wrote or resumed from, for error messages; ``None`` if there is none."""
    cb = getattr(trainer, "checkpoint_callback", None)
    for candidate in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""), trainer.ckpt_path):
        if candidate and os.path.exists(candidate):
            return str(candidate)
    return None
