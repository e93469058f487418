"""Train a tiny VisionLanguagePretraining stage for a few steps on fixed synthetic global batches; write the global losses.

Used by tests/test_distributed.py: `--strategy single` (one process, whole global batch), `ddp` (2 CPU processes on gloo,
half the rows each) and `fsdp` (the strategy of recipes/_base/trainers/fsdp-bf16.yaml, FSDP2 on 2 CPU processes, fp32
parameters so the numbers compare). The optimizer is plain SGD, so the gradient's scale shows in the next losses (AdamW
would hide gradients summed instead of averaged), and the rows carry 16, 12, 5 and 2 supervised tokens, so rank 0 has
28 and rank 1 only 7: the single-process loss is the mean over all 35 tokens, which the ranks reach only by weighting
their losses by token count, not by averaging their two means. A forward pre-hook counts every transformer block's
runs: with activation checkpointing (FSDP2 here) a block runs twice per step. Lightning launches the extra rank by
re-running this script.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.stages import VisionLanguagePretraining
from visprior.stages.parallelize import transformer_blocks

REPO = Path(__file__).resolve().parents[2]
LM = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
}
TOWER = {
    "model_type": "siglip_vision_model",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vision_use_head": False,
}
GLOBAL_ROWS, TEXT_TOKENS, STEPS, LR = 4, 16, 3, 0.5
SUPERVISED = (16, 12, 5, 2)
"""Supervised text tokens per row of the global batch (the last ones of the row): rank 0 of 2 gets 28, rank 1 gets 7."""


def global_batches(image_token: int, num_image_tokens: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        text = torch.randint(10, vocab, (GLOBAL_ROWS, TEXT_TOKENS), generator=g)
        ids = torch.cat([torch.full((GLOBAL_ROWS, num_image_tokens), image_token), text], dim=1)  # [B, T]
        labels = ids.clone()
        for row, keep in enumerate(SUPERVISED):  # labels[:, t] is predicted at t - 1: only text predicts text
            labels[row, : num_image_tokens + TEXT_TOKENS - keep] = -100
        t = ids.shape[1]
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": torch.arange(t).expand(GLOBAL_ROWS, t).clone(),
                "document_ids": torch.zeros(GLOBAL_ROWS, t, dtype=torch.long),
                "pixel_values": torch.randn(GLOBAL_ROWS, 3, 32, 32, generator=g),
            }
        )
    return out


class Shard(torch.utils.data.IterableDataset):
    """This rank's rows of every global batch (rank/world read when iterated, inside the launched process)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __iter__(self):
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        per = GLOBAL_ROWS // world
        for b in self.batches:
            yield {k: v[rank * per : (rank + 1) * per] for k, v in b.items()}


class GlobalLoss(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))


def fragment_strategy(path: Path) -> pl.strategies.Strategy:
    spec = yaml.safe_load(path.read_text())["trainer"]["strategy"]
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    # fp32 parameters so the numbers compare with the single process (the fragment says bf16)
    overrides = {"process_group_backend": "gloo", "param_dtype": "float32"}
    return cls(**{**spec.get("init_args", {}), **overrides})


class SGDPretraining(VisionLanguagePretraining):
    """The stage with plain SGD (no momentum): an update is the gradient times LR, so its scale is visible."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=LR)


def count_calls(blocks: list[torch.nn.Module]) -> list[int]:
    """A live list of how many times each block ran, recomputation in backward included.

    The hook sits on the block's MLP: transformers checkpoints a layer's `forward`, not its `__call__` (so FSDP2's hooks
    on the block run once), and a recomputation reruns `forward`, which calls the MLP again.
    """
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.mlp.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp"], required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    stage = SGDPretraining(
        LanguageModelSpec(config=LM, tokenizer=args.tokenizer),
        VisionTowerSpec(config=TOWER, feature_layer=-2),
        trainable={"vision_tower": LR, "connector": LR, "language_model": LR},
        grad_clip=None,
        activation_checkpointing=args.strategy == "fsdp",  # the stage's switch, applied under FSDP2 too
    )
    vocab = stage.model.language_model.config.vocab_size
    data = Shard(global_batches(stage.model.image_token_id, stage.num_image_tokens, vocab))
    if args.strategy == "fsdp":
        strategy: object = fragment_strategy(REPO / "recipes/_base/trainers/fsdp-bf16.yaml")
    elif args.strategy == "ddp":
        strategy = pl.strategies.DDPStrategy(process_group_backend="gloo")
    else:
        strategy = "auto"
    log = GlobalLoss()
    blocks = transformer_blocks(stage.model.language_model) + transformer_blocks(stage.model.vision_tower)
    calls = count_calls(blocks)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1 if args.strategy == "single" else 2,
        strategy=strategy,
        precision="32-true",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[log],
    )
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    if trainer.is_global_zero:
        from torch.distributed.fsdp import FSDPModule

        result = {
            "losses": log.losses,
            "world_size": trainer.world_size,
            "blocks": len(blocks),
            "block_calls": calls,
            "sharded_blocks": sum(isinstance(b, FSDPModule) for b in blocks),
            "root_sharded": isinstance(stage.model, FSDPModule),
            "pid": os.getpid(),
        }
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
