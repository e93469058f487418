"""`make demo` end to end: the toy VLM beats chance on MLE-Bench while its grey-image twin does not.

About 11 minutes on the 2-core CPU machine, so it runs in CI (`CI=true`, as `.ci/run` sets) or with `VISPRIOR_E2E=1`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(
    os.environ.get("CI") != "true" and os.environ.get("VISPRIOR_E2E") != "1",
    reason="~11 min end to end: runs in CI, or locally with VISPRIOR_E2E=1",
)
def test_demo_chain_beats_chance_on_mle_bench(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "visprior.demo", "--runs", str(tmp_path)], cwd=ROOT, check=True)
    metrics = json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]["mle_bench"]["metrics"]
    for level in ("small", "medium", "large"):
        assert metrics[f"ll/{level}"]["n"] == 200
        assert metrics[f"ll/{level}"]["ci95"][0] > 0.25, (level, metrics[f"ll/{level}"])  # clearly above chance
        low, high = metrics[f"blind/ll/{level}"]["ci95"]
        assert low < 0.25 < high, (level, metrics[f"blind/ll/{level}"])  # the gain comes from the image
