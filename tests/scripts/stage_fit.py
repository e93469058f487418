"""Run the real `visprior fit` CLI in this process, with a recording callback added, for tests/test_stage_robustness.py.
(`TrainedComponents`, which reports what each component of a stage did during a run, serves tests/test_stages.py.)

    python stage_fit.py --record OUT.json [--pause-at K] [--nan-at S,S,...] [--ckpt-every N] -- fit --config ... [more CLI args]

The callback (`StageProbe`, added as `--trainer.callbacks+=`) writes `<OUT>.started` when the first step begins (so an
error raised inside a step still leaves a mark) and OUT.json after every batch (so a killed process leaves what it
trained): per global step the loss as a Python float (`repr` precision; `null` for a skipped step), the batch's sample
keys and skip counts, and a checksum of the trainable parameters after the step. `--pause-at K` makes rank 0 wait at the start of step K
(after writing `<OUT>.paused`) until a signal arrives; `--nan-at` fills the batch's pixel values with NaN at those steps,
so the stage's own forward produces a NaN loss; `--ckpt-every N` makes the trainer fragment's checkpoint callback save
every N steps. Under DDP each rank writes OUT.json with `-rank<r>` before `.json`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class StageProbe(pl.Callback):
    def __init__(self, out: str, pause_at: int = -1, nan_at: list[int] | None = None, ckpt_every: int = 0) -> None:
        self.out, self.pause_at, self.nan_at = Path(out), pause_at, list(nan_at or [])
        self.ckpt_every = ckpt_every
        self.record: dict[str, Any] = {"losses": {}, "keys": {}, "skips": {}, "params": {}, "world_size": 1, "rank": 0}
        self._step = -1
        self.started = self.out.with_name(self.out.name + ".started")

    def path(self, trainer: pl.Trainer) -> Path:
        if trainer.world_size == 1:
            return self.out
        return self.out.with_name(f"{self.out.stem}-rank{trainer.global_rank}{self.out.suffix}")

    def setup(self, trainer, pl_module, stage) -> None:
        # the fragment's own AtomicModelCheckpoint, saving more often (a second one would save last-v1.ckpt)
        if self.ckpt_every:
            for cb in trainer.checkpoint_callbacks:
                cb._every_n_train_steps = self.ckpt_every

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        if not self.started.exists():  # a step began: an error raised inside it still leaves this mark
            self.started.write_text(str(self._step))
        if self._step in self.nan_at and batch.get("pixel_values") is not None:
            batch["pixel_values"].fill_(float("nan"))
        if self._step == self.pause_at and trainer.global_rank == 0:
            preemption = next(cb for cb in trainer.callbacks if type(cb).__name__ == "PreemptionCallback")
            Path(str(self.out) + ".paused").write_text(str(self._step))
            deadline = time.monotonic() + 120
            while not preemption.requested and time.monotonic() < deadline:
                time.sleep(0.02)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = str(self._step)
        loss = float(outputs["loss"].detach()) if outputs and outputs.get("loss") is not None else None
        self.record["losses"][step] = None if loss is None or not math.isfinite(loss) else loss
        self.record["keys"][step] = list(batch.get("keys", []))
        self.record["skips"][step] = batch.get("skips", {})
        with torch.no_grad():
            total = sum(float(p.double().sum()) for p in pl_module.parameters() if p.requires_grad)
        self.record["params"][step] = total
        self.record["world_size"], self.record["rank"] = trainer.world_size, trainer.global_rank
        path = self.path(trainer)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, path)


class TrainedComponents(pl.Callback):
    """Writes `out` (JSON) at train end: per top-level component of `pl_module.model`, whether it had trainable
    parameters, whether each trainable parameter moved and no frozen one did, and in which modes it ran the steps."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.start: dict[str, torch.Tensor] = {}
        self.modes: dict[str, set[bool]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {name: p.detach().clone() for name, p in pl_module.model.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for name, module in pl_module.model.named_children():
            self.modes.setdefault(name, set()).add(module.training)

    def on_train_end(self, trainer, pl_module) -> None:
        report = {}
        for comp, module in pl_module.model.named_children():
            params = [(f"{comp}.{n}", p) for n, p in module.named_parameters()]
            moved = {name for name, p in params if not torch.equal(p.detach(), self.start[name])}
            trainable = {name for name, p in params if p.requires_grad}
            report[comp] = {
                "trainable_params": sum(p.numel() for _, p in params if p.requires_grad),
                "frozen_params": sum(p.numel() for _, p in params if not p.requires_grad),
                "frozen_names": sorted(name for name, p in params if not p.requires_grad) if trainable else [],
                "trainable_not_moved": sorted(trainable - moved),
                "frozen_moved": sorted(moved - trainable),
                "modes": sorted("train" if m else "eval" for m in self.modes.get(comp, ())),
            }
        self.out.write_text(json.dumps(report, indent=1))


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    own, cli = argv[:split], argv[split + 1 :]
    opts = dict(zip(own[::2], own[1::2]))
    init = {"out": opts["--record"], "pause_at": int(opts.get("--pause-at", -1))}
    if opts.get("--ckpt-every"):
        init["ckpt_every"] = int(opts["--ckpt-every"])
    if opts.get("--nan-at"):
        init["nan_at"] = [int(s) for s in opts["--nan-at"].split(",")]
    probe = json.dumps({"class_path": "stage_fit.StageProbe", "init_args": init})
    torch.set_num_threads(1)
    from visprior.cli import main as visprior_main

    visprior_main([*cli, f"--trainer.callbacks+={probe}"])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
