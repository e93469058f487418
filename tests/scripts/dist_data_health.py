"""A tiny alignment stage on a broken pair dataset through the real `VisionLanguageDataModule`, on 1 or 2 CPU processes
(gloo DDP) with 0 or 2 loader workers per process; used by tests/test_data_quality.py.

Each rank writes `<out>/rank<r>.json`: the step it stopped at, the exception type and message (or `finished`), and the
worker-level threshold its stream ran with (None when `DataHealthCallback` decides for the whole run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from visprior.data.datamodule import SourceSpec, VisionLanguageDataModule
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.stages import VisionLanguagePretraining
from visprior.training import DataHealthCallback

LM = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
TOWER = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "vision_use_head": False}  # fmt: skip


class Outcome(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def write(self, trainer, **fields) -> None:
        loader = trainer.datamodule._train_loader
        rate = loader.dataset.max_skip_rate if loader is not None else "unbuilt"
        record = {"rank": trainer.global_rank, "step": trainer.global_step, "worker_max_skip_rate": rate, **fields}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.write(trainer, outcome=type(exception).__name__, message=str(exception))

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, outcome="finished", message="")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no_callback", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stage = VisionLanguagePretraining(
        LanguageModelSpec(config=LM, tokenizer=args.tokenizer), VisionTowerSpec(config=TOWER), grad_clip=None
    )
    data = VisionLanguageDataModule(
        [SourceSpec(path=args.data, weight=1.0)], batch_size=4, seq_len=64, packing=False,
        num_workers=args.workers, batches_per_epoch=args.steps, block_size=8,
    )  # fmt: skip
    callbacks: list[Callback] = [Outcome(out)] + ([] if args.no_callback else [DataHealthCallback()])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=pl.strategies.DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=str(out),
    )
    trainer.fit(stage, datamodule=data)


if __name__ == "__main__":
    main()
