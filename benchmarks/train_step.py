"""Training-step throughput of the toy VLM: fp32 / bf16, compiled blocks or not, the Lightning stage against a bare loop
for each, packed rows at 2k and 8k tokens per attention backend, and (with `--nanovlm DIR`) nanoVLM's own modules at
the same shapes.

The model is the issue-13 side-by-side shape: SigLIP 64 px / patch 8 / 4 layers / 256 wide -> 2x2 merge to 16 tokens ->
linear -> Llama 256 x 6, the toy tokenizer's vocabulary, tied embeddings, everything trainable; batch 8 x 256 tokens,
AdamW fused, as the stages pick it on CPU (one row, `bare foreach`, gives the optimizer kernel's share). The bare loop
and the Lightning stage run the same weights, batch and optimizer with threads pinned, so their ratio is the framework's
overhead (the Lightning loop carries the callbacks `visprior fit` adds: non-finite guard, loader resume, data health,
preemption, RNG state, and `peak_flops: auto`). bf16 is autocast around the forward with fp32 weights and optimizer
state (what `precision: bf16-mixed` does).

Every configuration runs once per round and the rounds alternate in one process (the order reversed every other round),
so a ratio is taken between neighbours in time: on a shared machine the absolute figures drift with the neighbours'
load, the ratios much less. Each ratio is given per round and as the median over rounds (tokens/s of A over B: > 1
means A is faster). `load_average` is sampled through the run and recorded with the figures.

The nanoVLM rows run `VisionLanguageModel(cfg, load_backbone=False)` from a local clone (`--nanovlm DIR`, never copied
into visprior) at the same widths, depths and vocabulary: `nanovlm` with the bare loop's optimizer (the same AdamW,
clipping, no schedule), so visprior/nanoVLM at the same precision compares the models; `nanovlm train.py` as its
`train.py` runs on CPU (bf16 autocast, a padding `attention_mask`, `AdamW(param_groups)` at torch's CPU default,
per-group learning rates, `loss.item()` per step), which is what "nanoVLM's defaults" means below. visprior's defaults
are the Lightning stage at `precision: auto` (resolved here from the measured matmul rates) and `compile: false`.

MFU is model FLOP/s (`VLMStage.flops_per_token`; nanoVLM has the same shapes, hence the same FLOPs) over the 1024²
matmul rate in the row's precision, measured here (best of before and after the rounds). The first compile is timed
twice: in a fresh process with an empty inductor cache (cold), and in the main process, itself fresh for dynamo and
inductor, whose first compiled step reads the cache the cold run left (a relaunch: a resume, the next seed or arm); the
packed rows' processes share that cache too. Packed rows run the text LM alone on one row of 2k / 8k tokens holding
documents of 64-512 tokens, forward only and forward + backward (FlexAttention: forward only on CPU, torch has no flex
backward there), each in its own process; peak memory is the process's resident high-water mark during the phase above
what it held before (the model, the batch). Padding is measured on the real pipeline (toy SFT conversations through
`TrainStream`), packed and one-sample-per-row. Writes benchmarks/results/train_step.json.

    python benchmarks/train_step.py [--data data/toyworld] [--steps 4] [--rounds 3] [--threads 2] [--nanovlm DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from visprior import hardware
from visprior.models.connectors import ConnectorSpec
from visprior.models.language import LanguageModelSpec
from visprior.models.presets import TOY_LLAMA, TOY_SIGLIP
from visprior.models.vision import VisionTowerSpec
from visprior.stages import InstructionTuning
from visprior.stages import base as stages_base
from visprior.stages.compile import compile_blocks
from visprior.training import robust_callbacks

ROWS, SEQ_LEN, IMAGE_TOKENS = 8, 256, 16
TRAINABLE = {"vision_tower": 1e-4, "connector": 1e-3, "language_model": 2e-4}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
PACKED_BACKENDS = ("sdpa", "flex_attention", "flash_attention_2")
NANOVLM_LRS = {"MP": 0.00512, "vision_encoder": 5e-5, "decoder": 5e-5}  # its TrainConfig defaults


def tokenizer_folder(data: Path) -> Path:
    folder = data / "tokenizer"
    if (folder / "tokenizer.json").exists():
        return folder
    from visprior.data.tokenizer import train_tokenizer

    out = Path(tempfile.mkdtemp(prefix="bench-tok-")) / "tokenizer"
    train_tokenizer(data, out, vocab_size=8192)
    return out


def build_stage(tokenizer: Path, peak_flops: str | None = None) -> InstructionTuning:
    torch.manual_seed(0)
    return InstructionTuning(
        LanguageModelSpec(config=TOY_LLAMA, tokenizer=str(tokenizer)),
        VisionTowerSpec(config=TOY_SIGLIP, feature_layer=-1),
        ConnectorSpec(name="linear", num_tokens=IMAGE_TOKENS),
        trainable=TRAINABLE,
        decay_steps=1000,
        peak_flops=peak_flops,
    )


def synthetic_batch(stage: InstructionTuning) -> dict:
    """8 rows x 256 tokens: one image (16 tokens) + 240 supervised text tokens per row."""
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


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ loops


def bare_loop(
    stage: InstructionTuning, batch: dict, steps: int, precision: str, compiled: bool, foreach: bool = False
) -> list[float]:
    """Plain PyTorch: forward (autocast for bf16), backward, clip, AdamW, schedule; seconds per step. `foreach`: the
    stage's AdamW with torch's foreach kernel in place of the fused one it picks on CPU (the optimizer row)."""
    if compiled:
        compile_blocks(stage.model)
    stage.train()
    with mock.patch.object(stages_base, "adamw", foreach_adamw) if foreach else contextlib.nullcontext():
        opt_cfg = stage.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    params = [p for g in opt.param_groups for p in g["params"]]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(precision):
            loss = stage.compute_loss(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def foreach_adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


class StepTimer(Callback):
    """Wall time between consecutive batch ends: all the framework does per step, data fetch and hooks included."""

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
        return (dict(self.batch) for _ in range(self.n))


@functools.cache
def run_dir() -> str:
    return tempfile.mkdtemp(prefix="bench-train-step-")


def lightning_loop(stage: InstructionTuning, batch: dict, steps: int, precision: str, compiled: bool) -> list[float]:
    """The stage under `pl.Trainer` with the run callbacks; the first batch (set-up, compile) is not timed."""
    timer = StepTimer()
    stage.regional_compile = compiled
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=PRECISIONS[precision],
        max_steps=steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir(),  # DataHealthCallback writes data_skips.json there, not into the working directory
        callbacks=[timer, *robust_callbacks()],  # what `visprior fit` adds to every run (checkpointing aside)
    )
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(Repeat(batch, steps + 1), batch_size=None))
    return timer.times


def matmul_rates() -> dict[str, float]:
    rates = {"fp32": hardware.time_matmul(torch.float32, repeats=20)}
    if hardware.bf16_flags():
        rates["bf16"] = hardware.time_matmul(torch.bfloat16, repeats=20)
    return rates


class LoadSampler:
    """`os.getloadavg()` every `every` seconds on a daemon thread, so the JSON says how busy the machine was."""

    def __init__(self, every: float = 10.0) -> None:
        self.samples: list[tuple[float, float, float]] = [os.getloadavg()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg())

    def summary(self) -> dict:
        self._stop.set()
        self.samples.append(os.getloadavg())
        one = [s[0] for s in self.samples]
        return {
            "start": self.samples[0],
            "end": self.samples[-1],
            "one_minute_mean": statistics.mean(one),
            "one_minute_min": min(one),
            "one_minute_max": max(one),
            "samples": len(one),
        }


def padding(data: Path, stage: InstructionTuning, packed: bool, batches: int = 30) -> float | None:
    """Pad share of the token slots of real SFT batches (seq_len 512, batch 8), as the trainer receives them."""
    from visprior.data.datamodule import SourceSpec, VisionLanguageDataModule

    if not (data / "sft").exists():
        return None
    dm = VisionLanguageDataModule([SourceSpec(str(data / "sft"))], batch_size=8, seq_len=512, packing=packed)
    dm.connect(stage.tokenizer, stage.image_transform, stage.num_image_tokens)
    stream = iter(dm.build_stream(dm.sources, seed=0))
    real = total = 0
    for _ in range(batches):
        docs = next(stream)["document_ids"]
        real += int((docs >= 0).sum())
        total += docs.numel()
    return 1 - real / total


# ------------------------------------------------------------------------------------------------ first compile


def first_steps(tokenizer: Path, precision: str, steps: int) -> dict:
    """One fresh process: build, compile, and time the first steps (the first carries the compile)."""
    stage = build_stage(tokenizer)
    batch = synthetic_batch(stage)
    times = bare_loop(stage, batch, steps, precision, compiled=True)
    return {"first_step_s": times[0], "steady_step_s": statistics.median(times[1:])}


def cold_compile(args: argparse.Namespace, precision: str, cache: Path) -> dict:
    """The first compile with an empty inductor cache (`cache`), in a fresh process: first step minus a steady one.

    The relaunch figure comes from the rounds: the main process is a fresh one for dynamo and inductor, and its first
    compiled step at this precision reads the cache this run left (see `main`).
    """
    cmd = [sys.executable, __file__, "--data", str(args.data), "--threads", str(args.threads)]
    cmd += ["--first-steps", precision]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONWARNINGS="ignore")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["compile_s"] = result["first_step_s"] - result["steady_step_s"]
    result["process_s"] = time.perf_counter() - t
    return result


# ------------------------------------------------------------------------------------------------ packed rows


def _status_mb(field: str) -> float:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_memory(device: torch.device) -> float:
    """Start a phase's peak at the memory held now (returned, MiB): CUDA's counter, or on Linux the process's resident
    high-water mark (`VmHWM`, reset by writing 5 to /proc/self/clear_refs). Not `ru_maxrss`: Linux carries it over from
    the parent across fork and exec, so a child started by a bigger process would read the parent's peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_memory_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _status_mb("VmHWM")


def packed_row(tokenizer: Path, backend: str, seq_len: int, precision: str, reps: int) -> dict:
    """One row of `seq_len` tokens packed with 64-512-token documents through the text LM; time and peak memory of a
    forward alone and (where the backend has one on this device) of forward + backward."""
    from visprior.models.vlm import VLMSpec, build_vlm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend.startswith("flash") and device.type != "cuda":
        return {"skipped": "flash-attention varlen needs a CUDA GPU (and the flash-attn package)"}
    torch.manual_seed(0)
    spec = LanguageModelSpec(config=TOY_LLAMA, tokenizer=str(tokenizer), attn_implementation=backend)
    model = build_vlm(VLMSpec(spec)).to(device)
    g = torch.Generator().manual_seed(0)
    docs, positions, d = [], [], 0
    while len(docs) < seq_len:
        n = int(torch.randint(64, 513, (1,), generator=g))
        docs += [d] * n
        positions += list(range(n))
        d += 1
    ids = torch.randint(10, model.language_model.config.vocab_size, (1, seq_len), generator=g)
    batch = {
        "input_ids": ids,
        "labels": ids.clone(),
        "document_ids": torch.tensor([docs[:seq_len]]),
        "position_ids": torch.tensor([positions[:seq_len]]),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ctx = torch.autocast(device.type, dtype=dtype) if precision == "bf16" else contextlib.nullcontext()

    def timed(step: Callable[[], None]) -> dict:
        base = reset_peak_memory(device)
        t = time.perf_counter()
        step()  # warm-up (flex: compiles its kernel)
        first = time.perf_counter() - t
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        s = statistics.median(times)
        peak = peak_memory_mb(device) - base
        return {"ms": 1e3 * s, "tokens_per_s": seq_len / s, "first_call_s": first, "peak_mem_mb": peak}

    def forward() -> None:
        with ctx, torch.no_grad():
            model(**batch)

    def forward_backward() -> None:
        with ctx:
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    out = {"documents": d, "dense_mask_mb": seq_len * seq_len / 2**20 if backend == "sdpa" else 0.0}
    out["forward"] = timed(forward)
    with ctx, torch.no_grad():  # the backend's kernel as it runs here (flex: compiled), checked against sdpa's loss
        out["loss"] = float(model(**batch).loss)
    if backend == "flex_attention" and device.type == "cpu":
        out["forward_backward"] = {"skipped": "torch has no FlexAttention backward on CPU"}
    else:
        out["forward_backward"] = timed(forward_backward)
    return out


def packed_rows(args: argparse.Namespace, precision: str) -> dict:
    out: dict = {}
    for seq_len in args.packed:
        for backend in PACKED_BACKENDS:
            if backend.startswith("flash") and not torch.cuda.is_available():
                out[f"{backend}@{seq_len}"] = {"skipped": "flash-attention varlen needs a CUDA GPU (and flash-attn)"}
                continue
            cmd = [sys.executable, __file__, "--data", str(args.data), "--threads", str(args.threads)]
            cmd += ["--packed-reps", str(args.packed_reps), "--packed-one", backend, str(seq_len), precision]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode != 0:
                out[f"{backend}@{seq_len}"] = {"failed": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
            else:
                out[f"{backend}@{seq_len}"] = json.loads(proc.stdout.strip().splitlines()[-1])
        reference = out.get(f"sdpa@{seq_len}", {}).get("loss")
        for backend in PACKED_BACKENDS[1:]:
            row = out[f"{backend}@{seq_len}"]
            if reference is not None and "loss" in row:
                row["loss_diff_vs_sdpa"] = abs(row["loss"] - reference)
    return out


# ------------------------------------------------------------------------------------------------ nanoVLM peer


def nanovlm_model(folder: Path, stage: InstructionTuning) -> torch.nn.Module:
    """nanoVLM's own `VisionLanguageModel(cfg, load_backbone=False)` at the same shapes, from a local clone.

    Its `data.processors` (tokenizer download, torchvision transforms) is replaced by a stub that hands over our image
    token id: nothing of it runs in a training step, and neither the hub nor torchvision is available here.
    """
    sys.path.insert(0, str(folder))
    stub = types.ModuleType("data.processors")
    stub.get_tokenizer = lambda *a, **k: types.SimpleNamespace(image_token_id=stage.model.image_token_id)
    sys.modules.setdefault("data", types.ModuleType("data"))
    sys.modules["data.processors"] = stub
    from models.config import VLMConfig  # the peer's modules, from --nanovlm
    from models.vision_language_model import VisionLanguageModel

    lm = TOY_LLAMA
    cfg = VLMConfig(
        vit_hidden_dim=TOY_SIGLIP["hidden_size"], vit_inter_dim=TOY_SIGLIP["intermediate_size"],
        vit_patch_size=TOY_SIGLIP["patch_size"], vit_img_size=TOY_SIGLIP["image_size"],
        vit_n_heads=TOY_SIGLIP["num_attention_heads"], vit_n_blocks=TOY_SIGLIP["num_hidden_layers"],
        lm_hidden_dim=lm["hidden_size"], lm_inter_dim=lm["intermediate_size"], lm_n_heads=lm["num_attention_heads"],
        lm_n_kv_heads=lm["num_key_value_heads"], lm_n_blocks=lm["num_hidden_layers"],
        lm_vocab_size=stage.model.language_model.config.vocab_size, lm_max_position_embeddings=1024,
        lm_tie_weights=True, mp_pixel_shuffle_factor=2, mp_image_token_length=IMAGE_TOKENS,
    )  # fmt: skip
    torch.manual_seed(0)
    return VisionLanguageModel(cfg, load_backbone=False)


def nanovlm_loop(model: torch.nn.Module, batch: dict, steps: int, precision: str) -> list[float]:
    """nanoVLM's model under the bare loop's optimizer (visprior's AdamW kernel choice, clipping): the model-to-model
    comparison."""
    model.train()
    opt = stages_base.adamw([{"params": list(model.parameters())}], lr=1e-4)
    params = list(model.parameters())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(precision):
            _, loss = model(batch["input_ids"], batch["pixel_values"], targets=batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def nanovlm_train_py_loop(model: torch.nn.Module, batch: dict, steps: int, precision: str) -> list[float]:
    """The step as nanoVLM's `train.py` runs it on CPU (one update per batch: our fixed batch of 8 x 256 in place of
    its 2 x 8 accumulation): bf16 autocast, padding mask, torch's default AdamW, per-group lr, `.item()` per step."""
    model.train()
    groups = [{"params": list(getattr(model, name).parameters()), "lr": lr} for name, lr in NANOVLM_LRS.items()]
    opt = torch.optim.AdamW(groups)
    params = [p for g in opt.param_groups for p in g["params"]]
    mask = torch.ones_like(batch["input_ids"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(precision):
            _, loss = model(batch["input_ids"], batch["pixel_values"], attention_mask=mask, targets=batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        for group, lr in zip(opt.param_groups, NANOVLM_LRS.values()):
            group["lr"] = lr
        opt.step()
        opt.zero_grad()
        loss.item(), mask.sum().item()
        times.append(time.perf_counter() - t)
    return times


# ------------------------------------------------------------------------------------------------ rounds


@dataclass
class Config:
    name: str
    run: Callable[[], list[float]]
    precision: str
    warmup: bool = True
    """`run` returns a warm-up step first (kept apart: it carries any compile); the Lightning timer already drops it."""


def configs(
    args: argparse.Namespace,
    template: InstructionTuning,
    batch: dict,
    precisions: list[str],
    nano: torch.nn.Module | None,
) -> list[Config]:
    """Every configuration of one round; each copies its model afresh from the same weights."""
    out = []
    for prec in precisions:
        for compiled in (False, True) if prec in args.compiled else (False,):
            tag = f"{prec}{' compiled' if compiled else ''}"

            def bare(prec=prec, compiled=compiled) -> list[float]:
                return bare_loop(copy.deepcopy(template), batch, args.steps + 1, prec, compiled)

            def light(prec=prec, compiled=compiled) -> list[float]:
                stage = copy.deepcopy(template)
                stage.peak_flops, stage._peak = "auto", None  # the stage YAMLs' default: train/mfu logged
                return lightning_loop(stage, batch, args.steps, prec, compiled)

            out += [Config(f"{tag} bare", bare, prec), Config(f"{tag} lightning", light, prec, warmup=False)]
        if prec == precisions[-1]:  # the optimizer kernel, at the last precision: fused (the stage's) / foreach

            def bare_foreach(prec=prec) -> list[float]:
                return bare_loop(copy.deepcopy(template), batch, args.steps + 1, prec, False, foreach=True)

            out.append(Config(f"{prec} bare foreach", bare_foreach, prec))
    if nano is not None:
        for prec in precisions:

            def peer(prec=prec) -> list[float]:
                return nanovlm_loop(copy.deepcopy(nano), batch, args.steps + 1, prec)

            out.append(Config(f"{prec} nanovlm", peer, prec))

        def peer_defaults() -> list[float]:
            return nanovlm_train_py_loop(copy.deepcopy(nano), batch, args.steps + 1, "bf16")

        out.append(Config("bf16 nanovlm train.py", peer_defaults, "bf16"))
    return out


def run_rounds(cfgs: list[Config], rounds: int) -> tuple[dict[str, list[list[float]]], dict[str, list[float]]]:
    """Per configuration, one list of measured step times per round, and the warm-up step of each round; the order is
    reversed every other round."""
    times: dict[str, list[list[float]]] = {c.name: [] for c in cfgs}
    warmups: dict[str, list[float]] = {c.name: [] for c in cfgs if c.warmup}
    for r in range(rounds):
        for c in cfgs if r % 2 == 0 else reversed(cfgs):
            t = time.perf_counter()
            steps = c.run()
            if c.warmup:
                warmups[c.name].append(steps[0])
                steps = steps[1:]
            times[c.name].append(steps)
            print(f"round {r + 1}/{rounds} {c.name:24s} {time.perf_counter() - t:6.1f} s", file=sys.stderr, flush=True)
    return times, warmups


def ratio(times: dict[str, list[list[float]]], a: str, b: str) -> dict | None:
    """tokens/s of `a` over `b` (= step time of b over a) per round, and the median over rounds."""
    if a not in times or b not in times:
        return None
    per_round = [statistics.median(tb) / statistics.median(ta) for ta, tb in zip(times[a], times[b])]
    return {
        "a": a,
        "b": b,
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
        "per_round": per_round,
    }


def ratios(times: dict[str, list[list[float]]], precisions: list[str], default: str) -> dict[str, dict]:
    out: dict[str, dict | None] = {}
    for prec in precisions:
        out[f"visprior / nanoVLM, {prec} (bare loop vs the same loop)"] = ratio(
            times, f"{prec} bare", f"{prec} nanovlm"
        )
        out[f"visprior Lightning / nanoVLM, {prec}"] = ratio(times, f"{prec} lightning", f"{prec} nanovlm")
    out[f"visprior defaults ({default} Lightning, eager) / nanoVLM defaults (train.py, bf16)"] = ratio(
        times, f"{default} lightning", "bf16 nanovlm train.py"
    )
    for prec in precisions:
        out[f"visprior compiled Lightning ({prec}) / nanoVLM defaults"] = ratio(
            times, f"{prec} compiled lightning", "bf16 nanovlm train.py"
        )
    out["nanoVLM under the bare loop / nanoVLM train.py loop (bf16)"] = ratio(
        times, "bf16 nanovlm", "bf16 nanovlm train.py"
    )
    for prec in precisions:
        out[f"fused AdamW / foreach AdamW, {prec} bare"] = ratio(times, f"{prec} bare", f"{prec} bare foreach")
    for name in [n for n in times if n.endswith(" lightning")]:
        out[f"Lightning / bare, {name.removesuffix(' lightning')}"] = ratio(
            times, name, name.replace("lightning", "bare")
        )
    for prec in precisions:
        for loop in ("bare", "lightning"):
            out[f"compiled / eager, {prec} {loop}"] = ratio(times, f"{prec} compiled {loop}", f"{prec} {loop}")
    if "fp32" in precisions and "bf16" in precisions:
        for loop in ("bare", "lightning", "compiled bare", "compiled lightning", "nanovlm"):
            out[f"bf16 / fp32, {loop}"] = ratio(times, f"bf16 {loop}", f"fp32 {loop}")
    return {k: v for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/toyworld", type=Path)
    p.add_argument("--steps", type=int, default=4, help="measured steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over all configurations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--packed", type=lambda s: [int(x) for x in s.split(",") if x], default=[2048, 8192])
    p.add_argument("--packed-reps", type=int, default=3, help="timed calls per packed row (after one warm-up)")
    p.add_argument("--nanovlm", type=Path, default=None, help="a local clone of huggingface/nanoVLM (peer rows)")
    p.add_argument("--compiled", type=lambda s: [x for x in s.split(",") if x], default=["fp32", "bf16"],
                   help="precisions that also get compiled rows (comma-separated; empty: none)")  # fmt: skip
    p.add_argument("--compile-cost", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="precisions whose cold first compile is timed (default: those of --compiled)")  # fmt: skip
    p.add_argument("--out", default=Path(__file__).parent / "results" / "train_step.json", type=Path)
    p.add_argument("--first-steps", default=None, help=argparse.SUPPRESS)
    p.add_argument("--packed-one", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = tokenizer_folder(args.data)
    if args.first_steps:
        print(json.dumps(first_steps(tokenizer, args.first_steps, steps=3)))
        return
    if args.packed_one:
        backend, seq_len, precision = args.packed_one
        print(json.dumps(packed_row(tokenizer, backend, int(seq_len), precision, args.packed_reps)))
        return

    started = time.perf_counter()
    load = LoadSampler()
    peaks = matmul_rates()
    precisions = [k for k in PRECISIONS if k in peaks]
    auto = hardware.choose_cpu_precision(
        hardware.MatmulRates(peaks["fp32"], peaks.get("bf16"), args.threads, flags=hardware.bf16_flags())
    )
    default = "bf16" if auto.precision == "bf16-mixed" else "fp32"
    args.compiled = [c for c in args.compiled if c in precisions]
    cost_precisions = [
        c for c in (args.compiled if args.compile_cost is None else args.compile_cost) if c in precisions
    ]
    cache_root = Path(tempfile.mkdtemp(prefix="bench-inductor-"))
    result: dict = {"first_compile": {}}
    for prec in cost_precisions:  # each precision its own empty cache, so "cold" is cold
        result["first_compile"][prec] = {"cold": cold_compile(args, prec, cache_root / prec)}
    # the rounds reuse the cache a cold run left (the default precision's when it was timed): a relaunch
    warm = default if default in cost_precisions else (cost_precisions or ["main"])[0]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root / warm)

    template = build_stage(tokenizer)
    batch = synthetic_batch(template)
    batch["host_counts"] = template.batch_counts(batch)
    tokens = ROWS * SEQ_LEN
    model_flops = template.flops_per_token(batch) * tokens
    nano = nanovlm_model(args.nanovlm, template) if args.nanovlm else None
    cfgs = configs(args, template, batch, precisions, nano)
    times, warmups = run_rounds(cfgs, args.rounds)
    for prec in args.compiled:  # the main process's first compiled step at `prec`, in round 1
        name = f"{prec} compiled bare"
        first, steady = warmups[name][0], statistics.median(times[name][0])
        kind = "relaunch" if prec == warm else "cold (in the main process)"
        result["first_compile"].setdefault(prec, {})[kind] = {
            "first_step_s": first,
            "steady_step_s": steady,
            "compile_s": first - steady,
        }
    for name, value in matmul_rates().items():  # best of before and after: a busy neighbour slows one
        peaks[name] = max(peaks[name], value)

    table = {}
    for c in cfgs:
        steps = [t for round_times in times[c.name] for t in round_times]
        s = statistics.median(steps)
        table[c.name] = {
            "ms_per_step": 1e3 * s,
            "tokens_per_s": tokens / s,
            "mfu": model_flops / s / peaks[c.precision],
            "ms_steps_per_round": [[round(1e3 * t, 1) for t in r] for r in times[c.name]],
            "warmup_ms_per_round": [round(1e3 * t, 1) for t in warmups.get(c.name, [])],
        }
    result.update(
        {
            "model": "toy VLM: SigLIP 64px/8/4x256 -> 2x2 merge (16 tokens) -> linear -> Llama 256x6, tied",
            "parameters": sum(p.numel() for p in template.parameters()),
            "batch": {"rows": ROWS, "seq_len": SEQ_LEN, "images": ROWS, "image_tokens": IMAGE_TOKENS},
            "settings": {
                "threads": args.threads,
                "steps": args.steps,
                "rounds": args.rounds,
                "compiled": args.compiled,
                "packed": args.packed,
                "packed_reps": args.packed_reps,
            },
            "matmul_flops": peaks,
            "auto_precision": {"precision": auto.precision, "reason": auto.reason},
            "model_flops_per_step": model_flops,
            "rows": table,
            "ratios": ratios(times, precisions, default),
        }
    )
    if args.nanovlm:
        result["nanovlm"] = {
            "folder": str(args.nanovlm),
            "commit": nanovlm_commit(args.nanovlm),
            "parameters": sum(p.numel() for p in nano.parameters()),
        }
    result["packed"] = packed_rows(args, default)
    result["packed_precision"] = default
    result["padding_sft_packed"] = padding(args.data, template, packed=True)
    result["padding_sft_unpacked"] = padding(args.data, template, packed=False)
    result.update(
        {
            "load_average": load.summary(),
            "wall_s": time.perf_counter() - started,
            "cpu": hardware.cpu_info()["model_name"],
            "cpu_bf16_flags": hardware.bf16_flags(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    report(result)
    print(f"-> {args.out}")


def nanovlm_commit(folder: Path) -> str | None:
    """The clone's commit: a `COMMIT` file in an exported tree (`git archive`), else `git rev-parse HEAD` of a clone."""
    if (marker := folder / "COMMIT").exists():
        return marker.read_text().strip()
    if not (folder / ".git").exists():
        return None
    proc = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def report(r: dict) -> None:
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r["matmul_flops"].items())
    load = r["load_average"]
    print(
        f"matmul 1024² GFLOP/s: {peaks}; precision: auto -> {r['auto_precision']['precision']}; "
        f"threads {r['settings']['threads']}; load average (1 min) {load['one_minute_mean']:.1f} "
        f"[{load['one_minute_min']:.1f}-{load['one_minute_max']:.1f}]; wall {r['wall_s'] / 60:.1f} min"
    )
    for name, row in r["rows"].items():
        print(f"{name:24s} {row['ms_per_step']:7.1f} ms {row['tokens_per_s']:6.0f} tok/s MFU {100 * row['mfu']:4.1f}%")
    for name, q in r["ratios"].items():
        print(f"{name:80s} {q['median']:.2f}x [{q['min']:.2f}-{q['max']:.2f}]")
    for prec, runs in r["first_compile"].items():
        cells = [
            f"{run} {v['compile_s']:.1f} s" if "compile_s" in v else f"{run} failed: {v['failed']}"
            for run, v in runs.items()
        ]
        steady = runs.get("cold", {}).get("steady_step_s")  # the compiled step in the cold process
        print(
            f"first compile {prec}: " + ", ".join(cells) + (f" (compiled step {1e3 * steady:.0f} ms)" if steady else "")
        )
    for name, row in r["packed"].items():
        if "forward" not in row:
            print(f"packed {name:24s} {row.get('skipped') or row.get('failed')}")
            continue
        cells = []
        for kind in ("forward", "forward_backward"):
            v = row[kind]
            cells.append(
                f"{kind} {v['ms']:8.1f} ms peak {v['peak_mem_mb']:6.0f} MB"
                if "ms" in v
                else f"{kind} {v.get('skipped')}"
            )
        if "loss_diff_vs_sdpa" in row:
            cells.append(f"|loss - sdpa's| {row['loss_diff_vs_sdpa']:.1e}")
        print(f"packed {name:24s} " + " | ".join(cells))
    if r.get("padding_sft_packed") is not None:
        print(
            f"SFT padding: packed {100 * r['padding_sft_packed']:.1f}%, unpacked {100 * r['padding_sft_unpacked']:.1f}%"
        )


if __name__ == "__main__":
    main()
