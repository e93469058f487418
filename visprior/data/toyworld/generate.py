"""Presets and the writer: `generate(out_dir, preset, seed)` lays the whole toy world out as in docs/contracts.md.

Every dataset gets its own `random.Random` seeded from `(seed, dataset name)`, so adding a dataset or changing one's size
leaves the others' bytes untouched, and the same seed gives identical files (shards are written with mtime 0, PNG
encoding is deterministic). Timings go into the returned summary only, never into files.
"""

from __future__ import annotations

import json
import random
import time
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


def generate(out_dir: str | Path, preset: str = "toy", seed: int = 0) -> dict[str, Any]:
    """Write the toy world under `out_dir`; return a summary with sample counts per dataset and seconds taken."""
    if preset not in PRESETS:
        raise ValueError(f"unknown toy world preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"generator": "toyworld", "preset": preset}
    size, mo = p.image_size, p.max_objects
    plan: list[tuple[str, str, Any]] = [
        ("pairs", "pair", lambda r: ds.pairs(r, p.pairs, size, mo)),
        ("sft", "conversation", lambda r: ds.sft(r, p.sft, size, mo)),
        ("sft_text", "conversation", lambda r: ds.sft_text(r, p.sft_text)),
        ("interleaved", "interleaved", lambda r: ds.interleaved_docs(r, p.interleaved, size)),
        ("eval/vqa", "conversation", lambda r: ds.vqa_eval(r, p.eval_vqa, size, mo)),
        ("eval/captions", "pair", lambda r: ds.captions_eval(r, p.eval_captions, size, mo)),
        ("eval/text_qa", "text", lambda r: ds.text_qa(r, p.eval_text_qa)),
        ("eval/shapes/train", "pair", lambda r: ds.shapes(r, p.shapes_train, p.shape_image_size, "train")),
        ("eval/shapes/test", "pair", lambda r: ds.shapes(r, p.shapes_test, p.shape_image_size, "test")),
    ]
    for cat in CATEGORIES:
        n, seen = p.text_docs * (p.web_factor if cat == "web" else 1), set()
        plan.append((f"text/{cat}", "text", lambda r, c=cat, n=n, s=seen: ds.text(r, c, n, "train", s)))
        plan.append((f"eval/text/{cat}", "text", lambda r, c=cat, s=seen: ds.text(r, c, p.eval_text, "eval", s, True)))

    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for path, kind, make in plan:
        t0 = time.perf_counter()
        name = path.rsplit("/", 1)[-1]
        manifest = write_shards(
            make(dataset_rng(seed, path)), out / path, name=name, kind=kind, maxcount=p.maxcount, seed=seed, extra=extra
        )
        counts[path] = manifest["num_samples"]
        seconds[path] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    counts["eval/mle_bench"] = write_mle_bench(
        dataset_rng(seed, "eval/mle_bench"), out / "eval/mle_bench", p.eval_mle, size
    )
    seconds["eval/mle_bench"] = round(time.perf_counter() - t0, 3)

    world = {
        "version": WORLD_VERSION,
        "preset": preset,
        "preset_config": asdict(p),
        "seed": seed,
        "image_size": size,
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
