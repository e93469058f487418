"""Checkpoints out: `visprior export --format hf-llava` folders load with transformers alone (a subprocess that never imports
visprior) and give our logits and greedy tokens; llava-hf folders round-trip; what LLaVA cannot express is refused and goes
to visprior's own format instead."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from visprior.checkpoints import NotExpressibleError, load_pretrained, write_export
from visprior.cli import main
from visprior.eval.load import load_vlm
from visprior.models import ConnectorSpec, LanguageModelSpec, VisionTowerSpec, VLMSpec, build_vlm
from visprior.stages import VisionLanguagePretraining

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import tiny_checkpoints as tc  # noqa: E402

LM = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "intermediate_size": 64, "max_position_embeddings": 512, "tie_word_embeddings": True}  # fmt: skip
CLIP = {"model_type": "clip_vision_model", **tc.TOWER}
SIGLIP = {"model_type": "siglip_vision_model", **tc.TOWER, "vision_use_head": False}

# Runs in a fresh interpreter that imports transformers only: the folder must stand on its own.
HF_ONLY = """
import sys, numpy as np, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
folder, out = sys.argv[1], sys.argv[2]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder)
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
prompt = "<|im_start|>user\\n<image>\\nWhat shape is in the image?<|im_end|>\\n<|im_start|>assistant\\n"
enc = processor(text=prompt, images=image, return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
    tokens = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
assert not any(m == "visprior" or m.startswith("visprior.") for m in sys.modules), "visprior was imported"
torch.save({"input_ids": enc["input_ids"], "pixel_values": enc["pixel_values"], "logits": logits, "tokens": tokens,
            "processor": type(processor).__name__}, out)
"""


def hf_only(folder: Path, tmp_path: Path) -> dict:
    out = tmp_path / "hf_only.pt"
    proc = subprocess.run(
        [sys.executable, "-c", HF_ONLY, str(folder), str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


class FixedBatches(torch.utils.data.IterableDataset):
    def __init__(self, image_id: int, tokens: int, vocab: int) -> None:
        self.image_id, self.tokens, self.vocab = image_id, tokens, vocab

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            text = torch.randint(10, self.vocab, (2, 12), generator=g)
            ids = torch.cat([torch.full((2, self.tokens), self.image_id), text], dim=1)
            labels = ids.masked_fill(ids == self.image_id, -100)
            t = ids.shape[1]
            yield {"input_ids": ids, "labels": labels, "position_ids": torch.arange(t).expand(2, t).clone(),
                   "document_ids": torch.zeros(2, t, dtype=torch.long), "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}  # fmt: skip


def trained_checkpoint(
    tokenizer_dir: Path, tmp_path: Path, tower: dict, connector: ConnectorSpec, select="patch"
) -> Path:
    """A toy stage trained three steps (every component), saved as a Lightning checkpoint."""
    pl.seed_everything(0)
    stage = VisionLanguagePretraining(
        LanguageModelSpec(config=LM, tokenizer=str(tokenizer_dir)), VisionTowerSpec(config=tower, select=select), connector,
        trainable={"vision_tower": 1e-2, "connector": 1e-2, "language_model": 1e-2},
    )  # fmt: skip
    data = FixedBatches(
        stage.model.image_token_id, stage.num_image_tokens, stage.model.language_model.config.vocab_size
    )
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(stage, torch.utils.data.DataLoader(data, batch_size=None))
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    "tower, connector, select, strategy",
    [
        (CLIP, "mlp2x_gelu", "patch", "default"),
        pytest.param(SIGLIP, "linear", "patch", "full", marks=pytest.mark.slow),
        pytest.param(CLIP, "linear", "cls_patch", "full", marks=pytest.mark.slow),
    ],
)
def test_trained_model_exports_to_llava_hf_with_our_logits_and_tokens(
    tokenizer_dir, tmp_path, tower, connector, select, strategy
):
    ckpt = trained_checkpoint(tokenizer_dir, tmp_path, tower, ConnectorSpec(connector), select)
    out = tmp_path / "llava"
    main(["export", str(ckpt), "--format", "hf-llava", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["vision_feature_select_strategy"] == strategy
    assert config["projector_hidden_act"] == ("gelu" if connector == "mlp2x_gelu" else "linear")
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").is_file()
    theirs = hf_only(out, tmp_path)
    assert theirs["processor"] == "LlavaProcessor"
    ours = load_vlm(ckpt)
    ids, pv = theirs["input_ids"], theirs["pixel_values"]
    assert int((ids == ours.image_token_id).sum()) == ours.num_image_tokens  # the processor expands <image> as we do
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    torch.testing.assert_close(pv[0], ours.image_transform(image))  # and preprocesses the image as we do
    with torch.no_grad():
        logits = ours(ids, pixel_values=pv).logits
        embeds = ours.embed(ids, pv)
        tokens = ours.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                              min_new_tokens=8, do_sample=False)[0]  # fmt: skip
    torch.testing.assert_close(logits, theirs["logits"], atol=1e-4, rtol=0)
    assert tokens.tolist() == theirs["tokens"].tolist()


def test_imported_llava_hf_exported_again_is_equivalent(tokenizer_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src = tc.llava_hf(tmp_path, tokenizer_dir)
    out = write_export(load_pretrained(src["dir"]), tmp_path / "again", "hf-llava")
    a = LlavaForConditionalGeneration.from_pretrained(src["dir"]).eval()
    b = LlavaForConditionalGeneration.from_pretrained(out).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for key in ("image_token_index", "image_seq_length", "vision_feature_layer", "vision_feature_select_strategy",
                "projector_hidden_act", "multimodal_projector_bias"):  # fmt: skip
        assert getattr(a.config, key) == getattr(b.config, key), key
    skip = {"dtype", "_name_or_path", "transformers_version", "architectures"}
    for sub in ("text_config", "vision_config"):
        da, db = getattr(a.config, sub).to_dict(), getattr(b.config, sub).to_dict()
        assert {k: v for k, v in da.items() if k not in skip} == {k: v for k, v in db.items() if k not in skip}, sub


def test_linear_llava_hf_projector_round_trips_to_the_same_logits(tokenizer_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src = tc.llava_hf(tmp_path, tokenizer_dir, act="linear")
    out = write_export(load_pretrained(src["dir"]), tmp_path / "again", "hf-llava")
    b = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, *[src["image_id"]] * tc.PATCHES, 6, 7]])
    pv = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids, pixel_values=pv).logits, src["model"](input_ids=ids, pixel_values=pv).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "connector",
    [ConnectorSpec("mlp2x_gelu", num_tokens=4), ConnectorSpec("avg_pool", num_tokens=4),
     ConnectorSpec("attention_pool", num_tokens=4, options={"num_heads": 4}), ConnectorSpec("c_abstractor", num_tokens=4, options={"depth": 1})],
)  # fmt: skip
def test_connectors_llava_cannot_express_are_refused_and_go_to_visprior_format(tokenizer_dir, tmp_path, connector):
    torch.manual_seed(0)
    model = build_vlm(
        VLMSpec(LanguageModelSpec(config=LM, tokenizer=str(tokenizer_dir)), VisionTowerSpec(config=SIGLIP), connector)
    ).eval()
    with pytest.raises(NotExpressibleError, match="export with --format visprior"):
        write_export(model, tmp_path / "llava", "hf-llava")
    assert not (tmp_path / "llava").exists()  # nothing half-written
    out = write_export(model, tmp_path / "ours", "visprior")
    back = load_pretrained(out)
    assert back.checkpoint_format == "visprior" and back.num_image_tokens == 4
    lm = back.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # tied as the config says
    ids = torch.tensor([[5, *[model.image_token_id] * 4, 6, 7]])
    pv = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(ids, pixel_values=pv).logits, model(ids, pixel_values=pv).logits)


def test_token_merge_refusal_names_the_merge(tokenizer_dir, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_vlm(VLMSpec(LanguageModelSpec(config=LM, tokenizer=str(tokenizer_dir)), VisionTowerSpec(config=SIGLIP),
                              ConnectorSpec("mlp2x_gelu", num_tokens=4))).eval()  # fmt: skip
    src = write_export(model, tmp_path / "ours", "visprior")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["export", str(src), "--format", "hf-llava", "--out", str(tmp_path / "llava")])
    assert re.search(r"merges 2x2 patches into one token \(16 patches -> 4 tokens\)", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["export", str(src), "--format", "visprior", "--out", str(src)])
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llava", "vila"])
def test_original_llava_and_vila_convert_to_llava_hf(tokenizer_dir, tmp_path, name):
    from transformers import LlavaForConditionalGeneration

    src = tc.original_llava(tmp_path) if name == "llava" else tc.vila(tmp_path)
    out = tmp_path / "converted"
    main(["export", str(src["dir"]), "--format", "hf-llava", "--out", str(out)])
    ours = load_pretrained(src["dir"])
    theirs = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids = torch.tensor([[5, *[ours.image_token_id] * ours.num_image_tokens, 6, 7]])
    pv = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, pixel_values=pv).logits, ours(ids, pixel_values=pv).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    assert load_pretrained(out).checkpoint_format == "llava-hf"
