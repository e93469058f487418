"""Preemption and kills on a real training process: stop at step K, resume with ckpt_path="last", and the per-step losses,
the data position and the final weights equal an uninterrupted run bit for bit (0 and 2 loader workers, with a scheduler
that reads ``estimated_stepping_batches``, Lightning issue 20550)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"
N, K = 8, 3


def launch(root: Path, tag: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(SCRIPT), "--root", str(root), "--tag", tag, "--max-steps", str(N), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(root: Path, tag: str, *extra: str) -> dict:
    proc = launch(root, tag, *extra)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    return json.loads((root / f"losses-{tag}.json").read_text())


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted run of N steps (0 workers; TinyStream's sequence does not depend on the worker count)."""
    root = tmp_path_factory.mktemp("reference")
    return run(root, "full")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_and_resume_is_exact(tmp_path: Path, reference: dict, workers: int, sig: signal.Signals) -> None:
    if sig == signal.SIGUSR1 and workers == 2:
        pytest.skip("SIGUSR1 takes the same path as SIGTERM; one worker count is enough")
    proc = launch(tmp_path, "first", "--workers", str(workers), "--pause-at", str(K))
    wait_for(tmp_path / "paused", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"preemption ({sig.name})" in out
    first = json.loads((tmp_path / "losses-first.json").read_text())
    assert first["stopped_by_preemption"].endswith("last.ckpt")
    assert sorted(map(int, first["losses"])) == list(range(K + 1))  # step K ran, then the stop

    second = run(tmp_path, "second", "--workers", str(workers), "--resume")
    assert sorted(map(int, second["losses"])) == list(range(K + 1, N))
    merged = {**first["losses"], **second["losses"]}
    assert merged == reference["losses"]  # floats compared exactly
    assert {**first["seen"], **second["seen"]} == reference["seen"]  # the data position resumed, not restarted
    assert second["weight"] == reference["weight"]


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_after_checkpoint_then_resume(tmp_path: Path, reference: dict, workers: int) -> None:
    proc = launch(tmp_path, "first", "--workers", str(workers), "--every", "2", "--pause-at", "5")
    wait_for(tmp_path / "paused", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    second = run(tmp_path, "second", "--workers", str(workers), "--resume")
    assert sorted(map(int, second["losses"])) == list(range(4, N))  # last.ckpt was saved after step 4
    assert second["losses"] == {k: v for k, v in reference["losses"].items() if int(k) >= 4}
    assert second["seen"] == {k: v for k, v in reference["seen"].items() if int(k) >= 4}
    assert second["weight"] == reference["weight"]


@pytest.mark.distributed
def test_ddp_signal_to_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """SIGTERM reaches rank 0 only; the all-reduced flag stops rank 1 at the same step, and resume is exact."""
    (tmp_path / "ref").mkdir()
    ref = run(tmp_path / "ref", "full", "--devices", "2")
    proc = launch(tmp_path, "first", "--devices", "2", "--pause-at", str(K))
    wait_for(tmp_path / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    first = {r: json.loads((tmp_path / f"losses-first{r}.json").read_text()) for r in ("", "-rank1")}
    assert first[""]["stopped_at"] == first["-rank1"]["stopped_at"] == K + 1
    second = run(tmp_path, "second", "--devices", "2", "--resume")
    assert {**first[""]["losses"], **second["losses"]} == ref["losses"]
    assert second["weight"] == ref["weight"]
