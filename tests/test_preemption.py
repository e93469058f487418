"""Preemption and kills on a real training process: stop at step K, resume with ckpt_path="last", and the per-step losses,
the data position, the final weights and the robustness callbacks' counts equal an uninterrupted run bit for bit (0 and 2
loader workers, with a scheduler that reads ``estimated_stepping_batches``, Lightning issue 20550). The module draws a
dropout mask every step (so the resumed losses match only if the RNG state comes back), two batches hold a NaN (the
NonFiniteGuard's count must survive the stop) and every third batch reports skipped samples (so must DataHealth's)."""

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
NAN_AT = (2, 5)
"""Batch numbers holding a NaN: steps 2 and 5 in one process; under DDP (rank r reads 2i + r) rank 0's step 1 and rank
1's step 2, a non-finite loss on one rank only."""
STREAM = ("--nan-at", ",".join(map(str, NAN_AT)), "--skips-every", "3")


def trained_steps(steps: range) -> list[int]:
    return [s for s in steps if s not in NAN_AT]


def launch(root: Path, tag: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(SCRIPT), "--root", str(root), "--tag", tag, "--max-steps", str(N), *STREAM, *extra]
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
    ref = run(root, "full")
    assert sorted(map(int, ref["losses"])) == trained_steps(range(N))
    assert ref["guard"] == {"total_skipped": len(NAN_AT), "consecutive": 0}
    assert ref["skips"] == {"src_a": {"bad_image": 3}, "src_b": {"too_long": 6}}  # batches 0, 3, 6
    return ref


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
    assert sorted(map(int, first["losses"])) == trained_steps(range(K + 1))  # step K ran, then the stop
    assert first["guard"]["total_skipped"] == 1

    second = run(tmp_path, "second", "--workers", str(workers), "--resume")
    assert sorted(map(int, second["losses"])) == trained_steps(range(K + 1, N))
    merged = {**first["losses"], **second["losses"]}
    assert merged == reference["losses"]  # floats compared exactly
    assert {**first["seen"], **second["seen"]} == reference["seen"]  # the data position resumed, not restarted
    assert second["weight"] == reference["weight"]
    assert (second["guard"], second["skips"]) == (reference["guard"], reference["skips"])  # counts went on


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_after_checkpoint_then_resume(tmp_path: Path, reference: dict, workers: int) -> None:
    proc = launch(tmp_path, "first", "--workers", str(workers), "--every", "2", "--pause-at", "5")
    wait_for(tmp_path / "paused", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    second = run(tmp_path, "second", "--workers", str(workers), "--resume")
    assert sorted(map(int, second["losses"])) == trained_steps(range(4, N))  # last.ckpt was saved after step 4
    assert second["losses"] == {k: v for k, v in reference["losses"].items() if int(k) >= 4}
    assert second["seen"] == {k: v for k, v in reference["seen"].items() if int(k) >= 4}
    assert second["weight"] == reference["weight"]
    assert (second["guard"], second["skips"]) == (reference["guard"], reference["skips"])  # counts went on


def ranks(root: Path, tag: str) -> list[dict]:
    return [json.loads((root / f"losses-{tag}{suffix}.json").read_text()) for suffix in ("", "-rank1")]


@pytest.mark.distributed
def test_ddp_signal_to_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """SIGTERM reaches rank 0 only; the all-reduced flag stops rank 1 at the same step, and resume is exact on both ranks.

    The ranks read different batches (rank r: 2i + r) and draw different dropout masks; a NaN reaches rank 0 alone at
    step 1 and rank 1 alone at step 2, and both ranks skip both steps (the all-reduced decision), without a hang."""
    (tmp_path / "ref").mkdir()
    run(tmp_path / "ref", "full", "--devices", "2")
    ref = ranks(tmp_path / "ref", "full")
    for r, rec in enumerate(ref):
        assert sorted(map(int, rec["losses"])) == [0, 3, 4, 5, 6, 7]  # steps 1 and 2 skipped on both ranks
        assert rec["seen"] == {str(s): 2 * s + r for s in (0, 3, 4, 5, 6, 7)}  # each rank its own batches
        assert rec["guard"] == {"total_skipped": 2, "consecutive": 0}
    assert ref[0]["weight"] == ref[1]["weight"]  # the replicas stayed equal
    assert ref[0]["losses"]["0"] != ref[1]["losses"]["0"]

    proc = launch(tmp_path, "first", "--devices", "2", "--pause-at", str(K))
    wait_for(tmp_path / "paused", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    first = ranks(tmp_path, "first")
    assert first[0]["stopped_at"] == first[1]["stopped_at"] == K + 1
    run(tmp_path, "second", "--devices", "2", "--resume")
    second = ranks(tmp_path, "second")
    for r in (0, 1):
        assert {**first[r]["losses"], **second[r]["losses"]} == ref[r]["losses"], f"rank {r}"
        assert {**first[r]["seen"], **second[r]["seen"]} == ref[r]["seen"], f"rank {r}"
        assert second[r]["weight"] == ref[r]["weight"], f"rank {r}"
        assert second[r]["guard"] == ref[r]["guard"], f"rank {r}"
        assert second[r]["skips"] == ref[r]["skips"], f"rank {r}"  # each rank's own skip counts came back
