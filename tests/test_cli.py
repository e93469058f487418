"""The `visprior` command: `_base_` composition, validation before work, our own subcommands."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from visprior.cli import main
from visprior.config import RecipeError, expand_config, expand_config_args

BORING = {
    "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
    "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
}


def _write(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    trainer = {
        "accelerator": "cpu",
        "max_steps": 5,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "default_root_dir": str(tmp_path / "run"),
    }
    _write(tmp_path / "frag" / "trainer.yaml", {"trainer": trainer})
    _write(tmp_path / "frag" / "model.yaml", {"_base_": "trainer.yaml", **BORING})
    return _write(tmp_path / "recipe.yaml", {"_base_": ["frag/model.yaml"], "trainer": {"max_steps": 2}})


def test_bases_come_first_depth_first(recipe: Path) -> None:
    files = [p.name for p, _ in expand_config(recipe)]
    assert files == ["trainer.yaml", "model.yaml", "recipe.yaml"]
    assert all("_base_" not in content for _, content in expand_config(recipe))


def test_print_config_shows_the_file_overriding_its_bases(recipe: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["trainer"]["max_steps"] == 2
    assert resolved["trainer"]["accelerator"] == "cpu"
    assert resolved["model"]["class_path"].endswith("BoringModel")


def test_command_line_overrides_the_recipe(recipe: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(recipe), "--trainer.max_steps", "7", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 7


def test_fit_runs_a_composed_recipe(recipe: Path, tmp_path: Path) -> None:
    main(["fit", "--config", str(recipe)])
    assert (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [({"trainer": {"max_stepz": 3}}, "max_stepz"), ({"trainer": {"max_steps": "many"}}, "trainer.max_steps")],
)
def test_bad_key_or_type_fails_before_work_naming_it(
    recipe: Path, tmp_path: Path, override: dict, named: str, capsys: pytest.CaptureFixture
) -> None:
    bad = _write(tmp_path / "bad.yaml", {"_base_": [str(recipe)], **override})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad)])
    assert exit_info.value.code not in (0, None)
    assert named in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "no work may start on a bad config"


def test_missing_fragment_and_cycles_are_named(tmp_path: Path) -> None:
    missing = _write(tmp_path / "a.yaml", {"_base_": ["nope.yaml"]})
    with pytest.raises(RecipeError, match="nope.yaml"):
        expand_config(missing)
    _write(tmp_path / "b.yaml", {"_base_": ["c.yaml"]})
    _write(tmp_path / "c.yaml", {"_base_": ["b.yaml"]})
    with pytest.raises(RecipeError, match="cycle"):
        expand_config(tmp_path / "b.yaml")


def test_a_plain_file_is_passed_as_its_content(tmp_path: Path) -> None:
    plain = _write(tmp_path / "plain.yaml", BORING)
    args = expand_config_args(["fit", "-c", str(plain)])
    assert args[:2] == ["fit", "--config"] and yaml.safe_load(args[2]) == BORING


def test_unknown_command_is_refused() -> None:
    with pytest.raises(SystemExit, match="unknown command"):
        main(["trian"])


def test_data_help_lists_subcommands(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    out = capsys.readouterr().out
    assert "toyworld" in out and "tokenizer" in out


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_explicit_ckpt_path_to_a_broken_file_is_named_before_work(
    recipe: Path, tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture
) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--ckpt_path", str(broken)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "not a complete checkpoint" in err and "broken.ckpt" in err and "weights_only=False" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_missing_explicit_ckpt_path_is_named(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(recipe), "--ckpt_path", str(tmp_path / "nowhere.ckpt")])
    assert "nowhere.ckpt" in capsys.readouterr().err
