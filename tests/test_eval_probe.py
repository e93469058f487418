"""Linear probe: separable features give perfect accuracy; evaluation runs end to end on tiny shard fixtures."""

from __future__ import annotations

import torch
from PIL import Image

from visprior.data.formats import PairSample
from visprior.data.shards import write_shards
from visprior.eval.probe import evaluate_probe, fit_linear_probe
from visprior.eval.toymodels import TinyVisionTower, tiny_image_transform


def test_probe_separates_gaussian_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 4
    y = torch.arange(3).repeat(20)
    x = centres[y] + 0.3 * torch.randn(60, 3, generator=g)
    predict = fit_linear_probe(x, y, 3)
    assert (predict(x) == y).float().mean() == 1.0
    assert (predict(x[:, [1, 2, 0]]) == y).float().mean() < 0.5  # a probe that ignored its input could not fail this


def test_probe_on_colour_coded_shapes(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for split, n in (("train", 12), ("test", 6)):
        samples = [
            PairSample(f"{split}{i}", Image.new("RGB", (8, 8), colours[i % 3]), "x", {"label": i % 3}) for i in range(n)
        ]
        write_shards(samples, tmp_path / split, name=split, kind="pair")
    torch.manual_seed(0)
    res = evaluate_probe(TinyVisionTower(16), tiny_image_transform, tmp_path)
    assert res.metrics["train_acc"].value == 1.0 and res.metrics["test_acc"].value == 1.0
    assert res.metrics["test_acc"].n == 6 and res.dataset.count == 18
