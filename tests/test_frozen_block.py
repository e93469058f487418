"""LM4VE: trainable-parameter counts per variant, forward/backward, bidirectional attention, the block really is the LLM's."""

from __future__ import annotations

import pytest
import torch

from visprior.models.frozen_block import (
    FrozenBlockClassifierSpec,
    build_frozen_block_classifier,
    parameter_count,
)
from visprior.models.language import LanguageModelSpec, causal_lm_from_config
from visprior.models.vision import VisionTowerSpec

LLM = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
VIT = {
    "model_type": "vit",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
# one Llama layer: q, k, v, o (4 x 64²) + gate, up, down (3 x 64 x 128) + two RMSNorms (2 x 64)
BLOCK_PARAMS = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
ADAPTER_PARAMS = (32 * 64 + 64) + (64 * 32 + 32)


def build(variant: str, attn: str = "sdpa", **kwargs):
    spec = FrozenBlockClassifierSpec(
        vision_tower=VisionTowerSpec(config=VIT, feature_layer=-1, select="cls_patch"),
        num_classes=5,
        variant=variant,
        language_model=LanguageModelSpec(config=LLM, attn_implementation=attn),
        pool="cls",
        **kwargs,
    )
    return build_frozen_block_classifier(spec)


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_trainable_parameter_counts_per_variant() -> None:
    baseline = build("none")
    frozen = build("llm_block")
    unfrozen = build("llm_block_unfrozen")
    mlp = build("mlp")
    assert parameter_count(frozen.extra.block) == BLOCK_PARAMS
    assert trainable(frozen.extra.block) == 0
    assert trainable(frozen) == trainable(baseline) + ADAPTER_PARAMS
    assert trainable(unfrozen) == trainable(baseline) + ADAPTER_PARAMS + BLOCK_PARAMS
    mlp_block = mlp.extra.block_parameters()
    assert abs(mlp_block - BLOCK_PARAMS) / BLOCK_PARAMS < 0.01
    assert trainable(mlp) == trainable(baseline) + ADAPTER_PARAMS + mlp_block


@pytest.mark.parametrize("variant", ["none", "llm_block", "llm_block_unfrozen", "mlp"])
def test_forward_backward(variant: str) -> None:
    model = build(variant)
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 5)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_block_is_the_llm_layer_and_attends_both_ways(tmp_path) -> None:
    lm = causal_lm_from_config(LLM)
    lm.save_pretrained(tmp_path / "lm")
    spec = FrozenBlockClassifierSpec(
        vision_tower=VisionTowerSpec(config=VIT, feature_layer=-1),
        num_classes=5,
        language_model=LanguageModelSpec(path=str(tmp_path / "lm")),
        layer=1,
    )
    model = build_frozen_block_classifier(spec).eval()
    block = model.extra.block
    assert type(block).__name__ == "LlamaDecoderLayer"
    for name, tensor in lm.model.layers[1].state_dict().items():
        torch.testing.assert_close(block.state_dict()[name], tensor, rtol=0, atol=0)
    tokens = torch.randn(1, 6, 32)
    changed = tokens.clone()
    changed[:, -1] += 1.0
    # a change to the last token reaches the first: no causal mask inside the block
    assert not torch.allclose(model.extra(changed)[:, 0], model.extra(tokens)[:, 0])


def test_sdpa_and_eager_agree_and_rope_changes_output() -> None:
    torch.manual_seed(0)
    sdpa = build("llm_block", attn="sdpa").eval()
    torch.manual_seed(0)
    eager = build("llm_block", attn="eager").eval()
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(sdpa(pixels), eager(pixels), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    with_rope = build("llm_block", rope=True).eval()
    assert not torch.allclose(with_rope(pixels), sdpa(pixels), atol=1e-5)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown LM4VE variant"):
        build("adapter")
    with pytest.raises(ValueError, match="out of range"):
        build("llm_block", layer=5)
    spec = FrozenBlockClassifierSpec(vision_tower=VisionTowerSpec(config=VIT), num_classes=3, variant="mlp")
    with pytest.raises(ValueError, match="needs `language_model`"):
        build_frozen_block_classifier(spec)
