"""Distributed runs for tests/test_distributed_scale.py: a tiny VLM stage on fixed synthetic global batches, 1 or 2 CPU
processes on gloo (Lightning re-runs this script for rank 1).

    --mode mixed   DDP or FSDP2; rank 1's batches carry no image at steps 1 and 2 (a text-only re-blend batch) while rank
                   0's do, with tower, connector and LM trainable. Writes every rank's losses and a parameter checksum.
    --mode train   FSDP2 (`--param_dtype`), `--steps` steps, checkpoint every 2 steps (`last.ckpt`), resume from
                   `--resume` if given. Writes the global loss of every step and the full weights after the last step.
    --kill_at_save K  SIGKILL the whole run while the K-th checkpoint is being written (its data files are on disk, its
                   metadata is not), as a node failure mid-save would.
    --naive        save with Lightning's stock ModelParallelStrategy.save_checkpoint (writes in place) instead of ours.

The global batch is the same whatever the process count (each rank takes its rows), every row has the same number of
supervised tokens, and the dataset's position is one integer shared by all ranks: a 2-process run and a 1-process run train
on the same batches and their losses compare.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torchdata.stateful_dataloader import StatefulDataLoader

from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.stages import VisionLanguagePretraining
from visprior.stages.parallelize import FSDP2Strategy, transformer_blocks
from visprior.training import AtomicModelCheckpoint, ExactLoaderResume

LM = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
      "num_key_value_heads": 4, "intermediate_size": 128}  # fmt: skip
TOWER = {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 8, "hidden_size": 64,
         "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128, "vision_use_head": False}  # fmt: skip
ROWS, TEXT = 4, 16


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class GlobalBatches(torch.utils.data.IterableDataset):
    """Global batch g is a pure function of g; each rank yields its rows. State: g (the same on every rank)."""

    def __init__(self, image_token: int, image_tokens: int, vocab: int, text_only: dict[int, set[int]] | None = None):
        self.image_token, self.image_tokens, self.vocab = image_token, image_tokens, vocab
        self.text_only = text_only or {}
        self.g = 0

    def batch(self, g: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 + g)
        text = torch.randint(10, self.vocab, (ROWS, TEXT), generator=gen)
        pixels = torch.randn(ROWS, 3, 32, 32, generator=gen)
        per = ROWS // world
        rows = slice(rank * per, (rank + 1) * per)
        if g in self.text_only.get(rank, set()):  # a text-only batch: no image tokens, no pixel_values
            ids = text[rows]
            ids = torch.cat([ids, ids[:, : self.image_tokens]], dim=1)  # same length and supervised count as image rows
            labels = ids.clone()
            out = {"input_ids": ids, "labels": labels}
        else:
            ids = torch.cat([torch.full((ROWS, self.image_tokens), self.image_token), text], dim=1)[rows]
            labels = ids.masked_fill(ids == self.image_token, -100)
            labels[:, : self.image_tokens] = -100
            out = {"input_ids": ids, "labels": labels, "pixel_values": pixels[rows]}
        t = out["input_ids"].shape[1]
        out["position_ids"] = torch.arange(t).expand(per, t).clone()
        out["document_ids"] = torch.zeros(per, t, dtype=torch.long)
        return out

    def __iter__(self):
        rank, world = rank_world()
        while True:
            b = self.batch(self.g, rank, world)
            self.g += 1
            yield b

    def state_dict(self) -> dict[str, int]:
        return {"g": self.g}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.g = int(state["g"])


class Record(Callback):
    """Global (mean over ranks) loss of every step, this rank's own losses, and the dtypes seen inside the LM."""

    def __init__(self) -> None:
        self.global_losses: list[float] = []
        self.rank_losses: list[float] = []
        self.compute_dtypes: set[str] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        layer = pl_module.model.language_model.model.layers[0].mlp.down_proj
        layer.register_forward_hook(lambda m, i, o: self.compute_dtypes.add(str(o.dtype)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach()
        self.rank_losses.append(float(loss))
        self.global_losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


class KillDuringSave(Callback):
    """Arms a SIGKILL of the whole process group inside the K-th checkpoint write (after its data files, before its
    metadata): what a node failure in the middle of a save leaves behind."""

    def __init__(self, at: int) -> None:
        self.at, self.saves = at, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves != self.at:
            return
        import lightning.pytorch.strategies.model_parallel as mp

        real = mp._distributed_checkpoint_save

        def save_then_die(state, path):
            real(state, path)
            dist.barrier()
            if trainer.is_global_zero:
                print(f"KILLING during the write of {path}", flush=True)
                os.killpg(os.getpgid(0), signal.SIGKILL)
            dist.barrier()

        mp._distributed_checkpoint_save = save_then_die


def full_weights(stage) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (gathered from FSDP2 shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        state = get_model_state_dict(stage.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    else:
        state = stage.model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float().clone() for k, v in state.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["mixed", "train"], required=True)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dir", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--resume", default=None)
    p.add_argument("--param_dtype", default="float32")
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--kill_at_save", type=int, default=0)
    p.add_argument("--naive", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    if args.naive:
        from lightning.pytorch.strategies import ModelParallelStrategy

        FSDP2Strategy.save_checkpoint = ModelParallelStrategy.save_checkpoint
    stage = VisionLanguagePretraining(
        LanguageModelSpec(config=LM, tokenizer=args.tokenizer),
        VisionTowerSpec(config=TOWER, feature_layer=-2),
        trainable={"vision_tower": 1e-3, "connector": 1e-3, "language_model": 1e-3},
        grad_clip=None,
        decay_steps=1000,  # the schedule must not depend on max_steps: runs of 4 and 6 steps share their first 4
        activation_checkpointing=args.activation_checkpointing,
    )
    vocab = stage.model.language_model.config.vocab_size
    text_only = {1: {1, 2}} if args.mode == "mixed" else {}
    data = GlobalBatches(stage.model.image_token_id, stage.num_image_tokens, vocab, text_only)
    if args.strategy == "fsdp":
        strategy: object = FSDP2Strategy(
            param_dtype=args.param_dtype, reduce_dtype="float32", process_group_backend="gloo"
        )
    else:
        strategy = pl.strategies.DDPStrategy(process_group_backend="gloo")
    record = Record()
    callbacks: list[Callback] = [record, ExactLoaderResume()]
    if args.mode == "train":
        callbacks.append(AtomicModelCheckpoint(dirpath=args.dir, save_last=True, save_top_k=0, every_n_train_steps=2))
        if args.kill_at_save:
            callbacks.append(KillDuringSave(args.kill_at_save))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        precision="32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=args.mode == "train",
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    trainer.fit(stage, train_dataloaders=StatefulDataLoader(data, batch_size=None), ckpt_path=args.resume)
    weights = full_weights(stage)
    checksum = float(sum(v.double().sum() for v in weights.values()))
    rank, world = rank_world()
    gathered = [None] * world
    local = [p.to_local() if hasattr(p, "to_local") else p for p in stage.model.parameters()]
    state = [
        v for st in trainer.optimizers[0].state.values() for k, v in st.items() if k != "step" and torch.is_tensor(v)
    ]
    payload = {
        "rank": rank,
        "rank_losses": record.rank_losses,
        "checksum": checksum,
        "param_bytes": sum(t.numel() * t.element_size() for t in local),  # this rank's shard (FSDP2) or all (DDP)
        "optimizer_bytes": sum((v.to_local() if hasattr(v, "to_local") else v).nbytes for v in state),
    }
    if dist.is_initialized():
        dist.all_gather_object(gathered, payload)
    else:
        gathered = [payload]
    if trainer.is_global_zero:
        blocks = transformer_blocks(stage.model.language_model) + transformer_blocks(stage.model.vision_tower)
        result = {
            "world_size": world,
            "vocab_size": vocab,
            "global_step": trainer.global_step,
            "losses": record.global_losses,
            "ranks": gathered,
            "compute_dtypes": sorted(record.compute_dtypes),
            "param_dtypes": sorted({str(p.dtype) for p in stage.model.parameters()}),
            "checkpointed_blocks": sum(bool(getattr(b, "gradient_checkpointing", False)) for b in blocks),
            "blocks": len(blocks),
        }
        torch.save(weights, Path(args.out).with_suffix(".weights.pt"))
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
