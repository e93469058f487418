"""The model's masks for packed rows: one rule, one form per attention backend (sdpa bool, eager additive, flex BlockMask),
the same outputs under every backend, and the contrastive text encoder right under eager too."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from transformers import LlamaConfig, LlamaForCausalLM

from visprior.models.attention import (
    IGNORE_INDEX,
    attention_mask_for,
    block_causal_mask,
    block_causal_mask_mod,
    crosses_document,
    mask_document_starts,
)

DOCS = torch.tensor([[0, 0, 1, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).eval()


def test_mask_form_per_backend() -> None:
    dense = attention_mask_for(DOCS, "sdpa", torch.float32)
    assert dense.dtype == torch.bool and dense.shape == (2, 1, 8, 8)
    assert torch.equal(dense, block_causal_mask(DOCS))
    additive = attention_mask_for(DOCS, "eager", torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert (additive[dense] == 0).all() and (additive[~dense] == torch.finfo(torch.bfloat16).min).all()
    flex = attention_mask_for(DOCS, "flex_attention", torch.float32)
    assert isinstance(flex, BlockMask)
    # the BlockMask's rule, evaluated densely, is exactly the boolean mask
    assert torch.equal(create_mask(block_causal_mask_mod(DOCS), 2, 1, 8, 8, device="cpu"), dense)
    assert attention_mask_for(DOCS, "flash_attention_2", torch.float32) is None  # varlen: documents from position_ids
    with pytest.raises(ValueError, match="paged_attention.*language_model.attn_implementation"):
        attention_mask_for(DOCS, "paged_attention", torch.float32)


def test_boundary_label_rule() -> None:
    labels = torch.arange(16).view(2, 8)
    masked = mask_document_starts(labels, DOCS)
    assert crosses_document(DOCS)[0].tolist() == [True, False, True, False, False, True, True, False]
    assert masked[0].tolist() == [IGNORE_INDEX, 1, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX, 7]
    assert masked[1, 1:].tolist() == list(range(9, 16))  # one document: only t = 0, never a target anyway
    assert mask_document_starts(labels, None) is labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_backend_gets_the_same_attention(attn: str) -> None:
    """The packed logits under each backend's mask equal sdpa's, and a boolean mask under eager would not."""
    ids = torch.randint(5, 50, (2, 8))
    positions = torch.tensor([[0, 1, 0, 1, 2, 0, 0, 0], list(range(8))])
    reference = tiny_llama("sdpa")(input_ids=ids, attention_mask=block_causal_mask(DOCS), position_ids=positions).logits
    model = tiny_llama(attn)
    mask = attention_mask_for(DOCS, attn, torch.float32)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    if attn == "eager":  # the pitfall the per-backend form exists for: eager adds a boolean mask as 1 / 0
        wrong = model(input_ids=ids, attention_mask=block_causal_mask(DOCS), position_ids=positions).logits
        assert not torch.allclose(wrong, reference, atol=1e-3)


def test_flex_attention_block_mask_matches_sdpa(unfused_flex_attention) -> None:
    """Our BlockMask through transformers' flex backend (unfused: see the fixture); forward only, as FlexAttention has no
    CPU backward in torch 2.13. A plain causal BlockMask must not pass (the documents would see each other)."""
    ids = torch.randint(5, 50, (2, 8))
    positions = torch.tensor([[0, 1, 0, 1, 2, 0, 0, 0], list(range(8))])
    mask = attention_mask_for(DOCS, "flex_attention", torch.float32)
    with torch.no_grad():
        reference = tiny_llama("sdpa")(
            input_ids=ids, attention_mask=block_causal_mask(DOCS), position_ids=positions
        ).logits
        logits = tiny_llama("flex_attention")(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        causal = create_block_mask(lambda b, h, q, kv: q >= kv, 2, None, 8, 8, device="cpu")
        leaky = tiny_llama("flex_attention")(input_ids=ids, attention_mask=causal, position_ids=positions).logits
    valid = DOCS >= 0
    torch.testing.assert_close(logits[valid], reference[valid], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[valid], reference[valid], atol=1e-3)


def test_contrastive_text_encoder_is_right_under_eager(tokenizer_dir) -> None:
    """ContrastivePretraining asks the model for the mask form of its text encoder's backend (a bool mask was wrong)."""
    from visprior.models.language import LanguageModelSpec
    from visprior.models.vision import VisionTowerSpec
    from visprior.stages import ContrastivePretraining

    lm = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    tower = {
        "model_type": "siglip_vision_model",
        "image_size": 32,
        "patch_size": 16,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vision_use_head": False,
    }
    stages = {}
    for attn in ("sdpa", "eager"):
        torch.manual_seed(0)
        spec = LanguageModelSpec(config=lm, tokenizer=str(tokenizer_dir), attn_implementation=attn)
        stages[attn] = ContrastivePretraining(VisionTowerSpec(config=tower), spec, embed_dim=8).eval()
    ids = torch.randint(5, 100, (2, 6))
    batch = {
        "input_ids": ids,
        "labels": torch.tensor([[-100, 5, 6, 7, -100, -100], [-100, 5, 6, 7, 8, 9]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 0], list(range(6))]),
        "document_ids": torch.tensor([[0, 0, 0, 0, -1, -1], [0] * 6]),
    }
    with torch.no_grad():
        torch.testing.assert_close(stages["eager"].embed_texts(batch), stages["sdpa"].embed_texts(batch))
