"""Bad paths and settings fail before the first step, with the key, the value and what was expected in the message."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonargparse
import pytest
import torch

from visprior.training.checkpointing import atomic_torch_save
from visprior.training.validation import (
    check_checkpoint,
    check_image_size,
    check_path_exists,
    check_remote_code_allowed,
    check_trust_remote_code,
)


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


def test_trust_remote_code_only_when_set(tmp_path: Path) -> None:
    assert check_trust_remote_code({}, "model") is False
    assert check_trust_remote_code({"trust_remote_code": True}, "model") is True
    with pytest.raises(TypeError, match="model.trust_remote_code: expected true or false, got 'false'"):
        check_trust_remote_code({"trust_remote_code": "false"}, "model")
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.X"}}))
    with pytest.raises(PermissionError, match="needs its own Python code"):
        check_remote_code_allowed(tmp_path, "model.language_model", trust_remote_code=False)
    check_remote_code_allowed(tmp_path, "model.language_model", trust_remote_code=True)


def test_image_size_message_names_expected_and_got() -> None:
    check_image_size(64, 64, 8)
    with pytest.raises(
        ValueError, match=r"model\.image_size: the vision tower takes 64x64 images, patch size 8; got 96x96"
    ):
        check_image_size(96, 64, 8, key="model.image_size")
    with pytest.raises(ValueError, match="not a multiple of the tower's patch size 7"):
        check_image_size(64, 64, 7)


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
