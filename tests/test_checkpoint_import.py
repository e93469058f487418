"""Released checkpoints in: tiny stand-ins written with `save_pretrained` in the four real layouts are detected, imported,
and give the logits of the source model (llava-hf) or of LLaVA's forward pass recomposed by hand from the saved pieces."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from visprior.checkpoints import CheckpointFormatError, detect_format, load_pretrained, open_checkpoint
from visprior.checkpoints.common import select_for
from visprior.models import ConnectorSpec, LanguageModelSpec, VisionTowerSpec, VLMSpec, build_vlm

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import tiny_checkpoints as tc  # noqa: E402


@pytest.fixture(scope="module")
def layouts(tokenizer_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    return {
        "pair": tc.hf_pair(root / "pair"),
        "llava-hf": tc.llava_hf(root, tokenizer_dir),
        "llava-hf-full": tc.llava_hf(root, tokenizer_dir, strategy="full"),
        "llava-hf-linear": tc.llava_hf(root, tokenizer_dir, act="linear"),
        "llava-hf-bin": tc.llava_hf(root, tokenizer_dir, pickled=True),
        "llava": tc.original_llava(root / "original"),
        "llava-inside": tc.original_llava(root / "inside", tower_weights_inside=True),
        "vila": tc.vila(root),
    }


def image_prompt(model) -> torch.Tensor:
    return torch.tensor([[5, 6, *[model.image_token_id] * model.num_image_tokens, 7, 8, 9]])  # [1, T]


def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def two_image_prompt(model) -> torch.Tensor:
    image = [model.image_token_id] * model.num_image_tokens
    return torch.tensor([[5, *image, 6, 7], [8, 9, 10, *image]])  # one image per row


@pytest.mark.parametrize(
    "name, tokens", [("llava-hf", 16), ("llava-hf-full", 17), ("llava-hf-linear", 16), ("llava-hf-bin", 16)]
)
def test_llava_hf_logits_equal_the_source_model(layouts, name, tokens):
    src = layouts[name]
    assert detect_format(src["dir"]) == "llava-hf"
    model = load_pretrained(src["dir"])
    assert model.num_image_tokens == tokens
    assert model.vision_tower.select == ("cls_patch" if name == "llava-hf-full" else "patch")
    assert type(model.connector).__name__ == ("Linear" if name == "llava-hf-linear" else "MLP2xGELU")
    ids, pv = two_image_prompt(model), pixels()
    with torch.no_grad():
        ours = model(ids, pixel_values=pv).logits
        theirs = src["model"](input_ids=ids, pixel_values=pv).logits
    assert ours.shape == theirs.shape  # the padded vocabulary is kept (tokenizer + 6 rows)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_pickled_llava_hf_is_read_with_weights_only(layouts, monkeypatch):
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_pretrained(layouts["llava-hf-bin"]["dir"])
    assert seen and all(w is True for w in seen), seen  # both shards, never a plain unpickle


def test_a_pickle_holding_objects_is_refused(layouts, tmp_path):
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(layouts["llava-hf"]["dir"], folder)
    state = dict(torch.load(layouts["llava-hf-bin"]["dir"] / "pytorch_model-00001-of-00002.bin", weights_only=True))
    state["payload"] = Path("/etc/passwd")  # any non-tensor global
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model\.bin: holds pickled objects.*weights_only=True"):
        load_pretrained(folder)


def test_original_llava_logits_equal_the_recomposed_model(layouts):
    src = layouts["llava"]
    layout = open_checkpoint(src["dir"])
    assert layout.format == "llava" and "pads images" in layout.notes[0]
    model = load_pretrained(src["dir"])  # the tower folder sits beside the checkpoint under the hub id's name
    vocab = len(src["tokenizer"])
    assert model.image_token_id == vocab and model.language_model.config.vocab_size == vocab + 1  # <image> added
    ids, pv = two_image_prompt(model), pixels()
    with torch.no_grad():
        ours = model(ids, pixel_values=pv).logits
    want = tc.reference_logits(src["lm"], src["tower"], src["projector"], ids, pv, model.image_token_id)
    torch.testing.assert_close(ours[..., :vocab], want, atol=1e-5, rtol=1e-5)


def test_original_llava_with_the_tower_inside_its_state_dict(layouts):
    src = layouts["llava-inside"]
    model = load_pretrained(src["dir"])
    ids, pv = image_prompt(model), pixels()[:1]
    with torch.no_grad():
        ours = model(ids, pixel_values=pv).logits
    want = tc.reference_logits(src["lm"], src["tower"], src["projector"], ids, pv, model.image_token_id)
    torch.testing.assert_close(ours[..., : want.shape[-1]], want, atol=1e-5, rtol=1e-5)


def test_original_llava_names_a_tower_that_is_not_local(layouts, tmp_path):
    import shutil

    alone = tmp_path / "alone"
    shutil.copytree(layouts["llava"]["dir"], alone / "llava")
    with pytest.raises(
        CheckpointFormatError, match=r"names its vision tower 'openai/clip-vit-tiny-patch8-32'.*--vision_tower"
    ):
        open_checkpoint(alone / "llava")
    model = load_pretrained(alone / "llava", vision_tower=layouts["llava"]["tower_dir"])
    assert model.vision_tower.model_type == "clip_vision_model"


def test_vila_logits_equal_the_recomposed_model(layouts):
    src = layouts["vila"]
    assert detect_format(src["dir"]) == "vila"
    model = load_pretrained(src["dir"])
    assert model.vision_tower.model_type == "siglip_vision_model" and model.num_image_tokens == tc.PATCHES
    ids, pv = two_image_prompt(model), pixels()
    with torch.no_grad():
        ours = model(ids, pixel_values=pv).logits
    want = tc.reference_logits(
        src["lm"], src["tower"], src["projector"], ids, pv, model.image_token_id, drop_first=False
    )
    torch.testing.assert_close(ours[..., : want.shape[-1]], want, atol=1e-5, rtol=1e-5)


def test_hf_lm_and_tower_folders_compose_with_a_fresh_connector(layouts):
    """The LLaVA / VILA / LSBS start: LM and tower from their own HF folders, connector initialised here."""
    src = layouts["pair"]
    with pytest.raises(CheckpointFormatError, match="holds one component"):
        open_checkpoint(src["lm_dir"])
    spec = VLMSpec(
        LanguageModelSpec(path=str(src["lm_dir"]), add_image_token=True),
        VisionTowerSpec(path=str(src["tower_dir"])),
        ConnectorSpec("mlp2x_gelu"),
    )
    model = build_vlm(spec).eval()
    vocab = len(src["tokenizer"])
    text = torch.tensor([[5, 6, 7, 8]])
    ids, pv = image_prompt(model), pixels()[:1]
    with torch.no_grad():
        torch.testing.assert_close(model(text).logits[..., :vocab], src["lm"](text).logits, atol=1e-5, rtol=1e-5)
        ours = model(ids, pixel_values=pv).logits
    want = tc.reference_logits(src["lm"], src["tower"], model.connector.proj, ids, pv, model.image_token_id)
    torch.testing.assert_close(ours[..., :vocab], want, atol=1e-5, rtol=1e-5)


def test_feature_selection_without_cls_is_refused():
    assert select_for("clip_vision_model", True, "x") == "patch"
    assert select_for("clip_vision_model", False, "x") == "cls_patch"
    assert select_for("siglip_vision_model", False, "x") == "patch"
    with pytest.raises(CheckpointFormatError, match="no CLS token, so it drops a real patch"):
        select_for("siglip_vision_model", True, "x")


def test_unknown_folders_name_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="llava-hf = llava-hf folder"):
        open_checkpoint(tmp_path / "empty")


# ------------------------------------------------------------------------------------ fine-tuning and eval from each

REPO = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.slow


def source_tower(layouts, name) -> dict[str, torch.Tensor]:
    src = layouts[name]
    if name.startswith("llava-hf"):
        return {k.removeprefix("model.vision_tower."): v for k, v in src["model"].state_dict().items()
                if k.startswith("model.vision_tower.")}  # fmt: skip
    return src["tower"].state_dict()


def fit_smoke(tmp_path, monkeypatch, toyworld_dir, *overrides: str) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toyworld").symlink_to(toyworld_dir)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    from visprior.cli import main

    main(["fit", "--config", "recipes/_base/stages/sft-from-checkpoint.yaml", "--config", "recipes/_base/scales/smoke.yaml",
          "--trainer.enable_progress_bar=false", *overrides])  # fmt: skip
    return tmp_path / "runs" / "sft-from-checkpoint" / "run"


@pytest.mark.parametrize(
    "name",
    [
        "llava-hf",
        pytest.param("llava-hf-bin", marks=SLOW),
        pytest.param("llava", marks=SLOW),
        pytest.param("vila", marks=SLOW),
    ],  # fmt: skip
)
def test_fine_tuning_is_one_key_init_from_path(layouts, name, toyworld_dir, tmp_path, monkeypatch):
    """`init_from: PATH` alone: the released architecture, its weights, then two SFT steps (the tower stays frozen)."""
    from visprior.eval.load import load_vlm

    run = fit_smoke(tmp_path, monkeypatch, toyworld_dir, "--model.init_args.init_from", str(layouts[name]["dir"]))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    tuned = load_vlm(run)
    tower = {k.removeprefix("model."): v for k, v in tuned.vision_tower.state_dict().items()}
    for key, value in source_tower(layouts, name).items():
        assert torch.equal(tower[key.removeprefix("vision_model.")], value), key  # frozen, and loaded from the source
    source = load_pretrained(layouts[name]["dir"])
    before = source.language_model.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in tuned.language_model.state_dict().items()), "the LM trained"


@SLOW
def test_fine_tuning_from_hf_lm_and_tower_folders(layouts, toyworld_dir, tmp_path, monkeypatch):
    src = layouts["pair"]
    run = fit_smoke(
        tmp_path, monkeypatch, toyworld_dir,
        "--model.init_args.language_model", f"{{path: {src['lm_dir']}, add_image_token: true}}",
        "--model.init_args.vision_tower", f"{{path: {src['tower_dir']}}}",
        "--model.init_args.connector", "{name: mlp2x_gelu}",
    )  # fmt: skip
    from visprior.eval.command import evaluate_checkpoint

    results = evaluate_checkpoint(
        str(run), tasks="mle_bench", data=str(toyworld_dir), out=str(tmp_path / "ev"), limit=6
    )
    assert results.is_file()


@pytest.mark.parametrize(
    "name",
    [
        "llava-hf",
        pytest.param("llava-hf-bin", marks=SLOW),
        pytest.param("llava", marks=SLOW),
        pytest.param("vila", marks=SLOW),
    ],  # fmt: skip
)
def test_visprior_eval_runs_mle_bench_on_the_folder(layouts, name, toyworld_dir, tmp_path, capsys):
    import json

    from visprior.cli import main

    out = tmp_path / "ev"
    main(["eval", "--checkpoint", str(layouts[name]["dir"]), "--tasks", "mle_bench", "--data", str(toyworld_dir),
          "--out", str(out), "--limit", "6"])  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    metrics = doc["tasks"]["mle_bench"]["metrics"]
    assert doc["checkpoint"] == str(layouts[name]["dir"])
    assert sum(metrics[f"ll/{level}"]["n"] for level in ("small", "medium", "large")) == 6
    assert "MLE-Bench" in capsys.readouterr().out
