"""VW-LMM: the visual-words KL (sign, zero point, gradients), logit alignment at image positions, pseudo image features."""

from __future__ import annotations

import pytest
import torch

from visprior.models.visual_words import pseudo_image_features, shifted_image_logits, visual_words_kl, vm_head

V, D = 11, 8


def test_kl_is_non_negative_and_reaches_lm_logits() -> None:
    head = vm_head(D, V)
    logits = torch.randn(6, V, requires_grad=True)
    loss = visual_words_kl(logits, torch.randn(6, D), head, temperature=2.0)
    assert loss.item() > 0
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_kl_is_zero_when_distributions_match() -> None:
    head = vm_head(D, V)
    visual = torch.randn(2, 3, D)  # [N, K, D] is flattened row-major
    matching = head(visual.reshape(6, D)).detach() + 5.0  # a constant shift leaves the softmax unchanged
    loss = visual_words_kl(matching, visual, head)
    assert loss.abs().item() < 1e-6


def test_kl_direction_is_target_to_prediction() -> None:
    head = vm_head(D, V)
    visual, logits = torch.randn(4, D), torch.randn(4, V)
    target = torch.softmax(head(visual), -1)
    pred = torch.softmax(logits, -1)
    expected = (target * (target.log() - pred.log())).sum(-1).mean()
    torch.testing.assert_close(visual_words_kl(logits, visual, head), expected)


def test_detached_target_and_mask() -> None:
    head = vm_head(D, V)
    logits = torch.randn(3, V, requires_grad=True)
    keep = torch.tensor([True, False, True])
    loss = visual_words_kl(logits, torch.randn(3, D), head, mask=keep, detach_target=True)
    loss.backward()
    assert head.weight.grad is None
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    empty = visual_words_kl(logits, torch.randn(3, D), head, mask=torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="3 predicted positions but 4 visual embeddings"):
        visual_words_kl(logits, torch.randn(4, D), head)


def test_shifted_logits_align_with_image_tokens() -> None:
    logits = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1).expand(2, 5, V)  # value = 5 * row + position
    image_mask = torch.tensor([[False, True, True, False, True], [True, True, False, False, False]])
    pred, keep = shifted_image_logits(logits, image_mask)
    assert pred.shape == (5, V)
    # image tokens (row, t): (0,1) (0,2) (0,4) (1,0) (1,1) -> predictors at t - 1; (1,0) has none
    torch.testing.assert_close(pred[:, 0], torch.tensor([0.0, 1.0, 3.0, 0.0, 5.0]))
    assert keep.tolist() == [True, True, True, False, True]


def test_pseudo_image_features() -> None:
    embedding = torch.randn(V, D)
    confident = torch.full((2, V), -1e4)
    confident[0, 3] = confident[1, 7] = 1e4
    torch.testing.assert_close(pseudo_image_features(confident, embedding), embedding[[3, 7]])
    uniform = pseudo_image_features(torch.zeros(1, V), embedding)
    torch.testing.assert_close(uniform[0], embedding.mean(0))
