"""Confidence intervals on known cases, accumulation, and the results.json round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visprior.eval.results import (
    Accumulator,
    DatasetInfo,
    TaskResult,
    bootstrap_interval,
    format_table,
    macro_average,
    results_dict,
    wilson_interval,
    write_results,
)


def test_wilson_known_cases():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=5e-4) and hi == pytest.approx(0.9433, abs=5e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=5e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_is_seeded_and_covers_the_mean():
    v = np.random.default_rng(0).normal(3.0, 1.0, size=200)
    a, b = bootstrap_interval(v, seed=1), bootstrap_interval(v, seed=1)
    assert a == b
    assert a[0] < v.mean() < a[1]
    assert a[1] - a[0] == pytest.approx(2 * 1.96 / np.sqrt(200), rel=0.25)


def test_accumulator_and_results_json(tmp_path):
    acc = Accumulator()
    for i in range(10):
        acc.update("small", float(i < 8))
        acc.update("large", float(i < 5))
    small, large = acc.accuracy("small"), acc.accuracy("large")
    assert (small.value, small.n) == (0.8, 10) and large.value == 0.5
    avg = macro_average([small, large])
    assert avg.value == pytest.approx(0.65)
    data = tmp_path / "d"
    data.mkdir()
    (data / "x.txt").write_text("hello")
    info = DatasetInfo.of("toy", data, 10)
    res = results_dict(
        [TaskResult("mle_bench", info, {"small": small, "average": avg})],
        model="m",
        checkpoint=None,
        seed=0,
        wall_time_s=1.0,
    )
    path = write_results(res, tmp_path / "out")
    back = json.loads(path.read_text())
    assert back["tasks"]["mle_bench"]["metrics"]["small"]["ci95"][0] == pytest.approx(0.4902, abs=5e-4)
    assert back["tasks"]["mle_bench"]["dataset"]["sha256"] == info.sha256 and len(info.sha256) == 64
    assert "| mle_bench | small | 0.8 | 10 |" in format_table(back)
    (data / "x.txt").write_text("hellO")
    assert DatasetInfo.of("toy", data, 10).sha256 != info.sha256
