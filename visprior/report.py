"""The report of a recipe run: `<out>/report.md` and PNG plots, from `<out>/results.json` alone (`visprior report DIR`).

`results.json` (written by `visprior reproduce`, see `results_document`) holds what the report needs and nothing it must
recompute from the runs: the recipe's finding, citation, reported numbers and claims, the scale and seeds, every
measurement per arm, metric and seed (value in the metric's display unit, sample count, the evaluation's own 95 %
interval), and which stage runs ran or came from the cache, with their wall times, tokens/s and MFU.

Statistics. Per arm and metric: the mean over seeds, the seeds' spread (min-max, and the standard deviation), and a 95 %
interval over seeds (Student t with k-1 degrees of freedom; with one seed there is none, and the evaluation's own
interval over items is shown instead, labelled so). A claim `a - b` is tested on the seed-paired differences (the arms of
one seed share their cached stages): mean, t interval (never narrower than the evaluation items' own error of the mean
difference: a few seeds can agree exactly by chance), and how many seeds agree in sign. Verdict: `reproduced trend` when
the interval lies on the claimed side of 0 (for a claim of no difference: inside +-tolerance), `not reproduced` when it
lies entirely on the other side (outside the tolerance), else `inconclusive (intervals overlap)`. At toy and mini scale
only the direction is compared: the toy world's numbers are not the paper's and the wording never presents them so.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from visprior.eval.results import Z95, wilson_interval

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
"""Two-sided 95 % Student t quantiles by degrees of freedom (no scipy here); between entries the next smaller df is used
(a slightly wider interval), beyond 30 the normal quantile."""
SCALE_WORDING = {
    "smoke": "smoke: two optimizer steps per stage on the smallest toy world, a test of the machinery. The numbers mean "
    "nothing; not even a trend.",
    "toy": "toy: the procedurally generated toy world on a CPU, models of a few million parameters. These numbers "
    "measure the toy world, not the paper's benchmarks: only the direction of a difference is compared with the paper.",
    "mini": "mini: one GPU node, models of a few hundred million parameters on stand-in datasets. A trend check at "
    "reduced size: the values are not the paper's.",
    "paper": "paper: the paper's models and datasets (as the scale points at them). Values are comparable with the "
    "paper's, within the differences its setup leaves open.",
}
VERDICTS = ("reproduced trend", "not reproduced", "inconclusive (intervals overlap)")


def t_quantile(df: int) -> float:
    if df > 30:
        return Z95
    return T975[max(k for k in T975 if k <= df)]


# ------------------------------------------------------------------------------------------------ results.json


def results_document(plan: Any, host: dict[str, Any]) -> dict[str, Any]:
    """The start of a reproduce run's results.json: everything the report needs besides the measurements."""
    from visprior.eval.results import visprior_version

    r, s = plan.recipe, plan.scale
    return {
        "schema_version": 1,
        "kind": "visprior.reproduce",
        "visprior_version": visprior_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "recipe": {
            "name": r.name,
            "path": os.path.relpath(r.path, r.root),
            "command": r.command,
            "finding": r.finding,
            "paper": r.paper,
            "citation": r.citation,
            "source": r.source,
            "notes": r.notes,
        },
        "scale": {"name": s.name, "description": s.description, "files": [os.path.relpath(f, r.root) for f in s.files]},
        "seeds": plan.seeds,
        "arms": [
            {"name": a, "label": r.arms[a].label, "x": r.arms[a].x, "description": r.arms[a].description}
            for a in plan.arms
        ],  # fmt: skip
        "metrics": {
            name: {
                "label": m.label,
                "unit": m.unit,
                "higher_is_better": m.higher_is_better,
                "evaluation": m.evaluation,
                "sources": m.sources,
                "combine": m.combine,
                "paper_metric": m.paper_metric,
                "chance": m.chance,
            }
            for name, m in r.metrics.items()
        },  # fmt: skip
        "reported": {arm: {m: _reported(v) for m, v in values.items()} for arm, values in r.reported.items()},
        "extra_rows": {
            row: {"note": e["note"], "values": {m: _reported(v) for m, v in e["values"].items()}}
            for row, e in r.extra_rows.items()
        },  # fmt: skip
        "claims": [
            {
                "metric": c.metric,
                "compare": list(c.compare),
                "direction": c.direction,
                "tolerance": c.tolerance,
                "paper": c.paper,
                "paper_mark": c.paper_mark,
                "statement": c.statement,
            }
            for c in r.claims
        ],  # fmt: skip
        "evaluations": {
            st: {"tasks": e.tasks, "options": plan.scale.eval | e.options} for st, e in r.evaluations.items()
        },
        "host": host,
        "wall_time_s": 0.0,
        "runs": [],
        "measurements": {},
    }


def _reported(v: Any) -> dict[str, Any]:
    return {"value": v.value, "from": v.mark, "where": v.where}


def measurement(evaluated: dict[str, Any], metric: Any, path: Path) -> dict[str, Any]:
    """One metric of one evaluation's results.json, in display units, with its interval over items."""
    values = []
    for source in metric.sources:
        task, name = source.split("/", 1)
        try:
            values.append(evaluated["tasks"][task]["metrics"][name])
        except KeyError:
            have = sorted(evaluated.get("tasks", {}).get(task, {}).get("metrics", {}))
            raise KeyError(f"{path}: no metric {source!r} for {metric.name!r}; {task} has {have}") from None
    f = metric.factor
    if metric.combine == "one":
        v = values[0]
        return {"value": v["value"] * f, "n": v["n"], "ci95": [x * f for x in v["ci95"]], "ci_method": v["ci_method"]}
    n = sum(v["n"] for v in values)
    if metric.combine == "pool":  # accuracies: successes add up; Wilson on the pooled count
        successes = sum(v["value"] * v["n"] for v in values)
        lo, hi = wilson_interval(successes, n)
        return {"value": successes / max(n, 1) * f, "n": n, "ci95": [lo * f, hi * f], "ci_method": "wilson (pooled)"}
    mean = sum(v["value"] for v in values) / len(values)
    half = math.sqrt(sum(((v["ci95"][1] - v["ci95"][0]) / 2) ** 2 for v in values)) / len(values)
    return {"value": mean * f, "n": n, "ci95": [(mean - half) * f, (mean + half) * f], "ci_method": "mean of intervals"}


def write_results_document(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------------ statistics


def arm_summary(doc: dict[str, Any], arm: str, metric: str) -> dict[str, Any] | None:
    """Mean over seeds, spread, and the 95 % interval (t over seeds, or the items' interval with one seed)."""
    per_seed = doc["measurements"].get(arm, {}).get(metric, {})
    if not per_seed:
        return None
    seeds = sorted(per_seed, key=int)
    values = np.array([per_seed[s]["value"] for s in seeds], dtype=float)
    k = len(values)
    mean = float(values.mean())
    sd = float(values.std(ddof=1)) if k > 1 else 0.0
    if k > 1:
        half = t_quantile(k - 1) * sd / math.sqrt(k)
        ci, method = [mean - half, mean + half], f"t over {k} seeds"
    else:
        ci, method = list(per_seed[seeds[0]]["ci95"]), f"{per_seed[seeds[0]]['ci_method']} over items, 1 seed"
    return {"mean": mean, "sd": sd, "min": float(values.min()), "max": float(values.max()), "k": k, "ci95": ci,
            "ci_method": method, "values": values.tolist(), "seeds": [int(s) for s in seeds],
            "n": per_seed[seeds[0]]["n"]}  # fmt: skip


def _items_se(entry: dict[str, Any]) -> float:
    """The standard error one evaluation's 95 % interval over items implies."""
    lo, hi = entry["ci95"]
    return (hi - lo) / (2 * Z95)


def claim_summary(doc: dict[str, Any], claim: dict[str, Any]) -> dict[str, Any] | None:
    """The seed-paired difference a - b, its interval, the seeds that agree, and the verdict."""
    a, b = claim["compare"]
    ma = doc["measurements"].get(a, {}).get(claim["metric"], {})
    mb = doc["measurements"].get(b, {}).get(claim["metric"], {})
    seeds = sorted(set(ma) & set(mb), key=int)
    if not seeds:
        return None
    diffs = np.array([ma[s]["value"] - mb[s]["value"] for s in seeds], dtype=float)
    k = len(diffs)
    mean = float(diffs.mean())
    if k > 1:
        half = t_quantile(k - 1) * float(diffs.std(ddof=1)) / math.sqrt(k)
        method = f"paired t over {k} seeds"
        # a few seeds can agree to the last item by chance (two seeds, both +14 of 1,200 items: sd 0); the interval is
        # never narrower than the evaluation items' own error of the mean difference
        var = np.mean([_items_se(ma[s]) ** 2 + _items_se(mb[s]) ** 2 for s in seeds])
        items_half = Z95 * math.sqrt(float(var) / k)
        if items_half > half:
            half, method = items_half, f"{method}, no narrower than the items' error"
    else:
        half = Z95 * math.sqrt(_items_se(ma[seeds[0]]) ** 2 + _items_se(mb[seeds[0]]) ** 2)
        method = "items of 1 seed (normal)"
    lo, hi = mean - half, mean + half
    direction, tol = claim["direction"], claim.get("tolerance")
    if direction == "none":
        agree = int(sum(abs(d) <= tol for d in diffs))
        verdict = VERDICTS[0] if -tol <= lo and hi <= tol else VERDICTS[1] if lo > tol or hi < -tol else VERDICTS[2]
    else:
        sign = 1.0 if direction == "increase" else -1.0
        agree = int(sum(sign * d > 0 for d in diffs))
        low, high = sorted((sign * lo, sign * hi))
        verdict = VERDICTS[0] if low > 0 else VERDICTS[1] if high < 0 else VERDICTS[2]
    return {"mean": mean, "ci95": [lo, hi], "ci_method": method, "k": k, "agree": agree, "verdict": verdict,
            "values": diffs.tolist()}  # fmt: skip


def paper_match(claim: dict[str, Any], summary: dict[str, Any]) -> str:
    """At paper scale: is the measured difference within the claim's tolerance of the paper's?"""
    if claim.get("paper") is None or claim.get("tolerance") is None or claim["direction"] == "none":
        return ""
    gap = summary["mean"] - claim["paper"]
    ok = abs(gap) <= claim["tolerance"]
    return f"{'within' if ok else 'outside'} ±{claim['tolerance']:g} of the paper's {claim['paper']:+.2f} ({gap:+.2f})"


# ------------------------------------------------------------------------------------------------ text


def _num(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3g}" if unit == "ppl" and abs(x) >= 100 else f"{x:.2f}" if unit == "ppl" else f"{x:.1f}"


def _arm_label(doc: dict[str, Any], arm: str) -> str:
    info = next((a for a in doc["arms"] if a["name"] == arm), {"label": arm})
    return arm if info["label"] == arm else f"{arm}: {info['label']}"


def _paper_cell(doc: dict[str, Any], arm: str, metric: str) -> str:
    v = doc["reported"].get(arm, {}).get(metric)
    if not v:
        return "–"
    approx = "≈" if v["from"] == "read off figure" else ""
    return f"{approx}{_num(v['value'], doc['metrics'][metric]['unit'])} ({v['from']})"


def metric_table(doc: dict[str, Any], metric: str) -> str:
    m = doc["metrics"][metric]
    scale = doc["scale"]["name"]
    unit = f" ({m['unit']})" if m["unit"] else ""
    k = len(doc["seeds"])
    head = [f"| arm | {scale}: mean of {k} seed(s){unit} | seeds' spread (min–max, sd) | 95 % interval | paper |",
            "|---|---:|---|---|---|"]  # fmt: skip
    lines = list(head)
    for arm in (a["name"] for a in doc["arms"]):
        s = arm_summary(doc, arm, metric)
        if s is None:
            lines.append(f"| {_arm_label(doc, arm)} | not measured yet | | | {_paper_cell(doc, arm, metric)} |")
            continue
        spread = (
            f"{_num(s['min'], m['unit'])}–{_num(s['max'], m['unit'])}, sd {_num(s['sd'], m['unit'])}"
            if s["k"] > 1
            else "1 seed"
        )
        ci = f"[{_num(s['ci95'][0], m['unit'])}, {_num(s['ci95'][1], m['unit'])}] ({s['ci_method']})"
        lines.append(
            f"| {_arm_label(doc, arm)} | {_num(s['mean'], m['unit'])} | {spread} | {ci} | {_paper_cell(doc, arm, metric)} |"
        )
    for row, extra in doc.get("extra_rows", {}).items():
        v = extra["values"].get(metric)
        if v:
            approx = "≈" if v["from"] == "read off figure" else ""
            lines.append(
                f"| {row} (not run: {extra['note']}) | – | | | {approx}{_num(v['value'], m['unit'])} ({v['from']}) |"
            )
    return "\n".join(lines)


def chance_line(doc: dict[str, Any], metric: str) -> str | None:
    """Where each arm stands against a guess, by its 95 % interval; None when the metric has no chance level or no
    arm is measured. Says so plainly when no arm is above chance (MLE-Bench's generated letter at toy budgets)."""
    m = doc["metrics"][metric]
    chance = m.get("chance")
    if chance is None:
        return None
    unit = f" {m['unit']}" if m["unit"] else ""
    verdicts = {}
    for arm in (a["name"] for a in doc["arms"]):
        if (s := arm_summary(doc, arm, metric)) is not None:
            lo, hi = s["ci95"]
            verdicts[arm] = "above" if lo > chance else "below" if hi < chance else "at"
    if not verdicts:
        return None
    words = {"above": "above chance", "below": "below chance", "at": "at chance (its interval holds it)"}
    line = f"Chance (a guess) scores {_num(chance, m['unit'])}{unit}: " + "; ".join(
        f"{arm} {words[v]}" for arm, v in verdicts.items()
    )
    if "above" not in verdicts.values():
        line += f". No arm is above chance: at {doc['scale']['name']} scale this measure shows no ability yet"
    return line + "."


def claims_table(doc: dict[str, Any]) -> str:
    scale = doc["scale"]["name"]
    lines = [
        f"| claim | measured a − b ({scale}) | seeds agreeing | paper's a − b | verdict |",
        "|---|---|---|---|---|",
    ]
    for claim in doc["claims"]:
        m = doc["metrics"][claim["metric"]]
        a, b = claim["compare"]
        what = {"increase": "> 0", "decrease": "< 0", "none": f"≈ 0 (±{claim.get('tolerance')})"}[claim["direction"]]
        title = f"{a} − {b} on {m['label']} {what}"
        s = claim_summary(doc, claim)
        paper = (
            "–" if claim.get("paper") is None else f"{claim['paper']:+.2f} ({claim.get('paper_mark') or 'see recipe'})"
        )
        if s is None:
            lines.append(f"| {title} | not measured yet | | {paper} | – |")
            continue
        measured = f"{s['mean']:+.2f} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}] ({s['ci_method']})"
        verdict = s["verdict"]
        if scale == "paper" and (match := paper_match(claim, s)):
            verdict += f"; {match}"
        lines.append(f"| {title} | {measured} | {s['agree']}/{s['k']} | {paper} | **{verdict}** |")
    return "\n".join(lines)


def terminal_summary(doc: dict[str, Any]) -> str:
    """What `visprior reproduce` prints at the end: the claims, then one table per metric."""
    r = doc["recipe"]
    parts = [f"{r['name']} — {r['finding']}", f"scale {SCALE_WORDING.get(doc['scale']['name'], doc['scale']['name'])}",
             "", claims_table(doc)]  # fmt: skip
    for metric, m in doc["metrics"].items():
        parts += ["", m["label"], metric_table(doc, metric)]
        if line := chance_line(doc, metric):
            parts.append(line)
    return "\n".join(parts)


def _citation(doc: dict[str, Any]) -> str:
    c = doc["recipe"]["citation"]
    authors = c.get("authors") or []
    who = f"{authors[0]} et al." if len(authors) > 2 else " and ".join(authors)
    venue = f", {c['venue']}" if c.get("venue") else ""
    return f"*{c.get('title') or doc['recipe']['paper']}* ({who}, {c.get('year')}{venue}; {c.get('arxiv')})"


def runs_section(doc: dict[str, Any]) -> str:
    ran = [x for x in doc["runs"] if x["status"] == "ran"]
    cached = [x for x in doc["runs"] if x["status"] == "cached"]
    unique = {x["key"]: x for x in doc["runs"]}
    compute = sum(x["wall_time_s"] for x in unique.values())
    h = doc.get("host", {})
    lines = [
        f"- wall time of this invocation: {doc['wall_time_s'] / 60:.1f} min ({len(ran)} stage run(s) trained, "
        f"{len(cached)} taken from the cache)",
        f"- compute behind these results: {compute / 60:.1f} min over {len(unique)} distinct stage run(s)",
        f"- host: {h.get('cpu', '?')}, {h.get('cores', '?')} cores, torch {h.get('torch', '?')}; visprior "
        f"{doc.get('visprior_version')}",
        "- stage runs per arm and seed: `runs/<arm>/seed<N>/<stage>` in this folder (links into the cache)",
    ]
    if not doc.get("complete"):
        lines.append("- **incomplete**: the run has not finished; the tables hold the seeds measured so far")
    return "\n".join(lines + ["", stage_speed_table(doc)])


def stage_speed_table(doc: dict[str, Any]) -> str:
    """One row per stage over its distinct runs (arms and seeds that share a cached run count once): wall time, and
    the training throughput and MFU the stage measured over its logged windows (`train/tokens_per_s`, `train/mfu`),
    averaged over the runs. A run recorded before these were kept shows a dash."""
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for run in {x["key"]: x for x in doc["runs"]}.values():
        by_stage.setdefault(run["stage"], []).append(run)

    def mean(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    lines = ["| stage | distinct runs | wall time per run | tokens/s | MFU |", "|---|---|---|---|---|"]
    for stage, runs in by_stage.items():
        wall, tps, mfu = mean(runs, "wall_time_s"), mean(runs, "tokens_per_s"), mean(runs, "mfu")
        lines.append(
            f"| {stage} | {len(runs)} | {wall / 60:.1f} min | {'–' if tps is None else f'{tps:,.0f}'} | "
            f"{'–' if mfu is None else f'{100 * mfu:.1f} %'} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def plot_metric(doc: dict[str, Any], metric: str, path: Path) -> Path | None:
    """Arms as bars (mean, 95 % interval, one dot per seed) beside the paper's; a sweep (every arm has an `x`) as a
    line with its interval band; a dashed line at the metric's chance level if it has one. Measured and reported values
    get separate panels: they are on different scales."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = doc["metrics"][metric]
    arms = [a for a in doc["arms"] if arm_summary(doc, a["name"], metric) is not None]
    if not arms:
        return None
    summaries = [arm_summary(doc, a["name"], metric) for a in arms]
    reported = [doc["reported"].get(a["name"], {}).get(metric) for a in arms]
    has_paper = any(reported)
    sweep = all(a.get("x") is not None for a in arms) and len(arms) > 2
    fig, axes = plt.subplots(1, 2 if has_paper else 1, figsize=(10 if has_paper else 6, 3.8), squeeze=False)
    ax = axes[0][0]
    scale = doc["scale"]["name"]
    unit = f" ({m['unit']})" if m["unit"] else ""
    if sweep:
        xs = [a["x"] for a in arms]
        ax.plot(xs, [s["mean"] for s in summaries], marker="o", color="C0")
        ax.fill_between(xs, [s["ci95"][0] for s in summaries], [s["ci95"][1] for s in summaries], alpha=0.2, color="C0")
        for x, s in zip(xs, summaries):
            ax.scatter([x] * s["k"], s["values"], s=12, color="k", alpha=0.6, zorder=3)
        ax.set_xticks(xs)
    else:
        xs = list(range(len(arms)))
        means = [s["mean"] for s in summaries]
        err = [[s["mean"] - s["ci95"][0] for s in summaries], [s["ci95"][1] - s["mean"] for s in summaries]]
        ax.bar(xs, means, yerr=err, capsize=4, color="C0", alpha=0.75)
        for x, s in zip(xs, summaries):
            ax.scatter([x] * s["k"], s["values"], s=12, color="k", alpha=0.6, zorder=3)
        ax.set_xticks(xs, [a["name"] for a in arms], rotation=20, ha="right")
    if m.get("chance") is not None:
        ax.axhline(m["chance"], color="grey", linestyle="--", linewidth=1)
        ax.annotate("chance", (0, m["chance"]), xycoords=("axes fraction", "data"), xytext=(2, 2),
                    textcoords="offset points", fontsize=7, color="grey")  # fmt: skip
    ax.set_title(f"measured, {scale} scale ({len(doc['seeds'])} seed(s); 95 % interval)", fontsize=9)
    ax.set_ylabel(textwrap.fill(m["label"] + unit, 40), fontsize=9)  # long labels wrap instead of leaving the figure
    if has_paper:
        ax2 = axes[0][1]
        pts = [(i, a, v) for i, (a, v) in enumerate(zip(arms, reported)) if v]
        xs2 = [a["x"] for _, a, _ in pts] if sweep else [i for i, _, _ in pts]
        ys2 = [v["value"] for _, _, v in pts]
        ax2.plot(xs2, ys2, marker="s", color="C1", linestyle="-" if sweep else "none", markersize=7)
        for x, y in zip(xs2, ys2):
            ax2.annotate(f"{y:g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        if sweep:
            ax2.set_xticks(xs2)
        else:
            ax2.set_xticks(list(range(len(arms))), [a["name"] for a in arms], rotation=20, ha="right")
            ax2.set_xlim(-0.5, len(arms) - 0.5)
        marks = sorted({v["from"] for _, _, v in pts})
        what = m.get("paper_metric") or m["label"]
        ax2.set_title(textwrap.fill(f"paper, as reported ({', '.join(marks)}): {what}", 60), fontsize=8)
        ax2.set_ylabel(m["unit"] or "value", fontsize=9)
        ax2.margins(y=0.25)
    fig.suptitle(textwrap.fill(f"{doc['recipe']['name']}: {m['label']}", 90), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_report(doc: dict[str, Any], out: str | Path) -> Path:
    """Write `out/report.md` and one PNG per metric from a reproduce results document."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    r, scale = doc["recipe"], doc["scale"]["name"]
    seeds = doc["seeds"]
    lines = [
        f"# {r['finding']}",
        "",
        f"{_citation(doc)}, {r['source']}. Recipe: `{r['path']}`.",
        "",
        f"**Scale {SCALE_WORDING.get(scale, scale)}** Seeds: {len(seeds)} ({', '.join(map(str, seeds))}); "
        "intervals are 95 %: over seeds (Student t) when there are several, else over evaluation items.",
        "",
        f"Run with `{doc.get('invocation') or r['command']}`; the recipe's own command: `{r['command']}`.",
        "",
        "## The claims",
        "",
        claims_table(doc),
        "",
    ]
    for claim in doc["claims"]:
        if claim.get("statement"):
            lines.append(f"- {claim['compare'][0]} − {claim['compare'][1]}: {claim['statement']}")
    if scale in ("toy", "smoke", "mini"):
        lines += ["", f"At {scale} scale a verdict is about the direction of the difference only; the paper's column "
                  "is there to say which direction it found, not a number to match."]  # fmt: skip
    for metric, m in doc["metrics"].items():
        lines += ["", f"## {m['label']}", ""]
        if m.get("paper_metric"):
            lines += [f"The paper's column: {m['paper_metric']}.", ""]
        lines.append(metric_table(doc, metric))
        if line := chance_line(doc, metric):
            lines += ["", line]
        png = plot_metric(doc, metric, out / f"{metric}.png")
        if png is not None:
            lines += ["", f"![{m['label']}]({png.name})"]
    lines += ["", "## The runs", "", runs_section(doc)]
    if r.get("notes"):
        lines += ["", "## Notes", "", r["notes"]]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def report_command(folder: str) -> Path:
    """Re-render `report.md` and its plots from `folder/results.json` alone, and print the tables.

    Args:
        folder: the `--out` folder of a `visprior reproduce` run.
    """
    results = Path(folder) / "results.json"
    if not results.is_file():
        raise FileNotFoundError(f"{results} not found: give the --out folder of a `visprior reproduce` run")
    doc = json.loads(results.read_text())
    if doc.get("kind") != "visprior.reproduce":
        raise ValueError(f"{results} is not a reproduce results file (kind {doc.get('kind')!r}); `visprior eval` "
                         "writes the per-checkpoint kind")  # fmt: skip
    path = render_report(doc, Path(folder))
    print(terminal_summary(doc))
    print(f"\nreport: {path}")
    return path
