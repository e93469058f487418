"""SmolLM2's real weights through the ordinary paths (issue 14): its decoder layer as LM4VE's frozen block, and the folder
as a stage's language model (`<image>` added, ChatML turns from its own tokenizer), with no special path in the stages.
Uses the truncated real copy (tests/conftest.py: `smollm2_tiny_dir`); skipped without the `real` extra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from visprior.data.formats import ConversationSample
from visprior.data.tokenize import IGNORE_INDEX, SampleTokenizer
from visprior.models.frozen_block import FrozenBlockSpec, LLMBlockAdapter, build_frozen_block
from visprior.models.language import LanguageModelSpec, build_language_model

REPO = Path(__file__).resolve().parents[1]


def test_lm4ve_block_is_smollm2s_real_layer(smollm2_tiny_dir: Path) -> None:
    spec = FrozenBlockSpec("llm_block", LanguageModelSpec(path=str(smollm2_tiny_dir)), layer=-1)
    adapter = build_frozen_block(spec, vit_dim=192)
    assert isinstance(adapter, LLMBlockAdapter)
    assert adapter.adapter_in.out_features == 576 and adapter.adapter_out.in_features == 576
    with safe_open(str(smollm2_tiny_dir / "model.safetensors"), framework="pt") as f:
        for name, value in adapter.block.state_dict().items():
            assert torch.equal(value, f.get_tensor(f"model.layers.1.{name}")), name  # the last of the two layers
    x = torch.randn(2, 17, 192, requires_grad=True)
    adapter(x).square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in adapter.block.parameters())
    assert adapter.adapter_in.weight.grad is not None and x.grad is not None


def conversation() -> ConversationSample:
    from PIL import Image

    turns = [{"from": "human", "value": "<image>\nWhat shape is the red object?"}, {"from": "gpt", "value": "star"}]
    return ConversationSample("c0", turns, [Image.new("RGB", (64, 64), "white")], {})


def test_real_tokenizer_frames_chatml_turns_with_single_tokens(smollm2_tiny_dir: Path) -> None:
    model, tokenizer = build_language_model(LanguageModelSpec(path=str(smollm2_tiny_dir), add_image_token=True))
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert image == 49152 and model.get_input_embeddings().num_embeddings == 49153
    sample = SampleTokenizer(tokenizer, lambda im: torch.zeros(3, 64, 64), num_image_tokens=4, max_length=128)(
        conversation()
    )[0]
    ids, labels = sample.input_ids, sample.labels
    assert ids.count(image) == 4 and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "star<|im_end|>"  # the answer and its turn end, nothing else
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_align_stage_trains_a_connector_into_real_smollm2(smollm2_tiny_dir, toyworld_dir, tmp_path, monkeypatch):
    """`visprior fit` with `language_model: {path: <folder>, add_image_token: true}`: the same stage code as any LM."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toyworld").symlink_to(toyworld_dir)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    from visprior.cli import main

    main(["fit", "--config", "recipes/_base/stages/align.yaml", "--config", "recipes/_base/scales/smoke.yaml",
          "--trainer.enable_progress_bar=false", "--data.init_args.seq_len", "96",
          "--model.init_args.language_model", f"{{path: {smollm2_tiny_dir}, config: null, tokenizer: null, add_image_token: true}}",
          "--model.init_args.connector", "{name: mlp2x_gelu, num_tokens: 16}"])  # fmt: skip
    ckpt = torch.load(tmp_path / "runs/align/run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert state["model.language_model.model.embed_tokens.weight"].shape == (49153, 576)
    with safe_open(str(smollm2_tiny_dir / "model.safetensors"), framework="pt") as f:
        released = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(state["model.language_model.model.layers.0.mlp.down_proj.weight"], released)  # frozen in align


def test_random_arm_has_the_released_architecture(smollm2_dir: Path) -> None:
    """LSBS arm (b): recipes/_base/models/smollm2-135m-random.yaml builds every tensor of the released model, same shape."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    from visprior.models.language import causal_lm_config

    released = yaml.safe_load((REPO / "recipes/_base/models/smollm2-135m.yaml").read_text())
    random = yaml.safe_load((REPO / "recipes/_base/models/smollm2-135m-random.yaml").read_text())
    assert released["path"] == random["tokenizer"] == "checkpoints/smollm2-135m"
    assert released["add_image_token"] and random["add_image_token"]
    with torch.device("meta"):
        real = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_dir, local_files_only=True))
        fresh = AutoModelForCausalLM.from_config(causal_lm_config(random["config"]))
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert shapes == {k: v.shape for k, v in fresh.state_dict().items()}
    assert real.config.tie_word_embeddings and fresh.config.tie_word_embeddings
