"""LM4VE's information-filtering analysis: masks from the toy renderer, patch labels, the three concentration figures,
and a run through an LM4VE classifier at every tapped point."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from visprior.eval.information_filtering import (
    auroc,
    image_metrics,
    information_filtering,
    masked_shapes,
    patch_coverage,
)
from visprior.models.frozen_block import FrozenBlockClassifierSpec, FrozenBlockSpec, build_frozen_block_classifier
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec


def test_masks_match_the_rendered_object() -> None:
    samples = masked_shapes(6, size=64, seed=0)
    for s in samples:
        assert s.mask.shape == (64, 64) and 0.01 < s.mask.mean() < 0.6
        pixels = np.asarray(s.image, dtype=np.float32)
        inside, outside = pixels[s.mask > 0.99].mean(0), pixels[s.mask < 0.01]
        assert np.abs(outside - inside).sum(-1).mean() > 10  # the mask marks where the object's colour is
    assert [s.label for s in masked_shapes(6, size=64, seed=0)] == [s.label for s in samples]  # seeded


def test_patch_coverage_and_metrics() -> None:
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[:4, :4] = 1.0  # the top-left quarter
    mask[4:6, 4:8] = 1.0  # half of the bottom-right quarter
    assert patch_coverage(mask, 8, 4).tolist() == [1.0, 0.0, 0.0, 0.5]
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores, positive = rng.integers(0, 4, 9).astype(float), rng.random(9) < 0.5
        if positive.all() or not positive.any():
            continue
        pairs = list(itertools.product(scores[positive], scores[~positive]))
        brute = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs])
        assert auroc(scores, positive) == pytest.approx(brute)
    on = np.array([True, True, False, False, False, False, False, False])
    focused = image_metrics(on.astype(float) + 0.1, on)
    assert focused["object_share"] == pytest.approx((2.2 / 2.8) / 0.25) and focused["auroc"] == 1.0
    assert focused["iou"] == 1.0
    flat = image_metrics(np.ones(8), on)
    assert flat["object_share"] == pytest.approx(1.0) and flat["auroc"] == 0.5 and flat["iou"] == 0.0


def test_every_point_of_an_lm4ve_classifier() -> None:
    vit = {"model_type": "vit", "image_size": 64, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 64}  # fmt: skip
    llm = {"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 128}  # fmt: skip
    spec = FrozenBlockClassifierSpec(
        VisionTowerSpec(config=vit, feature_layer=-1, select="cls_patch"),
        num_classes=8,
        block=FrozenBlockSpec("llm_block", LanguageModelSpec(config=llm)),
        pool="cls",
    )
    model = build_frozen_block_classifier(spec)
    model.frozen_block.norm = LlamaRMSNorm(64)  # as with a loaded final norm: `llm_out` must be read before it
    result = information_filtering(model, masked_shapes(10, seed=1), batch_size=4)
    assert set(result) == {"before", "llm_in", "llm_out", "after"}
    for point in result.values():
        assert point["auroc"]["n"] >= 8 and 0.0 <= point["auroc"]["mean"] <= 1.0  # images with an object patch
        assert point["object_share"]["ci95"] > 1e-3  # varies across images (after a norm it would not)
    assert not any(m._forward_hooks for m in model.modules())  # the taps are removed afterwards
    plain = FrozenBlockClassifierSpec(VisionTowerSpec(config=vit, feature_layer=-1, select="cls_patch"), 8,
                                      FrozenBlockSpec("none"), pool="cls")  # fmt: skip
    none = information_filtering(build_frozen_block_classifier(plain), masked_shapes(4, seed=1))
    assert set(none) == {"before", "after"} and none["before"] == none["after"]  # no block: the head reads the tower
