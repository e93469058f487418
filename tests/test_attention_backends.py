"""Attention for packed rows (issue 13 §3): one key (`language_model.attn_implementation`) picks the backend, the model
builds the mask form it takes (`models/attention.py`), and every backend gives each packed document the loss it has
when run alone, to float tolerance."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from visprior.models.language import IGNORE_INDEX, LanguageModelSpec
from visprior.models.vlm import VLMSpec, build_vlm

TINY = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64}  # fmt: skip
LENGTHS = [[5, 9, 2], [16]]  # two packed rows of 16: three documents, then one; the first row ends in padding
T = 16


def packed_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (len(LENGTHS), T), generator=g)
    docs = torch.full((len(LENGTHS), T), -1)
    positions = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for d, n in enumerate(lengths):
            docs[row, start : start + n] = d
            positions[row, start : start + n] = torch.arange(n)
            start += n
    labels = ids.masked_fill(docs < 0, IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "document_ids": docs, "position_ids": positions}


def per_document_loss(model, batch: dict[str, torch.Tensor]) -> list[float]:
    """Mean next-token loss of each packed document, in row order (targets as the model supervises them)."""
    from visprior.models.attention import mask_document_starts

    out = model(**batch)
    labels = mask_document_starts(batch["labels"], batch["document_ids"])
    token = F.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none")  # [B, T-1]
    docs, supervised = batch["document_ids"][:, 1:], labels[:, 1:] != IGNORE_INDEX
    losses = []
    for row, lengths in enumerate(LENGTHS):
        for d in range(len(lengths)):
            sel = (docs[row] == d) & supervised[row]
            losses.append(token[row][sel].mean())
    return losses


def alone(model, batch: dict[str, torch.Tensor]) -> list[float]:
    """Each document run by itself in its own row (no packing): the reference."""
    losses = []
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            ids = batch["input_ids"][row : row + 1, start : start + n]
            losses.append(model(input_ids=ids, labels=ids).loss)
            start += n
    return losses


def model_for(tokenizer_dir, attn: str):
    torch.manual_seed(0)
    return build_vlm(VLMSpec(LanguageModelSpec(config=TINY, tokenizer=str(tokenizer_dir), attn_implementation=attn)))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_per_document_loss_equals_alone(attn: str, tokenizer_dir) -> None:
    model = model_for(tokenizer_dir, attn)
    batch = packed_batch(model.language_model.config.vocab_size)
    packed = per_document_loss(model, batch)
    torch.testing.assert_close(torch.stack(packed), torch.stack(alone(model, batch)), atol=1e-5, rtol=1e-5)
    torch.stack(packed).sum().backward()  # and it trains: a gradient reaches the embeddings
    assert model.language_model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_flex_attention_per_document_loss_equals_sdpa(tokenizer_dir, unfused_flex_attention) -> None:
    """The model's own BlockMask under transformers' flex backend (unfused: see the fixture); forward only on CPU
    (torch 2.13 has no CPU backward for FlexAttention)."""
    sdpa, flex = model_for(tokenizer_dir, "sdpa"), model_for(tokenizer_dir, "flex_attention")
    batch = packed_batch(sdpa.language_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.stack(per_document_loss(flex, batch)),
            torch.stack(per_document_loss(sdpa, batch)),
            atol=1e-5,
            rtol=1e-5,
        )


FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not FLASH, reason="flash-attention varlen needs a CUDA GPU and the flash-attn package")
def test_flash_varlen_per_document_loss_equals_sdpa(tokenizer_dir) -> None:
    sdpa = model_for(tokenizer_dir, "sdpa").cuda()
    flash = model_for(tokenizer_dir, "flash_attention_2").cuda()
    batch = {k: v.cuda() for k, v in packed_batch(sdpa.language_model.config.vocab_size).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        reference, got = per_document_loss(sdpa, batch), per_document_loss(flash, batch)
    torch.testing.assert_close(torch.stack(got), torch.stack(reference), atol=2e-2, rtol=2e-2)  # bf16 kernels


def test_varlen_backend_without_positions_is_refused(tokenizer_dir) -> None:
    model = model_for(tokenizer_dir, "sdpa")
    model.language_model.config._attn_implementation = "flash_attention_2"  # the mask step only; no kernel runs
    batch = packed_batch(model.language_model.config.vocab_size)
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=batch["input_ids"], document_ids=batch["document_ids"])
