"""`loss_average: turn` weighs every answer turn the same, whatever its length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visprior.models.language import IGNORE_INDEX, causal_lm_loss, turn_averaged_loss


def _case() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 7)
    labels = torch.randint(0, 7, (2, 12))
    # row 0: a 6-token turn (targets 2..7) and a 1-token turn (target 10); row 1: one 3-token turn (targets 4..6)
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[0, 2:8] = keep[0, 10] = keep[1, 4:7] = True
    return logits, labels.masked_fill(~keep, IGNORE_INDEX)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    )


def test_each_turn_weighs_the_same() -> None:
    logits, labels = _case()
    per_token = _token_losses(logits, labels).view(2, 11)  # target t sits at shifted position t-1
    turns = [per_token[0, 1:7].mean(), per_token[0, 9:10].mean(), per_token[1, 3:6].mean()]
    assert turn_averaged_loss(logits, labels).item() == pytest.approx(torch.stack(turns).mean().item(), rel=1e-6)
    token_mean, n = causal_lm_loss(logits, labels)
    assert n == 10 and abs(token_mean.item() - turn_averaged_loss(logits, labels).item()) > 1e-3


def test_equal_length_turns_give_the_token_average_and_no_turn_gives_zero() -> None:
    logits, labels = _case()
    labels[0, 10] = IGNORE_INDEX
    labels[0, 5:8] = IGNORE_INDEX  # row 0 now has one 3-token turn (targets 2..4), like row 1
    assert turn_averaged_loss(logits, labels).item() == pytest.approx(
        causal_lm_loss(logits, labels)[0].item(), rel=1e-6
    )
    empty = torch.full_like(labels, IGNORE_INDEX)
    loss = turn_averaged_loss(logits.requires_grad_(), empty)
    assert loss.item() == 0.0 and loss.requires_grad


def test_a_bad_loss_average_fails_before_the_model_is_built() -> None:
    from visprior.stages import InstructionTuning

    with pytest.raises(ValueError, match="loss_average must be 'token' or 'turn', got 'sample'"):
        InstructionTuning(
            language_model={"config": {"model_type": "llama"}, "tokenizer": "does/not/exist"},
            vision_tower={"config": {"model_type": "siglip_vision_model"}},
            loss_average="sample",
        )
