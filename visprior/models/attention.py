"""Packed rows inside the model: the attention mask in the form each attention backend takes, and the label rule at
document boundaries.

The data pipeline hands over `document_ids` `[B, T]` (0, 1, 2, ... per packed document, -1 for padding) and never a mask
of its own making (torchtune's `attention_utils.py` does the same). Here they become:

- the block-causal mask (query i attends key j when both lie in the same document and j <= i; a padding position attends
  to itself only, so no softmax row is empty), in the form the backend wants (`attention_mask_for`):
  `sdpa` a dense boolean `[B, 1, T, T]` (True = attend); `eager` an additive float mask (0 / dtype minimum), because
  transformers' eager attention *adds* the mask to the scores and a boolean would silently add 1 / 0 (measured in
  transformers 5.2x); `flex_attention` a `BlockMask` built from the same rule. transformers passes any 4D mask (tensor or
  `BlockMask`) through unchanged (`masking_utils._preprocess_mask_arguments`). `flash_attention_2` / `_3` take no
  mask at all: they run padding-free variable-length attention (`flash_attn_varlen_func`) over the sequences that
  `position_ids` delimit (each document restarts at 0; padding positions are 0, so each is a sequence of one and
  attends to itself, as the rule says), which transformers derives from `position_ids` when the mask is None. That is
  O(T) memory where the dense masks are O(T²). FlexAttention has no backward on CPU (torch 2.13): on CPU it serves
  evaluation; training with it needs a GPU.

Which backend runs is one key, `language_model.attn_implementation` (`LanguageModelSpec`, set in the model fragment,
e.g. recipes/_base/models/toy-lm.yaml): `sdpa` (the CPU default), `flex_attention` (CPU forward, GPU), `flash_attention_2`
(GPU with flash-attn installed), `eager`.
- the boundary label rule (`mask_document_starts`): a target whose previous token lies in another document is not
  supervised, since the shifted loss would predict it from the previous document's last token. With it a packed
  document's loss equals its loss alone. The rule lives only here; the packer leaves labels as the tokenizer made them.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100

DENSE_BOOL_BACKENDS = ("sdpa",)
ADDITIVE_BACKENDS = ("eager",)
BLOCK_MASK_BACKENDS = ("flex_attention",)
VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3")
"""Backends that take the documents from `position_ids` (padding-free varlen) instead of a mask."""


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """BoolTensor `[B, 1, T, T]`, True where query i may attend key j: same document, j <= i, document >= 0.

    Padding positions (-1) attend to themselves only, so no softmax row is empty (no NaN).
    """
    t = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # [B, T, T]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    valid = (document_ids >= 0)[:, :, None]
    eye = torch.eye(t, dtype=torch.bool, device=document_ids.device)
    return ((same & causal & valid) | eye).unsqueeze(1)


def block_causal_bias(document_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive float mask `[B, 1, T, T]`: 0 where `block_causal_mask` is True, the dtype's minimum elsewhere."""
    mask = block_causal_mask(document_ids)
    zero = torch.zeros((), dtype=dtype, device=document_ids.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def block_causal_mask_mod(document_ids: torch.Tensor) -> Any:
    """The rule of `block_causal_mask` as a FlexAttention `mask_mod(b, h, q, kv) -> bool`."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        doc_q, doc_kv = document_ids[b, q], document_ids[b, kv]
        return ((doc_q == doc_kv) & (kv <= q) & (doc_q >= 0)) | (q == kv)

    return mask_mod


def block_causal_block_mask(document_ids: torch.Tensor) -> Any:
    """A FlexAttention `BlockMask` for the packed rows (blocks that are fully masked are skipped by the kernel)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = document_ids.shape
    return create_block_mask(block_causal_mask_mod(document_ids), b, None, t, t, device=document_ids.device)


def attention_mask_for(document_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> Any:
    """The block-causal mask for `document_ids` `[B, T]` in the form the LM's attention backend takes (None for the
    varlen backends, which read the documents from `position_ids`)."""
    if attn_implementation in DENSE_BOOL_BACKENDS:
        return block_causal_mask(document_ids)  # [B, 1, T, T] bool
    if attn_implementation in ADDITIVE_BACKENDS:
        return block_causal_bias(document_ids, dtype)  # [B, 1, T, T] float
    if attn_implementation in BLOCK_MASK_BACKENDS:
        return block_causal_block_mask(document_ids)
    if attn_implementation in VARLEN_BACKENDS:
        return None
    known = DENSE_BOOL_BACKENDS + ADDITIVE_BACKENDS + BLOCK_MASK_BACKENDS + VARLEN_BACKENDS
    raise ValueError(
        f"attention backend {attn_implementation!r} cannot take a block-causal mask for packed rows; "
        f"set language_model.attn_implementation to one of {list(known)}"
    )


def crosses_document(document_ids: torch.Tensor) -> torch.Tensor:
    """BoolTensor `[B, T]`: True at t when the token before it (t - 1) lies in another document (and at t = 0)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def mask_document_starts(labels: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """`labels` with the first target of every packed document set to -100 (never predicted across a boundary).

    Position 0 of a row is never a target of the shifted loss, so masking it changes nothing there. Without
    `document_ids` a row is one document and the labels come back unchanged.
    """
    if document_ids is None:
        return labels
    return labels.masked_fill(crosses_document(document_ids), IGNORE_INDEX)
