"""Train TinyModule as a real process, for the preemption and kill tests; writes per-step losses to ``<root>/losses-<tag>.json``.

``--pause-at K`` stops at the start of step K, writes ``<root>/paused`` and waits (up to 120 s) for a signal, so the test
can deliver SIGTERM or SIGKILL at a known step. ``--slow-save-after S`` makes every checkpoint written after step S write
half its bytes, touch ``<root>/writing`` and hang, so the test can kill the process mid-write. The module applies input
dropout (``--dropout``, 0.25 by default), so every step draws random numbers; ``--nan-at`` and ``--skips-every`` feed the
NonFiniteGuard and DataHealthCallback whose end states go into the JSON beside the losses.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import TinyModule, tiny_loader  # noqa: E402

from visprior.training import checkpointing  # noqa: E402
from visprior.training.checkpointing import AtomicCheckpointIO  # noqa: E402
from visprior.training.data_health import DataHealthCallback  # noqa: E402
from visprior.training.loader_state import ExactLoaderResume  # noqa: E402
from visprior.training.nonfinite import NonFiniteGuard  # noqa: E402
from visprior.training.preemption import PreemptionCallback  # noqa: E402
from visprior.training.rng_state import RNGStateCallback  # noqa: E402


class Pause(pl.Callback):
    """Rank 0 waits at the start of step ``at`` until the preemption flag is set (or a kill arrives)."""

    def __init__(self, root: Path, at: int, preemption: PreemptionCallback) -> None:
        self.root, self.at, self.preemption = root, at, preemption

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.at or trainer.global_rank != 0:  # other ranks wait in DDP's all-reduce
            return
        (self.root / "paused").write_text(str(self.at))
        deadline = time.monotonic() + 120
        while not self.preemption.requested and time.monotonic() < deadline:
            time.sleep(0.02)


def slow_save_after(root: Path, step: int) -> None:
    """Patch the atomic writer's torch.save so checkpoints after ``step`` hang halfway through the file."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj.get("global_step", 0) <= step:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        (root / "writing").write_text(str(obj["global_step"]))
        time.sleep(120)
        f.write(data[len(data) // 2 :])

    checkpointing.torch.save = save


class NaiveIO(AtomicCheckpointIO):
    """Writes straight onto the final name, as a non-atomic IO would: the contrast that shows the kill test bites."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            checkpointing.torch.save(checkpoint, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--every", type=int, default=0, help="ModelCheckpoint every_n_train_steps (0: none)")
    ap.add_argument("--pause-at", type=int, default=-1)
    ap.add_argument("--slow-save-after", type=int, default=-1)
    ap.add_argument("--no-scheduler", action="store_true")
    ap.add_argument("--naive-io", action="store_true")
    ap.add_argument("--devices", type=int, default=1, help="2: DDP on gloo, two CPU processes")
    ap.add_argument("--dropout", type=float, default=0.25, help="input dropout: every step draws random numbers")
    ap.add_argument("--nan-at", default="", help="batch numbers g (comma-separated) whose input holds a NaN")
    ap.add_argument("--skips-every", type=int, default=0, help="every k-th batch reports fake skipped samples")
    args = ap.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0, workers=True)
    if args.slow_save_after >= 0:
        slow_save_after(args.root, args.slow_save_after)
    preemption = PreemptionCallback()
    ckpt = checkpointing.AtomicModelCheckpoint(
        dirpath=args.root / "ckpt", save_last=True, every_n_train_steps=args.every or None, save_top_k=0
    )
    guard, health = NonFiniteGuard(3), DataHealthCallback()
    callbacks = [ExactLoaderResume(), preemption, ckpt, guard, health, RNGStateCallback()]
    if args.pause_at >= 0:
        callbacks.append(Pause(args.root, args.pause_at, preemption))
    trainer = pl.Trainer(
        default_root_dir=args.root,
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        plugins=[NaiveIO() if args.naive_io else AtomicCheckpointIO()],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    model = TinyModule(scheduler=not args.no_scheduler, dropout=args.dropout)
    stream = {"nan_at": tuple(int(g) for g in args.nan_at.split(",") if g), "skips_every": args.skips_every}
    loader = tiny_loader(args.workers, **stream)
    trainer.fit(model, train_dataloaders=loader, ckpt_path="last" if args.resume else None)
    out = {"losses": {str(k): v for k, v in model.losses.items()}, "seen": {str(k): v for k, v in model.seen.items()}}
    out["weight"] = model.linear.weight.detach().flatten().tolist() + model.linear.bias.detach().tolist()
    out["stopped_by_preemption"] = preemption.saved_path
    out["stopped_at"] = trainer.global_step
    out["guard"] = {"total_skipped": guard.total_skipped, "consecutive": guard.consecutive}
    out["skips"] = health.totals
    suffix = "" if trainer.global_rank == 0 else f"-rank{trainer.global_rank}"
    (args.root / f"losses-{args.tag}{suffix}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
