"""The skip-rate threshold decided on every loader worker's and rank's counts together: a broken source stops the run
early, on every rank at the same step, whatever the worker and rank layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visprior.training.data_health import should_stop, wilson_lower

SCRIPT = Path(__file__).parent / "scripts" / "dist_data_health.py"


def test_the_stop_rule():
    assert not should_stop(10_000, 50, 0.01, 200)  # a healthy source at 0.5 %
    assert not should_stop(1, 1, 0.01, 200)  # one bad sample first is not yet evidence
    assert not should_stop(100, 2, 0.01, 200)  # 2 % over 100 samples: not enough to tell
    assert should_stop(300, 4, 0.01, 200)  # the plain rate once 200 samples were read
    assert should_stop(20, 5, 0.01, 200)  # badly broken: stops after tens of samples, before the 200
    assert 0.05 < wilson_lower(5, 20) < 0.25 and wilson_lower(0, 10) == 0.0


@pytest.fixture(scope="module")
def broken(toyworld_dir, tmp_path_factory) -> Path:
    """160 pairs in 4 shards, every 4th caption empty (`empty_text` skips, 25 %)."""
    from visprior.data.formats import PairSample
    from visprior.data.shards import iter_samples, resolve_shards, write_shards

    out = tmp_path_factory.mktemp("broken") / "broken"
    pairs = list(iter_samples(resolve_shards(toyworld_dir / "pairs"), "pair"))[:160]
    bad = (PairSample(s.key, s.image, "" if i % 4 == 0 else s.text, s.meta) for i, s in enumerate(pairs))
    write_shards(bad, out, name="broken", kind="pair", maxcount=40)
    return out


def run(tmp_path: Path, broken: Path, tokenizer_dir: Path, *args: str) -> list[dict]:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--data",
        str(broken),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a hang fails here
    ranks = sorted(out.glob("rank*.json"))
    assert ranks, proc.stderr[-3000:]
    return [json.loads(r.read_text()) for r in ranks]


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_a_broken_source_stops_early_whatever_the_workers(workers, broken, tokenizer_dir, tmp_path):
    [rank] = run(tmp_path, broken, tokenizer_dir, "--workers", str(workers))
    assert rank["outcome"] == "DataQualityError", rank
    assert rank["worker_max_skip_rate"] is None  # the workers leave the decision to the run
    assert "source 'broken'" in rank["message"] and "> max_skip_rate 1.0%" in rank["message"]
    assert "most common reason 'empty_text'" in rank["message"] and "worst shard " in rank["message"]
    assert rank["step"] < 10  # tens of samples, not 200 per worker


@pytest.mark.distributed
@pytest.mark.slow
def test_every_rank_stops_at_the_same_step_under_ddp(broken, tokenizer_dir, tmp_path):
    ranks = run(tmp_path, broken, tokenizer_dir, "--devices", "2", "--workers", "2")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["outcome"] for r in ranks} == {"DataQualityError"}
    assert ranks[0]["step"] == ranks[1]["step"] and ranks[0]["message"] == ranks[1]["message"]
    assert "2 rank(s)" in ranks[0]["message"]
