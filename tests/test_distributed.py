"""DDP and the FSDP2 fragment on 2 CPU processes (gloo) reach the single-process losses on the same global batches
(SGD, so the gradient's scale matters; ranks with 28 and 7 supervised tokens, so the loss must be weighted per token,
not per rank), and under FSDP2 every transformer block of the LM and of the vision tower is its own FSDP unit (plus the
root) and is recomputed in backward (activation checkpointing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "dist_stage.py"


def launch(strategy: str, tokenizer_dir: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(SCRIPT), "--strategy", strategy, "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tokenizer_dir, tmp_path_factory) -> dict:
    return launch("single", tokenizer_dir, tmp_path_factory.mktemp("single") / "out.json")


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(strategy, single, tokenizer_dir, tmp_path):
    result = launch(strategy, tokenizer_dir, tmp_path / "out.json")
    assert result["world_size"] == 2
    assert len(result["losses"]) == len(single["losses"]) == 3
    assert result["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-5)
    assert len(set(single["losses"])) == 3  # SGD moved the weights at every step
    # per step: each of the 2 LM layers and the first 2 of 3 tower layers once (feature_layer -2: the last never runs)
    assert single["block_calls"] == [3, 3, 3, 3, 0]
    if strategy == "fsdp":
        assert result["blocks"] == 5  # 2 LM decoder layers + 3 SigLIP encoder layers
        assert result["sharded_blocks"] == 5 and result["root_sharded"]
        assert result["block_calls"] == [6, 6, 6, 6, 0]  # checkpointed: every block that runs is recomputed in backward
    else:
        assert result["sharded_blocks"] == 0 and result["block_calls"] == [3, 3, 3, 3, 0]
