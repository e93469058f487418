"""VW-LMM (Peng et al., 2024, "Multi-modal Auto-regressive Modeling via Visual Words"): supervise the LM at image positions.

A plain VLM trains only on text; VW-LMM also asks the LM to predict each visual token, as a distribution over its own
vocabulary (a "visual word"). The target comes from a `vm_head`, a linear map from the visual embedding to the vocabulary:
`loss = KL(softmax(vm_head(v) / T) || softmax(lm_logits / T))`, the KL from the target to the LM's prediction, so the LM's
distribution is pulled onto the visual word (forward KL, as in distillation: the target's mass must be covered).
By default the target is not detached, so the same loss trains the vm_head; `detach_target=True` freezes it per step.
As in any autoregressive loss, the logits that predict the visual token at position t are the LM's logits at t - 1
(`shifted_image_logits`). `pseudo_image_features` turns predicted visual words back into embeddings (softmax @ E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def vm_head(visual_dim: int, vocab_size: int) -> nn.Linear:
    """Visual-modelling head: visual embedding `[.., D]` -> vocabulary logits `[.., V]` (the visual word)."""
    return nn.Linear(visual_dim, vocab_size, bias=False)


def shifted_image_logits(logits: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LM logits that predict each image token, row-major like the image features: `([M, V], keep [M])`.

    `logits` `[B, T, V]`, `image_mask` `[B, T]`. The prediction for position t is the logit row at t - 1; an image token
    at t = 0 has none, so `keep` is False there (its row is a placeholder).
    """
    previous = torch.zeros_like(image_mask)  # [B, T]: True at t - 1 for every image token at t
    previous[:, :-1] = image_mask[:, 1:]
    starts_with_image = image_mask[:, 0]  # [B]
    predictors = logits[previous]  # [M', V] in row-major order, missing the tokens at t = 0
    if not bool(starts_with_image.any()):
        return predictors, torch.ones(predictors.shape[0], dtype=torch.bool, device=logits.device)
    rows = image_mask.sum(dim=1)  # [B] image tokens per row
    out = logits.new_zeros(int(rows.sum()), logits.shape[-1])  # [M, V]
    keep_flat = torch.ones(out.shape[0], dtype=torch.bool, device=logits.device)
    starts = torch.cumsum(rows, 0) - rows  # first flat index of each row
    keep_flat[starts[starts_with_image]] = False
    out[keep_flat] = predictors
    return out, keep_flat


def visual_words_kl(
    lm_logits: torch.Tensor,
    visual_embeddings: torch.Tensor,
    head: nn.Module,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    detach_target: bool = False,
) -> torch.Tensor:
    """Mean over visual tokens of `KL(softmax(head(v)/T) || softmax(lm_logits/T))`; 0 (in the graph) when none is kept.

    `lm_logits` `[M, V]` (from `shifted_image_logits`), `visual_embeddings` `[M, D]` or `[N, K, D]` with N * K = M,
    `mask` `[M]` selects the tokens that count.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    visual = visual_embeddings.reshape(-1, visual_embeddings.shape[-1])  # [M, D]
    if visual.shape[0] != lm_logits.shape[0]:
        raise ValueError(f"{lm_logits.shape[0]} predicted positions but {visual.shape[0]} visual embeddings")
    target_logits = head(visual).float() / temperature  # [M, V]
    if detach_target:
        target_logits = target_logits.detach()
    log_target = F.log_softmax(target_logits, dim=-1)
    log_pred = F.log_softmax(lm_logits.float() / temperature, dim=-1)  # [M, V]
    per_token = F.kl_div(log_pred, log_target, log_target=True, reduction="none").sum(-1)  # [M]
    if mask is None:
        mask = torch.ones_like(per_token, dtype=torch.bool)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def pseudo_image_features(
    logits: torch.Tensor, embedding_matrix: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Expected token embedding under the predicted visual word: `softmax(logits / T) @ E`, `[.., V]` -> `[.., D]`."""
    probs = F.softmax(logits.float() / temperature, dim=-1).to(embedding_matrix.dtype)  # [.., V]
    return probs @ embedding_matrix  # [.., D]
