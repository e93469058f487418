"""`make demo` end to end: the main job's recipe at toy scale, one seed, through `visprior reproduce`.

It asserts the result's structure only. No learned number is asserted until one has held on at least three seeds: a toy
result is one draw, and the same seed trains to different numbers on different CPUs. It takes tens of minutes on the
2-core CPU machine, so it runs in CI (`CI=true`, as `.ci/run` sets) or with `VISPRIOR_SLOW=1`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from visprior import demo
from visprior.recipe import find_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_runs_its_recipe_with_one_seed(monkeypatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr("visprior.reproduce.reproduce", lambda *a, **k: calls.append((a, k)))
    demo.main(["--out", str(tmp_path)])
    assert calls == [((demo.RECIPE,), {"scale": "toy", "seeds": "1", "out": str(tmp_path), "cache": None})]
    recipe = load_recipe(find_recipe(demo.RECIPE))
    assert {"text_qa", "mle_gen", "mle_ll"} <= set(recipe.metrics)


@pytest.mark.long
@pytest.mark.timeout(7200)
def test_demo_recipe_at_toy_scale(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "visprior.demo", "--out", str(out), "--cache", str(tmp_path / "cache")]
    subprocess.run(cmd, cwd=ROOT, check=True)
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] and doc["seeds"] == [0] and (out / "report.md").is_file()
    m = {arm: {k: v["0"] for k, v in per_arm.items()} for arm, per_arm in doc["measurements"].items()}
    metrics = load_recipe(find_recipe(demo.RECIPE)).metrics
    for arm in ("visual", "reblend"):
        for name, metric in metrics.items():  # results.json holds display units: accuracies in %, so in [0, 100]
            assert metric.unit == "%", name
            assert m[arm][name]["n"] > 0 and 0.0 <= m[arm][name]["value"] <= 100.0, (arm, name)
