"""Stages: freezing by component (counts and values), optimizer groups and schedule, init_from, perplexity drops with
text pre-training, and every stage YAML runs through the real CLI at smoke size."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from visprior.data.datamodule import SourceSpec, VisionLanguageDataModule
from visprior.models.connectors import ConnectorSpec
from visprior.models.language import LanguageModelSpec
from visprior.models.vision import VisionTowerSpec
from visprior.stages import (
    ContrastivePretraining,
    InitFrom,
    InstructionTuning,
    LanguagePretraining,
    VisionLanguagePretraining,
)
from visprior.stages.base import adamw, schedule_factor
from visprior.stages.contrastive import clip_loss, siglip_loss

REPO = Path(__file__).resolve().parents[1]
TINY_LM = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "tie_word_embeddings": True,
}
TINY_TOWER = {
    "model_type": "siglip_vision_model",
    "image_size": 64,
    "patch_size": 16,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vision_use_head": False,
}


def lm_spec(tokenizer_dir: Path) -> LanguageModelSpec:
    return LanguageModelSpec(config=TINY_LM, tokenizer=str(tokenizer_dir))


def tower_spec() -> VisionTowerSpec:
    return VisionTowerSpec(config=TINY_TOWER, feature_layer=-1)


def trainer(steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def data(root: Path, *sources: str, **kwargs) -> VisionLanguageDataModule:
    kwargs = {"batch_size": 4, "seq_len": 96, "batches_per_epoch": 50, **kwargs}
    return VisionLanguageDataModule([SourceSpec(str(root / s)) for s in sources], **kwargs)


def snapshot(stage: pl.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
    return {
        comp: {n: p.detach().clone() for n, p in module.named_parameters()}
        for comp, module in stage.model.named_children()
    }


# ---------------------------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize(
    ("stage_cls", "trainable", "sources"),
    [
        (VisionLanguagePretraining, {"connector": 1e-2}, ("pairs",)),
        (InstructionTuning, {"connector": 1e-2, "language_model": 1e-3}, ("sft",)),
    ],
)
def test_frozen_components_stay_and_trainable_ones_move(toyworld_dir, tokenizer_dir, stage_cls, trainable, sources):
    stage = stage_cls(lm_spec(tokenizer_dir), tower_spec(), ConnectorSpec(), trainable=trainable)
    counts = {name: (t, f) for name, t, f in stage.parameter_table()}
    for comp, module in stage.model.named_children():
        total = sum(p.numel() for p in module.parameters())
        if comp in trainable:
            assert counts[comp][0] > 0 and counts[comp][0] + counts[comp][1] == total
        else:
            assert counts[comp] == (0, total), comp
    stage.train()
    for comp, module in stage.model.named_children():
        assert module.training == (comp in trainable), comp
    before = snapshot(stage)
    trainer(3).fit(stage, data(toyworld_dir, *sources, packing=stage_cls is InstructionTuning, seq_len=160))
    after = snapshot(stage)
    for comp in before:
        moved = [n for n in before[comp] if not torch.equal(before[comp][n], after[comp][n])]
        if comp in trainable:
            trainable_names = [n for n, p in getattr(stage.model, comp).named_parameters() if p.requires_grad]
            assert set(trainable_names) <= set(moved), f"{comp}: {set(trainable_names) - set(moved)} did not change"
        else:
            assert moved == [], f"frozen {comp} changed: {moved[:3]}"
            assert not getattr(stage.model, comp).training


def test_unknown_component_is_named(tokenizer_dir):
    with pytest.raises(ValueError, match="vision_towr"):
        VisionLanguagePretraining(lm_spec(tokenizer_dir), tower_spec(), trainable={"vision_towr": 1e-3})


def test_param_groups_no_decay_on_vectors_and_schedule(tokenizer_dir):
    stage = InstructionTuning(
        lm_spec(tokenizer_dir), tower_spec(), trainable={"connector": 1e-3, "language_model": 2e-4}, weight_decay=0.1
    )
    stage.decay_steps = 100
    opt = stage.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True  # CPU has torch's fused AdamW
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"connector", "connector/no_decay", "language_model", "language_model/no_decay"}
    assert (
        all(p.ndim >= 2 for p in groups["language_model"]["params"]) and groups["language_model"]["weight_decay"] == 0.1
    )
    assert all(p.ndim < 2 for p in groups["language_model/no_decay"]["params"])
    assert groups["language_model/no_decay"]["weight_decay"] == 0.0
    assert groups["connector"]["lr"] == 1e-3 and groups["language_model"]["lr"] == 2e-4
    assert schedule_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert schedule_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert schedule_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert schedule_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_adamw_fused_where_the_device_has_it_and_the_same_update_as_foreach() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(5)]
    runs = {}
    for kernel in ("fused", "foreach"):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        opt = adamw(groups, lr=1e-2) if kernel == "fused" else torch.optim.AdamW(groups, lr=1e-2, foreach=True)
        assert opt.defaults["fused" if kernel == "fused" else "foreach"] is True
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs[kernel] = params
    for fused, foreach, start in zip(runs["fused"], runs["foreach"], weights):
        assert not torch.equal(fused, start)
        torch.testing.assert_close(fused, foreach, rtol=1e-5, atol=1e-6)
    # a device torch has no fused kernel for (meta stands in for one): foreach, as before
    meta = [torch.nn.Parameter(torch.empty(4, 4, device="meta"))]
    opt = adamw([{"params": meta}], lr=1e-3)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


# ---------------------------------------------------------------------------------------------------- init_from


def test_init_from_checkpoint_and_hf_folder(toyworld_dir, tokenizer_dir, tmp_path):
    source = LanguagePretraining(lm_spec(tokenizer_dir))
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "lm.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    source.model.language_model.save_pretrained(tmp_path / "hf")

    for path in (ckpt, tmp_path / "hf"):
        target = VisionLanguagePretraining(
            lm_spec(tokenizer_dir),
            tower_spec(),
            init_from=[InitFrom(path=str(path), components=["language_model"])],
        )
        tower_before = {n: p.clone() for n, p in target.model.vision_tower.named_parameters()}
        target.configure_model()
        for (n, p), q in zip(target.model.language_model.named_parameters(), source.model.language_model.parameters()):
            assert torch.equal(p, q), n
        for n, p in target.model.vision_tower.named_parameters():
            assert torch.equal(p, tower_before[n]), n

    bad = VisionLanguagePretraining(
        lm_spec(tokenizer_dir),
        tower_spec(),
        init_from=[InitFrom(path=str(tmp_path / "nope.ckpt"), components=["connector"])],
    )
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        bad.configure_model()


# ---------------------------------------------------------------------------------------------------- learning


def heldout_loss(stage: LanguagePretraining, dm: VisionLanguageDataModule) -> float:
    stage.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            out = stage.compute_loss(batch)
            total += float(out.loss) * out.supervised
            count += out.supervised
    return total / count


def test_text_pretraining_lowers_heldout_perplexity(toyworld_dir, tokenizer_dir):
    torch.manual_seed(0)
    stage = LanguagePretraining(lm_spec(tokenizer_dir), trainable={"language_model": 3e-3}, warmup_steps=5)
    categories = ["web", "encyclopedia", "literature", "visual"]
    dm = data(toyworld_dir, *[f"text/{c}" for c in categories], batch_size=4, seq_len=128, val_batches=3)
    dm.val_sources = [SourceSpec(str(toyworld_dir / "eval/text" / c)) for c in categories]
    dm.connect(stage.tokenizer, stage.image_transform, stage.num_image_tokens)
    before = heldout_loss(stage, dm)
    trainer(60).fit(stage, dm)
    after = heldout_loss(stage, dm)
    assert math.exp(after) < 0.25 * math.exp(before), (math.exp(before), math.exp(after))


def test_contrastive_loss_falls(toyworld_dir, tokenizer_dir):
    stage = ContrastivePretraining(tower_spec(), lm_spec(tokenizer_dir), loss="clip", embed_dim=32)
    dm = data(toyworld_dir, "pairs", batch_size=8, seq_len=48, packing=False)
    dm.connect(stage.tokenizer, stage.image_transform, stage.num_image_tokens)
    batch = next(iter(dm.train_dataloader()))
    first = float(stage.compute_loss(batch).loss.detach())
    assert first == pytest.approx(math.log(8), abs=0.5)  # chance level of InfoNCE over 8 pairs
    trainer(8).fit(stage, dm)
    stage.eval()
    with torch.no_grad():
        assert float(stage.compute_loss(batch).loss) < first


LOGITS_3X3 = [[2.0, 0.0, -1.0], [1.0, 3.0, 0.0], [0.0, -2.0, 1.0]]
"""Image i (row) against text j (column); pair i matches text i. Not symmetric, so rows and columns give different terms."""


def test_clip_loss_matches_a_hand_computed_3x3_case():
    """InfoNCE both ways: mean over images of -log softmax(row)[i], mean over texts of -log softmax(column)[j], halved."""
    z = LOGITS_3X3
    image_to_text = [math.log(sum(math.exp(v) for v in z[i])) - z[i][i] for i in range(3)]
    text_to_image = [math.log(sum(math.exp(z[i][j]) for i in range(3))) - z[j][j] for j in range(3)]
    # by hand: rows 0.16985, 0.16985, 0.34901; columns 0.40761, 0.05499, 0.40761
    assert image_to_text == pytest.approx([0.16985, 0.16985, 0.34901], abs=1e-5)
    assert text_to_image == pytest.approx([0.40761, 0.05499, 0.40761], abs=1e-5)
    expected = 0.5 * (sum(image_to_text) / 3 + sum(text_to_image) / 3)
    assert expected == pytest.approx(0.259817, abs=1e-6)
    assert float(clip_loss(torch.tensor(z))) == pytest.approx(expected, rel=1e-6)


def test_siglip_loss_matches_a_hand_computed_3x3_case():
    """Sigmoid loss: log(1 + exp(-s * z)) over all 9 pairs, s = +1 on the diagonal and -1 off it, divided by 3 images."""
    z = LOGITS_3X3
    expected = sum(math.log1p(math.exp(-(1 if i == j else -1) * z[i][j])) for i in range(3) for j in range(3)) / 3
    assert expected == pytest.approx(1.440557, abs=1e-6)
    assert float(siglip_loss(torch.tensor(z))) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- recipes


STAGE_TRAINS = {
    "text-pretrain": {"language_model"},
    "contrastive": {"vision_tower", "text_encoder", "head"},
    "align": {"connector"},  # LLaVA stage 1: tower and LM frozen
    "sft": {"connector", "language_model"},  # LLaVA stage 2: tower frozen
}
"""What each stage YAML trains, written down here independently of the YAMLs' `trainable` keys."""
UNUSED_FROZEN = {("contrastive", "vision_tower"): ["model.post_layernorm.bias", "model.post_layernorm.weight"]}
"""Frozen parts of a trained component: the tower is read before its post-layernorm, which DDP must not wait for."""


@pytest.mark.parametrize("name", ["text-pretrain", "contrastive", "align", "sft"])
def test_stage_yaml_runs_at_smoke_size(name, toyworld_dir, tokenizer_dir, tmp_path, monkeypatch):
    """The real `visprior fit --config` on each stage YAML, with the smoke scale, in a fresh run directory; a probe
    reports which components moved, which stayed bit-identical, and that frozen ones ran every step in eval mode."""
    (tmp_path / "data").mkdir()
    os.symlink(toyworld_dir, tmp_path / "data" / "toyworld")
    os.symlink(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "tests" / "scripts"))
    from visprior.cli import main

    probe = json.dumps(
        {"class_path": "stage_fit.TrainedComponents", "init_args": {"out": str(tmp_path / "trained.json")}}
    )
    main(
        [
            "fit",
            "--config",
            f"recipes/_base/stages/{name}.yaml",
            "--config",
            "recipes/_base/scales/smoke.yaml",
            "--trainer.enable_progress_bar=false",
            f"--trainer.callbacks+={probe}",
        ]
    )
    ckpt = torch.load(tmp_path / "runs" / name / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"], "the loader position is in the checkpoint"
    report = json.loads((tmp_path / "trained.json").read_text())
    trains = {comp for comp, r in report.items() if r["trainable_params"]}
    assert trains == STAGE_TRAINS[name], report
    for comp, r in report.items():
        assert r["frozen_moved"] == [], (comp, r)  # frozen parameters bit-identical after the run
        if comp in STAGE_TRAINS[name]:
            unused = [f"{comp}.{n}" for n in UNUSED_FROZEN.get((name, comp), [])]
            assert r["frozen_names"] == unused and r["trainable_not_moved"] == [], (comp, r)
            assert r["modes"] == ["train"], (comp, r)
        else:
            assert r["trainable_params"] == 0 and r["modes"] == ["eval"], (comp, r)  # dropout off, norms fixed


# ---------------------------------------------------------------------------------------------------- lifecycle


def test_freeze_table_per_component(tokenizer_dir):
    tower = VisionTowerSpec(config=TINY_TOWER, feature_layer=-2)
    stage = VisionLanguagePretraining(lm_spec(tokenizer_dir), tower, trainable={"connector": 1e-3})
    table = {name: (t, f) for name, t, f in stage.parameter_table()}
    connector_params = sum(p.numel() for p in stage.model.connector.parameters())
    assert table["connector"] == (connector_params, 0)
    assert table["vision_tower"][0] == 0 and table["language_model"][0] == 0
    everything = {"vision_tower": 1e-4, "connector": 1e-3, "language_model": 1e-4}
    full = VisionLanguagePretraining(lm_spec(tokenizer_dir), tower, trainable=everything)
    assert {name: t for name, t, _ in full.parameter_table()} != {name: t for name, (t, _) in table.items()}
    assert not full.model.vision_tower.model.post_layernorm.weight.requires_grad  # unreachable, stays frozen
    with pytest.raises(ValueError, match="unknown component 'projector'"):
        VisionLanguagePretraining(lm_spec(tokenizer_dir), tower, trainable={"projector": 1e-3})
    with pytest.raises(RuntimeError, match="frozen once"):
        stage.freeze()


def test_one_constructor_and_hyperparameters_captured_once(tokenizer_dir):
    """InstructionTuning is VisionLanguagePretraining's constructor with another default; hparams are its YAML keys."""
    tower = tower_spec()
    sft = InstructionTuning(lm_spec(tokenizer_dir), tower, warmup_steps=7)
    align = VisionLanguagePretraining(lm_spec(tokenizer_dir), tower, warmup_steps=7)
    assert InstructionTuning.__init__ is VisionLanguagePretraining.__init__
    assert sft.trainable == {"connector": 1e-3, "language_model": 2e-4} and align.trainable == {"connector": 1e-3}
    assert set(sft.hparams) == set(align.hparams)
    assert sft.hparams["trainable"] == sft.trainable and sft.hparams["warmup_steps"] == 7
    assert sft.hparams["language_model"]["config"] == TINY_LM  # plain data, the resolved spec
    rebuilt = InstructionTuning(**sft.hparams)
    assert rebuilt.trainable == sft.trainable and rebuilt.hparams == sft.hparams


class ModeProbe(pl.Callback):
    """Records, at every training and validation batch, whether frozen parts are in eval mode and trainable ones train."""

    def __init__(self) -> None:
        self.train_ok: list[bool] = []
        self.val_ok: list[bool] = []

    def _frozen_eval(self, stage) -> bool:
        frozen = stage.frozen_modules()
        return bool(frozen) and all(not m.training for f in frozen for m in f.modules())

    def on_train_batch_start(self, trainer, stage, batch, batch_idx) -> None:
        trains = [getattr(stage.model, comp.split(".")[0]).training for comp in stage.trainable]
        self.train_ok.append(self._frozen_eval(stage) and all(trains))

    def on_validation_batch_start(self, trainer, stage, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_ok.append(self._frozen_eval(stage))


def lifecycle_stage(kind: str, tokenizer_dir: Path):
    if kind == "align":  # tower and LM frozen, whole components
        return VisionLanguagePretraining(lm_spec(tokenizer_dir), tower_spec(), trainable={"connector": 1e-3})
    from visprior.models.frozen_block import FrozenBlockSpec
    from visprior.stages import ImageClassification

    vit = {"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 64}  # fmt: skip
    lm = {**TINY_LM, "vocab_size": 64}
    return ImageClassification(  # LM4VE: the frozen LLM block nested inside the trainable frozen_block component
        VisionTowerSpec(config=vit, select="cls_patch"),
        num_classes=8,
        frozen_block=FrozenBlockSpec("llm_block", LanguageModelSpec(config=lm)),
        head_norm=True,
        pool="cls",
    )


def lifecycle_data(kind: str, root: Path):
    if kind == "align":
        val = [SourceSpec(str(root / "eval" / "captions"))]
        return data(root, "pairs", seq_len=160, packing=False, val_sources=val, val_batches=1, batches_per_epoch=3)
    from visprior.data.classification import ImageClassificationDataModule

    shapes = root / "eval" / "shapes"
    return ImageClassificationDataModule(
        str(shapes / "train"), str(shapes / "test"), batch_size=4, batches_per_epoch=3, val_batches=1
    )


@pytest.mark.parametrize("kind", ["align", "lm4ve"])
def test_frozen_once_and_in_eval_through_fit_validation_and_resume(
    kind, toyworld_dir, tokenizer_dir, tmp_path, monkeypatch
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from visprior.stages.base import Stage

    calls: list[str] = []
    original = Stage.freeze

    def counted(self):
        calls.append(type(self).__name__)
        return original(self)

    monkeypatch.setattr(Stage, "freeze", counted)

    def fit(steps: int, resume: str | None = None):
        pl.seed_everything(0)
        stage, probe = lifecycle_stage(kind, tokenizer_dir).eval(), ModeProbe()  # fit must put trainable parts back
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
        run = pl.Trainer(
            accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, val_check_interval=1, limit_val_batches=1, callbacks=[probe, ckpt],
        )  # fmt: skip
        run.fit(stage, lifecycle_data(kind, toyworld_dir), ckpt_path=resume)
        return stage, probe

    first, probe_a = fit(2)
    frozen_before = {n: p.detach().clone() for n, p in first.model.named_parameters() if not p.requires_grad}
    second, probe_b = fit(4, resume=str(tmp_path / "last.ckpt"))
    assert calls == [type(first).__name__] * 2, "each stage instance is frozen exactly once, resume included"
    for probe in (probe_a, probe_b):
        assert probe.train_ok and all(probe.train_ok), probe.train_ok
        assert probe.val_ok and all(probe.val_ok), probe.val_ok
    assert len(probe_b.train_ok) == 2  # the resumed run did the two remaining steps
    for name, value in frozen_before.items():
        param = second.model.get_parameter(name)
        assert not param.requires_grad and torch.equal(param, value), name


@pytest.mark.parametrize("name", ["align", "sft"])
def test_visual_words_switch_in_the_stage_yaml(name, toyworld_dir, tokenizer_dir, tmp_path, monkeypatch):
    """The one key `--model.init_args.visual_words recipes/_base/models/visual-words.yaml` adds vm_head and its loss."""
    (tmp_path / "data").mkdir()
    os.symlink(toyworld_dir, tmp_path / "data" / "toyworld")
    os.symlink(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    from visprior.cli import main

    main(["fit", "--config", f"recipes/_base/stages/{name}.yaml", "--config", "recipes/_base/scales/smoke.yaml",
          "--model.init_args.visual_words=recipes/_base/models/visual-words.yaml",
          "--trainer.enable_progress_bar=false"])  # fmt: skip
    ckpt = torch.load(tmp_path / "runs" / name / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["visual_words"] == {"weight": 1.0, "detach_target": False, "pseudo_image_features": False,
                                  "temperature": 1.0, "train_head": True}  # fmt: skip
    assert hp["trainable"]["vm_head"] == hp["trainable"]["connector"]
    vocab, hidden = ckpt["state_dict"]["model.language_model.lm_head.weight"].shape
    assert ckpt["state_dict"]["model.vm_head.weight"].shape == (vocab, hidden)
