"""The report from results.json alone: per-arm statistics over seeds, the claim's verdict, the wording by scale, plots,
and `visprior report DIR`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from visprior.report import (
    VERDICTS,
    arm_summary,
    chance_line,
    claim_summary,
    claims_table,
    render_report,
    report_command,
    stage_speed_table,
    t_quantile,
)


def doc(
    values: dict[str, list[float]], *, scale: str = "toy", claim: dict | None = None, n: int = 200, items: float = 5.0
) -> dict:
    """A reproduce results document with one metric (accuracy in %) measured for each arm and seed, each evaluation's
    interval over items +-`items`."""
    seeds = list(range(max(len(v) for v in values.values())))
    measurements = {
        arm: {"acc": {str(s): {"value": v, "n": n, "ci95": [v - items, v + items], "ci_method": "wilson"}
                      for s, v in zip(seeds, vs)}}
        for arm, vs in values.items()
    }  # fmt: skip
    return {
        "kind": "visprior.reproduce",
        "complete": True,
        "visprior_version": "test",
        "recipe": {
            "name": "test/finding",
            "path": "recipes/test/finding.yaml",
            "command": "visprior reproduce test/x",
            "finding": "b beats a",
            "paper": "vila",
            "source": "Table 1",
            "notes": "",
            "citation": {
                "title": "A paper",
                "authors": ["Lin", "Yin", "Ping"],
                "year": 2024,
                "venue": "CVPR",
                "arxiv": "arXiv:2312.07533",
            },
        },  # fmt: skip
        "scale": {"name": scale, "description": "", "files": []},
        "seeds": seeds,
        "arms": [{"name": a, "label": a, "x": None, "description": ""} for a in values],
        "metrics": {
            "acc": {
                "label": "accuracy",
                "unit": "%",
                "higher_is_better": True,
                "evaluation": "sft",
                "sources": ["vqa/all"],
                "combine": "one",
                "paper_metric": "",
            }
        },  # fmt: skip
        "reported": {
            "a": {"acc": {"value": 50.0, "from": "table", "where": "Table 1"}},
            "b": {"acc": {"value": 61.2, "from": "read off figure", "where": "Figure 2"}},
        },  # fmt: skip
        "extra_rows": {},
        "claims": [
            claim
            or {
                "metric": "acc",
                "compare": ["b", "a"],
                "direction": "increase",
                "tolerance": 2.0,
                "paper": 11.2,
                "paper_mark": "table",
                "statement": "b is better",
            }
        ],  # fmt: skip
        "evaluations": {},
        "host": {"cpu": "test cpu", "cores": 2, "torch": "x"},
        "wall_time_s": 60.0,
        "runs": [
            {"arm": "a", "seed": 0, "stage": "sft", "key": "k", "entry": "e", "status": "ran", "wall_time_s": 60.0}
        ],
        "measurements": measurements,
    }


def test_arm_summary_is_mean_spread_and_a_t_interval_over_seeds() -> None:
    s = arm_summary(doc({"a": [40.0, 44.0, 42.0], "b": [50.0]}), "a", "acc")
    assert s["mean"] == pytest.approx(42.0) and (s["min"], s["max"]) == (40.0, 44.0) and s["k"] == 3
    assert s["sd"] == pytest.approx(2.0)
    half = 4.303 * 2.0 / math.sqrt(3)  # t(0.975, df=2)
    assert s["ci95"] == pytest.approx([42.0 - half, 42.0 + half])
    assert s["ci_method"] == "t over 3 seeds"


def test_one_seed_shows_the_evaluations_interval_over_items() -> None:
    s = arm_summary(doc({"a": [40.0], "b": [50.0]}), "a", "acc")
    assert s["ci95"] == [35.0, 45.0] and "over items, 1 seed" in s["ci_method"]


def test_t_quantiles() -> None:
    assert t_quantile(2) == pytest.approx(4.303) and t_quantile(11) == pytest.approx(2.228)
    assert t_quantile(100) == pytest.approx(1.96, abs=1e-3)


@pytest.mark.parametrize(
    ("a", "b", "direction", "verdict"),
    [
        ([40.0, 41.0, 42.0], [45.0, 47.0, 48.0], "increase", VERDICTS[0]),  # every seed +5..+6: interval above 0
        ([40.0, 41.0, 42.0], [35.0, 36.0, 36.0], "increase", VERDICTS[1]),  # clearly below 0
        ([40.0, 41.0, 42.0], [42.0, 39.0, 44.0], "increase", VERDICTS[2]),  # seeds disagree: interval holds 0
        ([40.0, 41.0, 42.0], [35.0, 36.0, 36.0], "decrease", VERDICTS[0]),
        ([40.0, 41.0, 42.0], [40.5, 41.0, 42.5], "none", VERDICTS[0]),  # within +-2
        ([40.0, 41.0, 42.0], [50.0, 51.0, 52.5], "none", VERDICTS[1]),  # far outside +-2
    ],
)
def test_claim_verdicts_on_seed_paired_differences(a, b, direction, verdict) -> None:
    d = doc({"a": a, "b": b}, items=0.5)  # the seeds' spread, not the items', sets these intervals
    claim = {**d["claims"][0], "direction": direction}
    s = claim_summary(d, claim)
    diffs = [y - x for x, y in zip(a, b)]
    assert s["mean"] == pytest.approx(sum(diffs) / 3) and s["values"] == pytest.approx(diffs)
    assert s["verdict"] == verdict, s
    assert s["k"] == 3 and s["ci_method"] == "paired t over 3 seeds"


def test_seeds_that_agree_exactly_do_not_make_a_zero_width_interval() -> None:
    """Two seeds both +1.17 (14 of 1,200 items): sd 0 over seeds, but each evaluation has its own sampling error."""
    d = doc({"a": [35.0, 36.5], "b": [36.17, 37.67]})
    s = claim_summary(d, d["claims"][0])
    half = 1.96 * math.sqrt((2 * (5.0 / 1.96) ** 2) / 2)  # the items' error of a mean over 2 seeds
    assert s["ci95"] == pytest.approx([1.17 - half, 1.17 + half], abs=1e-6)
    assert s["verdict"] == VERDICTS[2] and s["agree"] == 2 and "items' error" in s["ci_method"]


def test_one_seed_claim_uses_the_items_intervals() -> None:
    s = claim_summary(doc({"a": [40.0], "b": [60.0]}), doc({"a": [40.0], "b": [60.0]})["claims"][0])
    half = 1.96 * math.sqrt(2) * 5.0 / 1.96  # two independent +-5 intervals
    assert s["ci95"] == pytest.approx([20.0 - half, 20.0 + half], abs=1e-6)
    assert s["verdict"] == VERDICTS[0] and s["agree"] == 1


def test_toy_wording_speaks_of_trends_and_paper_scale_checks_the_number(tmp_path: Path) -> None:
    toy = doc({"a": [40.0, 41.0, 42.0], "b": [45.0, 47.0, 48.0]})
    text = render_report(toy, tmp_path / "toy").read_text()
    assert "toy world" in text and "only the direction" in text and "not the paper's" in text
    assert "within ±" not in claims_table(toy)
    paper = doc({"a": [50.0], "b": [60.5]}, scale="paper")
    table = claims_table(paper)
    assert "within ±2 of the paper's +11.20 (-0.70)" in table, table
    far = doc({"a": [50.0], "b": [52.0]}, scale="paper", n=10_000)
    assert "outside ±2 of the paper's" in claims_table(far)


def test_report_has_tables_paper_values_marked_and_plots(tmp_path: Path) -> None:
    d = doc({"a": [40.0, 41.0, 42.0], "b": [45.0, 47.0, 48.0]})
    text = render_report(d, tmp_path).read_text()
    assert "| a | 41.0 | 40.0–42.0, sd 1.0 |" in text, text
    assert "50.0 (table)" in text and "≈61.2 (read off figure)" in text
    assert "**reproduced trend**" in text and "3/3" in text
    assert (tmp_path / "acc.png").stat().st_size > 1000 and "![accuracy](acc.png)" in text


def test_the_report_says_which_arms_are_above_chance_and_when_none_is(tmp_path: Path) -> None:
    d = doc({"a": [24.0, 25.5, 26.0], "b": [40.0, 41.0, 42.0], "c": [1.0, 2.0, 1.5]})
    assert chance_line(d, "acc") is None  # no chance level given: nothing said
    d["metrics"]["acc"]["chance"] = 25.0
    line = chance_line(d, "acc")
    assert line.startswith("Chance (a guess) scores 25.0 %:"), line
    assert "a at chance (its interval holds it)" in line and "b above chance" in line and "c below chance" in line
    assert "No arm is above chance" not in line
    text = render_report(d, tmp_path).read_text()
    assert line in text and text.index("| c | 1.5 |") < text.index(line) < text.index("![accuracy]")
    d["measurements"].pop("b")
    assert chance_line(d, "acc").endswith("No arm is above chance: at toy scale this measure shows no ability yet.")
    one_seed = doc({"a": [27.0]}, items=1.5)  # one seed: the interval over items decides
    one_seed["metrics"]["acc"]["chance"] = 25.0
    assert "a above chance" in chance_line(one_seed, "acc")


def test_a_sweep_is_plotted_as_a_line(tmp_path: Path) -> None:
    d = doc({"r0": [40.0, 41.0], "r50": [44.0, 45.0], "r100": [43.0, 46.0]})
    for arm, x in zip(d["arms"], (0, 50, 100)):
        arm["x"] = x
    d["reported"] = {"r0": {"acc": {"value": 38.8, "from": "read off figure", "where": ""}}}
    d["claims"][0]["compare"] = ["r50", "r0"]
    render_report(d, tmp_path)
    assert (tmp_path / "acc.png").stat().st_size > 1000


def test_the_runs_section_gives_each_stage_its_wall_time_throughput_and_mfu(tmp_path: Path) -> None:
    d = doc({"a": [40.0], "b": [45.0]})
    run = {"seed": 0, "entry": "e", "status": "ran", "global_step": 10}
    d["runs"] = [
        {**run, "arm": "a", "stage": "pretrain", "key": "p", "wall_time_s": 90.0, "tokens_per_s": 3000.0, "mfu": 0.2},
        {
            **run,
            "arm": "b",
            "stage": "pretrain",
            "key": "p",
            "wall_time_s": 90.0,
            "tokens_per_s": 3000.0,
            "mfu": 0.2,
            "status": "cached",
        },  # shared with arm a: counted once
        {**run, "arm": "a", "stage": "sft", "key": "s1", "wall_time_s": 120.0, "tokens_per_s": 4000.0, "mfu": 0.3},
        {**run, "arm": "b", "stage": "sft", "key": "s2", "wall_time_s": 180.0, "tokens_per_s": 2000.0, "mfu": 0.4},
        {**run, "arm": "a", "stage": "align", "key": "al", "wall_time_s": 30.0},  # recorded before throughput was kept
    ]
    table = stage_speed_table(d)
    assert "| pretrain | 1 | 1.5 min | 3,000 | 20.0 % |" in table, table
    assert "| sft | 2 | 2.5 min | 3,000 | 35.0 % |" in table, table
    assert "| align | 1 | 0.5 min | – | – |" in table, table
    assert table in render_report(d, tmp_path).read_text()


def test_visprior_report_rerenders_from_results_json_alone(tmp_path: Path, capsys) -> None:
    from visprior.cli import main

    d = doc({"a": [40.0, 41.0, 42.0], "b": [45.0, 47.0, 48.0]})
    (tmp_path / "results.json").write_text(json.dumps(d))
    main(["report", str(tmp_path)])
    out = capsys.readouterr().out
    assert "reproduced trend" in out and (tmp_path / "report.md").is_file() and (tmp_path / "acc.png").is_file()
    assert report_command(str(tmp_path)) == tmp_path / "report.md"


def test_visprior_report_on_a_folder_without_results_is_one_line(tmp_path: Path, capsys) -> None:
    from visprior.cli import main

    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "results.json not found" in err
