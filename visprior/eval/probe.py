"""Linear probe on frozen vision-tower features for the toy shape-classification set.

The tower runs in eval mode under no_grad; its patch features are mean-pooled to one vector per image, standardised with
the training split's statistics, and a multinomial logistic regression (full-batch L-BFGS, small L2, seeded) is fitted on the
train split. Train and test accuracy say how linearly separable the tower's features are, which is what the frozen-block
experiments (LM4VE) compare.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from visprior.data.formats import PairSample
from visprior.data.shards import iter_samples, resolve_shards
from visprior.eval.results import Accumulator, DatasetInfo, TaskResult, sha256_files


@torch.no_grad()
def pooled_features(
    tower: nn.Module,
    transform: Callable[[Image.Image], torch.Tensor],
    images: Sequence[Image.Image],
    batch_size: int = 32,
) -> torch.Tensor:
    """`[N, D]` mean over the tower's output tokens (`[N, P, D]`, or an HF output's `last_hidden_state`)."""
    was_training = tower.training
    tower.eval()
    device = next(tower.parameters()).device
    feats = []
    for start in range(0, len(images), batch_size):
        pv = torch.stack([transform(im) for im in images[start : start + batch_size]]).to(device)  # [B, C, H, W]
        out = tower(pv)
        out = getattr(out, "last_hidden_state", out)
        feats.append(out.float().mean(dim=1).cpu() if out.dim() == 3 else out.float().cpu())
    tower.train(was_training)
    return torch.cat(feats)


def fit_linear_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, num_classes: int, *, l2: float = 1e-3, steps: int = 100, seed: int = 0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A standardised multinomial logistic regression; returns a function from features to predicted labels."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x = (x_train - mean) / std
    w = (0.01 * torch.randn(x.shape[1], num_classes, generator=gen)).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y_train) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda feats: (((feats - mean) / std) @ w + b).argmax(-1)


def load_shapes(path: str | os.PathLike) -> tuple[list[Image.Image], torch.Tensor]:
    samples = [s for s in iter_samples(resolve_shards(path), "pair") if isinstance(s, PairSample)]
    return [s.image for s in samples], torch.tensor([int(s.meta["label"]) for s in samples])


def evaluate_probe(
    tower: nn.Module, transform: Callable[[Image.Image], torch.Tensor], shapes_dir: str | os.PathLike, *, seed: int = 0
) -> TaskResult:
    """Train/test accuracy of a linear probe on `shapes_dir/{train,test}`."""
    start = time.perf_counter()
    root = Path(shapes_dir)
    train_images, y_train = load_shapes(root / "train")
    test_images, y_test = load_shapes(root / "test")
    x_train, x_test = pooled_features(tower, transform, train_images), pooled_features(tower, transform, test_images)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    predict = fit_linear_probe(x_train, y_train, num_classes, seed=seed)
    acc = Accumulator()
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        for ok in (predict(x) == y).tolist():
            acc.update(f"{split}_acc", float(ok))
    files = resolve_shards(root / "train") + resolve_shards(root / "test")
    dataset = DatasetInfo("toyworld-shapes", str(root), len(y_train) + len(y_test), sha256_files(files))
    return TaskResult("probe", dataset, {n: acc.accuracy(n) for n in acc.names()}, time.perf_counter() - start)
