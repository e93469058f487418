"""ImageClassification: the stage YAML runs through the real CLI at smoke size, a short run classifies held-out images
well above chance, its checkpoint initialises another stage's vision tower exactly, and bad labels are skipped and
counted."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image

from visprior.data.classification import ImageClassificationDataModule, read_label
from visprior.data.formats import PairSample, SampleError
from visprior.data.shards import iter_samples, resolve_shards, write_shards
from visprior.data.toyworld.datasets import shapes
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.stages import ContrastivePretraining, ImageClassification, InitFrom

REPO = Path(__file__).resolve().parents[1]
TINY_TOWER = {
    "model_type": "siglip_vision_model",
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vision_use_head": False,
}
TINY_LM = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
}
STEPS = 100


def heldout_accuracy(stage: ImageClassification, folder: Path) -> float:
    """Top-1 on a folder the run never reads, labels straight from the shards' meta (not through the data module)."""
    samples = list(iter_samples(resolve_shards(folder), "pair"))
    pixels = torch.stack([stage.image_transform(s.image) for s in samples])  # [N, C, H, W]
    labels = torch.tensor([s.meta["label"] for s in samples])
    stage.eval()
    with torch.no_grad():
        predicted = torch.cat([stage.logits(chunk).argmax(dim=1) for chunk in pixels.split(64)])
    return float((predicted == labels).float().mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageClassification, tuple[float, float], Path]:
    """100 seeded steps (batch 64, lr 5e-3) on 1024 toy-world shape images; held-out: 256 others from another seed.

    The smoke world's 128 training images are memorised long before the shapes are learnt (training batches reach 80 %
    while held-out images stay at chance), so this set is generated here with the toy world's own `shapes`.
    """
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("shapes")
    write_shards(shapes(random.Random(1), 1024, 64, "train"), root / "train", name="train", kind="pair", maxcount=256)
    write_shards(shapes(random.Random(2), 256, 64, "test"), root / "test", name="test", kind="pair", maxcount=256)
    pl.seed_everything(0, verbose=False)
    stage = ImageClassification(
        VisionTowerSpec(config=TINY_TOWER),
        num_classes=8,
        trainable={"vision_tower": 5e-3, "head": 5e-3},
        warmup_steps=5,
    )
    before = heldout_accuracy(stage, root / "test")
    dm = ImageClassificationDataModule(str(root / "train"), str(root / "test"), batch_size=64, batches_per_epoch=50)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=50,
        limit_val_batches=1,
    )
    trainer.fit(stage, dm)
    assert "val/accuracy" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    after = heldout_accuracy(stage, root / "test")
    ckpt = tmp_path_factory.mktemp("classify") / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return stage, (before, after), ckpt


def test_short_training_beats_chance_on_heldout_images(trained):
    _, (before, after), _ = trained
    # measured (1 thread, seeds 0 / 1 / 2 for model and data): held-out 0.35 / 0.39 / 0.43 after 100 steps; chance 0.125
    assert before < 0.22, before
    assert after > 0.25, (before, after)


def test_checkpoint_initialises_another_stage_vision_tower(trained, tokenizer_dir):
    stage, _, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert {k.split(".")[1] for k in state} == {"vision_tower", "head"}
    other = ContrastivePretraining(
        VisionTowerSpec(config=TINY_TOWER),
        LanguageModelSpec(config=TINY_LM, tokenizer=str(tokenizer_dir)),
        embed_dim=16,
        init_from=[InitFrom(path=str(ckpt), components=["vision_tower"])],
    )
    before = {k: v.clone() for k, v in other.model["vision_tower"].state_dict().items()}
    other.configure_model()
    loaded = other.model["vision_tower"].state_dict()
    trained_tower = stage.model.vision_tower.state_dict()
    assert loaded.keys() == trained_tower.keys()
    for k, v in trained_tower.items():
        assert torch.equal(loaded[k], v), k
    assert any(not torch.equal(before[k], loaded[k]) for k in loaded), "init_from changed nothing"


def bad_label_set(root: Path) -> Path:
    """36 good samples and 5 bad ones (missing, non-integer, boolean, out of range, no meta at all)."""
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]
    samples = [
        PairSample(f"good-{i:03d}", Image.new("RGB", (32, 32), colours[i % 4]), "x", {"label": i % 4 if i else "0"})
        for i in range(36)
    ]
    bad = [
        ("bad-missing", {"shape": "circle"}),
        ("bad-text", {"label": "circle"}),
        ("bad-bool", {"label": True}),
        ("bad-range", {"label": 8}),
        ("bad-nometa", {}),
    ]
    samples += [PairSample(key, Image.new("RGB", (32, 32)), "x", meta) for key, meta in bad]
    write_shards(samples, root, name="labelled", kind="pair", maxcount=16)
    return root


def test_bad_labels_are_skipped_and_counted(tmp_path):
    root = bad_label_set(tmp_path / "labelled")
    stage = ImageClassification(VisionTowerSpec(config=TINY_TOWER), num_classes=8)
    dm = ImageClassificationDataModule(str(root), str(root), batch_size=4, batches_per_epoch=50, max_skip_rate=0.5)
    dm.connect(stage.image_transform, stage.num_classes)
    loader = dm.train_dataloader()
    skips: dict[str, int] = {}
    for batch in loader:  # 50 batches x 4 = 200 good samples: more than 5 full passes
        assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].dtype == torch.long and 0 <= int(batch["labels"].min()) <= int(batch["labels"].max()) < 4
        for reason, n in batch["skips"].get("train", {}).items():
            skips[reason] = skips.get(reason, 0) + n
    assert set(skips) == {"bad_label"} and 25 <= skips["bad_label"] <= 30  # 5 per pass, 5 or 6 passes started
    counter = loader.dataset.sources["train"].counter
    assert counter.by_reason == {"bad_label": skips["bad_label"]}
    assert "'bad-" in counter.examples["bad_label"]  # the message names the sample key

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        val = list(dm.val_dataloader())
    assert [len(b["labels"]) for b in val] == [4] * 9
    assert any("5 skipped (bad_label=5)" in str(w.message) for w in caught)
    assert stage.compute_loss(val[0]).samples == 4  # a validation batch goes through the stage


def test_read_label():
    assert read_label({"label": 3}, "k", "label", 8) == 3
    assert read_label({"label": "3"}, "k", "label", 8) == 3
    assert read_label({"label": 3.0}, "k", "label", None) == 3
    assert read_label({"cls": 7}, "k", "cls", 8) == 7
    for meta in ({}, {"label": None}, {"label": 2.5}, {"label": "a"}, {"label": True}, {"label": -1}, {"label": 8}):
        with pytest.raises(SampleError, match="sample 'key-1': bad_label"):
            read_label(meta, "key-1", "label", 8)


def test_stage_yaml_runs_at_smoke_size(toyworld_dir, tmp_path, monkeypatch):
    """The real `visprior fit --config recipes/_base/stages/classify.yaml` at smoke size, in a fresh run directory."""
    (tmp_path / "data").mkdir()
    os.symlink(toyworld_dir, tmp_path / "data" / "toyworld")
    os.symlink(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    from visprior.cli import main

    main(
        [
            "fit",
            "--config",
            "recipes/_base/stages/classify.yaml",
            "--config",
            "recipes/_base/scales/smoke.yaml",
            "--trainer.enable_progress_bar=false",
        ]
    )
    ckpt = torch.load(tmp_path / "runs" / "classify" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"], "the loader position is in the checkpoint"
    assert {k.split(".")[1] for k in ckpt["state_dict"]} == {"vision_tower", "head"}
    assert ckpt["state_dict"]["model.head.weight"].shape == (8, 256)


# ---------------------------------------------------------------------------------------------------- LM4VE

TINY_VIT = {
    "model_type": "vit",
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
BLOCK_LM = {**TINY_LM, "vocab_size": 64}


def lm4ve_stage(variant: str) -> ImageClassification:
    from visprior.models.frozen_block import FrozenBlockSpec

    torch.manual_seed(0)
    return ImageClassification(
        VisionTowerSpec(config=TINY_VIT, select="cls_patch", drop_path=0.1),
        num_classes=8,
        frozen_block=FrozenBlockSpec(variant, LanguageModelSpec(config=BLOCK_LM)),
        head_norm=True,
        pool="cls",
        label_smoothing=0.1,
        warmup_steps=2,
    )


@pytest.fixture(scope="module")
def lm4ve_runs(toyworld_dir: Path) -> dict[str, tuple[ImageClassification, dict, dict]]:
    """Each variant, 4 steps on the smoke shapes: (stage, parameters before, parameters after)."""
    shapes = toyworld_dir / "eval" / "shapes"
    runs = {}
    for variant in ("llm_block", "llm_block_unfrozen", "mlp", "none"):
        stage = lm4ve_stage(variant)
        before = {n: p.detach().clone() for n, p in stage.model.named_parameters()}
        dm = ImageClassificationDataModule(str(shapes / "train"), batch_size=8, batches_per_epoch=4)
        pl.Trainer(
            accelerator="cpu",
            max_steps=4,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(stage, dm)
        runs[variant] = (stage, before, {n: p.detach().clone() for n, p in stage.model.named_parameters()})
    return runs


def trainable_count(stage: ImageClassification) -> int:
    return sum(t for _, t, _ in stage.parameter_table())


def test_frozen_block_stays_bit_identical_while_adapters_train(lm4ve_runs) -> None:
    stage, before, after = lm4ve_runs["llm_block"]
    block = [n for n in before if n.startswith("frozen_block.block.")]
    assert block and all(not stage.model.get_parameter(n).requires_grad for n in block)
    assert all(torch.equal(before[n], after[n]) for n in block), "the frozen LLM block changed"
    assert all(stage.model.get_parameter(n).grad is None for n in block)  # it never received a gradient
    for name in ("frozen_block.adapter_in.weight", "frozen_block.adapter_out.weight", "head.weight", "norm.weight"):
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    assert not stage.model.frozen_block.block.training  # a frozen block is kept in eval mode through fit


def test_unfrozen_block_trains_and_the_mlp_control_matches_the_trainable_count(lm4ve_runs) -> None:
    stage, before, after = lm4ve_runs["llm_block_unfrozen"]
    block = [n for n in before if n.startswith("frozen_block.block.")]
    assert all(stage.model.get_parameter(n).requires_grad for n in block)
    assert any(not torch.equal(before[n], after[n]) for n in block), "the unfrozen block did not train"
    frozen, mlp, none = (lm4ve_runs[v][0] for v in ("llm_block", "mlp", "none"))
    assert abs(trainable_count(mlp) - trainable_count(frozen)) <= 0.01 * trainable_count(frozen)
    assert trainable_count(none) < trainable_count(frozen) < trainable_count(stage)
    table = {name: (t, f) for name, t, f in frozen.parameter_table()}
    assert table["frozen_block"] == (2 * 32 * 64, 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64)  # adapters / the Llama layer


def test_variant_llm_block_refuses_to_train_its_block() -> None:
    from visprior.models.frozen_block import FrozenBlockSpec

    with pytest.raises(ValueError, match="llm_block_unfrozen"):
        ImageClassification(
            VisionTowerSpec(config=TINY_VIT, select="cls_patch"),
            num_classes=8,
            frozen_block=FrozenBlockSpec("llm_block", LanguageModelSpec(config=BLOCK_LM)),
            pool="cls",
            trainable={"vision_tower": 1e-3, "frozen_block.block": 1e-3, "head": 1e-3},
        )


@pytest.fixture(scope="module")
def lm4ve_project(toyworld_dir: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with the toy world, the recipes and a toy-LM LanguagePretraining checkpoint where
    recipes/_base/models/lm4ve-block.yaml expects the text pre-training run's."""
    import yaml

    from visprior.stages import LanguagePretraining

    root = tmp_path_factory.mktemp("lm4ve")
    (root / "data").mkdir()
    os.symlink(toyworld_dir, root / "data" / "toyworld")
    os.symlink(REPO / "recipes", root / "recipes")
    config = yaml.safe_load((REPO / "recipes/_base/models/toy-lm.yaml").read_text())["config"]
    stage = LanguagePretraining(LanguageModelSpec(config=config, tokenizer=str(tokenizer_dir)))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(stage)
    ckpt = root / "runs" / "text-pretrain" / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    trainer.save_checkpoint(ckpt)
    return root


def fit_cli(root: Path, monkeypatch, *args: str) -> None:
    monkeypatch.chdir(root)
    from visprior.cli import main

    main(["fit", *args, "--config", "recipes/_base/scales/smoke.yaml", "--trainer.enable_progress_bar=false"])


@pytest.mark.parametrize("variant", ["llm_block", "llm_block_unfrozen", "mlp", "none"])
def test_lm4ve_yaml_runs_each_variant_at_smoke_size(variant, lm4ve_project, monkeypatch):
    """`visprior fit --config recipes/_base/stages/lm4ve.yaml --model.init_args.frozen_block.variant V` (smoke size)."""
    name = f"lm4ve-{variant}"
    fit_cli(lm4ve_project, monkeypatch, "--config", "recipes/_base/stages/lm4ve.yaml",
            f"--model.init_args.frozen_block.variant={variant}", f"--trainer.logger.init_args.name={name}")  # fmt: skip
    ckpt = torch.load(lm4ve_project / "runs" / name / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["frozen_block"]["variant"] == variant
    state = ckpt["state_dict"]
    components = {k.split(".")[1] for k in state}
    assert components == ({"vision_tower", "norm", "head"} | ({"frozen_block"} if variant != "none" else set()))
    lm = torch.load(lm4ve_project / "runs/text-pretrain/run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    layer = "model.language_model.model.layers.5."  # toy-lm has 6 layers: layer -1
    block = {k.removeprefix("model.frozen_block.block."): v for k, v in state.items() if ".block." in k}
    if variant == "llm_block":  # the LLM layer, bit-identical after training
        assert block and all(torch.equal(v, lm[layer + k]) for k, v in block.items())
    elif variant == "llm_block_unfrozen":
        assert any(not torch.equal(v, lm[layer + k]) for k, v in block.items())
    else:
        assert not block


def test_classify_yaml_takes_the_frozen_block_key(lm4ve_project, monkeypatch):
    """classify.yaml itself with `frozen_block` given: the toy SigLIP tower, mean pooling, the block's adapters train."""
    fit_cli(lm4ve_project, monkeypatch, "--config", "recipes/_base/stages/classify.yaml",
            "--model.init_args.frozen_block=recipes/_base/models/lm4ve-block.yaml",
            "--trainer.logger.init_args.name=classify-lm4ve")  # fmt: skip
    ckpt = torch.load(lm4ve_project / "runs/classify-lm4ve/run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["trainable"] == {"vision_tower": 1e-3, "frozen_block": 1e-3, "head": 1e-3}
    assert ckpt["state_dict"]["model.frozen_block.adapter_in.weight"].shape == (256, 256)  # toy SigLIP -> toy LM
