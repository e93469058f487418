"""Every recipe resolves and dry-runs at toy, mini and paper scale; a malformed recipe fails before any work, naming the
file and the key; a paper-scale run without its data fails with one line naming the missing path.

The dry runs resolve every stage of every arm through the real CLI parser (`visprior.stage_cli.resolve_config`), so an
unknown key, a wrong type or a missing fragment in any recipe, base recipe or scale fails here.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest
import yaml

from visprior.config import RecipeError
from visprior.recipe import PAPERS, SCALES, all_recipes, load_recipe, load_scale
from visprior.reproduce import ContentHashes, build_plan, describe_plan, missing_inputs

REPO = Path(__file__).resolve().parents[1]
RECIPES = all_recipes(REPO)
FINDINGS = {  # issue 10, section 5: the recipes visprior ships
    "lsbs/reasoning-data-builds-visual-reasoning",
    "lsbs/visual-world-text-saturates",
    "lsbs/balanced-mix-beats-language-favorable",
    "lsbs/blind-instruction-tuning",
    "lsbs/mle-bench-perception-by-object-size",
    "vila/unfrozen-llm-enables-in-context-learning",
    "vila/interleaved-beats-pairs",
    "vila/text-reblend-restores-text",
    "mm1/resolution-and-tokens-over-connector",
    "mm1/caption-interleaved-text-mix",
    "lm4ve/frozen-llm-block-improves-vit",
    "visual-words/vm-loss-supervision",
}


REAL_WEIGHTS = ("recipes/_base/models/smollm2-135m", "recipes/_base/models/smollm2-block.yaml")
"""Model fragments that read SmolLM2-135M's materialised folder, `checkpoints/smollm2-135m` (issue 14)."""
EXTRA_SCALES = [(p, s) for p in RECIPES for s in load_recipe(p).scale_sections if s not in SCALES]
"""(recipe, scale) for the scales a recipe adds to toy, mini and paper (`real-cpu`)."""


def needs_real_weights(path: Path) -> bool:
    return any(ref in path.read_text() for ref in REAL_WEIGHTS)


def real_weights_or_skip(request: pytest.FixtureRequest, path: Path, root: Path) -> None:
    """For a recipe on SmolLM2's real weights: skip without the `real` extra, as every real-weights test does (the
    `smollm2_dir` fixture, which materialises the folder once otherwise); `root/checkpoints/smollm2-135m` is it."""
    if not needs_real_weights(path):
        return
    folder = request.getfixturevalue("smollm2_dir")
    target = root / "checkpoints" / "smollm2-135m"
    if not target.exists() and root != REPO:
        target.parent.mkdir(exist_ok=True)
        os.symlink(folder, target)
    if not target.is_dir():
        pytest.skip(
            f"real-weights recipe: it reads {target}, but the materialised folder is {folder} (VISPRIOR_CHECKPOINTS)"
        )


def needs_missing_switch(path: Path) -> str | None:
    """The reason a recipe cannot resolve yet: it uses a stage argument the landed stages do not have."""
    from visprior.stages import VisionLanguagePretraining

    if (
        "visual_words" in path.read_text()
        and "visual_words" not in inspect.signature(VisionLanguagePretraining).parameters
    ):
        return "the VLM stages have no `visual_words` argument yet (issue 11)"
    return None


def test_every_finding_has_its_recipe() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    assert names >= FINDINGS, sorted(FINDINGS - names)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_opens_with_its_command_and_cites_its_paper(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    recipe = load_recipe(path)
    scale = "real-cpu" if "real-cpu" in recipe.scale_sections else "toy"  # a real-weights recipe opens with its CPU run
    assert first == f"# visprior reproduce {path.parent.name}/{path.stem} --scale {scale}", first
    assert recipe.citation["title"], f"{recipe.paper}: no CITATION.cff reference with {PAPERS[recipe.paper]}"
    assert recipe.claims and recipe.arms and recipe.evaluations
    for claim in recipe.claims:
        if claim.paper is not None and claim.direction != "none":
            assert (claim.paper > 0) == (claim.direction == "increase"), (claim.metric, claim.compare)
    for arm in recipe.reported.values():
        for value in arm.values():
            assert value.mark in ("table", "printed on figure", "read off figure", "text")


@pytest.mark.parametrize("scale", [s if s == "toy" else pytest.param(s, marks=pytest.mark.slow) for s in SCALES])
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_resolves_and_dry_runs(path: Path, scale: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if reason := needs_missing_switch(path):
        pytest.skip(reason)
    real_weights_or_skip(request, path, REPO)
    recipe = load_recipe(path)
    s = load_scale(recipe, scale)
    seeds = list(range(s.seeds))
    plan = build_plan(recipe, s, None, seeds, tmp_path / "out", tmp_path / "cache", ContentHashes(tmp_path / "h.json"))
    text = describe_plan(plan)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists(), "a dry run writes nothing"
    for arm in recipe.arms:
        stages = plan.order[arm]
        assert set(recipe.evaluations) <= set(stages), (arm, stages)
        for stage in stages:  # every stage after the ones it starts from
            run = plan.run(arm, seeds[0], stage)
            assert all(stages.index(dep) < stages.index(stage) for dep in run.upstream), (arm, stage)
    for stage in {r.stage for r in plan.runs}:
        assert stage in text
    if scale == "toy":
        # every stage's budget is counted (a classifier-only recipe's in images)
        assert s.seeds == 3 and re.search(r"\d[KMBT]? (tokens|images)\b", text), text
        if (REPO / "data" / "toyworld" / "tokenizer" / "tokenizer.json").exists():
            assert not missing_inputs(plan), missing_inputs(plan)
        # a stage no arm changes, starting only from such stages, is one run per seed shared by every arm
        touched = {st for a in recipe.arms.values() for st in [*a.stages, *a.init_from]}
        shared: set[str] = set()
        for stage in plan.order[next(iter(recipe.arms))]:
            run = plan.run(next(iter(recipe.arms)), 0, stage)
            if stage not in touched and set(run.upstream) <= shared:
                shared.add(stage)
                keys = {plan.run(a, 0, stage).key for a in recipe.arms if stage in plan.order[a]}
                assert len(keys) == 1, (stage, "not shared across arms")
    if scale == "paper":
        # the paper's models and data are placeholders the user points at: listed, never required by a dry run
        assert missing_inputs(plan), "a paper-scale recipe on this machine should miss its paper-scale data"
        assert "do not exist" in text


@pytest.mark.parametrize(("path", "scale"), EXTRA_SCALES, ids=lambda x: x if isinstance(x, str) else x.stem)
def test_a_recipes_own_scale_dry_runs_in_its_budget(path: Path, scale: str, request: pytest.FixtureRequest, tmp_path):
    """`real-cpu` (issue 14): one seed, every input present once the toy world is generated, its notes give the
    measured time (under an hour); with the toy scale's budget, its stages are the toy scale's seed-0 runs (same keys)."""
    real_weights_or_skip(request, path, REPO)
    recipe = load_recipe(path)
    s, toy = load_scale(recipe, scale), load_scale(recipe, "toy")
    assert s.seeds == 1 and s.toyworld == toy.toyworld and "Time, measured" in recipe.notes, "its notes give the time"
    plan = build_plan(recipe, s, None, [0], tmp_path / "o", tmp_path / "c", ContentHashes(tmp_path / "h.json"))
    text = describe_plan(plan)
    assert f"at scale {scale}: {len(recipe.arms)} arm(s) x 1 seed(s)" in text
    if (REPO / "data" / "toyworld" / "tokenizer" / "tokenizer.json").exists():
        assert not missing_inputs(plan), missing_inputs(plan)
    if recipe.scale_sections[scale] == recipe.scale_sections["toy"]:  # the same budget: the toy scale's seed-0 runs
        same = build_plan(recipe, toy, None, [0], tmp_path / "o", tmp_path / "c", ContentHashes(tmp_path / "h.json"))
        assert {r.key for r in plan.runs} == {r.key for r in same.runs}
    for run in plan.runs:
        steps = run.resolved["trainer"]["max_steps"]
        assert 0 < steps <= 300, (run.arm, run.stage, steps)


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory: pytest.TempPathFactory, toyworld_dir: Path, tokenizer_dir: Path) -> Path:
    """A project root over the real recipes and the smoke toy world, with one stage cache for every recipe."""
    root = tmp_path_factory.mktemp("recipes-smoke")
    os.symlink(REPO / "recipes", root / "recipes")
    (root / "data").mkdir()
    os.symlink(toyworld_dir, root / "data" / "toyworld")
    return root


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_runs_end_to_end_at_smoke_size(path: Path, smoke_root: Path, request: pytest.FixtureRequest) -> None:
    """Every arm's stages, the evaluations and the report, at two steps per stage; the cache is shared by the recipes,
    so what one recipe trained another reuses (the point of the cache, and what keeps this test affordable)."""
    import json

    from visprior.reproduce import reproduce

    if reason := needs_missing_switch(path):
        pytest.skip(reason)
    real_weights_or_skip(request, path, smoke_root)
    name = f"{path.parent.name}/{path.stem}"
    out = smoke_root / "out" / name
    report = reproduce(str(smoke_root / "recipes" / path.parent.name / path.name), scale="smoke", out=str(out),
                       cache=str(smoke_root / "cache"), in_process=True)  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    recipe = load_recipe(path)
    assert doc["complete"] and doc["seeds"] == [0]
    for arm in recipe.arms:
        for metric in recipe.metrics:
            m = doc["measurements"][arm][metric]["0"]
            assert m["n"] > 0 and m["value"] == m["value"], (arm, metric, m)  # measured, not NaN
    text = report.read_text()
    assert "The claims" in text and "smoke" in text and all(f"{m}.png" in text for m in recipe.metrics)


def test_a_paper_scale_run_without_its_data_fails_in_one_line_naming_the_path(tmp_path: Path, capsys) -> None:
    from visprior.cli import main

    recipe = REPO / "recipes" / "lm4ve" / "frozen-llm-block-improves-vit.yaml"
    with pytest.raises(SystemExit) as info:
        main(
            ["reproduce", str(recipe), "--scale", "paper", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]
        )
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2
    assert len(err.splitlines()) == 1, err
    assert "input not found" in err and ("models/llama-7b" in err or "data/imagenet" in err), err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").glob("classify-*/run")), "nothing ran"


# ------------------------------------------------------------------------------------------------ malformed recipes


GOOD = """\
# visprior reproduce test/tiny --scale toy
finding: a tiny recipe for tests
paper: lm4ve
source: Table 1
stages:
  text-pretrain: {config: text-pretrain}
  classify:
    config: classify
    overrides:
      model.init_args.frozen_block: {checkpoint: "${checkpoint:text-pretrain}"}
arms:
  vit:
    classify: {model.init_args.frozen_block.variant: none}   # no block
  block:
    classify: {model.init_args.frozen_block.variant: llm_block}
evaluations:
  classify:
    tasks: [classify]
    metrics: {top1: {label: top-1, metric: classify/top1}}
reported:
  from: table
  arms: {vit: {top1: 80.1}, block: {top1: 80.7}}
claims:
  - {metric: top1, compare: [block, vit], direction: increase}
scales: {toy: {}, mini: {}, paper: {}}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root with the real recipes/_base and a recipes/test/ folder for recipes written by the tests."""
    (tmp_path / "recipes" / "test").mkdir(parents=True)
    os.symlink(REPO / "recipes" / "_base", tmp_path / "recipes" / "_base")
    return tmp_path


def write(project: Path, text: str, name: str = "tiny") -> Path:
    path = project / "recipes" / "test" / f"{name}.yaml"
    path.write_text(text)
    return path


def edit(text: str, change) -> str:
    first, _, body = text.partition("\n")
    data = yaml.safe_load(body)
    change(data)
    return first + "\n" + yaml.safe_dump(data, sort_keys=False)


def test_the_good_test_recipe_loads(project: Path) -> None:
    recipe = load_recipe(write(project, GOOD))
    assert list(recipe.stages) == ["text-pretrain", "classify"]
    assert recipe.claims[0].paper == pytest.approx(0.6)
    assert recipe.stage_order("vit", load_scale(recipe, "toy")) == ["text-pretrain", "classify"]


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        (lambda d: d.update(arm={}), "arm", "unknown recipe key"),
        (lambda d: d["arms"]["vit"].update(clasify={}), "arms.vit.clasify", "not a stage of this recipe"),
        (lambda d: d["arms"]["vit"]["classify"].update({"modle.init_args.x": 1}), "arms.vit.classify.modle", "not a `visprior fit` config group"),
        (lambda d: d["stages"]["classify"].update(config="nope"), "stages.classify.config", "stage YAML not found"),
        (lambda d: d["stages"]["classify"].update(init_from={"nowhere": ["vision_tower"]}), "stages.classify.init_from.nowhere", "unknown stage"),
        (lambda d: d["evaluations"]["classify"]["metrics"]["top1"].update(metric="classify/top3"), "evaluations.classify.metrics.top1.metric", "writes no metric"),
        (lambda d: d["evaluations"]["classify"].update(tasks=["classify", "vqa"]), "evaluations.classify.tasks", "goes alone"),
        (lambda d: d["evaluations"]["classify"]["metrics"]["top1"].update(chance="a quarter"), "evaluations.classify.metrics.top1.chance", "a guess's score"),
        (lambda d: d["claims"][0].update(compare=["block", "other"]), "claims.0.compare", "two different arms"),
        (lambda d: d["claims"][0].update(direction="none"), "claims.0.tolerance", "needs the tolerance"),
        (lambda d: d["claims"][0].update(paper=2.0), "claims.0.paper", "disagrees with the reported values"),
        (lambda d: d["reported"]["arms"].update(other={"top1": 1.0}), "reported.arms.other", "not an arm"),
        (lambda d: d["reported"].update({"from": "guessed"}), "reported.arms.vit.top1", "mark each reported value"),
        (lambda d: d["scales"].pop("paper"), "scales", "missing scale 'paper'"),
        (lambda d: d["scales"]["toy"].update(stages={"nope": {}}), "scales.toy.stages.nope", "not a stage of this recipe"),
        (lambda d: d.update(paper="lsbs2"), "paper", "unknown paper"),
    ],
)  # fmt: skip
def test_a_malformed_recipe_fails_naming_file_and_key(project: Path, change, key: str, message: str) -> None:
    path = write(project, edit(GOOD, change))
    with pytest.raises(RecipeError) as info:
        recipe = load_recipe(path)
        load_scale(recipe, "toy")
    text = str(info.value)
    assert text.startswith(f"{path}: {key}:") or (key == "scales" and str(path) in text), text
    assert message in text, text


def test_a_key_in_a_base_recipe_is_named_in_its_own_file(project: Path) -> None:
    base = write(
        project,
        GOOD.replace("  vit:\n", "  vit:\n    label: plain\n").replace("paper: lm4ve", "paper: lm4vee"),
        "_base",
    )
    child = write(project, "# visprior reproduce test/child --scale toy\n_base_: [_base.yaml]\nnotes: hi\n", "child")
    with pytest.raises(RecipeError, match=re.escape(f"{base}: paper: unknown paper")):
        load_recipe(child)


def test_an_unknown_config_key_fails_before_any_work_naming_recipe_stage_and_key(project: Path, tmp_path: Path) -> None:
    bad = edit(GOOD, lambda d: d["arms"]["vit"]["classify"].update({"model.init_args.head_nrom": True}))
    path = write(project, bad)
    recipe = load_recipe(path)
    with pytest.raises(RecipeError) as info:
        build_plan(
            recipe, load_scale(recipe, "toy"), None, [0], tmp_path / "o", tmp_path / "c", ContentHashes(tmp_path / "h")
        )
    text = str(info.value)
    assert "stage 'classify', arm 'vit', scale toy" in text and "head_nrom" in text and str(path) in text, text
    assert not (tmp_path / "c").exists()


def test_the_cli_prints_a_bad_recipe_as_one_line(project: Path, capsys) -> None:
    from visprior.cli import main

    path = write(project, edit(GOOD, lambda d: d["arms"]["vit"].update(clasify={})))
    with pytest.raises(SystemExit) as info:
        main(["reproduce", str(path), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "arms.vit.clasify" in err, err


def test_reproduce_and_report_are_listed_in_the_help(capsys) -> None:
    from visprior.cli import main

    main(["--help"])
    out = capsys.readouterr().out
    assert "reproduce RECIPE" in out and "report DIR" in out


def test_a_scale_rewires_one_arm_alone(project: Path) -> None:
    """`scales.<scale>.arms.<arm>.<stage>.init_from`: an arm that loads the toy tower loads nothing where the tower is a
    released encoder, and the other arms keep the stage's wiring."""

    def rewire(d: dict) -> None:
        d["stages"]["classify"]["init_from"] = {"text-pretrain": ["vision_tower"]}
        d["scales"]["mini"] = {"arms": {"block": {"classify": {"init_from": {}}}}}

    text = edit(GOOD, rewire)
    recipe = load_recipe(write(project, text))
    toy, mini = load_scale(recipe, "toy"), load_scale(recipe, "mini")
    assert recipe.wiring("classify", "block", toy) == {"text-pretrain": ["vision_tower"]}
    assert recipe.wiring("classify", "block", mini) == {}
    assert recipe.wiring("classify", "vit", mini) == {"text-pretrain": ["vision_tower"]}
    bad = edit(text, lambda d: d["scales"]["mini"]["arms"]["block"]["classify"].update(init_from={"x": "tower"}))
    with pytest.raises(RecipeError, match=r"scales\.mini\.arms\.block\.classify\.init_from\.x: expected a list"):
        load_scale(load_recipe(write(project, bad)), "mini")


def test_the_runner_writes_the_counting_task_a_recipe_reads(project: Path, toyworld_dir: Path, tmp_path: Path) -> None:
    """data/toyworld/count is derived from the toy world's scenes: written before the plan is keyed, never listed as
    missing where the runner generates the toy world, listed where it does not (mini)."""
    import json

    from visprior.reproduce import Plan, ensure_derived_tasks

    world = project / "data" / "toyworld"
    world.mkdir(parents=True)
    for child in toyworld_dir.iterdir():
        if child.name != "count":
            os.symlink(child, world / child.name)
    count = {"data.init_args": {"train": "data/toyworld/count/train", "val": "data/toyworld/count/test"}}
    recipe = load_recipe(write(project, edit(GOOD, lambda d: d["arms"]["block"]["classify"].update(count))))
    toy, mini = load_scale(recipe, "toy"), load_scale(recipe, "mini")

    def missing(scale) -> dict[str, str]:
        plan = build_plan(recipe, scale, None, [0], tmp_path / "o", tmp_path / "c", ContentHashes(tmp_path / "h.json"))
        return missing_inputs(plan)

    assert str(world / "count" / "train") not in missing(toy)
    assert str(world / "count" / "train") in missing(mini)
    ensure_derived_tasks(Plan(recipe, mini, [], [], tmp_path / "o", tmp_path / "c"))
    assert not (world / "count").exists(), "only where the runner generates the toy world"
    ensure_derived_tasks(Plan(recipe, toy, [], [], tmp_path / "o", tmp_path / "c"))
    scenes = json.loads((world / "pairs" / "manifest.json").read_text())["num_samples"]
    task = json.loads((world / "count" / "task.json").read_text())
    assert (task["train"], task["test"]) == (scenes - scenes // 6, scenes // 6)
    assert sorted((world / "count" / "train").glob("*.tar")) and sorted((world / "count" / "test").glob("*.tar"))


def test_smoke_is_two_steps_whatever_the_toy_budget(project: Path, tmp_path: Path) -> None:
    """A recipe whose toy scale sets its own steps (the real-cpu recipes) still runs two steps per stage at smoke."""
    text = edit(GOOD, lambda d: d["scales"].update(toy={"stages": {"classify": {"trainer.max_steps": 150}}}))
    recipe = load_recipe(write(project, text))
    for scale, steps in (("toy", 150), ("smoke", 2)):
        plan = build_plan(recipe, load_scale(recipe, scale), ["block"], [0], tmp_path / "o", tmp_path / "c",
                          ContentHashes(tmp_path / "h.json"))  # fmt: skip
        assert plan.run("block", 0, "classify").resolved["trainer"]["max_steps"] == steps, scale
