"""Training-step throughput of the toy-base VLM: the Lightning stage against a bare PyTorch loop, MFU, and padding.

Both loops run the same model (same initial weights), the same batch and the same optimizer (AdamW foreach, the stage's
per-component groups and schedule) with threads pinned, so their ratio is the framework's overhead. MFU is the model
FLOP/s (`VLMStage.flops_per_token`: 6·N per trained parameter and token plus the attention term) over the fp32 matmul
FLOP/s measured on this CPU (best of before and after the loops). Padding is measured on the real pipeline (toy SFT conversations through
`TrainStream`), packed and one-sample-per-row. Prints the figures and writes benchmarks/results/train_step.json.

    python benchmarks/train_step.py [--data data/toyworld] [--steps 8] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from visprior.data.datamodule import SourceSpec, VisionLanguageDataModule
from visprior.models.connectors import ConnectorSpec
from visprior.models.language import LanguageModelSpec
from visprior.models.presets import TOY_LLAMA, TOY_SIGLIP
from visprior.models.vision import VisionTowerSpec
from visprior.stages import InstructionTuning

ROWS, SEQ_LEN = 8, 256
TRAINABLE = {"vision_tower": 1e-4, "connector": 1e-3, "language_model": 2e-4}


def matmul_flops(n: int = 1024, repeats: int = 20) -> float:
    """Best-of fp32 matmul FLOP/s at n x n (the CPU's practical peak for this model's dense layers)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def tokenizer_folder(data: Path) -> Path:
    folder = data / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return folder
    from visprior.data.tokenizer import train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="bench-tok-")) / "tokenizer"
    train_tokenizer(data, out, vocab_size=8192)
    return out


def build_stage(tokenizer: Path) -> InstructionTuning:
    torch.manual_seed(0)
    return InstructionTuning(
        LanguageModelSpec(config=TOY_LLAMA, tokenizer=str(tokenizer)),
        VisionTowerSpec(config=TOY_SIGLIP),
        ConnectorSpec(name="mlp2x_gelu"),
        trainable=TRAINABLE,
        decay_steps=1000,
    )


def synthetic_batch(stage: InstructionTuning) -> dict:
    """8 rows x 256 tokens: one image (64 tokens) + 192 supervised text tokens per row."""
    g = torch.Generator().manual_seed(0)
    k = stage.num_image_tokens
    vocab = stage.model.language_model.config.vocab_size
    text = torch.randint(10, vocab, (ROWS, SEQ_LEN - k), generator=g)
    ids = torch.cat([torch.full((ROWS, k), stage.model.image_token_id), text], dim=1)  # [B, T]
    labels = ids.clone()
    labels[:, :k] = -100
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": torch.arange(SEQ_LEN).expand(ROWS, SEQ_LEN).clone(),
        "document_ids": torch.zeros(ROWS, SEQ_LEN, dtype=torch.long),
        "pixel_values": torch.randn(ROWS, 3, 64, 64, generator=g),
        "keys": [f"row{i}" for i in range(ROWS)],
    }


def bare_loop(stage: InstructionTuning, batch: dict, steps: int) -> list[float]:
    """Plain PyTorch: forward, backward, clip, AdamW step, schedule step; seconds per step."""
    stage.train()
    opt_cfg = stage.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = stage.compute_loss(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in stage.parameters() if p.grad is not None], 1.0, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


class StepTimer(Callback):
    """Wall time between consecutive batch ends: everything the framework does per step, data fetch and hooks included."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


def lightning_loop(stage: InstructionTuning, batch: dict, steps: int) -> list[float]:
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="32-true",
        max_steps=steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(Repeat(batch, steps + 1), batch_size=None))
    return timer.times


def padding(data: Path, tokenizer: Path, stage: InstructionTuning, packed: bool, batches: int = 30) -> float:
    """Pad share of the token slots of real SFT batches (seq_len 512, batch 8), as the trainer receives them."""
    dm = VisionLanguageDataModule([SourceSpec(str(data / "sft"))], batch_size=8, seq_len=512, packing=packed)
    dm.connect(stage.tokenizer, stage.image_transform, stage.num_image_tokens)
    stream = iter(dm.build_stream(dm.sources, seed=0))
    real = total = 0
    for _ in range(batches):
        docs = next(stream)["document_ids"]
        real += int((docs >= 0).sum())
        total += docs.numel()
    return 1 - real / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/toyworld", type=Path)
    p.add_argument("--steps", type=int, default=4, help="measured steps per loop and round")
    p.add_argument("--rounds", type=int, default=4, help="alternating bare/Lightning rounds (medians over all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=Path(__file__).parent / "results" / "train_step.json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    tokenizer = tokenizer_folder(args.data)
    template = build_stage(tokenizer)
    batch = synthetic_batch(template)
    peak = matmul_flops()

    bare, light = [], []
    for _ in range(args.rounds):
        stage = copy.deepcopy(template)
        bare += bare_loop(stage, batch, args.steps + 1)[1:]  # first step warms the allocator
        stage = copy.deepcopy(template)
        light += lightning_loop(stage, batch, args.steps)
    peak = max(peak, matmul_flops())  # before and after: a busy neighbour during one measurement would inflate MFU
    bare_s, light_s = statistics.median(bare), statistics.median(light)
    tokens = ROWS * SEQ_LEN
    model_flops = template.flops_per_token(batch) * tokens
    result = {
        "model": "toy VLM: SigLIP 64px/8/4 layers + mlp2x_gelu + Llama 256x6",
        "parameters": sum(p.numel() for p in template.parameters()),
        "trainable": TRAINABLE,
        "batch": {"rows": ROWS, "seq_len": SEQ_LEN, "images": ROWS, "image_tokens": template.num_image_tokens},
        "threads": args.threads,
        "bare_ms_per_step": 1e3 * bare_s,
        "lightning_ms_per_step": 1e3 * light_s,
        "bare_tokens_per_s": tokens / bare_s,
        "lightning_tokens_per_s": tokens / light_s,
        "overhead_pct": 100 * (light_s / bare_s - 1),
        "overhead_pct_best_step": 100 * (min(light) / min(bare) - 1),
        "bare_ms_steps": [round(1e3 * t, 1) for t in bare],
        "lightning_ms_steps": [round(1e3 * t, 1) for t in light],
        "steps_measured": {"bare": len(bare), "lightning": len(light)},
        "matmul_fp32_flops": peak,
        "model_flops_per_step": model_flops,
        "achieved_flops_lightning": model_flops / light_s,
        "mfu_lightning": model_flops / light_s / peak,
        "mfu_bare": model_flops / bare_s / peak,
        "padding_sft_packed": padding(args.data, tokenizer, template, packed=True),
        "padding_sft_unpacked": padding(args.data, tokenizer, template, packed=False),
        "load_average": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"bare      {result['bare_ms_per_step']:8.1f} ms/step {result['bare_tokens_per_s']:8.0f} tok/s\n"
        f"lightning {result['lightning_ms_per_step']:8.1f} ms/step {result['lightning_tokens_per_s']:8.0f} tok/s  "
        f"overhead {result['overhead_pct']:+.1f}% (median), {result['overhead_pct_best_step']:+.1f}% (best step)\n"
        f"matmul {peak / 1e9:.1f} GFLOP/s; model {model_flops / 1e9:.2f} GFLOP/step; "
        f"MFU {100 * result['mfu_lightning']:.1f}% (bare {100 * result['mfu_bare']:.1f}%)\n"
        f"SFT padding: packed {100 * result['padding_sft_packed']:.1f}%, "
        f"unpacked {100 * result['padding_sft_unpacked']:.1f}%\n"
        f"-> {args.out}"
    )


if __name__ == "__main__":
    main()
