"""Bad paths and settings fail before the first step, with the key, the value and what was expected in the message."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonargparse
import pytest
import torch

from visprior.models.language import LanguageModelSpec
from visprior.training.checkpointing import atomic_torch_save
from visprior.training.validation import check_checkpoint, check_path_exists, check_remote_code_allowed


def test_missing_dataset_names_key_path_and_expectation(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        FileNotFoundError, match=r"data\.sources\[0\]\.path: '.*nope' does not exist; expected a dataset"
    ):
        check_path_exists(missing, "data.sources[0].path", "dataset")
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        check_path_exists(missing, "data.sources[0].path", "dataset")
    (missing / "manifest.json").write_text("{}")
    assert check_path_exists(missing, "data.sources[0].path", "dataset") == missing


def test_hf_folder_needs_config_json(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"model\.language_model\.path: .* has no config.json; expected a Hugging"
    ):
        check_path_exists(tmp_path, "model.language_model.path", "hf_model")
    with pytest.raises(FileNotFoundError, match="model.path: no path given"):
        check_path_exists(None, "model.path", "hf_model")


def test_checkpoint_complete_truncated_and_missing(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(64)}}, good)
    assert check_checkpoint(good) == good
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"ckpt_path: '.*bad.ckpt' is not a complete checkpoint"):
        check_checkpoint(bad)
    with pytest.raises(
        FileNotFoundError, match=r"init_from\[0\]\.path: .* does not exist; expected a Lightning \.ckpt"
    ):
        check_checkpoint(tmp_path / "gone.ckpt", "init_from[0].path")


def test_remote_code_refused_unless_trusted_or_a_known_model_type(tmp_path: Path) -> None:
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.X"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x_lm", "auto_map": auto_map}))
    with pytest.raises(PermissionError, match=r"model\.language_model: .* needs its own Python code .*'x_lm'"):
        check_remote_code_allowed(tmp_path, "model.language_model", trust_remote_code=False)
    check_remote_code_allowed(tmp_path, "model.language_model", trust_remote_code=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": auto_map}))
    check_remote_code_allowed(tmp_path, "model.language_model", trust_remote_code=False)  # transformers' own Llama


def test_trust_remote_code_is_a_typed_boolean() -> None:
    """jsonargparse turns the YAML / CLI string "false" into False and refuses a number: no truthy string reaches
    transformers."""
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--lm", type=LanguageModelSpec)
    assert parser.parse_args(['--lm={"path": "x", "trust_remote_code": "false"}']).lm.trust_remote_code is False
    with pytest.raises(jsonargparse.ArgumentError, match=r"lm\.trust_remote_code"):
        parser.parse_args(['--lm={"path": "x", "trust_remote_code": 1}'])


@dataclasses.dataclass
class Source:
    path: str
    weight: float = 1.0


def test_jsonargparse_rejects_unknown_key_and_wrong_type() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--source", type=Source)
    with pytest.raises(jsonargparse.ArgumentError, match="wieght"):
        parser.parse_args(['--source={"path": "a", "wieght": 2}'])
    with pytest.raises(jsonargparse.ArgumentError, match="weight"):
        parser.parse_args(['--source={"path": "a", "weight": "heavy"}'])
