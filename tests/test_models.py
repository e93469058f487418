"""Language models, vision towers and the VisionLanguageModel: building, offline loading, image placement, masks, sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from visprior.models import presets
from visprior.models.connectors import ConnectorSpec
from visprior.models.language import LanguageModelSpec, build_language_model, causal_lm_from_config, causal_lm_loss
from visprior.models.vision import VisionTowerSpec, build_vision_tower, vision_model_from_config
from visprior.models.vlm import VLMSpec, build_vlm

SPECIALS = ["<|endoftext|>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>", "<unk>"]
IMAGE_ID = 2
TINY_LM = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
TINY_TOWERS = {
    "siglip_vision_model": {"vision_use_head": False},
    "clip_vision_model": {},
    "vit": {},
}


def tiny_tower_config(model_type: str = "siglip_vision_model") -> dict:
    base = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {"model_type": model_type, **base, "intermediate_size": 64, **TINY_TOWERS[model_type]}


def save_word_tokenizer(out: Path, with_image: bool = True) -> Path:
    """A 46-token word-level tokenizer with the project's special tokens (`<image>` = id 2 when `with_image`)."""
    specials = SPECIALS if with_image else [t for t in SPECIALS if t != "<image>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(40)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out)
    return out


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    return save_word_tokenizer(tmp_path / "tok")


def tiny_vlm(tok_dir: Path, connector: str = "mlp2x_gelu", num_tokens: int | None = 4, attn: str = "sdpa"):
    spec = VLMSpec(
        LanguageModelSpec(config=TINY_LM, tokenizer=str(tok_dir), attn_implementation=attn),
        VisionTowerSpec(config=tiny_tower_config()),
        ConnectorSpec(connector, num_tokens),
    )
    return build_vlm(spec).eval()


# --- language models ---


def test_toy_lm_takes_vocab_from_tokenizer(tok_dir: Path) -> None:
    model, tok = build_language_model(LanguageModelSpec(config=TINY_LM, tokenizer=str(tok_dir)))
    assert model.config.vocab_size == len(tok) == 46
    assert model.config.eos_token_id == tok.eos_token_id


def test_missing_folder_is_refused_not_sent_to_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never from the model hub"):
        build_language_model(LanguageModelSpec(path="meta-llama/Llama-2-7b-hf"))
    with pytest.raises(ValueError, match="exactly one"):
        build_language_model(LanguageModelSpec())


def test_tokenizer_without_image_token(tmp_path: Path) -> None:
    no_image = save_word_tokenizer(tmp_path / "noimg", with_image=False)
    spec = LanguageModelSpec(config=TINY_LM, tokenizer=str(no_image))
    with pytest.raises(ValueError, match="add_image_token") as err:
        build_language_model(spec)
    assert str(no_image) in str(err.value)
    model, tok = build_language_model(LanguageModelSpec(config=TINY_LM, tokenizer=str(no_image), add_image_token=True))
    assert len(tok.encode("<image>", add_special_tokens=False)) == 1
    assert model.get_input_embeddings().num_embeddings == len(tok) == 46


def test_lm_folder_reloads_identically_and_offline(tok_dir: Path, tmp_path: Path, monkeypatch) -> None:
    model, tok = build_language_model(LanguageModelSpec(config=TINY_LM, tokenizer=str(tok_dir)))
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    calls: list[dict] = []
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        original = auto.from_pretrained

        def spy(*args, _original=original, **kwargs):
            calls.append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    reloaded, _ = build_language_model(LanguageModelSpec(path=str(tmp_path / "lm")))
    assert len(calls) == 2
    assert all(c.get("local_files_only") is True and "trust_remote_code" not in c for c in calls)
    ids = torch.tensor([[6, 7, 8, 9]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_folder_that_needs_its_own_code_is_refused_unless_trusted(tok_dir: Path, tmp_path: Path) -> None:
    """Refused naming the config key before transformers runs (it would stop to ask on the terminal); a folder of a type
    transformers implements that also has an auto_map loads transformers' own class."""
    model, tok = build_language_model(LanguageModelSpec(config=TINY_LM, tokenizer=str(tok_dir)))
    model.save_pretrained(tmp_path / "known")
    tok.save_pretrained(tmp_path / "known")
    config = json.loads((tmp_path / "known" / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (tmp_path / "known" / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    reloaded, _ = build_language_model(LanguageModelSpec(path=str(tmp_path / "known")))
    assert type(reloaded) is type(model)  # no modeling_x.py exists: nothing of the folder's code could have run

    shutil.copytree(tmp_path / "known", tmp_path / "custom")
    (tmp_path / "custom" / "config.json").write_text(json.dumps({**config, "model_type": "x_lm", "auto_map": auto_map}))
    with pytest.raises(PermissionError, match=r"model\.text_encoder: '.*custom' needs its own Python code") as err:
        build_language_model(LanguageModelSpec(path=str(tmp_path / "custom")), "model.text_encoder")
    assert "'x_lm'" in str(err.value) and "sets model.text_encoder.trust_remote_code: true" in str(err.value)


def test_causal_lm_loss_matches_manual_and_is_zero_without_targets() -> None:
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, -100, -100, 4]])
    loss, num = causal_lm_loss(logits, labels)
    picks = [(0, 0, 1), (0, 1, 2), (0, 3, 3), (1, 3, 4)]  # (row, predicting position, target)
    manual = torch.stack([-logits[b, t].log_softmax(-1)[y] for b, t, y in picks]).mean()
    assert int(num) == 4
    torch.testing.assert_close(loss, manual)
    none, num0 = causal_lm_loss(logits, torch.full((2, 5), -100))
    none.backward()
    assert int(num0) == 0 and none.item() == 0.0 and not torch.isnan(none)
    assert logits.grad is not None and torch.all(logits.grad == 0)


# --- vision towers ---


@pytest.mark.parametrize("model_type", sorted(TINY_TOWERS))
@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_tower_reads_the_hf_hidden_state(model_type: str, feature_layer: int) -> None:
    tower = build_vision_tower(
        VisionTowerSpec(config=tiny_tower_config(model_type), feature_layer=feature_layer)
    ).eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    if tower.has_cls:
        expected = expected[:, 1:]
    out = tower(pixels)
    assert out.shape == (2, tower.num_patches, tower.hidden_size) == (2, 16, 32)
    torch.testing.assert_close(out, expected)
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    assert tower.image_transform(image).shape == (3, 32, 32)


def test_tower_keeps_unreachable_parameters_frozen() -> None:
    tower = build_vision_tower(VisionTowerSpec(config=tiny_tower_config("siglip_vision_model"), feature_layer=-2))
    tower.requires_grad_(True)
    tower(torch.randn(1, 3, 32, 32)).sum().backward()
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in tower.parameters() if p.requires_grad)
    assert not any(n.startswith(("model.encoder.layers.1.", "model.post_layernorm")) for n in trainable)


def test_tower_cls_patch_and_wrong_image_size() -> None:
    tower = build_vision_tower(VisionTowerSpec(config=tiny_tower_config("clip_vision_model"), select="cls_patch"))
    assert tower(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)
    with pytest.raises(ValueError, match=r"expects pixel_values \[N, C, 32, 32\], got \[1, 3, 64, 64\]"):
        tower(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="CLS"):
        build_vision_tower(VisionTowerSpec(config=tiny_tower_config("siglip_vision_model"), select="cls_patch"))


def test_tower_folder_reloads_identically(tmp_path: Path) -> None:
    tower = build_vision_tower(VisionTowerSpec(config=tiny_tower_config("clip_vision_model"))).eval()
    tower.model.save_pretrained(tmp_path / "tower")
    tower.image_transform.processor.save_pretrained(tmp_path / "tower")
    reloaded = build_vision_tower(VisionTowerSpec(path=str(tmp_path / "tower"))).eval()
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reloaded(pixels), tower(pixels), rtol=0, atol=0)
    image = Image.new("RGB", (40, 40), (0, 128, 255))
    torch.testing.assert_close(reloaded.image_transform(image), tower.image_transform(image))


# --- the vision-language model ---


class _Recognisable(nn.Module):
    """A connector whose output encodes (image index, token index): value 100 * image + token in every channel."""

    num_tokens = 4

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = features.shape[0]
        codes = 100.0 * torch.arange(n)[:, None] + torch.arange(self.num_tokens)[None, :]  # [N, K]
        return codes[:, :, None].expand(n, self.num_tokens, 32) + 0 * features.sum()


def test_embed_places_images_in_order(tok_dir: Path) -> None:
    vlm = tiny_vlm(tok_dir)
    vlm.connector = _Recognisable()
    ids = torch.tensor([[6, 2, 2, 2, 2, 7, 2, 2, 2, 2], [8, 9, 2, 2, 2, 2, 10, 11, 12, 13]])
    embeds = vlm.embed(ids, torch.randn(3, 3, 32, 32))
    table = vlm.language_model.get_input_embeddings().weight
    image_pos = ids == IMAGE_ID
    codes = embeds[image_pos][:, 0]  # row-major order of image positions
    torch.testing.assert_close(codes, torch.tensor([0.0, 1, 2, 3, 100, 101, 102, 103, 200, 201, 202, 203]))
    torch.testing.assert_close(embeds[~image_pos], table[ids[~image_pos]])


def test_image_token_count_must_match(tok_dir: Path) -> None:
    vlm = tiny_vlm(tok_dir)
    ids = torch.tensor([[6, 2, 2, 2, 7]])
    with pytest.raises(ValueError, match=r"3 image tokens but 1 images x 4 tokens per image = 4"):
        vlm(ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="pixel_values is None"):
        vlm(ids)
    with pytest.raises(ValueError, match="expects pixel_values"):
        vlm(torch.tensor([[2, 2, 2, 2]]), pixel_values=torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(tok_dir: Path, attn: str) -> None:
    vlm = tiny_vlm(tok_dir, attn=attn)
    doc_a = [6, 2, 2, 2, 2, 7, 0]
    doc_b = [8, 2, 2, 2, 2, 9, 10]
    pixels = torch.randn(2, 3, 32, 32)
    packed = torch.tensor([doc_a + doc_b + [1, 1]])
    document_ids = torch.tensor([[0] * 7 + [1] * 7 + [-1, -1]])
    position_ids = torch.tensor([list(range(7)) * 2 + [0, 0]])
    labels = packed.masked_fill((packed == IMAGE_ID) | (document_ids < 0), -100)
    out = vlm(packed, labels=labels, position_ids=position_ids, document_ids=document_ids, pixel_values=pixels)
    alone = vlm(torch.tensor([doc_b]), pixel_values=pixels[1:])
    torch.testing.assert_close(out.logits[0, 7:14], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(out.logits).any()
    # supervised: doc a's 2 text targets after its first token; doc b's 2, its first being predicted across documents
    assert int(out.num_supervised) == 2 + 2
    assert out.image_features.shape == (2, 4, 32) and int(out.image_mask.sum()) == 8


def test_plain_causal_without_document_ids(tok_dir: Path) -> None:
    vlm = tiny_vlm(tok_dir)
    ids = torch.tensor([[6, 7, 8, 9, 10, 11]])
    full = vlm(ids).logits
    prefix = vlm(ids[:, :3]).logits
    torch.testing.assert_close(full[:, :3], prefix, atol=1e-5, rtol=1e-5)
    restarting = vlm(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]])).logits
    assert not torch.allclose(restarting[:, 3:], prefix, atol=1e-4)  # no packing inferred from position_ids


def test_text_only_model(tok_dir: Path) -> None:
    vlm = build_vlm(VLMSpec(LanguageModelSpec(config=TINY_LM, tokenizer=str(tok_dir))))
    assert vlm.vision_tower is None and vlm.connector is None and vlm.num_image_tokens == 0
    ids = torch.tensor([[6, 7, 8, 0, 9, 10]])
    out = vlm(ids, labels=ids, document_ids=torch.tensor([[0, 0, 0, 0, 1, 1]]))
    out.loss.backward()
    assert int(out.num_supervised) == 4
    with pytest.raises(ValueError, match="text-only"):
        vlm(torch.tensor([[2, 2, 2, 2]]), pixel_values=torch.randn(1, 3, 32, 32))


# --- paper-scale configurations on the meta device ---


@pytest.mark.parametrize(
    ("config", "expected"),
    [(presets.LLAMA2_7B, 6_738_415_616), (presets.QWEN2_7B, 7_615_616_512)],
)
def test_paper_language_models_on_meta(config: dict, expected: int) -> None:
    with torch.device("meta"):
        model = causal_lm_from_config(config)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(
    ("config", "expected", "patches"),
    [
        (
            presets.CLIP_L14_336,
            303_179_776 + 320 * 1024,
            576,
        ),  # CLIP-L/14 tower + 320 extra position embeddings at 336 px
        (presets.SIGLIP_SO400M_384, 412_987_248, 729),  # so400m without its MAP head (428M with it)
    ],
)
def test_paper_vision_towers_on_meta(config: dict, expected: int, patches: int) -> None:
    with torch.device("meta"):
        model = vision_model_from_config(config)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert (model.config.image_size // model.config.patch_size) ** 2 == patches


def test_tower_from_full_clip_folder_and_resolution_override(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    vision = {k: v for k, v in tiny_tower_config("clip_vision_model").items() if k != "model_type"}
    text = {
        "vocab_size": 50,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "clip")
    tower = build_vision_tower(VisionTowerSpec(path=str(tmp_path / "clip"), feature_layer=-1)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    expected = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    torch.testing.assert_close(tower(pixels), expected)
    larger = build_vision_tower(VisionTowerSpec(path=str(tmp_path / "clip"), image_size=48))
    assert larger.num_patches == 36 and larger(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)
    assert larger.image_transform(Image.new("RGB", (60, 50))).shape == (3, 48, 48)


@pytest.mark.parametrize("model_type", sorted(TINY_TOWERS))
def test_tower_drop_path_in_training_only(model_type: str) -> None:
    from visprior.models.vision import DropPathHook

    torch.manual_seed(0)
    plain = build_vision_tower(VisionTowerSpec(config=tiny_tower_config(model_type), feature_layer=-1))
    torch.manual_seed(0)
    dropping = build_vision_tower(
        VisionTowerSpec(config=tiny_tower_config(model_type), feature_layer=-1, drop_path=0.5)
    )
    rates = [h.rate for m in dropping.modules() for h in m._forward_hooks.values() if isinstance(h, DropPathHook)]
    assert sorted(set(rates)) == [0.0, 0.5]  # linear in depth: 0 at the first layer, drop_path at the last
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(pixels), plain.eval()(pixels))
        dropping.train()
        assert not torch.allclose(dropping(pixels), dropping(pixels))
