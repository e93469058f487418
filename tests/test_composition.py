"""Config composition is safe by design (issue 10 §1): a trainer fragment changes hardware and nothing else, every stage owns
its run folder, paths mean the same from any working directory, the robustness callbacks come once from the CLI, and a
resume refuses another stage's checkpoint before any step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from visprior.cli import main
from visprior.config import HARDWARE_KEYS, RecipeError, expand_config, expand_config_args

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (REPO / "recipes/_base/stages").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (REPO / "recipes/_base/trainers").glob("*.yaml"))


def resolved(capsys: pytest.CaptureFixture, *args: str) -> dict:
    with pytest.raises(SystemExit) as info:
        main(["fit", *args, "--print_config"])
    assert info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_the_stages_and_trainer_fragments_exist() -> None:
    assert {"text-pretrain", "classify", "contrastive", "align", "sft"} <= set(STAGES)
    assert {"cpu", "gpu-bf16", "fsdp-bf16", "multinode"} <= set(TRAINERS)


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_with_every_trainer_fragment_keeps_its_run(stage: str, trainer: str, capsys) -> None:
    alone = resolved(capsys, "--config", str(REPO / f"recipes/_base/stages/{stage}.yaml"))["trainer"]
    fragment = yaml.safe_load((REPO / f"recipes/_base/trainers/{trainer}.yaml").read_text())["trainer"]
    config = resolved(
        capsys,
        "--config",
        str(REPO / f"recipes/_base/stages/{stage}.yaml"),
        "--config",
        str(REPO / f"recipes/_base/trainers/{trainer}.yaml"),
    )
    t = config["trainer"]
    assert t["logger"]["init_args"]["name"] == stage  # each stage YAML names its run after itself
    assert t["logger"] == alone["logger"] and t["logger"]["init_args"]["save_dir"] == str(REPO / "runs")
    for key in ("max_steps", "val_check_interval", "log_every_n_steps", "callbacks"):
        assert t[key] == alone[key], key
    for key, value in fragment.items():  # and the hardware is the fragment's
        assert t[key] == value or (isinstance(value, dict) and t[key]["class_path"] == value["class_path"]), key
    assert config["ckpt_path"] == "last"


def test_two_stages_with_the_same_fragment_get_different_run_folders(capsys) -> None:
    folders = set()
    for stage in STAGES:
        t = resolved(
            capsys,
            "--config",
            str(REPO / f"recipes/_base/stages/{stage}.yaml"),
            "--config",
            str(REPO / "recipes/_base/trainers/fsdp-bf16.yaml"),
        )["trainer"]["logger"]["init_args"]
        folders.add(os.path.join(t["save_dir"], t["name"], t["version"]))
    assert len(folders) == len(STAGES)


def test_trainer_fragments_hold_hardware_keys_only() -> None:
    for name in TRAINERS:
        data = yaml.safe_load((REPO / f"recipes/_base/trainers/{name}.yaml").read_text())
        assert set(data) == {"trainer"} and set(data["trainer"]) <= HARDWARE_KEYS, name


def _write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ({"trainer": {"accelerator": "cpu", "max_steps": 10000}}, "trainer.max_steps"),
        ({"trainer": {"logger": {"init_args": {"name": "stage"}}}}, "trainer.logger.init_args.name"),
        ({"ckpt_path": "last"}, "ckpt_path"),
        ({"_base_": ["cpu.yaml"], "trainer": {"precision": "bf16-mixed"}}, "may not have '_base_'"),
    ],
)
def test_a_trainer_fragment_with_run_settings_is_refused_naming_file_and_key(tmp_path: Path, content, named) -> None:
    _write(tmp_path / "recipes" / "trainers" / "cpu.yaml", {"trainer": {"accelerator": "cpu"}})
    bad = _write(tmp_path / "recipes" / "trainers" / "bad.yaml", content)
    with pytest.raises(RecipeError, match=named) as info:
        expand_config(bad)
    assert "bad.yaml" in str(info.value)


def test_a_shared_base_is_applied_once_where_it_first_appears(tmp_path: Path) -> None:
    _write(tmp_path / "recipes" / "common.yaml", {"trainer": {"max_steps": 10000}})
    stage = _write(tmp_path / "recipes" / "stage.yaml", {"_base_": ["common.yaml"], "trainer": {"max_steps": 7}})
    extra = _write(tmp_path / "recipes" / "extra.yaml", {"_base_": ["common.yaml"], "trainer": {"devices": 2}})
    args = expand_config_args(["fit", "--config", str(stage), "--config", str(extra)])
    contents = [yaml.safe_load(a) for a in args[2::2]]
    assert contents == [{"trainer": {"max_steps": 10000}}, {"trainer": {"max_steps": 7}}, {"trainer": {"devices": 2}}]


def test_paths_resolve_against_the_project_root_from_any_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    configs = []
    for cwd in (REPO, tmp_path, REPO / "recipes" / "_base"):
        monkeypatch.chdir(cwd)
        configs.append(resolved(capsys, "--config", str(REPO / "recipes/_base/stages/sft.yaml")))
    assert configs[0] == configs[1] == configs[2]
    lm = configs[0]["model"]["init_args"]["language_model"]
    assert lm["tokenizer"] == str(REPO / "data/toyworld/tokenizer")  # inside the referenced model fragment
    assert lm["config"]["model_type"] == "llama"  # the fragment reference was inlined
    sources = configs[0]["data"]["init_args"]["sources"]
    assert [s["path"] for s in sources] == [str(REPO / "data/toyworld/sft"), str(REPO / "data/toyworld/sft_text")]


def test_a_linked_recipes_folder_keeps_its_own_project_root(tmp_path: Path, capsys) -> None:
    os.symlink(REPO / "recipes", tmp_path / "recipes")
    config = resolved(capsys, "--config", str(tmp_path / "recipes/_base/stages/align.yaml"))
    assert config["data"]["init_args"]["sources"][0]["path"] == str(tmp_path / "data/toyworld/pairs")


def test_a_fit_without_a_run_name_is_refused(tmp_path: Path, capsys) -> None:
    recipe = _write(
        tmp_path / "stage.yaml",
        {
            "_base_": [str(REPO / "recipes/_base/run.yaml")],
            "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": {"init_args": {"save_dir": str(tmp_path)}}},
            "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
            "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        },
    )
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe)])
    assert info.value.code == 2
    assert "trainer.logger.init_args.name is not set" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.ckpt"))


def test_the_cli_adds_each_robustness_callback_once(tmp_path: Path, monkeypatch) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    from visprior.stage_cli import StageCLI
    from visprior.training import (
        AtomicCheckpointIO,
        AtomicModelCheckpoint,
        DataHealthCallback,
        ExactLoaderResume,
        NonFiniteGuard,
        PreemptionCallback,
        RNGStateCallback,
    )

    built: list[StageCLI] = []
    monkeypatch.setattr(StageCLI, "_run_subcommand", lambda self, subcommand: built.append(self))
    recipe = _write(
        tmp_path / "stage.yaml",
        {
            "_base_": [str(REPO / "recipes/_base/run.yaml"), str(REPO / "recipes/_base/trainers/cpu.yaml")],
            "trainer": {"logger": {"init_args": {"name": "boring", "save_dir": str(tmp_path)}}},
            "nonfinite": {"max_consecutive": 3},
            "checkpoint": {"every_n_train_steps": 7},
            "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
            "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        },
    )
    main(["fit", "--config", str(recipe)])
    trainer = built[0].trainer
    kinds = [type(cb) for cb in trainer.callbacks]
    robust = (ExactLoaderResume, PreemptionCallback, DataHealthCallback, RNGStateCallback)
    for kind in (AtomicModelCheckpoint, LearningRateMonitor, *robust):
        assert kinds.count(kind) == 1, (kind, kinds)
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert kinds.count(NonFiniteGuard) == 1 and guard.max_consecutive == 3
    assert trainer.checkpoint_callback._every_n_train_steps == 7
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


TINY = """
trainer:
  max_steps: 2
  val_check_interval: null
  limit_val_batches: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
model:
  init_args:
    language_model:
      tokenizer: data/toyworld/tokenizer
      config: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 4,
               intermediate_size: 128, tie_word_embeddings: true}
    vision_tower:
      feature_layer: -1
      config: {model_type: siglip_vision_model, image_size: 64, patch_size: 16, hidden_size: 64, num_hidden_layers: 2,
               num_attention_heads: 4, intermediate_size: 128, vision_use_head: false}
data:
  init_args: {batch_size: 2, seq_len: 96, batches_per_epoch: 2, pack_buffer: 8, val_sources: null}
"""


def test_a_checkpoint_of_another_stage_is_refused_before_any_step(toyworld_dir, tokenizer_dir, tmp_path, capsys):
    """align writes runs/shared/run/checkpoints/last.ckpt; sft launched with the same run name must not resume it."""
    (tmp_path / "data").mkdir()
    os.symlink(toyworld_dir, tmp_path / "data" / "toyworld")
    os.symlink(REPO / "recipes", tmp_path / "recipes")
    (tmp_path / "tiny.yaml").write_text(TINY)
    shared = ["--trainer.logger.init_args.name", "shared", "--config", str(tmp_path / "tiny.yaml")]
    main(["fit", "--config", str(tmp_path / "recipes/_base/stages/align.yaml"), *shared])
    last = tmp_path / "runs/shared/run/checkpoints/last.ckpt"
    assert last.is_file()
    before = last.stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(tmp_path / "recipes/_base/stages/sft.yaml"), *shared])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "written by VisionLanguagePretraining" in err and "this run is InstructionTuning" in err, err
    assert last.stat().st_mtime_ns == before, "the refused run must not have trained or saved"
    assert not (Path.cwd() / "data_skips.json").exists(), "a run that never started must not write into the cwd"


def test_the_resume_identity_is_the_stage_and_model_config_not_the_training_settings(tokenizer_dir: Path) -> None:
    from visprior.stages import InstructionTuning

    lm = {"tokenizer": str(tokenizer_dir), "config": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 64}}  # fmt: skip
    tower = {"config": {"model_type": "siglip_vision_model", "image_size": 32, "patch_size": 16, "hidden_size": 32,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}  # fmt: skip

    def identity(**overrides) -> dict:
        return InstructionTuning(**{"language_model": lm, "vision_tower": tower, **overrides}).identity()

    base = identity()
    assert identity(trainable={"connector": 5e-4}, warmup_steps=3) == base  # training settings may change on resume
    assert identity(connector={"name": "linear"})["model"] != base["model"]
    assert identity(vision_tower={**tower, "feature_layer": -1})["model"] != base["model"]
    moved = {**lm, "tokenizer": str(tokenizer_dir) + "/."}
    assert identity(language_model=moved) == base  # a folder's location is not the model
