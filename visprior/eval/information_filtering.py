"""LM4VE's *information filtering* analysis on the toy shapes: does the LLM block concentrate feature activation on the
object?

Pang et al. (Sec. 5) find that after a frozen LLM block the magnitude of the token features singles out the object region
more than before it. Here that is measured per image against the toy world's exact object masks (the renderer keeps one
visible-area mask per object): fresh single-shape images are drawn the way `eval/shapes` draws them (with their own seed),
each patch token is labelled object or background (at least half its area covered), and the L2 norm of every patch token
(CLS excluded) is read at several points of the classifier:

- `before`: the ViT's output, which enters the block; `after`: the block module's output (adapters included), which the
  head reads; for the LLM block also `llm_in` (after the first adapter) and `llm_out` (the block's output, before its
  final norm: after an RMS norm every token has nearly the same magnitude, so there it would say nothing).

Per image: `object_share` = the share of total magnitude on object patches divided by the share of object patches (1 =
no preference, > 1 = concentrated on the object); `auroc` = the probability that an object patch outranks a background
patch; `iou` = IoU of the patches above the image's mean magnitude with the object patches (LM4VE's pseudo-mask reading).
Each is reported as mean and 95 % interval over images.

    python -m visprior.eval.information_filtering --checkpoint runs/lm4ve/run/checkpoints/last.ckpt --out if.json
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from visprior.models.frozen_block import FrozenBlockClassifier, LLMBlockAdapter

METRICS = ("object_share", "auroc", "iou")


@dataclass
class MaskedShape:
    """A toy-shapes image with its object's visible-area mask `[H, W]` in 0..1."""

    image: Image.Image
    mask: np.ndarray
    label: int


def masked_shapes(n: int, size: int = 64, seed: int = 12345) -> list[MaskedShape]:
    """`n` single-shape images drawn as the toy world's `eval/shapes` draws them, with their masks kept."""
    from visprior.data.toyworld.render import render
    from visprior.data.toyworld.world import COLOURS, SHAPES, Scene, make_object, place, sample_background

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(len(SHAPES))
        obj = make_object(rng, SHAPES[label], rng.choice(sorted(COLOURS)), rng.choice(("medium", "large")), 0.5, 0.5)
        obj.x, obj.y = place(rng, obj.r, []) or (0.5, 0.5)
        rendered = render(Scene([obj], sample_background(rng)), size)
        out.append(MaskedShape(rendered.image, rendered.masks[0], label))
    return out


def patch_coverage(mask: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """Object coverage of each patch `[P]` (row-major, as ViT patch tokens), the mask resized to the tower's input."""
    if mask.shape != (image_size, image_size):
        resized = Image.fromarray((mask * 255).astype(np.uint8)).resize((image_size, image_size), Image.BILINEAR)
        mask = np.asarray(resized, dtype=np.float32) / 255
    g = image_size // patch_size
    return mask[: g * patch_size, : g * patch_size].reshape(g, patch_size, g, patch_size).mean(axis=(1, 3)).reshape(-1)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / n+ n-)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def image_metrics(magnitude: np.ndarray, on_object: np.ndarray) -> dict[str, float]:
    """The three concentration figures of one image from its patch magnitudes `[P]` and object patches `[P]`."""
    share = magnitude[on_object].sum() / max(magnitude.sum(), 1e-12)
    fraction = on_object.mean()
    above = magnitude > magnitude.mean()
    union = (above | on_object).sum()
    return {
        "object_share": float(share / fraction) if fraction > 0 else float("nan"),
        "auroc": auroc(magnitude, on_object),
        "iou": float((above & on_object).sum() / union) if union else float("nan"),
    }


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, 95 % interval (normal approximation) and count over images, NaNs (no object patch) left out."""
    v = np.array([x for x in values if not math.isnan(x)])
    if len(v) == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": float(half), "n": int(len(v))}


def _taps(model: FrozenBlockClassifier) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Forward hooks recording the token features at each point of the analysis."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, use_input: bool = False):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            seen[name] = (inputs[0] if use_input else output).detach()

        return hook

    handles.append(model.vision_tower.register_forward_hook(keep("before")))
    block = getattr(model, "frozen_block", None)
    if block is not None:
        handles.append(block.register_forward_hook(keep("after")))
        if isinstance(block, LLMBlockAdapter):
            handles.append(block.adapter_in.register_forward_hook(keep("llm_in")))
            handles.append(block.norm.register_forward_hook(keep("llm_out", use_input=True)))
    return seen, handles


@torch.no_grad()
def information_filtering(
    model: FrozenBlockClassifier, samples: list[MaskedShape], batch_size: int = 64, object_threshold: float = 0.5
) -> dict[str, dict[str, dict[str, float]]]:
    """`{point: {metric: {mean, ci95, n}}}` over `samples`, for the points the model has (see the module docstring)."""
    model = model.eval()
    tower = model.vision_tower
    per_point: dict[str, dict[str, list[float]]] = {}
    seen, handles = _taps(model)
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            pixels = torch.stack([model.image_transform(s.image) for s in chunk])  # [N, C, H, W]
            model(pixels)
            coverage = [patch_coverage(s.mask, tower.image_size, tower.patch_size) for s in chunk]
            for point, features in seen.items():
                tokens = features[:, model.prefix_tokens :].float()  # [N, P, D] patch tokens only
                magnitudes = tokens.norm(dim=-1).cpu().numpy()  # [N, P]
                metrics = per_point.setdefault(point, {m: [] for m in METRICS})
                for mag, cov in zip(magnitudes, coverage):
                    for name, value in image_metrics(mag, cov >= object_threshold).items():
                        metrics[name].append(value)
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    if "after" not in per_point:  # no block: what the head reads is the tower's output
        per_point["after"] = per_point["before"]
    return {point: {m: summarise(v) for m, v in metrics.items()} for point, metrics in per_point.items()}


def evaluate_checkpoint(checkpoint: str, n: int = 256, seed: int = 12345, out: str | None = None) -> dict[str, Any]:
    """Run the analysis on an `ImageClassification` checkpoint (`last.ckpt`); writes JSON to `out` when given."""
    from visprior.stages.classification import ImageClassification

    stage = ImageClassification.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    samples = masked_shapes(n, size=64, seed=seed)
    variant = (stage.hparams.get("frozen_block") or {}).get("variant", "none (no block)")
    result = {"checkpoint": checkpoint, "variant": variant, "images": n, "seed": seed}
    result["points"] = information_filtering(stage.model, samples)
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    from jsonargparse import CLI

    print(json.dumps(CLI(evaluate_checkpoint, as_positional=False), indent=2))
