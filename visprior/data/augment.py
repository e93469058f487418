"""DeiT's training augmentations for image classification, written for PIL and tensors (torchvision cannot be installed
beside the CPU torch here, and timm depends on it).

Per image (data side, `TrainAugment`): random resized crop (scale 0.08-1, ratio 3/4-4/3), horizontal flip, RandAugment
(`num_ops` random operations at `magnitude` out of 10 with Gaussian jitter `magnitude_std`, timm's `rand-m9-mstd0.5-inc1`
family: the "increasing" operations, where a larger magnitude is always a stronger change), then the tower's own
preprocessing, then random erasing (timm's `RandomErasing(mode="pixel")`: one box of 2-33 % of the area filled with
normal noise, on the normalised tensor). Per batch (model side, `mix_batch`): mixup or cutmix with soft targets, one
lambda per batch as timm's `Mixup(mode="batch")` with label smoothing folded into the targets.

The draws come from the process's RNGs (`random` per worker, torch's for batches), seeded by Lightning; a resumed run
continues the data order exactly but not the augmentation draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)


@dataclass
class AugmentSpec:
    """Per-image training augmentation (validation images only get the tower's preprocessing)."""

    crop_scale: tuple[float, float] | None = (0.08, 1.0)
    """RandomResizedCrop area range (None: no crop)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    rand_augment_ops: int = 2
    """RandAugment operations per image (0: none)."""
    rand_augment_magnitude: float = 9.0
    """RandAugment magnitude, 0-10."""
    rand_augment_std: float = 0.5
    """Gaussian jitter of the magnitude per operation (timm's mstd)."""
    random_erase: float = 0.25
    """Probability of erasing one random box with noise (DeiT: 0.25)."""


@dataclass
class MixupSpec:
    """Batch mixing as DeiT trains (timm `Mixup`): mixup 0.8, cutmix 1.0, one of them per batch."""

    mixup_alpha: float = 0.8
    """Beta(alpha, alpha) for mixup's lambda (0: no mixup)."""
    cutmix_alpha: float = 1.0
    """Beta(alpha, alpha) for cutmix's box area (0: no cutmix)."""
    prob: float = 1.0
    """Probability that a batch is mixed at all."""
    switch_prob: float = 0.5
    """With both on, the probability of cutmix rather than mixup."""


# ------------------------------------------------------------------------------------------------ RandAugment


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(
        image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR, fillcolor=FILL
    )


def _op(name: str, image: Image.Image, level: float, rng: random.Random) -> Image.Image:
    """One RandAugment operation at `level` in [0, 1] (timm's increasing variants)."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(_signed(30 * level, rng), resample=Image.Resampling.BILINEAR, fillcolor=FILL)
    if name == "Posterize":
        return ImageOps.posterize(image, max(1, 4 - int(4 * level)))
    if name == "Solarize":
        return ImageOps.solarize(image, 256 - int(round(256 * level)))
    if name == "SolarizeAdd":
        added = Image.eval(image, lambda v: min(255, v + int(round(110 * level))))
        return Image.composite(added, image, image.convert("L").point(lambda v: 255 if v < 128 else 0))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        enhancer = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast}.get(name)
        enhancer = enhancer or {"Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}[name]
        return enhancer(image).enhance(1.0 + _signed(0.9 * level, rng))
    if name == "ShearX":
        return _affine(image, (1, _signed(0.3 * level, rng), 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(image, (1, 0, 0, _signed(0.3 * level, rng), 1, 0))
    if name == "TranslateX":
        return _affine(image, (1, 0, _signed(0.45 * level, rng) * image.size[0], 0, 1, 0))
    if name == "TranslateY":
        return _affine(image, (1, 0, 0, 0, 1, _signed(0.45 * level, rng) * image.size[1]))
    raise ValueError(f"unknown RandAugment operation {name!r}")


RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)  # fmt: skip


def rand_augment(image: Image.Image, num_ops: int, magnitude: float, std: float, rng: random.Random) -> Image.Image:
    """`num_ops` operations drawn with replacement, each applied with probability 0.5 (timm's `AugmentOp` default) at a
    magnitude ~ N(magnitude, std) clipped to [0, 10]."""
    image = image.convert("RGB")
    for name in rng.choices(RAND_AUGMENT_OPS, k=num_ops):
        if rng.random() >= 0.5:
            continue
        m = magnitude if std <= 0 else min(10.0, max(0.0, rng.gauss(magnitude, std)))
        image = _op(name, image, m / 10.0, rng)
    return image


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params`: ten tries at a box of the area and aspect asked, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def random_erase(pixels: torch.Tensor, rng: random.Random, area: tuple[float, float] = (0.02, 1 / 3)) -> torch.Tensor:
    """One box of `area` (fraction) and aspect 0.3-3.3 filled with N(0, 1) noise, on a normalised `[C, H, W]` image."""
    _, h, w = pixels.shape
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
            out = pixels.clone()
            generator = torch.Generator().manual_seed(rng.getrandbits(63))
            out[:, top : top + eh, left : left + ew] = torch.randn(
                pixels.shape[0], eh, ew, generator=generator, dtype=pixels.dtype
            )
            return out
    return pixels


class TrainAugment:
    """PIL image -> augmented, preprocessed `[C, H, W]` tensor; picklable for loader workers."""

    def __init__(self, spec: AugmentSpec, image_transform: Callable[[Image.Image], torch.Tensor]):
        self.spec, self.image_transform = spec, image_transform
        self._rng: random.Random | None = None

    @property
    def rng(self) -> random.Random:
        if self._rng is None:  # per process: torch seeds each loader worker differently from the run's seed
            self._rng = random.Random(torch.initial_seed())
        return self._rng

    def __call__(self, image: Image.Image) -> torch.Tensor:
        spec, rng = self.spec, self.rng
        image = image.convert("RGB")
        if spec.crop_scale is not None:
            image = image.crop(random_resized_crop_box(*image.size, tuple(spec.crop_scale), rng))
        if rng.random() < spec.hflip:
            image = ImageOps.mirror(image)
        if spec.rand_augment_ops > 0:
            image = rand_augment(image, spec.rand_augment_ops, spec.rand_augment_magnitude, spec.rand_augment_std, rng)
        pixels = self.image_transform(image)  # [C, H, W]
        if rng.random() < spec.random_erase:
            pixels = random_erase(pixels, rng)
        return pixels

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_rng": None}


# ------------------------------------------------------------------------------------------------ mixup / cutmix


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot `[B, classes]` with label smoothing as timm's `mixup_target` does (off = s / C, on = 1 - s + off)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area (1 - lam) centred uniformly at random, clipped to the image: (top, bottom, left, right)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(torch.randint(0, height, ()).item()), int(torch.randint(0, width, ()).item())
    return max(cy - ch // 2, 0), min(cy + ch // 2, height), max(cx - cw // 2, 0), min(cx + cw // 2, width)


def mix_batch(
    pixels: torch.Tensor, labels: torch.Tensor, num_classes: int, spec: MixupSpec, smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of a batch with its flipped self: `(pixels [B, C, H, W], soft targets [B, classes])`."""
    targets = soft_targets(labels, num_classes, smoothing)
    use_mixup, use_cutmix = spec.mixup_alpha > 0, spec.cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or float(torch.rand(())) >= spec.prob:
        return pixels, targets
    cutmix = use_cutmix and (not use_mixup or float(torch.rand(())) < spec.switch_prob)
    alpha = spec.cutmix_alpha if cutmix else spec.mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = pixels.flip(0)
    if cutmix:
        top, bottom, left, right = cutmix_box(pixels.shape[-2], pixels.shape[-1], lam)
        pixels = pixels.clone()
        pixels[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (pixels.shape[-2] * pixels.shape[-1])  # the box really cut
    else:
        pixels = lam * pixels + (1.0 - lam) * flipped
    return pixels, lam * targets + (1.0 - lam) * targets.flip(0)
