"""The main job's chain: which stages run, in which order, from which checkpoints, and when the toy world is regenerated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visprior import demo
from visprior.data.toyworld.generate import WORLD_VERSION


def test_chain_order_and_init_from_point_at_earlier_stages() -> None:
    names = [s.name for s in demo.CHAIN]
    assert names == ["text-pretrain", "classify", "contrastive", "align", "sft"]
    for i, stage in enumerate(demo.CHAIN):
        assert all(names.index(src) < i for src, _ in stage.init_from), stage.name
        assert (Path("recipes/_base/stages") / f"{stage.name}.yaml").exists()
    # the VLM stages must build the same connector, or `init_from` of the align checkpoint into sft would not fit
    align, sft = demo.CHAIN[3], demo.CHAIN[4]
    assert align.overrides == sft.overrides[: len(demo.CONNECTOR)] == demo.CONNECTOR
    assert sft.overrides[len(demo.CONNECTOR) :] == ["--model.init_args.loss_average", "turn"]


def test_fit_command_carries_checkpoints_and_overrides(tmp_path: Path) -> None:
    stage = next(s for s in demo.CHAIN if s.name == "contrastive")
    cmd = demo.fit_command(stage, tmp_path, ["--seed_everything", "1"])
    assert cmd[cmd.index("--config") + 1] == "recipes/_base/stages/contrastive.yaml"
    specs = json.loads(cmd[cmd.index("--model.init_args.init_from") + 1])
    assert specs == [{"path": str(tmp_path / "classify/run/checkpoints/last.ckpt"), "components": ["vision_tower"]}]
    assert cmd[-2:] == ["--seed_everything", "1"] and "--model.init_args.trainable" in cmd


@pytest.mark.parametrize(
    ("world", "regenerate"),
    [
        ({"preset": "toy", "seed": 0, "version": WORLD_VERSION}, False),
        ({"preset": "toy", "seed": 0, "version": WORLD_VERSION - 1}, True),
        ({"preset": "toy", "seed": 0}, True),
        ({"preset": "smoke", "seed": 0, "version": WORLD_VERSION}, True),
    ],
)
def test_an_old_toy_world_is_regenerated(tmp_path: Path, monkeypatch, world: dict, regenerate: bool) -> None:
    (tmp_path / "world.json").write_text(json.dumps(world))
    monkeypatch.setattr(demo, "DATA", tmp_path)
    calls = []
    monkeypatch.setattr("visprior.data.toyworld.generate", lambda out, preset, seed: calls.append((out, preset, seed)))
    demo.ensure_toyworld("toy", 0)
    assert calls == ([(tmp_path, "toy", 0)] if regenerate else [])
