"""VW-LMM (Peng et al., 2024, "Multi-modal Auto-regressive Modeling via Visual Words"): supervise the LM at image positions.

A plain VLM trains only on text; VW-LMM also asks the LM to predict each visual token, as a distribution over its own
vocabulary (a "visual word"). The target comes from a `vm_head`, a linear map (hidden -> vocab, no bias) from the projected
image embedding to the vocabulary. Checked against the released `visual_words/model/language_model/vw_llama.py` and
`vw_arch.py` (pengts/VW-LMM, commit b1aeaef):

- `vm_head` is applied to the LM's input embeddings at image positions, i.e. the connector outputs;
- the target for image position t + 1 is `softmax(vm_head(x_{t+1}))`, the prediction `log_softmax(lm_logits_t)` (the same
  shift as the text loss), over every image position of the batch flattened, with `KLDivLoss(reduction="batchmean")`:
  the sum of `KL(target || prediction)` divided by the number of positions (`visual_words_kl`);
- the target is not detached (the KL trains `vm_head` and, through it, the connector); `detach_target=True` is our switch;
- total loss = text cross-entropy + KL with weight 1; image positions carry label -100, so they stay out of the text loss;
- the *pseudo image features* variant (`vw_pif_arch.py`) feeds the LM `softmax(vm_head(x)) @ E` (E the input embedding
  matrix) in place of the image features, with the same target (`pseudo_image_features`).

The released code has no temperature; ours defaults to 1 (the release). An image token whose previous token lies in another
packed document (or that starts a row) has no prediction and is left out, so a packed batch gives every sample the loss it
has alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visprior.models.attention import crosses_document


@dataclass
class VisualWordsSpec:
    """The visual-words loss of a VLM stage (VW-LMM); absent (`null` in YAML) means text loss only."""

    weight: float = 1.0
    """Total loss = text cross-entropy + weight x visual-words KL (the release: 1)."""
    detach_target: bool = False
    """Stop the gradient through the target softmax(vm_head(v)) (the release does not)."""
    pseudo_image_features: bool = False
    """Feed the LM softmax(vm_head(v)) @ E instead of the image features v (VW-LMM's PIF variant)."""
    temperature: float = 1.0
    """Softmax temperature of target and prediction (the release: 1)."""
    train_head: bool = True
    """The stage trains `vm_head` at the connector's learning rate unless its `trainable` names `vm_head` itself."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"visual_words.temperature must be > 0, got {self.temperature}")
        if self.weight < 0:
            raise ValueError(f"visual_words.weight must be >= 0, got {self.weight}")


def vm_head(visual_dim: int, vocab_size: int, init_std: float | None = None) -> nn.Linear:
    """Visual-modelling head: visual embedding `[.., D]` -> vocabulary logits `[.., V]` (the visual word).

    `init_std`: normal init with this std (the release inherits the LM's `initializer_range` through `post_init`).
    """
    head = nn.Linear(visual_dim, vocab_size, bias=False)
    if init_std is not None:
        nn.init.normal_(head.weight, std=init_std)
    return head


def predicted_image_positions(image_mask: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """BoolTensor `[B, T]`: image tokens whose previous position exists and lies in the same document."""
    if document_ids is None:
        document_ids = torch.zeros_like(image_mask, dtype=torch.long)
    return image_mask & ~crosses_document(document_ids)


def shifted_image_logits(
    logits: torch.Tensor, image_mask: torch.Tensor, document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM logits that predict each image token, row-major like the image features: `([M, V], keep [M])`.

    `logits` `[B, T, V]`, `image_mask` `[B, T]`. The prediction for position t is the logit row at t - 1; an image token
    at t = 0, or right after a document boundary, has none, so `keep` is False there (its row is a zero placeholder).
    """
    predicted = predicted_image_positions(image_mask, document_ids)  # [B, T]
    keep = predicted[image_mask]  # [M]
    predictors = logits[:, :-1][predicted[:, 1:]]  # [M_kept, V] row-major
    if bool(keep.all()):
        return predictors, keep
    out = logits.new_zeros(keep.shape[0], logits.shape[-1])  # [M, V]
    out[keep] = predictors
    return out, keep


def visual_words_kl(
    lm_logits: torch.Tensor,
    visual_embeddings: torch.Tensor,
    head: nn.Module,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    detach_target: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """`KL(softmax(head(v)/T) || softmax(lm_logits/T))` per visual token, averaged over the kept ones (`batchmean`).

    `lm_logits` `[M, V]` (from `shifted_image_logits`), `visual_embeddings` `[M, D]` or `[N, K, D]` with N * K = M,
    `mask` `[M]` selects the tokens that count. `reduction="none"` returns the per-token values `[M]` (0 where masked);
    the mean is 0 (still in the graph) when no token is kept.
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
    per_token = per_token * mask
    if reduction == "none":
        return per_token
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_token.sum() / mask.sum().clamp(min=1)


def visual_words_loss(
    logits: torch.Tensor,
    image_mask: torch.Tensor,
    features: torch.Tensor,
    head: nn.Module,
    spec: VisualWordsSpec,
    document_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The VLM's visual-words KL: LM `logits` `[B, T, V]`, `image_mask` `[B, T]`, connector outputs `features` `[N, K, D]`."""
    predictions, keep = shifted_image_logits(logits, image_mask, document_ids)  # [M, V], [M]
    return visual_words_kl(predictions, features, head, spec.temperature, keep, spec.detach_target, reduction=reduction)


def pseudo_image_features(
    logits: torch.Tensor, embedding_matrix: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Expected token embedding under the predicted visual word: `softmax(logits / T) @ E`, `[.., V]` -> `[.., D]`."""
    probs = F.softmax(logits.float() / temperature, dim=-1).to(embedding_matrix.dtype)  # [.., V]
    return probs @ embedding_matrix  # [.., D]
