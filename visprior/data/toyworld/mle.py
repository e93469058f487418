"""An MLE-Bench-style benchmark: "Which of the following objects appears in the image?" at three object-size levels.

LSBS's MLE-Bench splits existence questions by the share of the image the target object covers (0-30 %, 30-60 %,
60-100 %). Here the target's radius is searched so its *rendered, visible* area lands inside a level, and the level is
then assigned from the area measured on the final render's mask, kept clear of the level borders by `MARGIN` so that an
independent pixel count agrees. Distractors are shapes absent from the image; answer letters are balanced per level.
The output is an HF imagefolder (`images/*.png` + `metadata.jsonl`) in the real MLE-Bench schema plus extra fields.

No shape prior to exploit. A model that ignores the image should score 25 %, so per level:

- the answer shapes are the level's *feasible* shapes (`feasible_shapes`: those whose largest visible area, found by
  growing the shape at the image centre, reaches the level's band), each the answer equally often (±1);
- distractors are drawn only from the same feasible shapes, each exactly three times as often as it is the answer, so a
  shape is the answer in exactly 1 in 4 of the questions that offer it (P(answer | shape in choices) = 1/4 for all);
- other objects in the scene take shapes that are not among the choices, so every distractor is absent from the image.

Exclusions (the same for every seed and preset, also written to world.json as `mle_excluded_shapes`): a `ring` is
hollow (its hole is 0.55 of its radius) and covers at most about 61 % of the image, short of the 60-100 band's
62.5 % floor once the margin is kept, so it is neither an answer nor a distractor at `existence_60-100`. All eight
shapes take part at the other two levels.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
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
MAX_RADIUS = 1.4  # largest radius the area search tries (shapes this big are clipped by the frame)
PEAK_SLACK = 0.01  # a target's wanted area stays this far below its shape's largest reachable area


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


@cache
def shape_profile(shape: str) -> tuple[float, float]:
    """(largest visible area, largest useful radius) of `shape` centred in the frame, over radii up to `MAX_RADIUS`.

    Solid shapes keep growing until they fill the frame (useful radius: `MAX_RADIUS`); a ring's hole grows with it, so
    its area peaks and then falls, and the radius search must stop at the peak.
    """
    areas = [
        (float(coverage_mask(Obj(shape, "red", "large", 0.5, 0.5, MAX_RADIUS * i / 140, (0, 0, 0)), 64, 2).mean()), i)
        for i in range(1, 141)
    ]
    peak, at = max(areas)
    return peak, (MAX_RADIUS if areas[-1][0] >= peak - 0.02 else MAX_RADIUS * at / 140)


def feasible_shapes(sub_task: str) -> tuple[str, ...]:
    """Shapes that can be the target of `sub_task`: their largest visible area clears the band's floor plus `MARGIN`."""
    lo, _ = LEVELS[sub_task]
    return tuple(s for s in SHAPES if shape_profile(s)[0] - PEAK_SLACK > lo + MARGIN)


def excluded_shapes() -> dict[str, list[str]]:
    """{sub_task: shapes that cannot be its target} (written to world.json)."""
    return {lvl: [s for s in SHAPES if s not in feasible_shapes(lvl)] for lvl in LEVELS}


def _radius_for_area(obj: Obj, area: float, size: int = 64) -> float:
    """Bisection on the radius so the (frame-clipped) coverage of `obj` is about `area`.

    The search stays below the radius where the shape's area peaks if growing further would shrink it (a ring).
    """
    lo, hi = 0.01, shape_profile(obj.shape)[1]
    for _ in range(16):
        obj.r = (lo + hi) / 2
        if coverage_mask(obj, size, 2).mean() < area:
            lo = obj.r
        else:
            hi = obj.r
    return (lo + hi) / 2


def sample_item(
    rng: random.Random,
    sub_task: str,
    size: int,
    max_others: int = 2,
    tries: int = 200,
    shape: str | None = None,
    avoid: tuple[str, ...] = (),
    quantile: float | None = None,
) -> MLEItem:
    """A scene whose target object's measured visible area falls inside `sub_task`'s band (minus the margin).

    `shape` fixes the target's shape (default: any feasible one per try); other objects never take a shape in `avoid`
    (the question's choices) nor the target's. `quantile` places the first try's wanted area in the band (0: bottom,
    1: top); later tries, and every try without it, draw it at random.
    """
    lo, hi = LEVELS[sub_task]
    for t in range(tries):
        s = shape or rng.choice(feasible_shapes(sub_task))
        top = min(hi - MARGIN, 0.97, shape_profile(s)[0] - PEAK_SLACK)
        bottom = max(lo + MARGIN, MIN_AREA * 2)
        want = bottom + (top - bottom) * (quantile if quantile is not None and t == 0 else rng.random())
        colour = rng.choice(sorted(COLOURS))
        jitter = 0.15 if lo >= 0.3 else 0.0
        target = Obj(s, colour, "large", 0.5, 0.5, 0.1, jittered_rgb(rng, colour))
        if jitter:
            target.x, target.y = 0.5 + rng.uniform(-jitter, jitter), 0.5 + rng.uniform(-jitter, jitter)
        target.r = _radius_for_area(target, want)
        if not jitter:
            target.x, target.y = place(rng, target.r, []) or (0.5, 0.5)
        target.size = "small" if target.r < 0.08 else "medium" if target.r < 0.14 else "large"
        objects = [target]
        other_shapes = [o for o in SHAPES if o != s and o not in avoid]
        other_colours = [c for c in sorted(COLOURS) if _colour_distance(c, colour) > 90]
        for _ in range(rng.randint(0, max_others)):
            os_, c = rng.choice(other_shapes), rng.choice(other_colours)
            o = Obj(os_, c, "small", 0.5, 0.5, rng.uniform(0.045, 0.08), jittered_rgb(rng, c))
            pos = place(rng, o.r, objects[1:] if jitter else objects)
            if pos:
                o.x, o.y = pos
                objects.append(o)
        scene = Scene(objects, sample_background(rng))
        area = render(scene, size).areas[0]
        if level_of(area) == sub_task and lo + MARGIN <= area <= hi - MARGIN and area >= MIN_AREA:
            return MLEItem(scene, 0, area, sub_task)
    raise RuntimeError(f"could not sample an MLE item for {sub_task} ({shape or 'any shape'}) in {tries} tries")


def _balanced(rng: random.Random, values: list, n: int) -> list:
    """`n` values cycling through `values` (each used n // len or n // len + 1 times, the extras chosen at random)."""
    extra = rng.sample(values, n % len(values))
    out = [v for v in values for _ in range(n // len(values))] + extra
    rng.shuffle(out)
    return out


def design_choices(
    rng: random.Random, shapes: tuple[str, ...], n: int, tries: int = 100
) -> list[tuple[str, list[str]]]:
    """`n` (answer, 3 distractors) pairs over `shapes`: answers balanced (±1), and every shape a distractor exactly three
    times as often as it is the answer, so it is the answer in exactly a quarter of the questions offering it.

    Distractors are filled greedily from the largest remaining quota (ties at random); a rare dead end (the quota left
    only on the item's own answer) restarts with a new shuffle.
    """
    if len(shapes) < 4:
        raise ValueError(f"need at least 4 shapes for 4 choices, got {shapes}")
    for _ in range(tries):
        answers = _balanced(rng, list(shapes), n)
        quota = {s: 3 * answers.count(s) for s in shapes}
        out = []
        for ans in answers:
            pool = [s for s in shapes if s != ans and quota[s] > 0]
            rng.shuffle(pool)
            pool.sort(key=lambda s: -quota[s])  # stable: random among equal quotas
            if len(pool) < 3:
                break
            picked = pool[:3]
            for s in picked:
                quota[s] -= 1
            rng.shuffle(picked)
            out.append((ans, picked))
        else:
            return out
    raise RuntimeError(f"could not balance the MLE choices over {shapes} for {n} items")


def build_items(rng: random.Random, n: int, size: int) -> list[dict[str, Any]]:
    """`n` items (split evenly over the levels) as metadata records, each with its rendered image under `_image`.

    Within a level, answers and distractors follow `design_choices`, letters are balanced, and the wanted areas are
    stratified (one per equal slice of the band, in random order), so every level spans its band from bottom to top.
    """
    records = []
    per_level = n // len(LEVELS)
    for li, sub_task in enumerate(LEVELS):
        letters = [i % 4 for i in range(per_level)]
        rng.shuffle(letters)
        design = design_choices(rng, feasible_shapes(sub_task), per_level)
        quantiles = [(k + rng.random()) / per_level for k in range(per_level)]
        rng.shuffle(quantiles)
        for i, (letter, (answer, distractors), q) in enumerate(zip(letters, design, quantiles)):
            choices = distractors[:letter] + [answer] + distractors[letter:]
            item = sample_item(rng, sub_task, size, shape=answer, avoid=tuple(choices), quantile=q)
            target = item.scene.objects[item.target]
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
