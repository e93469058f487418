"""Presets and the writer: `generate(out_dir, preset, seed)` lays the whole toy world out as in docs/contracts.md.

Every dataset gets its own `random.Random` seeded from `(seed, dataset name)`, so adding a dataset or changing one's size
leaves the others' bytes untouched, and the same seed gives identical files (shards are written with mtime 0, PNG
encoding is deterministic). Timings go into the returned summary only, never into files.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visprior.data.shards import write_shards
from visprior.data.toyworld import datasets as ds
from visprior.data.toyworld.corpora import CATEGORIES
from visprior.data.toyworld.describe import QUESTION_TYPES
from visprior.data.toyworld.mle import LEVELS, excluded_shapes, write_mle_bench
from visprior.data.toyworld.world import SHAPES, vocabulary

WORLD_VERSION = 4
"""Bumped when the generated data change for a given preset and seed (2: lettered `which_exists` SFT questions; 3: fewer
detailed descriptions in SFT; 4: lettered replies lead with the letter, `C. hexagon`, the form lmms-eval's MLE-Bench reads,
in `sft` and `eval/vqa` only), so callers such as `make demo` regenerate an old toy world instead of training on it."""


@dataclass(frozen=True)
class Preset:
    image_size: int = 128
    """Side of rendered scenes in pixels (the toy VLM reads 64 px, so small objects blur away)."""
    shape_image_size: int = 64
    """Side of the shape-classification images."""
    max_objects: int = 5
    """Objects per scene: 1..max_objects."""
    maxcount: int = 1000
    """Samples per shard."""
    pairs: int = 6000
    sft: int = 4000
    sft_text: int = 3000
    interleaved: int = 1200
    text_docs: int = 3000
    """Documents per text category (web gets `web_factor` times as many: it is the broad mixture)."""
    web_factor: int = 2
    eval_vqa: int = 1200
    eval_captions: int = 300
    eval_mle: int = 600
    eval_text: int = 200
    """Held-out documents per text category, for perplexity."""
    eval_text_qa: int = 800
    shapes_train: int = 4000
    shapes_test: int = 800


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        max_objects=4,
        maxcount=32,
        pairs=160,
        sft=128,
        sft_text=96,
        interleaved=40,
        text_docs=96,
        eval_vqa=160,
        eval_captions=40,
        eval_mle=96,
        eval_text=24,
        eval_text_qa=64,
        shapes_train=128,
        shapes_test=64,
    ),
    "toy": Preset(),
}


def dataset_rng(seed: int, name: str) -> random.Random:
    """An independent, reproducible stream per dataset (str seeds hash with SHA-512, not Python's salted hash)."""
    return random.Random(f"toyworld/{seed}/{name}")


def _datasets(p: Preset) -> dict[str, tuple[str, Callable[[random.Random], Any]]]:
    """Dataset path -> (sample kind, generator of its samples from its own rng)."""
    size, mo = p.image_size, p.max_objects
    plan: dict[str, tuple[str, Callable[[random.Random], Any]]] = {
        "pairs": ("pair", lambda r: ds.pairs(r, p.pairs, size, mo)),
        "sft": ("conversation", lambda r: ds.sft(r, p.sft, size, mo)),
        "sft_text": ("conversation", lambda r: ds.sft_text(r, p.sft_text)),
        "interleaved": ("interleaved", lambda r: ds.interleaved_docs(r, p.interleaved, size)),
        "eval/vqa": ("conversation", lambda r: ds.vqa_eval(r, p.eval_vqa, size, mo)),
        "eval/captions": ("pair", lambda r: ds.captions_eval(r, p.eval_captions, size, mo)),
        "eval/text_qa": ("text", lambda r: ds.text_qa(r, p.eval_text_qa)),
        "eval/shapes/train": ("pair", lambda r: ds.shapes(r, p.shapes_train, p.shape_image_size, "train")),
        "eval/shapes/test": ("pair", lambda r: ds.shapes(r, p.shapes_test, p.shape_image_size, "test")),
    }
    for cat in CATEGORIES:
        n, seen = p.text_docs * (p.web_factor if cat == "web" else 1), set()
        plan[f"text/{cat}"] = ("text", lambda r, c=cat, n=n, s=seen: ds.text(r, c, n, "train", s))
        plan[f"eval/text/{cat}"] = ("text", lambda r, c=cat, s=seen: ds.text(r, c, p.eval_text, "eval", s, True))
    return plan


MLE_BENCH = "eval/mle_bench"


def _jobs() -> list[list[str]]:
    """The datasets in groups that can be written in any order or in parallel, the costliest (most images) first. A
    category's held-out documents share a group with its training ones: they exclude the texts those drew."""
    images = ["pairs", "sft", "eval/shapes/train", "interleaved", "eval/vqa", MLE_BENCH, "eval/shapes/test",
              "eval/captions"]  # fmt: skip
    return (
        [[name] for name in images]
        + [["sft_text", "eval/text_qa"]]
        + [[f"text/{c}", f"eval/text/{c}"] for c in CATEGORIES]
    )


def _write_job(out: Path, preset: str, seed: int, names: list[str]) -> dict[str, tuple[int, float]]:
    """Write one group of datasets; returns name -> (samples, seconds)."""
    p, extra = PRESETS[preset], {"generator": "toyworld", "preset": preset}
    plan, done = _datasets(p), {}
    for name in names:
        t0 = time.perf_counter()
        if name == MLE_BENCH:
            n = write_mle_bench(dataset_rng(seed, name), out / name, p.eval_mle, p.image_size)
        else:
            kind, make = plan[name]
            leaf = name.rsplit("/", 1)[-1]
            manifest = write_shards(make(dataset_rng(seed, name)), out / name, name=leaf, kind=kind,
                                    maxcount=p.maxcount, seed=seed, extra=extra)  # fmt: skip
            n = manifest["num_samples"]
        done[name] = (n, round(time.perf_counter() - t0, 3))
    return done


def generate(out_dir: str | Path, preset: str = "toy", seed: int = 0, workers: int | None = None) -> dict[str, Any]:
    """Write the toy world under `out_dir`; return a summary with sample counts per dataset and seconds taken.

    `workers` processes (default: one per core the process may use, at most 4) write the dataset groups of `_jobs`;
    each dataset's bytes depend on its own rng only, so the files are the same for any number of workers."""
    if preset not in PRESETS:
        raise ValueError(f"unknown toy world preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    start = time.perf_counter()
    results: dict[str, tuple[int, float]] = {}
    if workers <= 1:
        for names in _jobs():
            results.update(_write_job(out, preset, seed, names))
    else:  # the platform's start method, as the DataLoader's workers use it (fork on Linux)
        with ProcessPoolExecutor(workers) as pool:
            for done in pool.map(_write_job, *zip(*[(out, preset, seed, names) for names in _jobs()])):
                results.update(done)
    counts = {name: n for name, (n, _) in sorted(results.items())}
    seconds = {name: t for name, (_, t) in sorted(results.items())}
    world = {
        "version": WORLD_VERSION,
        "preset": preset,
        "preset_config": asdict(p),
        "seed": seed,
        "image_size": p.image_size,
        "vocabulary": vocabulary(),
        "text_categories": list(CATEGORIES),
        "question_types": list(QUESTION_TYPES),
        "mle_levels": {k: list(v) for k, v in LEVELS.items()},
        "mle_excluded_shapes": excluded_shapes(),
        "shape_labels": list(SHAPES),
        "counts": counts,
    }
    (out / "world.json").write_text(json.dumps(world, indent=2, sort_keys=True) + "\n")
    return {
        "out_dir": str(out),
        "preset": preset,
        "seed": seed,
        "counts": counts,
        "seconds": round(time.perf_counter() - start, 3),
        "seconds_by_dataset": seconds,
    }
