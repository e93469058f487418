"""`visprior reproduce RECIPE`: a recipe's arms x seeds x stages as `visprior fit` runs, a stage cache, the evaluations,
and `<out>/results.json` + `<out>/report.md`.

Every stage of every arm and seed is one `visprior fit --config <entry>/stage.yaml` process, `stage.yaml` being the
stage's fully resolved config (`visprior.stage_cli.resolve_config`, validated before anything runs), its log in
`<entry>/fit.log`. Stages are chained by weights-only `init_from` of the earlier stages' `last.ckpt`, never by parsing
run-folder names.

**The stage cache.** A stage's key is a sha256 over its resolved config without what does not change the result (the
logger and its folders, `ckpt_path`, the checkpoint folder, the progress bar), with every input path replaced by a hash of
its content (data folders, tokenizers, model folders: every file's bytes, memoised by size and mtime in
`<cache>/content-hashes.json`), every earlier stage it starts from replaced by *that stage's key* (its output is a
function of its key, and the key is known before the checkpoint exists, so `--dry-run` can say what is cached), the seed,
and the visprior version. Entries live in `<cache>/<run name>-<key[:12]>/` (`stage.yaml`, `key.json` = what was hashed,
`fit.log`, `run/` = the Lightning run folder with its checkpoints, tensorboard logs and `config.yaml`), shared by every
arm, seed and recipe that resolves to the same key: the VILA arms share one text-pretrained LLM, the LSBS mixtures share
their tower, and two recipes share whatever they have in common. Changing one key of one stage changes that stage's key
and, through the chain, the keys of the stages after it: exactly those rerun.

**Finished, and resumable.** A stage is finished only when `<entry>/done.json` exists: written after `visprior fit`
returned 0 *and* the run's own callback (`StageComplete`) recorded that it reached `max_steps` (a preempted run also exits
cleanly). Anything else is resumed by the next launch of the same command: `ckpt_path: last` continues from the stage's
last checkpoint. A lock file keeps two launches from running the same entry at once. Evaluations are cached beside the
stage (`<entry>/eval/<key>/results.json`, keyed by the stage key, tasks, options, seed and the evaluation data's hash).

A **seed** N sets `seed_everything` and the data module's `seed`; shared stages are cached per seed. `--scale smoke` is
the toy scale shrunk to two steps per stage (see `visprior.recipe.SMOKE`).
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from visprior.config import RecipeError, absolute, expand_config_args, fragment_of_key
from visprior.recipe import (
    CLASSIFY_TASK,
    STAGE_PLACEHOLDER,
    EvaluationSpec,
    Recipe,
    ScaleSpec,
    find_recipe,
    load_recipe,
    load_scale,
    placeholder,
)

RESULTS_SCHEMA = 1
EXCLUDED_FROM_KEY = (
    "config",
    "ckpt_path",
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "checkpoint.dirpath",
)
"""Config keys that say where a run writes or how it looks, not what it computes: left out of the stage key."""


class ReproduceError(ValueError):
    """A recipe run that cannot go on (a stage failed, an input is missing); one line for the user."""


class StageComplete(pl.Callback):
    """Writes `path` when fit ends having reached `max_steps` (or `max_epochs`): what tells a finished stage from a
    stopped one (preemption and the non-finite guard end fit cleanly too). It holds the stage's tokens/s and MFU over
    this attempt's logged windows, which the report lists per stage."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        steps_done = (
            trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        )
        epochs_done = (trainer.max_steps in (None, -1) and trainer.max_epochs is not None
                       and trainer.current_epoch >= trainer.max_epochs)  # fmt: skip
        if trainer.is_global_zero and (steps_done or epochs_done) and not trainer.interrupted:
            measured = pl_module.throughput() if hasattr(pl_module, "throughput") else {}
            Path(self.path).write_text(json.dumps({"global_step": trainer.global_step, **measured}) + "\n")


# ------------------------------------------------------------------------------------------------ content hashes


class ContentHashes:
    """sha256 of files and folders (every file's bytes), memoised by path, size and mtime in a JSON file."""

    def __init__(self, memo: Path) -> None:
        self.memo_path = memo
        try:
            self.memo: dict[str, Any] = json.loads(memo.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.memo = {}
        self.dirty = False

    def _file(self, p: Path) -> str:
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self.memo.get(str(p))
        if hit and hit[:2] == stamp:
            return hit[2]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        self.memo[str(p)] = [*stamp, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def of(self, path: str | Path) -> str:
        p = Path(path)
        if p.is_file():
            return self._file(p)
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0" + self._file(f).encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            self.memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.memo))
            tmp.replace(self.memo_path)
            self.dirty = False


def _walk(value: Any, fn: Callable[[str, str], Any], key: str = "") -> Any:
    """`value` with every string replaced by `fn(string, dotted key)`."""
    if isinstance(value, dict):
        return {k: _walk(v, fn, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, fn, f"{key}[{i}]") for i, v in enumerate(value)]
    return fn(value, key) if isinstance(value, str) else value


def _drop(config: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def _get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def stage_of_placeholder(value: str) -> str | None:
    return value[len(STAGE_PLACEHOLDER) :].split("/", 1)[0] if value.startswith(STAGE_PLACEHOLDER) else None


def input_paths(resolved: dict[str, Any]) -> dict[str, str]:
    """{dotted key: absolute path} of every path the stage reads (not the earlier stages' checkpoints)."""
    doc = copy.deepcopy(resolved)
    for k in EXCLUDED_FROM_KEY:
        _drop(doc, k)
    found: dict[str, str] = {}

    def visit(s: str, key: str) -> str:
        if os.path.isabs(s) and stage_of_placeholder(s) is None:
            found[key] = s
        return s

    _walk(doc, visit)
    return found


def with_seed(resolved: dict[str, Any], seed: int) -> dict[str, Any]:
    cfg = copy.deepcopy(resolved)
    cfg["seed_everything"] = seed
    data_args = _get(cfg, "data.init_args")
    if isinstance(data_args, dict) and "seed" in data_args:
        data_args["seed"] = seed
    return cfg


def stage_key(resolved: dict[str, Any], seed: int, upstream: dict[str, str], hashes: ContentHashes) -> tuple[str, dict]:
    """(key, the document hashed) of a stage: see the module docstring for what goes in and what stays out."""
    from visprior.eval.results import visprior_version

    doc = with_seed(resolved, seed)
    for k in EXCLUDED_FROM_KEY:
        _drop(doc, k)

    def identify(s: str, key: str) -> Any:
        stage = stage_of_placeholder(s)
        if stage is not None:
            return {"stage": upstream[stage]}
        if os.path.isabs(s):
            return {"content": hashes.of(s)} if os.path.exists(s) else {"missing": s}
        return s

    doc = {"config": _walk(doc, identify), "visprior_version": visprior_version()}
    key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return key, doc


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class StageRun:
    """One stage of one arm and seed, with its key and where it lives in the cache."""

    arm: str
    seed: int
    stage: str
    resolved: dict[str, Any]
    """The resolved config, seed-free, earlier stages' checkpoints as placeholders."""
    key: str
    hashed: dict[str, Any]
    upstream: dict[str, str]
    """stage -> key of the runs this one starts from."""
    entry: Path
    config_id: int
    """Runs with the same config (before seeds and upstream keys) share an id: the dry-run's rows."""
    shared_with: str | None = None
    """The earlier run (arm) with the same key in this plan, which runs it."""

    @property
    def done(self) -> bool:
        return (self.entry / "done.json").is_file()

    @property
    def checkpoint(self) -> Path:
        return self.entry / "run" / "checkpoints" / "last.ckpt"


@dataclass
class Plan:
    recipe: Recipe
    scale: ScaleSpec
    arms: list[str]
    seeds: list[int]
    out: Path
    cache: Path
    runs: list[StageRun] = field(default_factory=list)
    order: dict[str, list[str]] = field(default_factory=dict)
    """arm -> its stages in execution order."""
    configs: list[dict[str, Any]] = field(default_factory=list)
    """config_id -> the resolved config (seed-free)."""
    invocation: str = ""
    """The command line this plan answers (for the report)."""

    def run(self, arm: str, seed: int, stage: str) -> StageRun:
        return next(r for r in self.runs if (r.arm, r.seed, r.stage) == (arm, seed, stage))

    def entry_of(self, key: str) -> Path:
        return next(r.entry for r in self.runs if r.key == key)


def seeds_from(spec: int | str | None, default: int) -> list[int]:
    """`3` -> [0, 1, 2]; `"0,4"` -> [0, 4]; None -> the scale's default count."""
    if spec is None:
        return list(range(default))
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        n = int(spec)
        if n < 1:
            raise ValueError(f"--seeds must be at least 1, got {n}")
        return list(range(n))
    try:
        seeds = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes a count (3) or a list of seeds (0,4,7), got {spec!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct seeds, got {spec!r}")
    return seeds


def rewrite_paths(content: Any, paths: dict[str, str]) -> Any:
    """Toy-world folders -> the folders a scale puts in their place (longest match first)."""
    if not paths:
        return content
    ordered = sorted(paths, key=len, reverse=True)

    def sub(s: str, key: str) -> str:
        for src in ordered:
            if s == src or s.startswith(src + os.sep):
                return paths[src] + s[len(src) :]
        return s

    return _walk(content, sub)


_PARSER: list[Any] = []
_RESOLVED: dict[str, dict[str, Any]] = {}


def resolve_args(args: list[str]) -> dict[str, Any]:
    """`visprior.stage_cli.resolve_config` for already expanded arguments, its parser built once per process and results
    memoised by the arguments (building LightningCLI's parser costs more than parsing; arms and recipes share configs)."""
    memo_key = "\0".join(args)
    if memo_key not in _RESOLVED:
        if not _PARSER:
            from visprior.stage_cli import parse_only

            cli = parse_only(["fit", *args])
            _PARSER.append(cli.parser)
            resolved = cli.config["fit"].as_dict()
        else:
            resolved = _PARSER[0].parse_args(["fit", *args]).fit.as_dict()
        resolved.pop("config", None)
        _RESOLVED[memo_key] = resolved
    return copy.deepcopy(_RESOLVED[memo_key])


class Resolver:
    """Resolved configs of (recipe, stage, arm, scale), memoised by the composed arguments (arms share most stages)."""

    def __init__(self) -> None:
        self.memo: dict[str, tuple[int, dict[str, Any]]] = {}
        self.configs: list[dict[str, Any]] = []

    def __call__(self, recipe: Recipe, stage: str, arm: str, scale: ScaleSpec) -> tuple[int, dict[str, Any]]:
        from visprior.errors import one_line, unknown_key

        spec = recipe.stages[stage]
        fragments: list[tuple[Path, dict[str, Any]]] = []
        args = expand_config_args(["--config", str(spec.config)], fragments)
        for layer in recipe.layers(stage, arm, scale):
            if layer.file is not None:
                more: list[tuple[Path, dict[str, Any]]] = []
                args += expand_config_args(["--config", str(layer.file)], more)
                fragments += more
            elif layer.content:
                fragments.append((layer.origin, layer.content))
                args += ["--config", yaml.safe_dump(layer.content, sort_keys=False)]
        wiring = recipe.wiring(stage, arm, scale)
        if wiring:
            init = [{"path": placeholder(src), "components": comps} for src, comps in wiring.items()]
            args += ["--config", yaml.safe_dump({"model": {"init_args": {"init_from": init}}}, sort_keys=False)]
        args = [yaml.safe_dump(rewrite_paths(yaml.safe_load(a), scale.paths), sort_keys=False)
                if prev == "--config" else a for prev, a in zip(["", *args[:-1]], args)]  # fmt: skip
        memo_key = "\0".join(args)
        if memo_key not in self.memo:
            try:
                resolved = _quiet(resolve_args, args)
            except Exception as err:  # jsonargparse's errors: one line, with the recipe file that set the key
                key = unknown_key(err) or _key_in(str(err))
                where = fragment_of_key(fragments, key) if key else None
                raise RecipeError(
                    f"{recipe.path.name}: stage {stage!r}, arm {arm!r}, scale {scale.name}: {one_line(err)}"
                    + (f" (set in {where})" if where else "")
                ) from err
            self.configs.append(resolved)
            self.memo[memo_key] = (len(self.configs) - 1, resolved)
        return self.memo[memo_key]


def _key_in(message: str) -> str | None:
    import re

    m = re.search(r'Parser key "([^"]+)"', message)
    return m.group(1) if m else None


def _quiet(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` with Lightning's "Seed set to N" info lines silenced."""
    import logging

    log = logging.getLogger("lightning.fabric.utilities.seed")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        return fn(*args)
    finally:
        log.setLevel(level)


def build_plan(
    recipe: Recipe,
    scale: ScaleSpec,
    arms: list[str] | None,
    seeds: list[int],
    out: Path,
    cache: Path,
    hashes: ContentHashes,
) -> Plan:
    """Resolve and key every stage of every arm and seed (this validates the whole recipe before any work)."""
    chosen = arms or list(recipe.arms)
    unknown = [a for a in chosen if a not in recipe.arms]
    if unknown:
        raise RecipeError(f"{recipe.path.name}: unknown arm(s) {unknown}; arms: {', '.join(recipe.arms)}")
    plan = Plan(recipe, scale, chosen, seeds, out, cache)
    resolver = Resolver()

    def deps(stage: str, arm: str) -> list[str]:
        return recipe.dependencies(stage, arm, scale, resolver(recipe, stage, arm, scale)[1])

    for arm in chosen:
        plan.order[arm] = recipe.stage_order(arm, scale, lambda st, arm=arm: deps(st, arm))
    by_key: dict[str, StageRun] = {}
    for seed in seeds:
        for arm in chosen:
            keys: dict[str, str] = {}
            for stage in plan.order[arm]:
                config_id, resolved = resolver(recipe, stage, arm, scale)
                upstream = {s: keys[s] for s in deps(stage, arm)}
                key, hashed = stage_key(resolved, seed, upstream, hashes)
                keys[stage] = key
                first = by_key.get(key)
                entry = first.entry if first else cache_entry(cache, stage, key)
                run = StageRun(arm, seed, stage, resolved, key, hashed, upstream, entry, config_id,
                               shared_with=first.arm if first else None)  # fmt: skip
                by_key.setdefault(key, run)
                plan.runs.append(run)
    plan.configs = resolver.configs
    hashes.save()
    return plan


def cache_entry(cache: Path, stage: str, key: str) -> Path:
    """`<cache>/<stage>-<key[:12]>`; an entry with this key made by another recipe keeps its folder and its name."""
    existing = sorted(cache.glob(f"*-{key[:12]}")) if cache.is_dir() else []
    return existing[0] if existing else cache / f"{stage}-{key[:12]}"


# ------------------------------------------------------------------------------------------------ the dry run


def stage_budget(resolved: dict[str, Any], scale: ScaleSpec) -> tuple[int | None, str, int | None, str]:
    """(steps, 'B x T tokens x W', tokens per run, unit) from a resolved stage config."""
    trainer = resolved.get("trainer") or {}
    steps = trainer.get("max_steps")
    steps = steps if isinstance(steps, int) and steps > 0 else None
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    world = (devices if isinstance(devices, int) else scale.gpus) * (nodes if isinstance(nodes, int) else 1)
    accumulate = trainer.get("accumulate_grad_batches") or 1
    data = _get(resolved, "data.init_args") or {}
    batch, seq = data.get("batch_size"), data.get("seq_len")
    if not isinstance(batch, int):
        return steps, "?", None, ""
    per = batch * accumulate * world
    if isinstance(seq, int):
        return steps, f"{batch} x {seq} x {accumulate * world}", (steps * per * seq if steps else None), "tokens"
    return steps, f"{batch} images x {accumulate * world}", (steps * per if steps else None), "images"


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def describe_plan(plan: Plan) -> str:
    """The dry run's text: per stage config, the arms that run it, steps, tokens, how many seeds are cached."""
    r, s = plan.recipe, plan.scale
    lines = [
        f"{r.name} at scale {s.name}: {len(plan.arms)} arm(s) x {len(plan.seeds)} seed(s) {plan.seeds}",
        f"  finding: {r.finding}",
        f"  paper: {r.citation.get('title') or r.paper} ({r.source})",
        f"  out: {plan.out}   cache: {plan.cache}",
        "",
    ]
    header = ("stage", "arms", "steps", "batch x seq x world", "per run", "runs cached", "cache entry")
    groups: dict[tuple[str, int], list[StageRun]] = {}
    for run in plan.runs:
        groups.setdefault((run.stage, run.config_id), []).append(run)
    stage_index = list(dict.fromkeys(run.stage for run in plan.runs))  # the order they run in
    rows = []
    for (stage, _), same in sorted(
        groups.items(), key=lambda g: (stage_index.index(g[0][0]), plan.arms.index(g[1][0].arm))
    ):
        arms = sorted({x.arm for x in same}, key=plan.arms.index)
        keys = {x.key: x for x in same}
        arms_text = "all" if len(arms) == len(plan.arms) and len(arms) > 1 else ", ".join(arms)
        if len(arms) > 1 and len(keys) == len(plan.seeds):
            arms_text += " (shared)"
        cached = sum(1 for x in keys.values() if x.done)
        steps, geometry, amount, unit = stage_budget(same[0].resolved, s)
        entry = same[0].entry.name if len(keys) == 1 else f"{len(keys)} entries, e.g. {same[0].entry.name}"
        rows.append((stage, arms_text, str(steps or "?"), geometry, f"{_count(amount)} {unit}".strip(),
                     f"{cached}/{len(keys)}", entry))  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    unique = {x.key: x for x in plan.runs}
    todo = sum(1 for x in unique.values() if not x.done)
    n_eval = sum(len(plan.arms) * len(plan.seeds) for _ in r.evaluations)
    lines += ["", f"  {len(unique)} stage run(s): {len(unique) - todo} cached, {todo} to run; "
              f"{n_eval} evaluation(s): " + ", ".join(f"{'+'.join(e.tasks)} on {st}" for st, e in r.evaluations.items())]  # fmt: skip
    missing = missing_inputs(plan)
    if missing:
        lines += [
            "",
            f"  {len(missing)} input path(s) do not exist (point the scale's `paths` or the models at your copies):",
        ]
        lines += [f"    {p}  ({where})" for p, where in list(missing.items())[:20]]
    return "\n".join(lines)


def missing_inputs(plan: Plan) -> dict[str, str]:
    """{missing path: 'stage, key'} over the plan (paper-scale placeholders until the user points them at data)."""
    out: dict[str, str] = {}
    for run in plan.runs:
        for key, path in input_paths(run.resolved).items():
            if derived_task(path, plan) and (eval_data(plan) / "pairs").is_dir():
                continue  # written by the runner from the toy world (ensure_derived_tasks)
            if not os.path.exists(path) and path not in out:
                out[path] = f"stage {run.stage}, {key}"
    ev = eval_data(plan)
    needs_data = any(t != CLASSIFY_TASK for e in plan.recipe.evaluations.values() for t in e.tasks)
    if needs_data and not ev.exists():
        out.setdefault(str(ev), "evaluation data (the scale's eval.data)")
    return out


DERIVED_TASKS = ("count",)
"""Toy-world folders the runner writes itself, from the toy world's own shards, when a plan reads them: `count` (object
counts of the pair scenes as `cls` shards, visprior/data/toyworld/counting.py)."""


def derived_task(path: str | Path, plan: Plan) -> str | None:
    """The derived toy-world task `path` lies in (at a scale that generates the toy world), else None."""
    if not plan.scale.toyworld:
        return None
    world, p = eval_data(plan), absolute(path)
    return next((name for name in DERIVED_TASKS if p == world / name or world / name in p.parents), None)


def ensure_derived_tasks(plan: Plan) -> None:
    """Before the plan is keyed (a stage's key hashes its data): write the derived toy-world tasks the recipe's stages
    read and the toy world lacks (`count`: a sixth of the scenes held out)."""
    r, wanted = plan.recipe, set()

    def visit(value: str, key: str) -> str:
        if os.path.isabs(value):
            wanted.add(derived_task(value, plan))
        return value

    for arm in r.arms:
        for stage in r.stages:
            for layer in r.layers(stage, arm, plan.scale):
                _walk(layer.content or {}, visit)
    world = eval_data(plan)
    if "count" in wanted and not (world / "count" / "task.json").is_file():
        from visprior.data.toyworld.counting import write_counting_task

        scenes = int(json.loads((world / "pairs" / "manifest.json").read_text())["num_samples"])
        print(f"[reproduce] writing the counting task into {world / 'count'} ({scenes} scenes)", flush=True)
        write_counting_task(world / "pairs", world / "count", train=scenes - scenes // 6, test=scenes // 6)


def eval_data(plan: Plan) -> Path:
    return Path(plan.scale.eval.get("data") or plan.recipe.root / "data" / "toyworld")


# ------------------------------------------------------------------------------------------------ running


def _fmt_time(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


@contextmanager
def locked(entry: Path) -> Iterator[None]:
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[reproduce] waiting for another process running {entry.name}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_config(plan: Plan, run: StageRun) -> dict[str, Any]:
    """The config `visprior fit` gets: the resolved one with the seed, the checkpoints it starts from, its run folder."""
    cfg = with_seed(run.resolved, run.seed)

    def real(s: str, key: str) -> str:
        stage = stage_of_placeholder(s)
        return str(plan.entry_of(run.upstream[stage]) / "run" / "checkpoints" / "last.ckpt") if stage else s

    cfg = _walk(cfg, real)
    logger = _get(cfg, "trainer.logger")
    if not isinstance(logger, dict) or not isinstance(logger.get("init_args"), dict):
        raise ReproduceError(
            f"stage {run.stage}: the runner needs the stage's logger (recipes/_base/run.yaml) for its run folder"
        )
    logger["init_args"].update(save_dir=str(run.entry.parent), name=run.entry.name, version="run")
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["ckpt_path"] = "last"
    return cfg


def last_step(ckpt: Path) -> int | None:
    """The global step of a Lightning checkpoint file (read lazily), or None."""
    if not ckpt.is_file():
        return None
    try:
        import torch

        return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    except Exception:
        return None


def tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return ""


@dataclass
class Launch:
    """How stages and evaluations are started: each a process of its own (the default; `launcher` prefixes the fit
    command, e.g. `torchrun --nproc-per-node 8`), or all inside this process (`in_process`: no start-up per stage)."""

    in_process: bool = False
    launcher: list[str] = field(default_factory=list)
    verbose: bool = False

    def __call__(self, module: str, args: list[str], log: Path, cwd: Path, distributed: bool = False) -> int:
        """Run `python -m module args` with its output in `log`; the exit code."""
        with open(log, "a") as f:
            f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {module} {' '.join(args)}\n")
            f.flush()
            if self.in_process:
                return _in_process(module, args, f)
            prefix = self.launcher if distributed and self.launcher else [sys.executable]
            out = None if self.verbose else f
            proc = subprocess.run([*prefix, "-m", module, *args], cwd=cwd, stdout=out,
                                  stderr=None if self.verbose else subprocess.STDOUT)  # fmt: skip
            return proc.returncode


def _in_process(module: str, args: list[str], log: Any) -> int:
    import gc
    import logging
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    # Lightning's handlers hold the terminal's stream whatever sys.stdout is: while the stage runs its loggers write to
    # the stage's log instead (its info lines, such as the `precision: auto` choice, are what a fit.log is read for)
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    saved = [(lg.level, lg.handlers, lg.propagate) for lg in loggers]
    to_log = logging.StreamHandler(log)
    for lg in loggers:
        lg.handlers, lg.propagate = [to_log], False
        lg.setLevel(logging.INFO)
    with redirect_stdout(log), redirect_stderr(log):
        try:
            if module == "visprior.cli":
                from visprior.cli import main

                main(args)
            elif module == "visprior.eval.classification":
                from jsonargparse import CLI

                from visprior.eval.classification import evaluate_classifier

                CLI(evaluate_classifier, args=args, as_positional=False)
            else:
                raise ValueError(f"cannot run {module} in process")
            return 0
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc(file=log)
            return 1
        finally:
            for lg, (level, handlers, propagate) in zip(loggers, saved):
                lg.setLevel(level)
                lg.handlers, lg.propagate = handlers, propagate
            gc.collect()


def _last_line(log: Path) -> str:
    lines = [ln for ln in tail(log).splitlines() if ln.strip()]
    return lines[-1].replace("  (--debug: traceback)", "") if lines else "no output"


def run_stage(plan: Plan, run: StageRun, prefix: str, launch: Launch) -> tuple[str, dict[str, Any]]:
    """Run (or find finished) one stage; returns (status, its done.json record: wall time, steps, tokens/s, MFU)."""
    with locked(run.entry):
        done = run.entry / "done.json"
        if done.is_file():
            return "cached", json.loads(done.read_text())
        for dep, key in run.upstream.items():
            if not (plan.entry_of(key) / "done.json").is_file():
                raise ReproduceError(f"stage {run.stage} starts from {dep}, which has not finished")
        entry = run.entry
        config = entry / "stage.yaml"
        config.write_text(yaml.safe_dump(run_config(plan, run), sort_keys=False))
        (entry / "key.json").write_text(json.dumps(run.hashed, indent=1, sort_keys=True, default=str) + "\n")
        complete = entry / "complete.json"
        complete.unlink(missing_ok=True)
        resumed = last_step(run.checkpoint)
        marker = json.dumps({"class_path": "visprior.reproduce.StageComplete", "init_args": {"path": str(complete)}})
        if sys.stdout.isatty():
            note = f" resuming from step {resumed}" if resumed else ""
            print(f"{prefix}: running{note} (log: {entry / 'fit.log'})", end="\r", flush=True)
        start = time.perf_counter()
        log = entry / "fit.log"
        code = launch("visprior.cli", ["fit", "--config", str(config), f"--trainer.callbacks+={marker}"], log,
                      plan.recipe.root, distributed=True)  # fmt: skip
        elapsed = time.perf_counter() - start
        attempts_file = entry / "attempts.json"
        attempts = json.loads(attempts_file.read_text()) if attempts_file.is_file() else []
        attempts.append({"started_from_step": resumed, "wall_time_s": round(elapsed, 1), "returncode": code})
        attempts_file.write_text(json.dumps(attempts, indent=1) + "\n")
        if sys.stdout.isatty():
            print(" " * 160, end="\r")
        where = f"stage {run.stage} (arm {run.arm}, seed {run.seed})"
        if code != 0:
            raise ReproduceError(f"{where} failed with exit code {code}: {_last_line(log)}; log: {log}; "
                                 "rerun the same command to resume it")  # fmt: skip
        if not complete.is_file():
            raise ReproduceError(f"{where} stopped before its last step (preempted, or stopped by the non-finite "
                                 f"guard); log: {log}; rerun the same command to resume it")  # fmt: skip
        total = sum(a["wall_time_s"] for a in attempts)
        record = {"key": run.key, "stage": run.stage, "wall_time_s": round(total, 1), **json.loads(complete.read_text()),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        done.write_text(json.dumps(record, indent=1) + "\n")
        note = f" (resumed from step {resumed})" if resumed else ""
        return f"ran{note}", record


def eval_options(plan: Plan, ev: EvaluationSpec) -> dict[str, Any]:
    """The scale's evaluation options under the recipe's. `fewshot` runs only the shot counts the recipe's metrics read
    (`fewshot/4-shot` -> 4) unless `shots` is given: a prompt with k examples carries k + 1 images, so an unread 8-shot
    column would be most of fewshot's time."""
    options = {**plan.scale.eval, **ev.options}
    if "fewshot" in ev.tasks and options.get("shots") is None:
        read = {src.split("/")[1] for m in ev.metrics.values() for src in m.sources if src.startswith("fewshot/")}
        if read:
            options["shots"] = sorted(int(name.removesuffix("-shot")) for name in read)
    return options


def eval_command(plan: Plan, run: StageRun, ev: EvaluationSpec, out: Path) -> tuple[str, list[str]]:
    """(module, arguments) of one evaluation: `visprior eval`, or the classifier's for task `classify`."""
    options = eval_options(plan, ev)
    name = f"{plan.recipe.name}/{run.arm}/seed{run.seed}/{run.stage}"
    common = ["--checkpoint", str(run.checkpoint), "--out", str(out), "--seed", str(run.seed), "--model_name", name]
    if options.get("limit"):  # an int, or a mapping task -> items (JSON, which jsonargparse reads as the dict)
        limit = options["limit"]
        common += ["--limit", json.dumps(limit) if isinstance(limit, dict) else str(limit)]
    if ev.tasks == [CLASSIFY_TASK]:
        return "visprior.eval.classification", [*common, "--val", str(_get(run.resolved, "data.init_args.val"))]
    args = ["eval", *common, "--tasks", ",".join(ev.tasks), "--data", str(eval_data(plan))]
    for key in ("mle_bench", "batch_size"):
        if options.get(key):
            args += [f"--{key}", str(options[key])]
    if options.get("vqa_blind"):
        args += ["--vqa_blind", "true"]
    if options.get("shots") is not None:  # a YAML list [0, 4] or a string "0,4"
        shots = options["shots"]
        args += ["--shots", ",".join(str(k) for k in shots) if isinstance(shots, list) else str(shots)]
    return "visprior.cli", args


def evaluation_key(plan: Plan, run: StageRun, ev: EvaluationSpec, hashes: ContentHashes) -> tuple[str, dict[str, Any]]:
    """The cache key of one evaluation and what it hashes: the stage run's key, tasks, options, the evaluation data's
    content, the seed, and the scoring's revision (a fix to how answers are read must not return results cached
    before it)."""
    from visprior.eval.results import SCORING_REVISION, visprior_version

    options = eval_options(plan, ev)
    if ev.tasks == [CLASSIFY_TASK]:
        val = _get(run.resolved, "data.init_args.val")
        if not val:
            raise ReproduceError(f"evaluation of {run.stage}: task classify needs the stage's data.init_args.val")
        inputs = {"val": hashes.of(val)}
    else:
        inputs = {"data": hashes.of(eval_data(plan) / "eval")}
        if options.get("mle_bench"):
            inputs["mle_bench"] = hashes.of(options["mle_bench"])
    hashes.save()
    doc = {"stage": run.key, "tasks": ev.tasks, "options": {k: v for k, v in options.items() if k != "data"},
           "inputs": inputs, "seed": run.seed, "visprior_version": visprior_version(),
           "scoring_revision": SCORING_REVISION}  # fmt: skip
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest(), doc


def run_evaluation(
    plan: Plan, run: StageRun, ev: EvaluationSpec, hashes: ContentHashes, launch: Launch
) -> tuple[Path, str, float]:
    """Evaluate one finished stage (cached beside it); returns (results.json, status, wall time)."""
    key, doc = evaluation_key(plan, run, ev, hashes)
    folder = run.entry / "eval" / key[:12]
    results = folder / "results.json"
    with locked(run.entry / "eval"):
        if results.is_file():
            return results, "cached", float(json.loads(results.read_text()).get("wall_time_s", 0.0))
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        log = tmp / "eval.log"
        module, args = eval_command(plan, run, ev, tmp)
        code = launch(module, args, log, plan.recipe.root)
        if code != 0 or not (tmp / "results.json").is_file():
            raise ReproduceError(f"evaluation of {run.stage} (arm {run.arm}, seed {run.seed}) failed: "
                                 f"{_last_line(log)}; log: {log}")  # fmt: skip
        (tmp / "key.json").write_text(json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return results, "ran", time.perf_counter() - start


def ensure_toyworld(plan: Plan) -> None:
    """At toy (and smoke) scale: generate the toy world and its tokenizer when they are missing or another version."""
    want = plan.scale.toyworld
    if not want:
        return
    from visprior.data.toyworld.generate import WORLD_VERSION

    world = eval_data(plan)
    info = json.loads((world / "world.json").read_text()) if (world / "world.json").is_file() else None
    preset, seed = want.get("preset", "toy"), int(want.get("seed", 0))
    if (
        info is None
        or info.get("version") != WORLD_VERSION
        or (plan.scale.name != "smoke" and info.get("preset") != preset)
    ):
        what = "missing" if info is None else f"preset {info.get('preset')}, version {info.get('version')}"
        print(f"[reproduce] generating the toy world ({preset}, seed {seed}) into {world} ({what})", flush=True)
        from visprior.data.toyworld import generate

        generate(world, preset=preset, seed=seed)
    from visprior.data.tokenizer import trained_on, world_identity

    identity = world_identity(world) or {}
    vocab_size = 2048 if identity.get("preset") == "smoke" else 8192  # smoke scale runs on whichever world is there
    tokenizer = world / "tokenizer"
    # a tokenizer outlives a regenerated world: a smoke run, then a toy one, read the toy world through the smoke
    # world's 1.6K-token vocabulary; it is retrained unless it records this world and this size
    if not (tokenizer / "tokenizer.json").is_file() or trained_on(tokenizer) != {**identity, "vocab_size": vocab_size}:
        from visprior.data.tokenizer import train_tokenizer

        print(f"[reproduce] training the toy tokenizer into {tokenizer}", flush=True)
        train_tokenizer(world, tokenizer, vocab_size=vocab_size)


def link(target: Path, link_path: Path) -> None:
    """`link_path` -> `target` (a browsable tree in the out folder over the cache)."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() or link_path.exists():
        if link_path.is_symlink() and Path(os.readlink(link_path)) == target:
            return
        link_path.unlink() if link_path.is_symlink() or link_path.is_file() else shutil.rmtree(link_path)
    os.symlink(target, link_path)


def host_info() -> dict[str, Any]:
    import platform

    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def execute(plan: Plan, hashes: ContentHashes, launch: Launch) -> dict[str, Any]:
    """Run every stage and evaluation of the plan (seed by seed, arm by arm), writing results.json as results come in."""
    from visprior.report import measurement, results_document, write_results_document

    recipe = plan.recipe
    plan.out.mkdir(parents=True, exist_ok=True)
    doc = results_document(plan, host_info())
    doc["invocation"] = plan.invocation
    start = time.perf_counter()
    n_arms, n_seeds = len(plan.arms), len(plan.seeds)
    for si, seed in enumerate(plan.seeds, 1):
        for ai, arm in enumerate(plan.arms, 1):
            stages = plan.order[arm]
            for sj, stage in enumerate(stages, 1):
                run = plan.run(arm, seed, stage)
                prefix = f"[reproduce] seed {seed} ({si}/{n_seeds}) · arm {ai}/{n_arms} {arm} · stage {sj}/{len(stages)} {stage}"
                status, done = run_stage(plan, run, prefix, launch)
                wall = float(done.get("wall_time_s", 0.0))
                if status == "cached" and run.shared_with and run.shared_with != arm:
                    status = f"cached (shared with arm {run.shared_with})"
                print(f"{prefix}: {status}, {_fmt_time(wall)}", flush=True)
                speed = {k: done[k] for k in ("global_step", "tokens_per_s", "mfu") if k in done}
                doc["runs"].append({"arm": arm, "seed": seed, "stage": stage, "key": run.key, "entry": str(run.entry),
                                    "status": status.split(" ")[0], "wall_time_s": round(wall, 1), **speed})  # fmt: skip
                link(run.entry / "run", plan.out / "runs" / arm / f"seed{seed}" / stage)
            for stage, ev in recipe.evaluations.items():
                if stage not in stages:
                    continue
                run = plan.run(arm, seed, stage)
                results, status, wall = run_evaluation(plan, run, ev, hashes, launch)
                print(f"[reproduce] seed {seed} ({si}/{n_seeds}) · arm {ai}/{n_arms} {arm} · evaluation "
                      f"{'+'.join(ev.tasks)} on {stage}: {status}, {_fmt_time(wall)}", flush=True)  # fmt: skip
                link(results.parent, plan.out / "eval" / arm / f"seed{seed}" / stage)
                evaluated = json.loads(results.read_text())
                for name, metric in ev.metrics.items():
                    doc["measurements"].setdefault(arm, {}).setdefault(name, {})[str(seed)] = {
                        **measurement(evaluated, metric, results), "results": str(results)}  # fmt: skip
                doc["wall_time_s"] = round(time.perf_counter() - start, 1)
                write_results_document(doc, plan.out)
    doc["complete"] = True
    doc["wall_time_s"] = round(time.perf_counter() - start, 1)
    write_results_document(doc, plan.out)
    return doc


def invocation(recipe: str, scale: str, arms: str | None, seeds: str | None, out: str | None, cache: str | None) -> str:
    parts = ["visprior reproduce", recipe, "--scale", scale]
    for flag, value in (("--arms", arms), ("--seeds", seeds), ("--out", out), ("--cache", cache)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(parts)


def reproduce(
    recipe: str,
    scale: str = "toy",
    arms: str | None = None,
    seeds: str | None = None,
    out: str | None = None,
    cache: str | None = None,
    dry_run: bool = False,
    verbose: bool = False,
    in_process: bool = False,
    launcher: str | None = None,
) -> Path | None:
    """Run a recipe: its arms x seeds x stages (cached), the evaluations, then report.md beside results.json.

    Args:
        recipe: a recipe file, or `<paper>/<finding>` under recipes/ (e.g. vila/interleaved-beats-pairs).
        scale: toy | mini | paper, a scale the recipe adds under `scales:`, smoke (toy at two steps per stage), or a
            scale file.
        arms: comma-separated arms to run (default: all).
        seeds: how many seeds (3 = seeds 0, 1, 2) or a list (0,4,7); default: the scale's (toy: 3).
        out: folder for results.json, report.md, plots and links to the runs (default: runs/<paper>/<finding>).
        cache: the stage cache, shared across recipes (default: runs/cache under the project root).
        dry_run: print the plan (arms, stages, cached or not, tokens per stage) and run nothing.
        verbose: stream each stage's own output instead of writing it to its fit.log.
        in_process: run the stages and evaluations inside this process (no process start-up per stage: quick toy
            runs and tests) instead of one process each.
        launcher: the command that starts each stage's `-m visprior.cli fit ...` instead of this Python, e.g.
            "torchrun --nproc-per-node 8" (multi-GPU without Lightning's own launcher) or "srun python".
    """
    from visprior.report import render_report, terminal_summary

    r = load_recipe(find_recipe(recipe))
    s = load_scale(r, scale)
    seed_list = seeds_from(seeds, s.seeds)
    out_dir = absolute(out) if out else r.root / "runs" / r.path.parent.name / r.path.stem
    cache_dir = absolute(cache) if cache else r.root / "runs" / "cache"
    hashes = ContentHashes(cache_dir / "content-hashes.json")
    chosen = [a.strip() for a in arms.split(",") if a.strip()] if arms else None
    if not dry_run:
        ensure_toyworld(Plan(r, s, [], [], out_dir, cache_dir))
        ensure_derived_tasks(Plan(r, s, [], [], out_dir, cache_dir))
    plan = build_plan(r, s, chosen, seed_list, out_dir, cache_dir, hashes)
    if dry_run:
        print(describe_plan(plan))
        return None
    plan.invocation = invocation(recipe, scale, arms, seeds, out, cache)
    missing = missing_inputs(plan)
    if missing:
        path, where = next(iter(missing.items()))
        more = f" (and {len(missing) - 1} more: --dry-run lists them)" if len(missing) > 1 else ""
        raise FileNotFoundError(
            f"{r.name} at scale {s.name}: input not found: {path} ({where}){more}; point the scale's `paths` (or the "
            f"model fragment) at your copy, converted with `visprior data convert` (data/manifests/ says how)"
        )
    print(f"[reproduce] {r.name} at scale {s.name}: {len(plan.arms)} arm(s) x {len(seed_list)} seed(s), "
          f"{len({x.key for x in plan.runs})} stage run(s) ({sum(1 for x in {y.key: y for y in plan.runs}.values() if x.done)} cached); "
          f"out {out_dir}, cache {cache_dir}", flush=True)  # fmt: skip
    import shlex

    doc = execute(plan, hashes, Launch(in_process, shlex.split(launcher or ""), verbose))
    report = render_report(doc, out_dir)
    print("\n" + terminal_summary(doc))
    print(f"[reproduce] report: {report}; results: {out_dir / 'results.json'}; total {_fmt_time(doc['wall_time_s'])}")
    return report
