"""What this machine computes fast: the precision `precision: auto` resolves to, and the peak FLOP/s MFU is taken against.

The CPU changes from one host to the next (an AVX2-only EPYC runs bf16 20-70x slower than fp32, a Zen 4 or Sapphire
Rapids 2.6-5x faster), so the choice is made on the machine, never in YAML:

- **CPU**: the flags are read first (`avx512_bf16`, `amx_bf16`); without them bf16 is emulated and never timed. With them
  a 1024² matmul is timed in fp32 and bf16 (best of a few repeats) and `bf16-mixed` is chosen when bf16 runs at least
  `BF16_MIN_SPEEDUP` times the fp32 rate (autocast's casts and the ops it keeps in fp32 eat part of a matmul gain: on a
  Zen 4 a 2.6x matmul gain gave a 1.4x step). The figures are kept on disk (`probe_cache_path()`), keyed by CPU model,
  torch version and thread count, as the best rate each dtype has shown: a probe taken beside other work reads low, and
  the peak for `peak_flops: auto` must not (this 2-core Xeon's first probe, beside other runs, read fp32 49 / bf16 199
  GFLOP/s; quiet ones read 180-200 / 340-420, so MFU read about 2x too high). Every launch probes again (well under a
  second: bf16 is timed only where the flags say it is native) and raises the kept figures when it reads higher.
- **GPU**: `bf16-mixed` when the device supports bf16, else `16-mixed`; the peak comes from `GPU_PEAK_FLOPS`, dense bf16
  tensor-core figures read from the device name.
- Under `FSDP2Strategy` the strategy's `MixedPrecisionPolicy` decides the compute dtype, so `auto` means `32-true` there.

Mixed precision keeps parameters, gradients and optimizer state in fp32 (autocast casts per op); the losses cast logits
to fp32 themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

AUTO = "auto"
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (as /proc/cpuinfo spells them) that mean native bf16 dot products; without them bf16 is emulated."""
BF16_MIN_SPEEDUP = 1.3
"""bf16 matmul rate / fp32 rate from which `auto` picks bf16-mixed on CPU."""
PROBE_SIZE = 1024
PROBE_VERSION = 1
"""Bump when the probe changes, so cached figures from an older probe are measured again."""

GPU_PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,
    "H200": 989e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "B200": 2250e12,
    "B100": 1750e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX A6000": 155e12,
    "MI300X": 1307e12,
    "MI250X": 383e12,
    "V100": 125e12,  # fp16 only (no bf16): the 16-mixed peak
    "T4": 65e12,  # fp16 only
}
"""Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, by a substring of `torch.cuda.get_device_name()`;
the longest matching name wins (`H100 PCIe` before `H100`). fp16 runs at the same rate on these devices."""


@dataclass
class MatmulRates:
    """Measured matmul FLOP/s of this CPU at `size`² with `threads` threads; `bf16` None when not timed (no flags)."""

    fp32: float
    bf16: float | None
    threads: int
    size: int = PROBE_SIZE
    flags: tuple[str, ...] = ()

    @property
    def bf16_speedup(self) -> float | None:
        return None if self.bf16 is None else self.bf16 / self.fp32


@dataclass
class PrecisionChoice:
    """What `precision: auto` resolved to, and the one line saying why."""

    precision: str
    reason: str


# ------------------------------------------------------------------------------------------------ the CPU


def cpu_info() -> dict[str, Any]:
    """Model name, family/model/stepping and flags of CPU 0 (`/proc/cpuinfo`); the platform's names elsewhere.

    Family/model/stepping go into the cache key because a hypervisor may show every Xeon as "Intel(R) Xeon(R) Processor".
    """
    info: dict[str, Any] = {"model_name": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name":
            info["model_name"] = value
        elif key in ("cpu family", "model", "stepping"):
            info[key.replace(" ", "_")] = value
        elif key == "flags":
            info["flags"] = value.split()
    return info


def bf16_flags(info: dict[str, Any] | None = None) -> tuple[str, ...]:
    flags = set((info or cpu_info())["flags"])
    return tuple(f for f in BF16_FLAGS if f in flags)


def time_matmul(dtype: torch.dtype, size: int = PROBE_SIZE, repeats: int = 10) -> float:
    """Best-of-`repeats` FLOP/s of a `size`² matmul in `dtype` (best-of: a busy neighbour only makes single runs slow)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure_cpu(threads: int | None = None) -> MatmulRates:
    """Time fp32 (and, with native bf16 flags, bf16) matmuls at the current thread count."""
    flags = bf16_flags()
    fp32 = time_matmul(torch.float32)
    bf16 = time_matmul(torch.bfloat16) if flags else None
    return MatmulRates(fp32, bf16, threads or torch.get_num_threads(), PROBE_SIZE, flags)


def cache_dir() -> Path:
    """`$VISPRIOR_CACHE_DIR`, else `$XDG_CACHE_HOME/visprior`, else `~/.cache/visprior`."""
    if env := os.environ.get("VISPRIOR_CACHE_DIR"):
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "visprior"


def probe_cache_path() -> Path:
    return cache_dir() / "hardware.json"


def probe_key(threads: int) -> str:
    info = cpu_info()
    fms = "/".join(str(info.get(k, "?")) for k in ("cpu_family", "model", "stepping"))
    return f"{info['model_name']} ({fms}) | torch {torch.__version__} | {threads} threads | probe v{PROBE_VERSION}"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside `path`, so ranks started together measure once and the rest read the figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_rates(threads: int | None = None) -> MatmulRates:
    """This CPU's matmul rates at `threads` (default: torch's current count): the best of this probe and every earlier
    one on disk for the same key, so a probe beside other work never lowers the peak."""
    threads = threads or torch.get_num_threads()
    path, key = probe_cache_path(), probe_key(threads)
    with _locked(path):
        cache = _read_cache(path)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            rates = measure_cpu(threads)
        finally:
            torch.set_num_threads(previous)
        if isinstance(entry := cache.get(key), dict):
            with contextlib.suppress(TypeError, ValueError):
                kept = MatmulRates(**{**entry, "flags": tuple(entry.get("flags", ()))})
                best = max(kept.bf16 or 0.0, rates.bf16 or 0.0) if rates.bf16 is not None else None
                rates = replace(rates, fp32=max(kept.fp32, rates.fp32), bf16=best)
        cache[key] = asdict(rates)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    return rates


def choose_cpu_precision(rates: MatmulRates) -> PrecisionChoice:
    """bf16-mixed when bf16 matmuls run at least `BF16_MIN_SPEEDUP` times the fp32 rate, else 32-true."""
    where = f"{rates.size}² matmul, {rates.threads} threads"
    if rates.bf16 is None:
        return PrecisionChoice("32-true", f"CPU without {'/'.join(BF16_FLAGS)} (bf16 emulated, not timed)")
    speedup = rates.bf16_speedup
    figures = f"bf16 {rates.bf16 / 1e9:.0f} vs fp32 {rates.fp32 / 1e9:.0f} GFLOP/s ({speedup:.2f}x, {where})"
    if speedup >= BF16_MIN_SPEEDUP:
        return PrecisionChoice("bf16-mixed", f"CPU {figures}")
    return PrecisionChoice("32-true", f"CPU {figures} < {BF16_MIN_SPEEDUP}x")


# ------------------------------------------------------------------------------------------------ resolution


def is_gpu(accelerator: Any) -> bool:
    """Whether a Trainer `accelerator` value runs on a CUDA/ROCm device (`auto` does when one is visible)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name in ("gpu", "cuda") or "cuda" in name:
        return True
    return name == "auto" and torch.cuda.is_available()


def resolve_precision(accelerator: Any, strategy: Any = None) -> PrecisionChoice:
    """`precision: auto` for this machine (see the module docstring)."""
    from visprior.stages.parallelize import FSDP2Strategy

    if isinstance(strategy, FSDP2Strategy):
        return PrecisionChoice(
            "32-true", f"FSDP2Strategy: compute in {strategy.param_dtype} by its MixedPrecisionPolicy"
        )
    if is_gpu(accelerator):
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16-mixed", f"{name} supports bf16")
        return PrecisionChoice("16-mixed", f"{name} has no bf16 (fp16 autocast with a loss scaler)")
    if accelerator not in ("cpu", "auto", None):
        return PrecisionChoice("32-true", f"accelerator {accelerator!r}: no bf16 probe for it")
    return choose_cpu_precision(cpu_rates())


def normalize_precision(value: Any) -> str:
    """Lightning's canonical spelling (`bf16` -> `bf16-mixed`, `32` -> `32-true`), so recorded values compare."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    return str(_convert_precision_to_unified_args(value))


# ------------------------------------------------------------------------------------------------ peak FLOP/s


def gpu_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU by name (`GPU_PEAK_FLOPS`), or None."""
    matches = [name for name in GPU_PEAK_FLOPS if name.lower() in device_name.lower()]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


def compute_dtype(precision: str, strategy: Any = None) -> torch.dtype:
    """The dtype the matmuls run in under a Trainer precision (and FSDP2's param_dtype)."""
    from visprior.stages.parallelize import FSDP2Strategy

    if isinstance(strategy, FSDP2Strategy):
        return getattr(torch, strategy.param_dtype)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def peak_flops_for(device: torch.device, precision: str, strategy: Any = None) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for MFU on `device` at `precision`; None when no figure is known."""
    dtype = compute_dtype(precision, strategy)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if dtype not in (torch.bfloat16, torch.float16):
            return None, f"{name}: only dense bf16/fp16 peaks are tabled, precision {precision} runs {dtype}"
        if peak is None:
            return None, f"{name} is not in visprior.hardware.GPU_PEAK_FLOPS"
        return peak, f"{name} dense bf16 peak (table)"
    if device.type != "cpu":
        return None, f"no peak known for device {device}"
    rates = cpu_rates()
    if dtype == torch.bfloat16 and rates.bf16 is not None:
        return rates.bf16, f"measured bf16 {rates.size}² matmul, {rates.threads} threads"
    return rates.fp32, f"measured fp32 {rates.size}² matmul, {rates.threads} threads"
