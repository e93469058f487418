"""Recipe files: one YAML per paper finding (`recipes/<paper>/<finding>.yaml`), loaded and checked before any work starts.

A recipe says what a paper found, what it reported, and how visprior tests it: which stages run in which order from which
earlier checkpoints, which keys each arm of the ablation changes, what is evaluated, and how every stage changes with the
scale. `visprior reproduce` (visprior/reproduce.py) runs it; `load_recipe` refuses a malformed one naming the file and key.

The format (every key is checked; an unknown one is an error naming the file that set it):

    # visprior reproduce recipes/vila/interleaved-beats-pairs.yaml --scale toy      <- the first line: the exact command
    _base_: [_common.yaml]       recipe files extended (relative to this file): mappings merge key by key, anything else is
                                 replaced (as are `init_from` and an empty `{}`), `null` removes a key (e.g. a stage)
    finding: one sentence
    paper: lsbs | vila | mm1 | lm4ve | visual-words    (the CITATION.cff reference with that arXiv id)
    source: where in the paper (Table 3, Figure 7, ...)
    stages:                      name -> {config, init_from, overrides}; order of execution follows init_from
      align:
        config: align            a stage YAML: recipes/_base/stages/<name>.yaml, or a path relative to the recipe
        init_from: {text-pretrain: [language_model], contrastive: [vision_tower]}   earlier stages' last.ckpt, weights only
                                 (`all`: every component); `{}` starts from nothing
        overrides: {model.init_args.connector.num_tokens: 16}   keys on top of the stage YAML (dotted or nested)
    arms:                        the ablation: each arm states only the keys it changes, per stage, with a comment
      pairs: {label: ..., x: 0, pretrain: {data.init_args.sources: [...]}}   (`init_from:` inside re-wires a stage)
    evaluations:                 stage -> the `visprior eval` tasks on its checkpoint (`classify` for a classifier) and the
      sft:                       metrics the tables show, read from their results.json
        tasks: [fewshot]
        metrics: {fourshot: {label: ..., metric: fewshot/4-shot}}   or pool: [..] (sample-weighted accuracy), mean: [..]
    reported:                    the paper's numbers: {from, where, arms: {arm: {metric: value | {value, from, where}}},
                                 extra_rows: {row: {note, metric: value}}}; `from` is table | printed on figure |
                                 read off figure | text
    claims:                      [{metric, compare: [a, b] (a - b), direction: increase | decrease | none, tolerance,
                                   paper (the paper's a - b; computed from `reported` when both are there), statement}]
    scales: {toy: ..., mini: ..., paper: ...}   each {use, seeds, every_stage, stages, arms, paths, eval} on top of
                                 recipes/_base/scales/<scale>.yaml (see `ScaleSpec`); a recipe may add scales of its own
                                 (`real-cpu`), each also on top of its base file when there is one
    notes: shown in the report

A stage runs in an arm only when an evaluated stage needs it (through `init_from` or a `${checkpoint:<stage>}` value), so
an arm that re-wires `sft` to start from `blind-sft` runs that extra stage and the others do not.

For one stage in one arm at one scale the config is composed in this order, later layers winning:
the stage YAML, the recipe stage's `overrides`, the base scale file (`every_stage`, then `stages.<stage YAML name>`), the
recipe's `scales.<scale>` (`every_stage`, then `stages.<stage name>`), the arm (then the scale's section for it; at
`--scale smoke`, smoke.yaml), and last what the runner sets (run folder, seed, `init_from` paths). A mapping-typed
value (`trainable`) is replaced whole, a spec (`connector`) merges field by field, a list (`sources`) is replaced whole,
as jsonargparse merges repeated `--config`. Values follow the stage YAMLs' path rules (`visprior.config`): relative
paths are relative to the project root, `.yaml` references are inlined. A scale's
`paths` then rewrite toy-world folders into the datasets that stand in for them at that scale (`data/toyworld/pairs:
data/coyo_25m`), so arms written once run at every scale.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visprior.config import BASE_KEY, RecipeError, absolute, project_root, resolve_paths

PAPERS: dict[str, str] = {
    "lsbs": "arXiv:2509.26625",
    "vila": "arXiv:2312.07533",
    "mm1": "arXiv:2403.09611",
    "lm4ve": "arXiv:2310.12973",
    "visual-words": "arXiv:2403.07720",
}
"""Recipe `paper:` ids -> the arXiv identifier of their CITATION.cff reference."""

RECIPE_KEYS = ("finding", "paper", "source", "stages", "arms", "evaluations", "reported", "claims", "scales", "notes")
STAGE_KEYS = ("config", "init_from", "overrides")
ARM_META_KEYS = ("label", "x", "description")
EVAL_KEYS = ("tasks", "metrics", "options")
METRIC_KEYS = ("label", "metric", "pool", "mean", "unit", "higher_is_better", "paper_metric", "chance")
CLAIM_KEYS = ("metric", "compare", "direction", "tolerance", "paper", "statement")
SCALE_KEYS = (
    "use",
    "extends",
    "description",
    "seeds",
    "gpus",
    "every_stage",
    "stages",
    "arms",
    "paths",
    "eval",
    "toyworld",
)
EVAL_OPTION_KEYS = ("data", "limit", "mle_bench", "batch_size", "shots", "vqa_blind")
CONFIG_GROUPS = ("trainer", "model", "data", "seed_everything", "ckpt_path", "checkpoint", "nonfinite")
"""Top-level keys an override may set: the groups of a `visprior fit` config."""
MARKS = ("table", "printed on figure", "read off figure", "text")
DIRECTIONS = ("increase", "decrease", "none")
UNITS = {"%": 100.0, "CIDEr": 100.0, "ppl": 1.0, "": 1.0}
"""Display unit -> factor from the value results.json stores (accuracies in [0, 1], CIDEr-D as computed)."""
SCALES = ("toy", "mini", "paper")
CLASSIFY_TASK = "classify"
METRIC_NAMES: dict[str, str] = {
    "vqa": r"(blind/)?(all|mc|open|type/\w+)",  # blind/: with options.vqa_blind
    "fewshot": r"\d+-shot",
    "mle_bench": r"(blind/)?(gen|gen_strict|ll|ll_letter)/(small|medium|large|average|answered)",
    "text": r"ppl/\w+|qa/(all|reasoning|knowledge)",
    "caption": r"cider_d",
    "classify": r"top1|top5",
}
"""The metric names each task writes into results.json (visprior/eval/), so a misspelt one fails before any training."""
STAGE_REF = re.compile(r"\$\{checkpoint:([A-Za-z0-9_.-]+)\}")
STAGE_PLACEHOLDER = "/visprior-stage/"
"""`${checkpoint:NAME}` and `init_from` paths become `/visprior-stage/NAME/last.ckpt` until the runner knows the folder."""


# ------------------------------------------------------------------------------------------------ loading, merging


@dataclass
class Source:
    """Which file set which dotted key, so an error can name it."""

    origins: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def of(self, dotted: str) -> Path:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            hit = self.origins.get(".".join(parts[:i]))
            if hit is not None:
                return hit
        return self.files[-1]


def _record(origins: dict[str, Path], content: Any, path: Path, prefix: str = "") -> None:
    if isinstance(content, dict):
        for k, v in content.items():
            dotted = f"{prefix}{k}"
            origins[dotted] = path
            _record(origins, v, path, dotted + ".")


REPLACED_WHOLE = ("init_from",)
"""Recipe keys a later file replaces rather than merges: where a stage starts from is said in one place."""


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge key by key (an empty one, and `init_from`, replace), other values replace,
    `None` removes the key."""
    out = dict(base)
    for k, v in top.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and v and k not in REPLACED_WHOLE and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path} is not valid YAML{where}: {problem}; quote values holding ': '") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path} must hold a mapping at the top level")
    return data


def load_merged(path: Path, source: Source, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe with its `_base_` recipes merged under it, recording where each key came from."""
    if path in _stack:
        raise RecipeError(f"'{BASE_KEY}' cycle: {' -> '.join(str(p) for p in (*_stack, path))}")
    data = read_yaml(path)
    raw = data.pop(BASE_KEY, [])
    bases = [raw] if isinstance(raw, str) else raw
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: '{BASE_KEY}' must be a path or a list of paths relative to the file")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = deep_merge(merged, load_merged(absolute(path.parent / b), source, (*_stack, path)))
    _record(source.origins, data, path)
    source.files.append(path)
    return deep_merge(merged, data)


def first_command_line(path: Path) -> str | None:
    """The command on the recipe's first line (`# visprior reproduce ...`)."""
    first = path.read_text().lstrip().splitlines()[0] if path.read_text().strip() else ""
    m = re.match(r"#\s*(visprior reproduce .+)$", first)
    return m.group(1).strip() if m else None


def expand_dotted(mapping: dict[str, Any]) -> dict[str, Any]:
    """`{"model.init_args.connector.num_tokens": 16}` -> nested mappings, merged with any nested keys beside it."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        value = expand_dotted(value) if isinstance(value, dict) else value
        parts = str(key).split(".")
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        out = deep_merge(out, {parts[0]: nested}) if isinstance(nested, dict) else {**out, parts[0]: nested}
    return out


def placeholder(stage: str) -> str:
    return f"{STAGE_PLACEHOLDER}{stage}/last.ckpt"


def with_placeholders(content: Any) -> Any:
    """`${checkpoint:NAME}` -> the placeholder path the runner later replaces with NAME's checkpoint."""
    if isinstance(content, dict):
        return {k: with_placeholders(v) for k, v in content.items()}
    if isinstance(content, list):
        return [with_placeholders(v) for v in content]
    if isinstance(content, str):
        return STAGE_REF.sub(lambda m: placeholder(m.group(1)), content)
    return content


# ------------------------------------------------------------------------------------------------ the parts


@dataclass
class Layer:
    """One piece of a stage's config: a fragment file, or override content (paths resolved) from `origin`."""

    origin: Path
    what: str
    """Where in the recipe or scale it comes from (`arms.pairs.pretrain`), for errors."""
    file: Path | None = None
    content: dict[str, Any] | None = None


@dataclass
class StageSpec:
    name: str
    config: Path
    init_from: dict[str, list[str] | None]
    overrides: dict[str, Any]

    @property
    def config_name(self) -> str:
        return self.config.stem


@dataclass
class ArmSpec:
    name: str
    label: str
    x: float | None
    description: str
    stages: dict[str, dict[str, Any]]
    """stage -> overrides (nested, `${checkpoint:}` as placeholders); `init_from` kept apart in `init_from`."""
    init_from: dict[str, dict[str, list[str] | None]]


@dataclass
class MetricSpec:
    name: str
    evaluation: str
    """The evaluated stage."""
    label: str
    sources: list[str]
    """`task/metric` keys of the evaluation's results.json."""
    combine: str
    """`one`, `pool` (accuracies weighted by their sample counts) or `mean` (unweighted)."""
    unit: str = "%"
    higher_is_better: bool = True
    paper_metric: str = ""
    """What the paper's column measures, when it is not the same thing (e.g. 'Vision-Centric VQA average')."""
    chance: float | None = None
    """A guess's score in display units (25 for a 4-way choice in %): the report says which arms are above it."""

    @property
    def factor(self) -> float:
        return UNITS[self.unit]


@dataclass
class EvaluationSpec:
    stage: str
    tasks: list[str]
    metrics: dict[str, MetricSpec]
    options: dict[str, Any]


@dataclass
class ReportedValue:
    value: float
    mark: str
    where: str


@dataclass
class ClaimSpec:
    metric: str
    compare: tuple[str, str]
    direction: str
    tolerance: float | None
    paper: float | None
    paper_mark: str
    statement: str


@dataclass
class ScaleSpec:
    """A scale: seeds by default, per-stage overrides, dataset paths that stand in for the toy world's, evaluation data.

    Base scale files (`recipes/_base/scales/<scale>.yaml`) key their `stages` by stage YAML name (they hold for every
    recipe); a recipe's `scales.<scale>` keys them by the recipe's stage names. `every_stage` entries are fragment files
    or override mappings applied to every stage; `paths` maps toy-world folders (relative to the project root) to the
    folders used instead; `eval` holds `visprior eval` options (`data`, `limit`, `mle_bench`, `batch_size`, `shots`,
    `vqa_blind`); `toyworld` (`{preset, seed}`) asks the runner to generate the toy world when it is missing; `gpus` is
    the world size the plan assumes when the trainer says `devices: auto`.
    """

    name: str
    seeds: int = 1
    gpus: int = 1
    description: str = ""
    every_stage: list[Layer] = field(default_factory=list)
    by_config: dict[str, list[Layer]] = field(default_factory=dict)
    by_stage: dict[str, list[Layer]] = field(default_factory=dict)
    by_arm: dict[str, dict[str, list[Layer]]] = field(default_factory=dict)
    """arm -> stage -> layers applied after the arm's own: what an arm changes differently at this scale (a recipe's
    `scales.<scale>.arms`; e.g. MM1's token counts are 16 / 64 in the toy world and 64 / 144 at paper scale)."""
    init_from: dict[str, dict[str, list[str] | None]] = field(default_factory=dict)
    after_arms: list[Layer] = field(default_factory=list)
    """Layers on every stage after the arms' own: `--scale smoke`'s two steps, whatever budget the recipe's toy scale
    or an arm sets."""
    arm_init_from: dict[str, dict[str, dict[str, list[str] | None]]] = field(default_factory=dict)
    """arm -> stage -> where the stage starts from in that arm at this scale (`scales.<scale>.arms.<arm>.<stage>.
    init_from`: e.g. an arm that loads the toy tower from `classify` loads nothing where the tower is released)."""
    paths: dict[str, str] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    toyworld: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)


@dataclass
class Recipe:
    path: Path
    root: Path
    command: str
    finding: str
    paper: str
    citation: dict[str, Any]
    source: str
    stages: dict[str, StageSpec]
    arms: dict[str, ArmSpec]
    evaluations: dict[str, EvaluationSpec]
    reported: dict[str, dict[str, ReportedValue]]
    extra_rows: dict[str, dict[str, Any]]
    claims: list[ClaimSpec]
    scale_sections: dict[str, dict[str, Any]]
    notes: str
    origin: Source

    @property
    def name(self) -> str:
        """`<paper folder>/<finding>`, e.g. `vila/interleaved-beats-pairs`."""
        return f"{self.path.parent.name}/{self.path.stem}"

    @property
    def metrics(self) -> dict[str, MetricSpec]:
        return {name: m for ev in self.evaluations.values() for name, m in ev.metrics.items()}

    # -------------------------------------------------------------------------------------------- per arm

    def wiring(self, stage: str, arm: str, scale: ScaleSpec) -> dict[str, list[str] | None]:
        """The stage's `init_from` after the scale, the arm and the scale's section for the arm re-wired it (the last
        one that says wins)."""
        wiring = self.stages[stage].init_from
        wiring = scale.init_from.get(stage, wiring)
        wiring = self.arms[arm].init_from.get(stage, wiring)
        return scale.arm_init_from.get(arm, {}).get(stage, wiring)

    def dependencies(self, stage: str, arm: str, scale: ScaleSpec, resolved: dict[str, Any] | None = None) -> list[str]:
        """The stages `stage` starts from: its `init_from` wiring, and every `${checkpoint:NAME}` its config still holds
        (in `resolved`, the composed config, when given: a later layer may have replaced the reference)."""
        refs = set(self.wiring(stage, arm, scale))
        if resolved is not None:
            refs |= stage_refs_in_placeholders(resolved)
        else:
            for layer in self.layers(stage, arm, scale):
                if layer.content is not None:
                    refs |= stage_refs_in_placeholders(layer.content)
        unknown = sorted(refs - set(self.stages))
        if unknown:
            raise RecipeError(f"{self.path}: stage {stage!r} (arm {arm!r}) starts from unknown stage(s) {unknown}")
        return sorted(refs, key=list(self.stages).index)

    def stage_order(self, arm: str, scale: ScaleSpec, deps: Any = None) -> list[str]:
        """The stages `arm` needs (the evaluated ones and what they start from), each after the ones it starts from.

        `deps(stage)` gives a stage's dependencies (default: `dependencies` from the layers)."""
        deps = deps or (lambda st: self.dependencies(st, arm, scale))
        needed: list[str] = []
        visiting: list[str] = []

        def visit(stage: str) -> None:
            if stage in needed:
                return
            if stage in visiting:
                cycle = " -> ".join([*visiting[visiting.index(stage) :], stage])
                raise RecipeError(f"{self.path}: the stages start from each other in a cycle: {cycle}")
            visiting.append(stage)
            for dep in deps(stage):
                visit(dep)
            visiting.pop()
            needed.append(stage)

        for stage in sorted(self.evaluations, key=list(self.stages).index):
            visit(stage)
        return needed

    def layers(self, stage: str, arm: str, scale: ScaleSpec) -> list[Layer]:
        """The override layers on top of the stage YAML, in the order they apply (see the module docstring)."""
        spec = self.stages[stage]
        out = []
        if spec.overrides:
            out.append(Layer(self.origin.of(f"stages.{stage}.overrides"), f"stages.{stage}.overrides",
                             content=self._resolved(spec.overrides, f"stages.{stage}.overrides")))  # fmt: skip
        out += scale.every_stage
        out += scale.by_config.get(spec.config_name, [])
        out += scale.by_stage.get(stage, [])
        overrides = self.arms[arm].stages.get(stage)
        if overrides:
            out.append(Layer(self.origin.of(f"arms.{arm}.{stage}"), f"arms.{arm}.{stage}",
                             content=self._resolved(overrides, f"arms.{arm}.{stage}")))  # fmt: skip
        return out + scale.by_arm.get(arm, {}).get(stage, []) + scale.after_arms

    def _resolved(self, content: dict[str, Any], where: str) -> dict[str, Any]:
        origin = self.origin.of(where)
        return resolve_paths(content, project_root(origin))


def stage_refs_in_placeholders(content: Any) -> set[str]:
    """Stage names behind placeholder paths in already-converted content."""
    if isinstance(content, dict):
        return set().union(set(), *(stage_refs_in_placeholders(v) for v in content.values()))
    if isinstance(content, list):
        return set().union(set(), *(stage_refs_in_placeholders(v) for v in content))
    if isinstance(content, str) and content.startswith(STAGE_PLACEHOLDER):
        return {content[len(STAGE_PLACEHOLDER) :].split("/", 1)[0]}
    return set()


# ------------------------------------------------------------------------------------------------ validation


class _Check:
    """Raise `RecipeError("<file>: <key>: <message>")`, the file being the one that set the key."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> None:
        raise RecipeError(f"{self.source.of(key)}: {key}: {message}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {type(value).__name__}")
        if allowed is not None:
            for k in value:
                if k not in allowed:
                    self.fail(f"{key}.{k}", f"unknown key; expected one of {', '.join(allowed)}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "expected a non-empty string")
        return value.strip()

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number, got {value!r}")
        return float(value)

    def overrides(self, value: Any, key: str) -> dict[str, Any]:
        nested = expand_dotted(self.mapping(value, key))
        for group in nested:
            if group not in CONFIG_GROUPS:
                self.fail(
                    f"{key}.{group}", f"not a `visprior fit` config group; expected one of {', '.join(CONFIG_GROUPS)}"
                )
        return nested

    def init_from(self, value: Any, key: str) -> dict[str, list[str] | None]:
        out: dict[str, list[str] | None] = {}
        for src, comps in self.mapping(value, key).items():
            if comps == "all" or comps is None:
                out[src] = None
            elif isinstance(comps, list) and comps and all(isinstance(c, str) for c in comps):
                out[src] = list(comps)
            else:
                self.fail(f"{key}.{src}", "expected a list of components (vision_tower, connector, ...) or `all`")
        return out


def stage_config_path(value: str, recipe_file: Path, root: Path) -> Path:
    """A stage YAML named by `config:`: a name in recipes/_base/stages/, or a path relative to the recipe file."""
    if value.endswith((".yaml", ".yml")):
        return absolute(recipe_file.parent / value)
    return root / "recipes" / "_base" / "stages" / f"{value}.yaml"


def citation(root: Path, paper: str) -> dict[str, Any]:
    """The CITATION.cff reference of `paper` (matched by its arXiv id), as {title, authors, year, venue, arxiv}."""
    cff = root / "CITATION.cff"
    if not cff.is_file():  # a recipes/ tree linked elsewhere (tests): the package's own project
        cff = Path(__file__).resolve().parents[1] / "CITATION.cff"
    arxiv = PAPERS[paper]
    refs = (yaml.safe_load(cff.read_text()) or {}).get("references", []) if cff.is_file() else []
    for ref in refs:
        if any(i.get("value") == arxiv for i in ref.get("identifiers") or []):
            authors = [a.get("family-names") or a.get("name", "") for a in ref.get("authors", [])]
            return {"title": ref.get("title", ""), "authors": authors, "year": ref.get("year"),
                    "venue": ref.get("collection-title", ""), "arxiv": arxiv}  # fmt: skip
    return {"title": "", "authors": [], "year": None, "venue": "", "arxiv": arxiv}


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe; a missing or malformed key raises `RecipeError` naming the file and the key."""
    from visprior.eval.runner import TASKS

    p = absolute(path)
    source = Source()
    data = load_merged(p, source)
    check = _Check(source)
    for k in data:
        if k not in RECIPE_KEYS:
            check.fail(k, f"unknown recipe key; expected one of {', '.join(RECIPE_KEYS)}")
    for k in ("finding", "paper", "source", "stages", "arms", "evaluations", "claims", "scales"):
        if k not in data:
            raise RecipeError(f"{p}: '{k}' is missing (see visprior/recipe.py for the format)")
    root = project_root(p)
    command = first_command_line(p)
    if command is None:
        raise RecipeError(f"{p}: the first line must be the command that runs it: '# visprior reproduce {p.name} ...'")
    paper = check.text(data["paper"], "paper")
    if paper not in PAPERS:
        check.fail("paper", f"unknown paper {paper!r}; expected one of {', '.join(PAPERS)}")

    stages: dict[str, StageSpec] = {}
    for name, spec in check.mapping(data["stages"], "stages").items():
        key = f"stages.{name}"
        spec = check.mapping(spec, key, STAGE_KEYS)
        config = stage_config_path(check.text(spec.get("config"), f"{key}.config"), source.of(key), root)
        if not config.is_file():
            check.fail(f"{key}.config", f"stage YAML not found: {config}")
        stages[name] = StageSpec(
            name,
            config,
            check.init_from(spec.get("init_from") or {}, f"{key}.init_from"),
            with_placeholders(check.overrides(spec.get("overrides") or {}, f"{key}.overrides")),
        )
    if not stages:
        check.fail("stages", "a recipe needs at least one stage")
    for name, spec in stages.items():
        for src in spec.init_from:
            if src not in stages:
                check.fail(f"stages.{name}.init_from.{src}", f"unknown stage; stages: {', '.join(stages)}")

    arms: dict[str, ArmSpec] = {}
    for name, spec in check.mapping(data["arms"], "arms").items():
        key = f"arms.{name}"
        spec = check.mapping(spec or {}, key)
        per_stage, wiring = {}, {}
        for k, v in spec.items():
            if k in ARM_META_KEYS:
                continue
            if k not in stages:
                check.fail(f"{key}.{k}", f"not a stage of this recipe ({', '.join(stages)}) nor one of {ARM_META_KEYS}")
            v = dict(check.mapping(v, f"{key}.{k}"))
            if "init_from" in v:
                wiring[k] = check.init_from(v.pop("init_from") or {}, f"{key}.{k}.init_from")
            per_stage[k] = with_placeholders(check.overrides(v, f"{key}.{k}"))
        x = spec.get("x")
        arms[str(name)] = ArmSpec(
            str(name),
            str(spec.get("label") or name),
            None if x is None else check.number(x, f"{key}.x"),
            str(spec.get("description") or ""),
            per_stage,
            wiring,
        )
    if not arms:
        check.fail("arms", "a recipe needs at least one arm")

    evaluations: dict[str, EvaluationSpec] = {}
    for stage, spec in check.mapping(data["evaluations"], "evaluations").items():
        key = f"evaluations.{stage}"
        if stage not in stages:
            check.fail(key, f"not a stage of this recipe ({', '.join(stages)})")
        spec = check.mapping(spec, key, EVAL_KEYS)
        tasks = spec.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            check.fail(f"{key}.tasks", "expected a list of evaluation tasks")
        for t in tasks:
            if t not in TASKS and t != CLASSIFY_TASK:
                check.fail(f"{key}.tasks", f"unknown task {t!r}; tasks: {', '.join([*TASKS, CLASSIFY_TASK])}")
        if CLASSIFY_TASK in tasks and len(tasks) > 1:
            check.fail(f"{key}.tasks", f"{CLASSIFY_TASK!r} evaluates a classifier and goes alone")
        options = _eval_options(check, spec.get("options"), f"{key}.options")
        metrics = {}
        for mname, m in check.mapping(spec.get("metrics"), f"{key}.metrics").items():
            metrics[mname] = _metric(check, f"{key}.metrics.{mname}", mname, stage, tasks, m)
            blind = [src for src in metrics[mname].sources if src.startswith("vqa/blind/")]
            if blind and not options.get("vqa_blind"):
                check.fail(f"{key}.metrics.{mname}", f"{blind[0]} is written only with `options: {{vqa_blind: true}}`")
        evaluations[stage] = EvaluationSpec(stage, list(tasks), metrics, dict(options))
    names = [m for ev in evaluations.values() for m in ev.metrics]
    if len(set(names)) != len(names):
        check.fail("evaluations", f"metric names must be unique across evaluations: {names}")
    all_metrics = {n: m for ev in evaluations.values() for n, m in ev.metrics.items()}

    reported, extra_rows = _reported(check, data.get("reported") or {}, arms, all_metrics)
    claims = []
    for i, c in enumerate(
        data["claims"] if isinstance(data["claims"], list) else check.fail("claims", "expected a list")
    ):
        claims.append(_claim(check, f"claims.{i}", c, arms, all_metrics, reported))
    if not claims:
        check.fail("claims", "a recipe states at least one claim")
    scales = check.mapping(data["scales"], "scales")
    for s in SCALES:
        if s not in scales:
            check.fail("scales", f"missing scale {s!r}: every recipe has toy, mini and paper")
    for s, section in scales.items():
        check.mapping(section or {}, f"scales.{s}", SCALE_KEYS)

    return Recipe(
        path=p,
        root=root,
        command=command,
        finding=check.text(data["finding"], "finding"),
        paper=paper,
        citation=citation(root, paper),
        source=check.text(data["source"], "source"),
        stages=stages,
        arms=arms,
        evaluations=evaluations,
        reported=reported,
        extra_rows=extra_rows,
        claims=claims,
        scale_sections={s: dict(v or {}) for s, v in scales.items()},
        notes=str(data.get("notes") or "").strip(),
        origin=source,
    )


def _eval_options(check: _Check, value: Any, key: str) -> dict[str, Any]:
    """`visprior eval` options (an evaluation's `options`, a scale's `eval`), their values checked before any run."""
    options = check.mapping(value or {}, key, EVAL_OPTION_KEYS)
    shots = options.get("shots")
    if shots is not None and not (
        isinstance(shots, list) and shots and all(isinstance(k, int) and k >= 0 for k in shots)
    ):
        check.fail(f"{key}.shots", f"expected a list of in-context example counts like [0, 4], got {shots!r}")
    if not isinstance(options.get("vqa_blind", False), bool):
        check.fail(f"{key}.vqa_blind", f"expected true or false, got {options['vqa_blind']!r}")
    limit = options.get("limit")
    if limit is not None:
        from visprior.eval.runner import TASKS

        per_task = limit if isinstance(limit, dict) else {"": limit}
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in per_task.values()):
            check.fail(
                f"{key}.limit", f"expected a positive item count, or one per task like {{fewshot: 400}}, got {limit!r}"
            )
        if isinstance(limit, dict) and set(limit) - set(TASKS):
            check.fail(f"{key}.limit", f"unknown task(s) {sorted(set(limit) - set(TASKS))}; tasks: {', '.join(TASKS)}")
    return options


def _metric(check: _Check, key: str, name: str, stage: str, tasks: list[str], m: Any) -> MetricSpec:
    m = check.mapping(m, key, METRIC_KEYS)
    kinds = [k for k in ("metric", "pool", "mean") if k in m]
    if len(kinds) != 1:
        check.fail(key, "give exactly one of metric (one value), pool (accuracies weighted by count) or mean")
    kind = kinds[0]
    sources = [m[kind]] if kind == "metric" else m[kind]
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        check.fail(f"{key}.{kind}", "expected a `task/metric` string (or a list of them for pool / mean)")
    for s in sources:
        task = s.split("/", 1)[0]
        if "/" not in s or task not in tasks:
            check.fail(f"{key}.{kind}", f"{s!r} must be `<task>/<metric>` with a task of this evaluation ({tasks})")
        pattern = METRIC_NAMES.get(task)
        if pattern and not re.fullmatch(pattern, s.split("/", 1)[1]):
            check.fail(f"{key}.{kind}", f"{task} writes no metric {s.split('/', 1)[1]!r} (its names: {pattern})")
    unit = m.get("unit", "%")
    if unit not in UNITS:
        check.fail(f"{key}.unit", f"unknown unit {unit!r}; units: {list(UNITS)}")
    hib = m.get("higher_is_better", unit != "ppl")
    if not isinstance(hib, bool):
        check.fail(f"{key}.higher_is_better", "expected true or false")
    chance = m.get("chance")
    if chance is not None and (isinstance(chance, bool) or not isinstance(chance, (int, float))):
        check.fail(
            f"{key}.chance",
            f"expected a guess's score in the metric's unit (25 for a 4-way choice in %), got {chance!r}",
        )
    return MetricSpec(name, stage, str(m.get("label") or name), list(sources), "one" if kind == "metric" else kind,
                      unit, hib, str(m.get("paper_metric") or ""),
                      None if chance is None else float(chance))  # fmt: skip


def _value(check: _Check, key: str, v: Any, mark: str, where: str) -> ReportedValue:
    if isinstance(v, dict):
        check.mapping(v, key, ("value", "from", "where"))
        mark, where = v.get("from", mark), v.get("where", where)
        v = v.get("value")
    if mark not in MARKS:
        check.fail(key, f"mark each reported value with `from`: one of {', '.join(MARKS)}")
    return ReportedValue(check.number(v, key), mark, str(where or ""))


def _reported(
    check: _Check, data: Any, arms: dict[str, ArmSpec], metrics: dict[str, MetricSpec]
) -> tuple[dict[str, dict[str, ReportedValue]], dict[str, dict[str, Any]]]:
    data = check.mapping(data, "reported", ("from", "where", "arms", "extra_rows"))
    mark, where = data.get("from"), str(data.get("where") or "")
    out: dict[str, dict[str, ReportedValue]] = {}
    for arm, values in check.mapping(data.get("arms") or {}, "reported.arms").items():
        if arm not in arms:
            check.fail(
                f"reported.arms.{arm}",
                f"not an arm ({', '.join(arms)}); a row the recipe does not run goes in extra_rows",
            )
        out[arm] = {}
        for metric, v in check.mapping(values, f"reported.arms.{arm}").items():
            if metric not in metrics:
                check.fail(f"reported.arms.{arm}.{metric}", f"not a metric of the evaluations ({', '.join(metrics)})")
            out[arm][metric] = _value(check, f"reported.arms.{arm}.{metric}", v, mark, where)
    extra: dict[str, dict[str, Any]] = {}
    for row, values in check.mapping(data.get("extra_rows") or {}, "reported.extra_rows").items():
        values = dict(check.mapping(values, f"reported.extra_rows.{row}"))
        note = str(values.pop("note", ""))
        extra[row] = {"note": note, "values": {}}
        for metric, v in values.items():
            if metric not in metrics:
                check.fail(f"reported.extra_rows.{row}.{metric}", f"not a metric ({', '.join(metrics)})")
            extra[row]["values"][metric] = _value(check, f"reported.extra_rows.{row}.{metric}", v, mark, where)
    return out, extra


def _claim(
    check: _Check,
    key: str,
    c: Any,
    arms: dict[str, ArmSpec],
    metrics: dict[str, MetricSpec],
    reported: dict[str, dict[str, ReportedValue]],
) -> ClaimSpec:
    c = check.mapping(c, key, CLAIM_KEYS)
    metric = c.get("metric")
    if metric not in metrics:
        check.fail(f"{key}.metric", f"not a metric of the evaluations ({', '.join(metrics)})")
    pair = c.get("compare")
    if not (isinstance(pair, list) and len(pair) == 2 and all(a in arms for a in pair) and pair[0] != pair[1]):
        check.fail(f"{key}.compare", f"expected [arm_a, arm_b] (a - b), two different arms of {', '.join(arms)}")
    direction = c.get("direction")
    if direction not in DIRECTIONS:
        check.fail(f"{key}.direction", f"expected one of {', '.join(DIRECTIONS)}")
    tol = c.get("tolerance")
    tolerance = None if tol is None else check.number(tol, f"{key}.tolerance")
    if direction == "none" and tolerance is None:
        check.fail(f"{key}.tolerance", "a claim of no difference needs the tolerance that counts as none")
    a, b = (reported.get(pair[0], {}).get(metric), reported.get(pair[1], {}).get(metric))
    computed = None if a is None or b is None else round(a.value - b.value, 4)
    paper = c.get("paper", computed)
    if paper is not None:
        paper = check.number(paper, f"{key}.paper")
        if computed is not None and abs(paper - computed) > 0.051:
            check.fail(
                f"{key}.paper", f"{paper} disagrees with the reported values ({pair[0]} - {pair[1]} = {computed})"
            )
    marks = sorted({v.mark for v in (a, b) if v is not None})
    return ClaimSpec(metric, (pair[0], pair[1]), direction, tolerance, paper, ", ".join(marks),
                     str(c.get("statement") or "").strip())  # fmt: skip


# ------------------------------------------------------------------------------------------------ scales


def _scale_layers(check: _Check, value: Any, key: str, origin: Path) -> list[Layer]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            f = absolute(origin.parent / item)
            if not f.is_file():
                check.fail(key, f"fragment not found: {f}")
            out.append(Layer(origin, f"{key}[{i}]", file=f))
        else:
            content = with_placeholders(check.overrides(item, key))
            out.append(Layer(origin, key, content=resolve_paths(content, project_root(origin))))
    return out


def _apply_section(
    scale: ScaleSpec, section: dict[str, Any], source: Source, where: str, by: str, stages: Any, arms: Any = None
) -> None:
    """Add one scale section (a base file's, keyed by stage YAML; or a recipe's, keyed by stage name) to `scale`."""
    check = _Check(source)
    origin = source.of(where) if where else source.files[-1]
    prefix = f"{where}." if where else ""
    if "seeds" in section:
        scale.seeds = int(check.number(section["seeds"], f"{prefix}seeds"))
    if "gpus" in section:
        scale.gpus = int(check.number(section["gpus"], f"{prefix}gpus"))
    if section.get("description"):
        scale.description = str(section["description"]).strip()
    if "every_stage" in section:
        scale.every_stage += _scale_layers(check, section["every_stage"], f"{prefix}every_stage", origin)
    for stage, value in check.mapping(section.get("stages") or {}, f"{prefix}stages").items():
        key = f"{prefix}stages.{stage}"
        if stages is not None and stage not in stages:
            check.fail(key, f"not a stage of this recipe ({', '.join(stages)})")
        value = dict(check.mapping(value, key))
        if "init_from" in value:
            if by == "config":
                check.fail(f"{key}.init_from", "a base scale cannot re-wire stages (it does not know the recipe's)")
            scale.init_from[stage] = check.init_from(value.pop("init_from") or {}, f"{key}.init_from")
        if value:
            target = scale.by_config if by == "config" else scale.by_stage
            target.setdefault(stage, []).extend(_scale_layers(check, value, key, source.of(key)))
    for arm, per_stage in check.mapping(section.get("arms") or {}, f"{prefix}arms").items():
        key = f"{prefix}arms.{arm}"
        if by == "config" or arms is None or arm not in arms:
            check.fail(key, "a recipe's scale may override its own arms only" if by != "config" else
                       "a base scale cannot override arms (it does not know the recipe's)")  # fmt: skip
        for stage, value in check.mapping(per_stage, key).items():
            if stage not in stages:
                check.fail(f"{key}.{stage}", f"not a stage of this recipe ({', '.join(stages)})")
            value = dict(check.mapping(value, f"{key}.{stage}"))
            if "init_from" in value:
                wiring = check.init_from(value.pop("init_from") or {}, f"{key}.{stage}.init_from")
                scale.arm_init_from.setdefault(arm, {})[stage] = wiring
            if value:
                layers = _scale_layers(check, value, f"{key}.{stage}", source.of(f"{key}.{stage}"))
                scale.by_arm.setdefault(arm, {}).setdefault(stage, []).extend(layers)
    root = project_root(origin)
    for src, dst in check.mapping(section.get("paths") or {}, f"{prefix}paths").items():
        scale.paths[str(absolute(root / src))] = str(absolute(root / check.text(dst, f"{prefix}paths.{src}")))
    options = _eval_options(check, section.get("eval"), f"{prefix}eval")
    for k, v in options.items():
        scale.eval[k] = str(absolute(root / v)) if k in ("data", "mle_bench") and isinstance(v, str) else v
    if "toyworld" in section:
        scale.toyworld = check.mapping(section["toyworld"], f"{prefix}toyworld", ("preset", "seed")) or None


def load_scale_file(
    path: Path, scale: ScaleSpec, scales_dir: Path | None = None, _stack: tuple[Path, ...] = ()
) -> None:
    """Apply a base scale file (and what it `extends`: a scale name in `scales_dir`, or a file relative to this one)."""
    if path in _stack:
        raise RecipeError(f"scale 'extends' cycle: {' -> '.join(str(p) for p in (*_stack, path))}")
    source = Source()
    data = read_yaml(path)
    _record(source.origins, data, path)
    source.files.append(path)
    check = _Check(source)
    for k in data:
        if k not in SCALE_KEYS:
            check.fail(k, f"unknown scale key; expected one of {', '.join(SCALE_KEYS)}")
    if data.get("extends"):
        base = str(data["extends"])
        named = scales_dir / f"{base}.yaml" if scales_dir is not None and not base.endswith((".yaml", ".yml")) else None
        target = named if named is not None else absolute(path.parent / base)
        load_scale_file(target, scale, scales_dir, (*_stack, path))
    _apply_section(scale, data, source, "", "config", None)
    scale.files.append(path)


SMOKE = "smoke"
"""`--scale smoke`: the recipe's toy scale with recipes/_base/scales/smoke.yaml on every stage after everything else
(two steps, tiny batches, even where the recipe's toy scale sets its own budget), one seed and at most 16 items per
evaluation task: what the tests run end to end."""


def load_scale(recipe: Recipe, name: str) -> ScaleSpec:
    """The scale `name` for `recipe`: toy | mini | paper (base file, then the recipe's section), `smoke`, or a scale
    file's path (a base scale file, usually `extends: toy`, then the recipe's toy section)."""
    scales_dir = recipe.root / "recipes" / "_base" / "scales"
    if name == SMOKE:
        scale = load_scale(recipe, "toy")
        scale.name, scale.seeds = SMOKE, 1
        smoke = scales_dir / "smoke.yaml"
        scale.after_arms.append(Layer(smoke, "smoke scale", file=smoke))
        scale.eval["limit"] = 16
        scale.toyworld = {"preset": "smoke", "seed": 0}
        return scale
    custom = name.endswith((".yaml", ".yml"))
    section_name = "toy" if custom else name
    if not custom and name not in recipe.scale_sections:
        raise RecipeError(f"{recipe.path}: no scale {name!r}; scales: {', '.join([*recipe.scale_sections, SMOKE])}")
    section = recipe.scale_sections[section_name]
    base = absolute(name) if custom else scales_dir / f"{name}.yaml"
    if section.get("use"):
        base = absolute(recipe.origin.of(f"scales.{section_name}.use").parent / section["use"])
    scale = ScaleSpec(Path(name).stem if custom else name, seeds=3 if section_name == "toy" else 1)
    if base.is_file():
        load_scale_file(base, scale, scales_dir)
    elif custom or section.get("use"):
        raise RecipeError(f"scale file not found: {base}")
    _apply_section(scale, {k: v for k, v in section.items() if k != "use"}, recipe.origin, f"scales.{section_name}",
                   "stage", recipe.stages, recipe.arms)  # fmt: skip
    return scale


def find_recipe(name: str, cwd: Path | None = None) -> Path:
    """A recipe by path, or by `<paper>/<finding>` under ./recipes or the installed project's recipes/."""
    p = Path(name)
    if p.is_file():
        return p
    candidates = [name, f"{name}.yaml"]
    roots = [cwd or Path.cwd(), Path(__file__).resolve().parents[1]]
    for root in roots:
        for c in candidates:
            for q in (root / c, root / "recipes" / c):
                if q.is_file():
                    return q
    raise FileNotFoundError(f"recipe not found: {name} (give a file, or <paper>/<finding> under recipes/)")


def all_recipes(root: Path) -> list[Path]:
    """Every runnable recipe under `root/recipes` (not `_base/`, not files starting with `_`)."""
    return sorted(
        p for p in (root / "recipes").glob("*/*.yaml") if p.parent.name != "_base" and not p.name.startswith("_")
    )
