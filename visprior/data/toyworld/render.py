"""Rendering scenes with PIL: anti-aliased shapes over textured backgrounds, with one visible-area mask per object.

Each object is drawn as a coverage mask at `supersample`x the output size and box-downsampled, then composited in draw
order, so later objects occlude earlier ones. The per-object masks are what is left visible after occlusion, which is how
the MLE benchmark measures an object's share of the image instead of assuming it from its radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from visprior.data.toyworld.world import BACKGROUND_COLOURS, Background, Obj, Scene


@dataclass
class Rendered:
    image: Image.Image
    masks: list[np.ndarray]  # [H, W] float32 in 0..1 per object: visible coverage after occlusion
    areas: list[float]  # visible share of the image per object (mean of its mask)


def _regular(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape with circumradius about `r`, in pixel coordinates (y down)."""
    up = -math.pi / 2
    if shape == "square":
        s = 0.8 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return _regular(cx, cy + 0.15 * r, 1.1 * r, 3, up)
    if shape == "diamond":
        return [(cx, cy - 1.1 * r), (cx + 0.75 * r, cy), (cx, cy + 1.1 * r), (cx - 0.75 * r, cy)]
    if shape == "hexagon":
        return _regular(cx, cy, r, 6, 0.0)
    if shape == "star":
        outer, inner = (
            _regular(cx, cy + 0.08 * r, 1.1 * r, 5, up),
            _regular(cx, cy + 0.08 * r, 0.47 * r, 5, up + math.pi / 5),
        )
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, w = r, 0.33 * r
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w), (cx + w, cy + w),
            (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise ValueError(f"not a polygonal shape: {shape!r}")


def coverage_mask(obj: Obj, size: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each output pixel covered by `obj`: [size, size] float32."""
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = obj.x * big, obj.y * big, obj.r * big
    if obj.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if obj.shape == "ring":
            h = 0.55 * r
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=0)
    else:
        draw.polygon(shape_polygon(obj.shape, cx, cy, r), fill=255)
    small = canvas.reduce(supersample) if supersample > 1 else canvas
    return np.asarray(small, dtype=np.float32) / 255.0


def background_array(bg: Background, size: int) -> np.ndarray:
    """The background as [size, size, 3] float32; texture noise comes from the background's own seed."""
    c0 = np.array(BACKGROUND_COLOURS[bg.colour], dtype=np.float32)
    c1 = np.array(BACKGROUND_COLOURS[bg.colour2], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if bg.kind == "gradient":
        a = math.radians(bg.angle)
        t = (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return c0 + (c1 - c0) * t[..., None]
    img = np.broadcast_to(c0, (size, size, 3)).copy()
    if bg.kind == "stripes":
        a = math.radians(bg.angle)
        t = xx * math.cos(a) + yy * math.sin(a)
        img += 7.0 * np.sign(np.sin(t * 2 * math.pi * 9))[..., None]
    elif bg.kind == "noise":
        img += np.random.default_rng(bg.seed).normal(0.0, 5.0, (size, size, 1)).astype(np.float32)
    return img


def render(scene: Scene, size: int = 128, supersample: int = 4) -> Rendered:
    """Draw `scene` at `size` x `size` pixels; objects are composited in list order (later ones on top)."""
    img = background_array(scene.background, size)
    covers = [coverage_mask(obj, size, supersample) for obj in scene.objects]
    for obj, m in zip(scene.objects, covers):
        img += (np.asarray(obj.rgb, dtype=np.float32) - img) * m[..., None]
    masks: list[np.ndarray] = []
    above = np.ones((size, size), dtype=np.float32)  # share of each pixel not covered by objects drawn later
    for m in reversed(covers):
        masks.append(m * above)
        above *= 1.0 - m
    masks.reverse()
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return Rendered(image, masks, [float(v.mean()) for v in masks])
