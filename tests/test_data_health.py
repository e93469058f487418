"""DataHealthCallback: the skip dicts batches carry are summed, logged to tensorboard and written to data_skips.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from visprior.training.data_health import DataHealthCallback, by_reason, merge_skips

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny import TinyModule, tiny_loader  # noqa: E402


def test_skips_are_summed_logged_and_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    health = DataHealthCallback()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[health],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(
        TinyModule(scheduler=False), train_dataloaders=tiny_loader(skips_every=2)
    )  # batches 0, 2, 4 carry skips

    expected = {"src_a": {"bad_image": 3}, "src_b": {"too_long": 6}}
    report = json.loads((Path(trainer.log_dir) / "data_skips.json").read_text())
    assert report["by_source"] == expected
    assert report["by_reason"] == {"bad_image": 3, "too_long": 6}
    assert report["when"] == "train_end" and report["step"] == 6
    assert "data skips after epoch 0 (step 6): bad_image=3, too_long=6" in capsys.readouterr().out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(trainer.log_dir).Reload()
    assert [e.value for e in events.Scalars("data/skips/too_long")][-1] == 6
    assert [e.value for e in events.Scalars("data/skips/src_a/bad_image")][-1] == 3


def test_totals_survive_a_checkpoint_round_trip() -> None:
    before = DataHealthCallback()
    merge_skips(before.totals, {"web": {"bad_json": 2}})
    after = DataHealthCallback()
    after.load_state_dict(before.state_dict())
    merge_skips(after.totals, {"web": {"bad_json": 1, "corrupt_tar": 1}})
    assert by_reason(after.totals) == {"bad_json": 3, "corrupt_tar": 1}


def test_a_two_rank_state_resumed_in_one_process_keeps_the_sum() -> None:
    """Each rank counts its own batches; resumed on one rank the totals over ranks must stay what they were."""
    ranks = [
        {"totals": {"web": {"bad_json": 2}}, "batches": 4, "seen": {"web": 30}, "shards": {"web": {"s0": 2}}},
        {"totals": {"web": {"bad_json": 1, "corrupt_tar": 1}}, "batches": 4, "seen": {"web": 28}, "shards": {}},
    ]
    one = DataHealthCallback()
    one.load_state_dict({**ranks[0], "ranks": ranks})
    assert (one.totals, one.seen, one.batches) == ({"web": {"bad_json": 3, "corrupt_tar": 1}}, {"web": 58}, 4)
    assert one.shards == {"web": {"s0": 2}}
