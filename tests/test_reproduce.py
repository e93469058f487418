"""The recipe runner: the stage cache (what a key holds, which stages share one, what a changed key reruns), the
plan, and resuming a run killed mid-stage.

The fast tests compute plans and keys only (the real CLI parser, no training); the slow ones run a two-stage recipe
(text-pretrain -> LM4VE classifier) at smoke size on the smoke toy world.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_recipes import GOOD, REPO, edit, write

from visprior.recipe import RecipeError, load_recipe, load_scale
from visprior.reproduce import ContentHashes, build_plan, eval_command, last_step, reproduce, seeds_from


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "recipes" / "test").mkdir(parents=True)
    os.symlink(REPO / "recipes" / "_base", root / "recipes" / "_base")
    return root


def plan_of(path: Path, tmp: Path, seeds=(0,), scale: str = "toy", out: str = "out", cache: str = "cache"):
    recipe = load_recipe(path)
    return build_plan(recipe, load_scale(recipe, scale), None, list(seeds), tmp / out, tmp / cache,
                      ContentHashes(tmp / "hashes.json"))  # fmt: skip


def keys(plan) -> dict[tuple[str, int, str], str]:
    return {(r.arm, r.seed, r.stage): r.key for r in plan.runs}


def test_arms_share_the_stage_they_do_not_change(project: Path, tmp_path: Path) -> None:
    plan = plan_of(write(project, GOOD), tmp_path)
    k = keys(plan)
    assert k[("vit", 0, "text-pretrain")] == k[("block", 0, "text-pretrain")]
    assert k[("vit", 0, "classify")] != k[("block", 0, "classify")]
    assert plan.run("block", 0, "text-pretrain").shared_with == "vit"
    assert plan.run("vit", 0, "classify").upstream == {"text-pretrain": k[("vit", 0, "text-pretrain")]}
    assert len({r.entry for r in plan.runs}) == 3


def test_one_changed_key_changes_exactly_that_stage_and_those_after_it(project: Path, tmp_path: Path) -> None:
    before = keys(plan_of(write(project, GOOD), tmp_path))

    def late(d):  # a classify key: text-pretrain keeps its key
        d["stages"]["classify"]["overrides"]["model.init_args.head_norm"] = True

    after = keys(plan_of(write(project, edit(GOOD, late)), tmp_path))
    for arm in ("vit", "block"):
        assert after[(arm, 0, "text-pretrain")] == before[(arm, 0, "text-pretrain")]
        assert after[(arm, 0, "classify")] != before[(arm, 0, "classify")]

    def early(d):  # a text-pretrain key: it and the classifier built on it change
        d["stages"]["text-pretrain"]["overrides"] = {"model.init_args.warmup_steps": 7}

    after = keys(plan_of(write(project, edit(GOOD, early)), tmp_path))
    assert all(after[k] != before[k] for k in before)


def test_output_folders_do_not_enter_the_key_and_the_seed_does(project: Path, tmp_path: Path) -> None:
    path = write(project, GOOD)
    a = keys(plan_of(path, tmp_path))
    assert keys(plan_of(path, tmp_path, out="elsewhere", cache="other-cache")) == a
    b = keys(plan_of(path, tmp_path, seeds=(0, 1)))
    assert {k: v for k, v in b.items() if k[1] == 0} == a
    assert all(b[(arm, 1, st)] != a[(arm, 0, st)] for arm, _, st in a)


def test_data_enter_the_key_by_content_not_by_timestamp(project: Path, tmp_path: Path, toyworld_dir: Path) -> None:
    shapes = project / "data" / "toyworld" / "eval" / "shapes"
    shutil.copytree(toyworld_dir / "eval" / "shapes", shapes)
    path = write(project, GOOD)
    base = keys(plan_of(path, tmp_path))
    shard = sorted((shapes / "train").glob("*.tar"))[0]
    os.utime(shard, (time.time() + 100, time.time() + 100))
    assert keys(plan_of(path, tmp_path)) == base, "a touched but unchanged file keeps the key"
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    changed = keys(plan_of(path, tmp_path))
    assert changed[("vit", 0, "classify")] != base[("vit", 0, "classify")]
    assert changed[("vit", 0, "text-pretrain")] == base[("vit", 0, "text-pretrain")], (
        "text pre-training reads no shapes"
    )


def test_a_scale_that_replaces_the_checkpoint_reference_drops_the_stage(project: Path, tmp_path: Path) -> None:
    def released(d):  # at mini scale the block comes from a released LLM folder: no toy LLM to train
        d["scales"]["mini"] = {"stages": {"classify": {"model.init_args.frozen_block": {
            "checkpoint": None, "language_model": {"path": "models/some-llm"}}}}}  # fmt: skip

    plan = plan_of(write(project, edit(GOOD, released)), tmp_path, scale="mini")
    assert plan.order == {"vit": ["classify"], "block": ["classify"]}
    assert plan.run("vit", 0, "classify").upstream == {}


def test_fewshot_runs_only_the_shot_counts_the_recipe_reads(tmp_path: Path) -> None:
    plan = plan_of(REPO / "recipes" / "vila" / "text-reblend-restores-text.yaml", tmp_path)
    ev = plan.recipe.evaluations["sft"]
    _, args = eval_command(plan, plan.run("visual", 0, "sft"), ev, tmp_path / "eval")
    assert args[args.index("--shots") + 1] == "0,4"  # fewshot/0-shot and fewshot/4-shot; no 8-shot column
    ev.options["shots"] = [8, 0]  # an explicit `options.shots` wins
    _, args = eval_command(plan, plan.run("visual", 0, "sft"), ev, tmp_path / "eval")
    assert args[args.index("--shots") + 1] == "8,0"


def test_vqa_blind_reaches_the_eval_command_and_must_be_a_bool(project: Path, tmp_path: Path) -> None:
    plan = plan_of(REPO / "recipes" / "vila" / "text-reblend-restores-text.yaml", tmp_path)
    ev = plan.recipe.evaluations["sft"]
    _, args = eval_command(plan, plan.run("visual", 0, "sft"), ev, tmp_path / "eval")
    assert "--vqa_blind" not in args
    ev.options["vqa_blind"] = True
    _, args = eval_command(plan, plan.run("visual", 0, "sft"), ev, tmp_path / "eval")
    assert args[args.index("--vqa_blind") + 1] == "true"
    bad = edit(GOOD, lambda d: d["evaluations"]["classify"].update(options={"vqa_blind": "yes"}))
    with pytest.raises(RecipeError, match=r"evaluations\.classify\.options\.vqa_blind: expected true or false"):
        load_recipe(write(project, bad))

    def blind_row(d, options):
        d["evaluations"]["text-pretrain"] = {"tasks": ["vqa"], "options": options,
                                   "metrics": {"blind": {"label": "grey", "metric": "vqa/blind/all"}}}  # fmt: skip

    load_recipe(write(project, edit(GOOD, lambda d: blind_row(d, {"vqa_blind": True}))))
    with pytest.raises(RecipeError, match=r"metrics\.blind: vqa/blind/all is written only with `options: "):
        load_recipe(write(project, edit(GOOD, lambda d: blind_row(d, {}))))


def test_bad_shots_fail_when_the_recipe_loads(project: Path) -> None:
    bad = edit(GOOD, lambda d: d["evaluations"]["classify"].update(options={"shots": [4, -1]}))
    with pytest.raises(RecipeError, match=r"evaluations\.classify\.options\.shots: expected a list"):
        load_recipe(write(project, bad))


def test_a_limit_per_task_is_checked_when_the_recipe_loads_and_reaches_the_eval_command(
    project: Path, tmp_path: Path
) -> None:
    for limit, message in (({"fewshot": 4, "imagenet": 2}, r"unknown task\(s\) \['imagenet'\]"),
                           ({"fewshot": 0}, "expected a positive item count"), (True, "expected a positive")):  # fmt: skip
        bad = edit(GOOD, lambda d, v=limit: d["evaluations"]["classify"].update(options={"limit": v}))
        with pytest.raises(RecipeError, match=r"evaluations\.classify\.options\.limit: " + message):
            load_recipe(write(project, bad))
    plan = plan_of(REPO / "recipes" / "vila" / "text-reblend-restores-text.yaml", tmp_path)
    _, args = eval_command(plan, plan.run("visual", 0, "sft"), plan.recipe.evaluations["sft"], tmp_path / "eval")
    assert json.loads(args[args.index("--limit") + 1]) == plan.scale.eval["limit"] == {"fewshot": 400, "mle_bench": 300}


def test_seeds() -> None:
    assert seeds_from(None, 3) == [0, 1, 2] and seeds_from("2", 3) == [0, 1] and seeds_from("0,4", 1) == [0, 4]
    for bad in ("0", "a", "1,1"):
        with pytest.raises(ValueError):
            seeds_from(bad, 1)


# ------------------------------------------------------------------------------------------------ runs (slow)


@pytest.fixture
def smoke_project(project: Path, toyworld_dir: Path, tokenizer_dir: Path) -> Path:
    (project / "data").mkdir()
    os.symlink(toyworld_dir, project / "data" / "toyworld")
    return project


def statuses(out: Path) -> dict[tuple[str, str], str]:
    doc = json.loads((out / "results.json").read_text())
    return {(r["arm"], r["stage"]): r["status"] for r in doc["runs"]}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_second_arm_reuses_the_shared_stage_and_a_changed_key_reruns_it_and_what_follows(
    smoke_project: Path, tmp_path: Path
) -> None:
    path = write(smoke_project, GOOD)
    cache = tmp_path / "cache"
    run = dict(scale="smoke", cache=str(cache), in_process=True)
    reproduce(str(path), out=str(tmp_path / "a"), **run)
    assert statuses(tmp_path / "a") == {("vit", "text-pretrain"): "ran", ("vit", "classify"): "ran",
                                         ("block", "text-pretrain"): "cached", ("block", "classify"): "ran"}  # fmt: skip
    assert len(list(cache.glob("text-pretrain-*/done.json"))) == 1
    # in-process, Lightning's info lines go to the stage's log too, as they do from a process of its own
    assert "precision: auto ->" in next(cache.glob("text-pretrain-*/fit.log")).read_text()
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    assert doc["complete"] and {a: set(m) for a, m in doc["measurements"].items()} == {
        "vit": {"top1"},
        "block": {"top1"},
    }
    assert (tmp_path / "a" / "report.md").is_file() and (
        tmp_path / "a" / "runs" / "vit" / "seed0" / "classify"
    ).is_dir()
    # each stage records its throughput and MFU over its logged windows; a cached run brings the recorded ones along
    for r in doc["runs"]:
        assert r["global_step"] == 2 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 2, r
    shared = [r for r in doc["runs"] if r["stage"] == "text-pretrain"]
    assert shared[0]["mfu"] == shared[1]["mfu"]
    assert (
        f"| text-pretrain | 1 | {shared[0]['wall_time_s'] / 60:.1f} min | "
        in (tmp_path / "a" / "report.md").read_text()
    )

    reproduce(str(path), out=str(tmp_path / "b"), **run)  # nothing changed: nothing runs
    assert set(statuses(tmp_path / "b").values()) == {"cached"}

    def late(d):
        d["stages"]["classify"]["overrides"]["model.init_args.head_norm"] = True

    reproduce(str(write(smoke_project, edit(GOOD, late))), out=str(tmp_path / "c"), **run)
    assert statuses(tmp_path / "c") == {("vit", "text-pretrain"): "cached", ("vit", "classify"): "ran",
                                         ("block", "text-pretrain"): "cached", ("block", "classify"): "ran"}  # fmt: skip

    def early(d):
        late(d)
        d["stages"]["text-pretrain"]["overrides"] = {"model.init_args.warmup_steps": 1}

    reproduce(str(write(smoke_project, edit(GOOD, early))), out=str(tmp_path / "d"), **run)
    assert statuses(tmp_path / "d") == {("vit", "text-pretrain"): "ran", ("vit", "classify"): "ran",
                                         ("block", "text-pretrain"): "cached", ("block", "classify"): "ran"}  # fmt: skip


KILL_SCALE = """\
extends: toy
seeds: 1
toyworld: {{preset: smoke, seed: 0}}
eval: {{limit: 16}}
every_stage:
  - {smoke}
  - {{trainer.max_steps: 8, checkpoint.every_n_train_steps: 1}}
"""


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_run_killed_mid_stage_and_relaunched_gives_the_same_results(smoke_project: Path, tmp_path: Path) -> None:
    path = write(smoke_project, GOOD)
    scale = tmp_path / "kill.yaml"
    scale.write_text(KILL_SCALE.format(smoke=REPO / "recipes" / "_base" / "scales" / "smoke.yaml"))

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "visprior.cli", "reproduce", str(path), "--scale", str(scale),
                "--out", str(tmp_path / f"out-{name}"), "--cache", str(tmp_path / f"cache-{name}")]  # fmt: skip

    subprocess.run(command("whole"), check=True, capture_output=True, cwd=smoke_project)

    proc = subprocess.Popen(command("killed"), cwd=smoke_project, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    cache = tmp_path / "cache-killed"
    deadline = time.monotonic() + 900
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        ckpts = list(cache.glob("text-pretrain-*/run/checkpoints/last.ckpt"))
        step = last_step(ckpts[0]) if ckpts else None
        if step is not None and 2 <= step < 8:
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and its stage process, mid-stage
            killed_at = step
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, "the stage finished before it could be killed (or never checkpointed)"
    entry = next(cache.glob("text-pretrain-*"))
    assert not (entry / "done.json").exists()

    subprocess.run(command("killed"), check=True, capture_output=True, cwd=smoke_project)
    attempts = json.loads((entry / "attempts.json").read_text())
    assert attempts[-1]["started_from_step"] >= killed_at and attempts[-1]["returncode"] == 0, attempts
    whole = json.loads((tmp_path / "out-whole" / "results.json").read_text())["measurements"]
    resumed = json.loads((tmp_path / "out-killed" / "results.json").read_text())["measurements"]

    def values(m: dict) -> dict:
        return {(a, k, s): (v["value"], v["n"]) for a, ms in m.items() for k, ss in ms.items() for s, v in ss.items()}

    assert values(resumed) == values(whole) and values(whole)


def test_a_regenerated_toy_world_gets_its_own_tokenizer(project: Path, tmp_path: Path, monkeypatch) -> None:
    from visprior.data.toyworld.generate import WORLD_VERSION
    from visprior.reproduce import ensure_toyworld

    world = project / "data" / "toyworld"
    (world / "tokenizer").mkdir(parents=True)
    (world / "tokenizer" / "tokenizer.json").write_text("{}")  # the smoke world's, from before tokenizers recorded it
    (world / "world.json").write_text(json.dumps({"version": WORLD_VERSION, "preset": "smoke", "seed": 0}))
    made = []

    def generate(out: Path, preset: str, seed: int) -> None:
        made.append(("world", preset))
        (out / "world.json").write_text(json.dumps({"version": WORLD_VERSION, "preset": preset, "seed": seed}))

    def train_tokenizer(data: Path, out: Path, vocab_size: int) -> None:
        made.append(("bpe", vocab_size))
        stamp = {"version": WORLD_VERSION, "preset": json.loads((data / "world.json").read_text())["preset"], "seed": 0}
        (out / "trained_on.json").write_text(json.dumps({**stamp, "vocab_size": vocab_size}))

    monkeypatch.setattr("visprior.data.toyworld.generate", generate)
    monkeypatch.setattr("visprior.data.tokenizer.train_tokenizer", train_tokenizer)
    toy = plan_of(write(project, GOOD), tmp_path)
    ensure_toyworld(toy)
    assert made == [("world", "toy"), ("bpe", 8192)]
    ensure_toyworld(toy)  # the world and its tokenizer match now: nothing is made again
    ensure_toyworld(plan_of(write(project, GOOD), tmp_path, scale="smoke"))  # smoke runs on the toy world as it is
    assert made == [("world", "toy"), ("bpe", 8192)]


def test_a_toy_tokenizer_records_its_world(toyworld_dir: Path, tokenizer_dir: Path) -> None:
    from visprior.data.tokenizer import trained_on, world_identity

    assert trained_on(tokenizer_dir) == {**world_identity(toyworld_dir), "vocab_size": 2048}
    assert world_identity(toyworld_dir)["preset"] == "smoke"


def test_an_evaluation_cached_under_another_scoring_revision_is_not_reused(
    project: Path, tmp_path: Path, monkeypatch
) -> None:
    from visprior.eval import results
    from visprior.reproduce import evaluation_key

    plan = plan_of(REPO / "recipes" / "vila" / "text-reblend-restores-text.yaml", tmp_path)
    run, ev = plan.run("visual", 0, "sft"), plan.recipe.evaluations["sft"]
    hashes = ContentHashes(tmp_path / "hashes.json")
    key, doc = evaluation_key(plan, run, ev, hashes)
    assert doc["scoring_revision"] == results.SCORING_REVISION and doc["stage"] == run.key
    assert evaluation_key(plan, run, ev, hashes)[0] == key  # the same inputs: the same key
    monkeypatch.setattr(results, "SCORING_REVISION", results.SCORING_REVISION + 1)
    assert evaluation_key(plan, run, ev, hashes)[0] != key
