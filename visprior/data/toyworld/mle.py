"""An MLE-Bench-style benchmark: "Which of the following objects appears in the image?" at three object-size levels.

LSBS's MLE-Bench splits existence questions by the share of the image the target object covers (0-30 %, 30-60 %,
60-100 %). Here the target's radius is searched so its *rendered, visible* area lands inside a level, and the level is
then assigned from the area measured on the final render's mask, kept clear of the level borders by `MARGIN` so that an
independent pixel count agrees. Distractors are shapes absent from the image; answer letters are balanced per level.
The output is an HF imagefolder (`images/*.png` + `metadata.jsonl`) in the real MLE-Bench schema plus extra fields.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visprior.data.toyworld.render import coverage_mask, render
from visprior.data.toyworld.world import COLOURS, SHAPES, Obj, Scene, jittered_rgb, place, sample_background

QUESTION = "Which of the following objects appears in the image?"
LEVELS: dict[str, tuple[float, float]] = {
    "existence_0-30": (0.0, 0.30),
    "existence_30-60": (0.30, 0.60),
    "existence_60-100": (0.60, 1.00),
}
MARGIN = 0.025  # measured area keeps this far from a level border
MIN_AREA = 0.004  # smallest target: about 8 px across at 128 px, 4 px at the toy VLM's 64 px


@dataclass
class MLEItem:
    scene: Scene
    target: int
    area: float
    sub_task: str


def level_of(area: float) -> str:
    for name, (lo, hi) in LEVELS.items():
        if lo <= area < hi or (hi == 1.0 and area >= hi):
            return name
    raise ValueError(f"area {area} outside [0, 1]")


def _colour_distance(a: str, b: str) -> float:
    return sum((x - y) ** 2 for x, y in zip(COLOURS[a], COLOURS[b])) ** 0.5


def _radius_for_area(obj: Obj, area: float, size: int = 64) -> float:
    """Bisection on the radius so the (frame-clipped) coverage of `obj` is about `area`."""
    lo, hi = 0.01, 1.4
    for _ in range(16):
        obj.r = (lo + hi) / 2
        if coverage_mask(obj, size, 2).mean() < area:
            lo = obj.r
        else:
            hi = obj.r
    return (lo + hi) / 2


def sample_item(rng: random.Random, sub_task: str, size: int, max_others: int = 2, tries: int = 50) -> MLEItem:
    """A scene whose target object's measured visible area falls inside `sub_task`'s band (minus the margin)."""
    lo, hi = LEVELS[sub_task]
    for _ in range(tries):
        want = rng.uniform(max(lo + MARGIN, MIN_AREA * 2), min(hi - MARGIN, 0.97))
        shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
        jitter = 0.15 if lo >= 0.3 else 0.0
        target = Obj(shape, colour, "large", 0.5, 0.5, 0.1, jittered_rgb(rng, colour))
        if jitter:
            target.x, target.y = 0.5 + rng.uniform(-jitter, jitter), 0.5 + rng.uniform(-jitter, jitter)
        target.r = _radius_for_area(target, want)
        if not jitter:
            target.x, target.y = place(rng, target.r, []) or (0.5, 0.5)
        target.size = "small" if target.r < 0.08 else "medium" if target.r < 0.14 else "large"
        objects = [target]
        other_shapes = [s for s in SHAPES if s != shape]
        other_colours = [c for c in sorted(COLOURS) if _colour_distance(c, colour) > 90]
        for _ in range(rng.randint(0, max_others)):
            s, c = rng.choice(other_shapes), rng.choice(other_colours)
            o = Obj(s, c, "small", 0.5, 0.5, rng.uniform(0.045, 0.08), jittered_rgb(rng, c))
            pos = place(rng, o.r, objects[1:] if jitter else objects)
            if pos:
                o.x, o.y = pos
                objects.append(o)
        scene = Scene(objects, sample_background(rng))
        area = render(scene, size).areas[0]
        if level_of(area) == sub_task and lo + MARGIN <= area <= hi - MARGIN and area >= MIN_AREA:
            return MLEItem(scene, 0, area, sub_task)
    raise RuntimeError(f"could not sample an MLE item for {sub_task} in {tries} tries")


def build_items(rng: random.Random, n: int, size: int) -> list[dict[str, Any]]:
    """`n` items (split evenly over the levels) as metadata records, each with its rendered image under `_image`."""
    records = []
    per_level = n // len(LEVELS)
    for li, sub_task in enumerate(LEVELS):
        letters = [i % 4 for i in range(per_level)]
        rng.shuffle(letters)
        for i, letter in enumerate(letters):
            item = sample_item(rng, sub_task, size)
            target = item.scene.objects[item.target]
            present = {o.shape for o in item.scene.objects}
            distractors = rng.sample([s for s in SHAPES if s not in present], 3)
            choices = distractors[:letter] + [target.shape] + distractors[letter:]
            rendered = render(item.scene, size)
            records.append(
                {
                    "file_name": f"images/mle-{li}-{i:05d}.png",
                    "question": QUESTION,
                    "choices": choices,
                    "answer": target.shape,
                    "sub_task": sub_task,
                    "answer_letter": "ABCD"[letter],
                    "area": round(item.area, 6),
                    "target": {"shape": target.shape, "colour": target.colour, "rgb": list(target.rgb)},
                    "scene": item.scene.to_dict(),
                    "_image": rendered.image,
                }
            )
    return records


def write_mle_bench(rng: random.Random, out_dir: str | Path, n: int, size: int) -> int:
    """Write `images/*.png` and `metadata.jsonl` under `out_dir`; return the number of items."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = build_items(rng, n, size)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            rec.pop("_image").save(out / rec["file_name"], format="PNG", optimize=False)
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return len(records)
