"""Reader throughput: decoded samples/s of the pair and interleaved `ShardStream`s with 0 and 2 DataLoader workers.

    .venv/bin/python benchmarks/loader.py --data data/toyworld --out benchmarks/results/loader.json

Decoding is included (every image fully decoded by PIL); tokenization and packing are not. If `--data` does not exist, a smoke
toy world is generated into a temporary folder (or, if the toy world generator is unavailable, synthetic 128 px PNG shards).
The first `--warmup` samples (worker start-up, first file opens) are not timed; start-up time is reported on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from visprior.data.formats import InterleavedSample, PairSample
from visprior.data.shards import write_shards
from visprior.data.stream import ShardStream


def synthetic_world(out: Path, seed: int = 0) -> None:
    """Pair and interleaved shards of random 128 px images, laid out like the toy world."""
    rng = np.random.default_rng(seed)

    def img() -> Image.Image:
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)  # blocky, so PNG sizes resemble rendered scenes
        return Image.fromarray(small).resize((128, 128), Image.NEAREST)

    pairs = (PairSample(f"p{i:05d}", img(), f"caption {i}") for i in range(160))
    write_shards(pairs, out / "pairs", name="pairs", kind="pair", maxcount=32)
    docs = (InterleavedSample(f"d{i:05d}", ["a", img(), "b", img(), "c", img()]) for i in range(40))
    write_shards(docs, out / "interleaved", name="interleaved", kind="interleaved", maxcount=32)


def ensure_data(path: Path, tmp: Path) -> tuple[Path, str]:
    """`path` if it exists, else a generated smoke toy world (or synthetic shards) in `tmp`, and how it was obtained."""
    if path.exists():
        return path, "given"
    try:
        from visprior.data.toyworld import generate
    except ImportError:
        synthetic_world(tmp)
        return tmp, "synthetic 128px PNG shards (toyworld not importable)"
    generate(tmp, preset="smoke", seed=0)
    return tmp, "toyworld smoke preset, seed 0"


def measure(dataset_dir: Path, workers: int, samples: int, warmup: int) -> dict[str, Any]:
    """Samples/s after `warmup` samples, reading forever-streams through a DataLoader with `workers` processes."""
    stream = ShardStream(dataset_dir, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    t0 = time.perf_counter()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    images = 0
    for _ in range(samples):
        s = next(it)
        images += 1 if isinstance(s, PairSample) else len(getattr(s, "images", []))
    t2 = time.perf_counter()
    del it
    return {
        "dataset": dataset_dir.name,
        "kind": stream.kind.value,
        "workers": workers,
        "samples": samples,
        "images": images,
        "startup_s": round(t1 - t0, 3),
        "seconds": round(t2 - t1, 3),
        "samples_per_s": round(samples / (t2 - t1), 1),
        "images_per_s": round(images / (t2 - t1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("data/toyworld"), help="toy world folder (pairs/, interleaved/)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader.json"))
    parser.add_argument("--samples", type=int, default=800, help="timed samples per measurement")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root, origin = ensure_data(args.data, Path(tmp))
        results = []
        for name in ("pairs", "interleaved"):
            for workers in args.workers:
                r = measure(root / name, workers, args.samples, args.warmup)
                results.append(r)
                print(
                    f"{name:12s} workers={workers}  {r['samples_per_s']:8.1f} samples/s  {r['images_per_s']:8.1f} images/s"
                    f"  (startup {r['startup_s']:.2f}s)",
                    flush=True,
                )
    report = {
        "benchmark": "loader",
        "data": str(args.data),
        "data_origin": origin,
        "torch_threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
