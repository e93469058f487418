"""LM4VE: trainable-parameter counts per variant, forward/backward, no causal mask and no positions, the block really is the
LLM's layer (from a save_pretrained Llama or Qwen2 folder, reading only that layer, or a LanguagePretraining checkpoint)."""

from __future__ import annotations

import pytest
import torch

from visprior.models.frozen_block import (
    FrozenBlockClassifierSpec,
    FrozenBlockSpec,
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
ADAPTER_PARAMS = 32 * 64 + 64 * 32  # LM4VE's two mappers have no bias


def build(variant: str, attn: str = "sdpa", **kwargs):
    block = FrozenBlockSpec(variant, LanguageModelSpec(config=LLM, attn_implementation=attn), **kwargs)
    spec = FrozenBlockClassifierSpec(
        vision_tower=VisionTowerSpec(config=VIT, feature_layer=-1, select="cls_patch"),
        num_classes=5,
        block=block,
        pool="cls",
    )
    return build_frozen_block_classifier(spec)


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_trainable_parameter_counts_per_variant() -> None:
    baseline = build("none")
    frozen = build("llm_block")
    unfrozen = build("llm_block_unfrozen")
    mlp = build("mlp")
    block_sized = build("mlp_block_size")
    assert parameter_count(frozen.frozen_block.block) == BLOCK_PARAMS
    assert trainable(frozen.frozen_block.block) == 0
    assert trainable(frozen) == trainable(baseline) + ADAPTER_PARAMS
    assert trainable(unfrozen) == trainable(baseline) + ADAPTER_PARAMS + BLOCK_PARAMS
    # the MLP control trains what the frozen-block model trains (the paper's "same trainable parameters")
    assert abs(trainable(mlp) - trainable(frozen)) <= 0.01 * trainable(frozen)
    mlp_block = block_sized.frozen_block.block_parameters()
    assert abs(mlp_block - BLOCK_PARAMS) / BLOCK_PARAMS < 0.01
    assert trainable(block_sized) == trainable(baseline) + ADAPTER_PARAMS + mlp_block
    # asking the frozen variant's adapter to train everything still leaves the LLM block frozen
    frozen.frozen_block.requires_grad_(True)
    assert trainable(frozen.frozen_block.block) == 0 and trainable(frozen.frozen_block) == ADAPTER_PARAMS


@pytest.mark.parametrize("variant", ["none", "llm_block", "llm_block_unfrozen", "mlp", "mlp_block_size"])
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
        block=FrozenBlockSpec(language_model=LanguageModelSpec(path=str(tmp_path / "lm")), layer=1),
    )
    model = build_frozen_block_classifier(spec).eval()
    block = model.frozen_block.block
    assert type(block).__name__ == "LlamaDecoderLayer"
    for name, tensor in lm.model.layers[1].state_dict().items():
        torch.testing.assert_close(block.state_dict()[name], tensor, rtol=0, atol=0)
    tokens = torch.randn(1, 6, 32)
    changed = tokens.clone()
    changed[:, -1] += 1.0
    # a change to the last token reaches the first: no causal mask inside the block
    assert not torch.allclose(model.frozen_block(changed)[:, 0], model.frozen_block(tokens)[:, 0])


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
    spec = FrozenBlockClassifierSpec(
        vision_tower=VisionTowerSpec(config=VIT), num_classes=3, block=FrozenBlockSpec(variant="mlp")
    )
    with pytest.raises(ValueError, match="needs exactly one LLM source"):
        build_frozen_block_classifier(spec)


QWEN2 = {**LLM, "model_type": "qwen2", "num_key_value_heads": 2}


def test_block_encodes_no_positions_and_sees_later_tokens() -> None:
    """Permuting the tokens permutes the outputs (no position is encoded); a later token changes an earlier output."""
    torch.manual_seed(0)
    adapter = build("llm_block").frozen_block.eval()
    tokens = torch.randn(2, 7, 32)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    with torch.no_grad():
        out = adapter(tokens)
        torch.testing.assert_close(adapter(tokens[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)
        later = tokens.clone()
        later[:, 4:] = torch.randn(2, 3, 32)
        assert not torch.allclose(adapter(later)[:, :4], out[:, :4], atol=1e-4)  # no causal mask
        with_rope = build("llm_block", rope=True).frozen_block.eval()  # the test can fail: RoPE encodes positions
        assert not torch.allclose(with_rope(tokens[:, perm]), with_rope(tokens)[:, perm], atol=1e-4)


def test_final_norm_options() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    unit = build("llm_block").frozen_block
    hidden = torch.randn(2, 5, 64)
    torch.testing.assert_close(unit.norm(hidden), LlamaRMSNorm(64, eps=1e-6)(hidden).detach())
    assert parameter_count(unit.norm) == 0  # the release's norm: never loaded, weight fixed at ones
    llm = build("llm_block", final_norm="llm").frozen_block
    assert type(llm.norm).__name__ == "LlamaRMSNorm" and trainable(llm.norm) == 0
    assert isinstance(build("llm_block", final_norm="none").frozen_block.norm, torch.nn.Identity)


@pytest.mark.parametrize("config", [LLM, QWEN2], ids=["llama", "qwen2"])
def test_loads_one_layer_from_a_save_pretrained_folder(tmp_path, monkeypatch, config) -> None:
    """A sharded folder: only the shards holding the layer are opened, and the block equals the saved layer."""
    import safetensors

    torch.manual_seed(0)
    lm = causal_lm_from_config(config)
    lm.save_pretrained(tmp_path / "lm", max_shard_size="40KB")
    assert len(list((tmp_path / "lm").glob("*.safetensors"))) > 3
    opened: list[str] = []
    original = safetensors.safe_open

    def spy(path, *args, **kwargs):
        opened.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    spec = FrozenBlockSpec(language_model=LanguageModelSpec(path=str(tmp_path / "lm")), layer=-1, final_norm="llm")
    from visprior.models.frozen_block import build_frozen_block

    adapter = build_frozen_block(spec, vit_dim=32).eval()
    assert type(adapter.block).__name__ == f"{type(lm).__name__.removesuffix('ForCausalLM')}DecoderLayer"
    for name, tensor in lm.model.layers[1].state_dict().items():
        assert torch.equal(adapter.block.state_dict()[name], tensor), name
    assert torch.equal(adapter.norm.weight, lm.model.norm.weight)
    assert 0 < len(set(opened)) < len(list((tmp_path / "lm").glob("*.safetensors")))
    assert trainable(adapter) == ADAPTER_PARAMS
    # the block runs bidirectionally inside the adapter; Qwen2's q/k/v biases came along
    adapter(torch.randn(1, 5, 32)).sum()
    if config is QWEN2:
        assert adapter.block.self_attn.q_proj.bias is not None


def test_loads_from_a_language_pretraining_checkpoint(tmp_path, tokenizer_dir) -> None:
    import lightning.pytorch as pl

    from visprior.models.frozen_block import build_frozen_block
    from visprior.stages import LanguagePretraining

    lm_config = {k: v for k, v in LLM.items() if k != "vocab_size"}  # the stage sizes the vocabulary from its tokenizer
    stage = LanguagePretraining(LanguageModelSpec(config=lm_config, tokenizer=str(tokenizer_dir)))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    adapter = build_frozen_block(FrozenBlockSpec(checkpoint=str(tmp_path / "lm.ckpt"), layer=0), vit_dim=32)
    for name, tensor in stage.model.language_model.model.layers[0].state_dict().items():
        assert torch.equal(adapter.block.state_dict()[name], tensor), name
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        build_frozen_block(FrozenBlockSpec(checkpoint=str(tmp_path / "nope.ckpt")), vit_dim=32)
