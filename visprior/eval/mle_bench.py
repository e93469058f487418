"""MLE-Bench (Multi-Level Existence Bench) in the real benchmark's schema, read from any local copy people have.

Rows carry `image`, `question`, `choices` (4), `answer` (the answer *text*) and `sub_task` in `existence_0-30 |
existence_30-60 | existence_60-100` (the object's share of the image: small / medium / large). The prompt follows lmms-eval's
`mle_bench` task; the model answers greedily in at most 16 tokens and the answer letter is read from the output twice:

- `gen/*`: lmms-eval's own extraction (`extract_letter_lmms_eval`, the rules of `_extract_answer_letter` in
  `lmms_eval/tasks/mle_bench/utils.py`, quirks included), scored as lmms-eval scores it (the read letter equals the gold
  letter, the position of `answer` in `choices`; no text fallback) and averaged as it averages (macro over the levels
  present, its `average`). This is the number to put beside published MLE-Bench results.
- `gen_strict/*`: a stricter reading (`extract_letter_strict`) that refuses ambiguous outputs (`A or B`, the article in
  `A cat`) and also reads a letter after the option's name (`hexagon (C)`) or the option's text alone (`hexagon`).

Since tiny models rarely follow the letter format, two likelihood-scored variants are reported beside them: the option *text*
with the highest mean log-likelihood (`ll`, cloze-style) and the letter A-D with the highest likelihood as the first answer
token (`ll_letter`, the constrained form of the generated answer, as MMLU-style harnesses score). The task's `extra.scoring`
in results.json names the scoring behind every metric family. Readers: HF `save_to_disk` folders (arrow IPC streams),
parquet files, and imagefolder + metadata.jsonl (the toy world's layout).

Blind baseline (`blind_baseline=True`, the default): the same items scored again with every image replaced by a uniform
grey image of the same size, reported as `blind/gen/*`, `blind/gen_strict/*`, `blind/ll/*` and `blind/ll_letter/*`. The gap
between a score and its blind twin is what the image contributed; a blind score away from 25 % means the model exploits
priors over the options' text. It doubles the cost, so it can be switched off.

One deliberate difference: a row whose `answer` is none of its choices (even case-insensitively) is an error at load time
here; lmms-eval logs a warning and scores the row as wrong.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch import nn

from visprior.eval.generate import chat_prompt, generate, pick_option, score_options
from visprior.eval.results import Accumulator, DatasetInfo, TaskResult, macro_average

LETTERS = "ABCD"
LEVELS = {"existence_0-30": "small", "existence_30-60": "medium", "existence_60-100": "large"}
POST_PROMPT = "Answer with the option's letter from the given choices directly."
BLIND_GREY = (128, 128, 128)


@dataclass
class MLEItem:
    image: Image.Image
    question: str
    choices: list[str]
    answer: str
    sub_task: str

    @property
    def level(self) -> str:
        return LEVELS[self.sub_task]

    @property
    def gold(self) -> int:
        """Index of the right choice, as lmms-eval finds it: the first choice equal to `answer`, else the first equal to it
        after stripping and lower-casing both."""
        if self.answer in self.choices:
            return self.choices.index(self.answer)
        folded = [c.strip().lower() for c in self.choices]
        if self.answer.strip().lower() in folded:
            return folded.index(self.answer.strip().lower())
        raise ValueError(f"answer {self.answer!r} is not one of the choices {self.choices}")


# ------------------------------------------------------------------------------------------------------------- reading


def _image(value: object, root: Path) -> Image.Image:
    """An image from the HF `Image` feature's struct {bytes, path}, a bare path, or bytes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, str):
        p = Path(value)
        return Image.open(p if p.is_absolute() else root / p).convert("RGB")
    raise ValueError(f"cannot read an image from {type(value).__name__}")


def _item(row: dict, root: Path, image_key: str = "image") -> MLEItem:
    if row.get("sub_task") not in LEVELS:
        raise ValueError(f"sub_task {row.get('sub_task')!r} is not one of {sorted(LEVELS)}")
    if len(row["choices"]) != 4:
        raise ValueError(f"MLE-Bench rows have 4 choices, got {len(row['choices'])}")
    item = MLEItem(_image(row[image_key], root), row["question"], list(row["choices"]), row["answer"], row["sub_task"])
    _ = item.gold  # a row whose answer is none of its choices fails here, before any generation
    return item


def _items(rows: Sequence[dict], root: Path, source: Path, image_key: str = "image") -> list[MLEItem]:
    """Rows -> items; a bad row's error names the file and the row."""
    items = []
    for i, row in enumerate(rows):
        try:
            items.append(_item(row, root, image_key))
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f"{source}: row {i}: {e}") from e
    return items


def _read_arrow(path: Path) -> pa.Table:
    """`save_to_disk` writes arrow IPC *streams*; plain IPC files are accepted too."""
    with pa.memory_map(str(path)) as src:
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_file(src).read_all()


def _rows(tables: Sequence[pa.Table]) -> list[dict]:
    return [row for t in tables for row in t.to_pylist()]


def _save_to_disk_dir(path: Path) -> Path:
    """A DatasetDict folder holds one split folder per split: take `test`, else the only one."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return path / ("test" if "test" in splits else splits[0])
    return path


def load_mle_bench(path: str | os.PathLike, limit: int | None = None) -> list[MLEItem]:
    """Items from an imagefolder (+ metadata.jsonl), an HF `save_to_disk` folder, or parquet file(s)."""
    p = Path(path)
    if p.is_dir() and (p / "metadata.jsonl").exists():
        lines = (p / "metadata.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines[:limit] if line.strip()]
        items = _items(rows, p, p / "metadata.jsonl", "file_name")
    elif p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        d = _save_to_disk_dir(p)
        files = [d / f["filename"] for f in json.loads((d / "state.json").read_text())["_data_files"]]
        items = _items(_rows([_read_arrow(f) for f in files])[:limit], d, d)
    else:
        files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{p}: no metadata.jsonl, save_to_disk state.json or parquet files")
        items = _items(_rows([pq.read_table(f) for f in files])[:limit], p if p.is_dir() else p.parent, p)
    return items


def balanced_subset(items: Sequence[MLEItem], limit: int) -> list[MLEItem]:
    """The first `limit` items taking the levels in turn, so a capped run still covers small, medium and large."""
    by_level = [[it for it in items if it.sub_task == level] for level in LEVELS]
    out: list[MLEItem] = []
    for i in range(max((len(x) for x in by_level), default=0)):
        out.extend(group[i] for group in by_level if i < len(group))
    return out[:limit]


# ---------------------------------------------------------------------------------------------------------- prompting


def build_prompt(item: MLEItem) -> str:
    """lmms-eval's MLE-Bench user text: image, question, lettered options, the letter instruction."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"<image>\n{item.question.strip()}\n{options}\n{POST_PROMPT}"


# lmms-eval's reading of the answer letter, written from the rules of `_extract_answer_letter` in
# lmms_eval/tasks/mle_bench/utils.py (EvolvingLMMs-Lab/lmms-eval, as added in 06221cc4 and unchanged at 75571cfe). On the
# stripped output, the first rule that matches wins:
#   1. anywhere, any case: `the answer is` (optionally then `:` or `-`) or `answer` then `:` or `-`, spaces, an optional
#      `(` or `[`, then a letter a-d. Nothing has to follow the letter, so `The answer is apple` reads A.
#   2. anywhere, any case: `option`, at least one space, a letter a-d (`option: A` and `options A` do not match).
#   3. at the start: any `(`/`[`, a letter A-D or a-d, then one of `)`, `]`, `.`, `:` or whitespace, so the article in
#      `A cat` reads A, `A or B` reads A, and `B, C` reads nothing.
#   4. the whole output is one letter A-D or a-d.
# Otherwise no answer: a letter after the option's name (`hexagon (C)`), markdown (`**B**`), `I think C`,
# `The correct option is B` and the option's text alone all read nothing.
_LMMS_ANSWER = re.compile(r"(?:the\s+answer\s+is\s*[:\-]?|answer\s*[:\-])\s*[(\[]?([A-Da-d])", re.IGNORECASE)
_LMMS_OPTION = re.compile(r"option\s+([A-Da-d])", re.IGNORECASE)
_LMMS_LEADING = re.compile(r"[(\[]*([A-Da-d])[)\].:\s]")


def extract_letter_lmms_eval(text: str) -> str | None:
    """The letter lmms-eval's `mle_bench` task reads from a model output (rules above), upper-case; None for none."""
    text = text.strip()
    m = _LMMS_ANSWER.search(text) or _LMMS_OPTION.search(text) or _LMMS_LEADING.match(text)
    if m:
        return m.group(1).upper()
    if len(text) == 1 and text.upper() in LETTERS:
        return text.upper()
    return None


_WHOLE = re.compile(r"^[\s\"'*(\[]*([A-Da-d])[\s\"'*)\].:,]*$")
_LEADING = re.compile(r"^[\s\"'*]*\(?([A-D])(?:[).:]|\s*$|\s*\n)")
_PHRASE = re.compile(
    r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*(?i:option\s*)?[\"'*(\[]*(?:([A-D])\b|([a-d])(?=[)\].:,]|\s*$))(?![-'])"
)
_STANDALONE = re.compile(r"(?<![A-Za-z'])\(?([A-D])(?![A-Za-z'])\)?")


def extract_letter_strict(text: str, choices: Sequence[str] | None = None) -> str | None:
    """The answer letter in a model output, or None (scored wrong) when there is none or it is ambiguous.

    Rules, first match wins:
    1. the whole output is one letter, any case, maybe bracketed or followed by `.`/`)`/`:` (`A`, `(b)`, `C.`);
    2. an upper-case letter opening the output followed by `.`, `)`, `:` or the end of a line (`A. cat`, `(A) cat`);
    3. phrases `answer is X`, `answer: X`, `option X`, `choice X` (any case): one distinct letter, else ambiguous;
    4. standalone upper-case letters A-D anywhere (not the article in `A cat`): exactly one distinct letter, else ambiguous;
    5. the output equals exactly one option's text (case-insensitive).
    Empty outputs and outputs naming several different letters give None.
    """
    text = text.strip()
    if not text:
        return None
    if m := _WHOLE.match(text):
        return m.group(1).upper()
    if m := _LEADING.match(text):
        return m.group(1)
    if found := {(up or low).upper() for up, low in _PHRASE.findall(text)}:
        return found.pop() if len(found) == 1 else None
    found = {m.group(1) for m in _STANDALONE.finditer(text) if not _is_article(text, m)}
    if found:
        return found.pop() if len(found) == 1 else None
    if choices:
        hits = [i for i, c in enumerate(choices) if c.strip().lower() == text.rstrip(".").lower()]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None


def _is_article(text: str, m: re.Match) -> bool:
    """`A` followed by a lower-case word (other than and/or/nor) reads as the article, not an option."""
    return m.group(0) == "A" and bool(re.match(r"\s+(?!(?:and|or|nor)\b)[a-z]", text[m.end() :]))


EXTRACTORS: dict[str, Callable[[str, Sequence[str]], str | None]] = {
    "gen": lambda text, choices: extract_letter_lmms_eval(text),
    "gen_strict": extract_letter_strict,
}
"""Metric family -> how its letter is read from the generated output."""

SCORING = {
    "gen": "greedy generation, letter read by lmms-eval's mle_bench rules (_extract_answer_letter), correct if it is "
    "the gold letter (the answer's position in choices); macro average over the levels",
    "gen_strict": "greedy generation, letter read by visprior's strict rules (ambiguous outputs are no answer; a letter "
    "after the option's name or the option's text alone counts); macro average over the levels",
    "ll": "option text with the highest mean log-likelihood after the prompt",
    "ll_letter": "letter A-D with the highest likelihood as the first answer token",
}
"""What results.json's `extra.scoring` says about each metric family (the `blind/` twins: the same on grey images)."""


# --------------------------------------------------------------------------------------------------------- evaluation


def blind_image(image: Image.Image) -> Image.Image:
    """A uniform grey image of `image`'s size: what the blind baseline shows the model instead."""
    return Image.new("RGB", image.size, BLIND_GREY)


def _score(
    model: nn.Module,
    items: Sequence[MLEItem],
    prompts: list[str],
    images: list[list[Image.Image]],
    acc: Accumulator,
    prefix: str,
    *,
    batch_size: int,
    max_new_tokens: int,
    likelihood: bool,
    seed: int,
) -> list[str]:
    """Add `{prefix}{gen,gen_strict}/<level>` and `.../answered` and (optionally) `{prefix}ll/<level>` and
    `{prefix}ll_letter/<level>` to `acc`; return outputs."""
    outputs = generate(model, prompts, images, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    for it, out in zip(items, outputs):
        gold = LETTERS[it.gold]
        for kind, extract in EXTRACTORS.items():
            letter = extract(out, it.choices)
            acc.update(f"{prefix}{kind}/{it.level}", float(letter == gold))
            acc.update(f"{prefix}{kind}/answered", float(letter is not None))
    if likelihood:
        scores = score_options(model, prompts, [list(it.choices) for it in items], images, batch_size=batch_size)
        for it, s in zip(items, scores):
            acc.update(f"{prefix}ll/{it.level}", float(pick_option(s) == it.gold))
        letters = [list(LETTERS[: len(it.choices)]) for it in items]
        for it, s in zip(items, score_options(model, prompts, letters, images, batch_size=batch_size)):
            acc.update(f"{prefix}ll_letter/{it.level}", float(pick_option(s) == it.gold))
    return outputs


def evaluate_mle_bench(
    model: nn.Module,
    items: Sequence[MLEItem],
    *,
    dataset: DatasetInfo,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    likelihood: bool = True,
    blind_baseline: bool = True,
    seed: int = 0,
) -> TaskResult:
    """Accuracy per level (small / medium / large) and their macro average, generated (read by lmms-eval's rules and by the
    strict ones) and (optionally) likelihood-scored.

    With `blind_baseline`, the same metrics again under `blind/` with every image replaced by a uniform grey one.
    `extra.scoring` names the scoring behind each metric family; `extra.examples` shows the first outputs and their letters.
    """
    start = time.perf_counter()
    prompts = [chat_prompt(build_prompt(it)) for it in items]
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, likelihood=likelihood, seed=seed)
    acc = Accumulator()
    outputs = _score(model, items, prompts, [[it.image] for it in items], acc, "", **kw)
    prefixes = [""]
    if blind_baseline:
        _score(model, items, prompts, [[blind_image(it.image)] for it in items], acc, "blind/", **kw)
        prefixes.append("blind/")
    kinds = [*EXTRACTORS, "ll", "ll_letter"] if likelihood else list(EXTRACTORS)
    metrics = {}
    for prefix in prefixes:
        for kind in kinds:
            name = f"{prefix}{kind}"
            per_level = {
                lvl: acc.accuracy(f"{name}/{lvl}") for lvl in LEVELS.values() if f"{name}/{lvl}" in acc.names()
            }
            metrics.update({f"{name}/{lvl}": m for lvl, m in per_level.items()})
            metrics[f"{name}/average"] = macro_average(list(per_level.values()))
        for kind in EXTRACTORS:
            metrics[f"{prefix}{kind}/answered"] = acc.accuracy(f"{prefix}{kind}/answered")
    scoring = {f"{p}{k}": SCORING[k] + (", on grey images" if p else "") for p in prefixes for k in kinds}
    examples = [
        {"prompt": p, "output": o, "gold": LETTERS[it.gold], **{k: ex(o, it.choices) for k, ex in EXTRACTORS.items()}}
        for p, o, it in list(zip(prompts, outputs, items))[:3]
    ]
    return TaskResult(
        "mle_bench", dataset, metrics, time.perf_counter() - start, {"scoring": scoring, "examples": examples}
    )


MLE_TABLE_ROWS = (
    ("gen", "letter (greedy, lmms-eval rules)"),
    ("gen_strict", "letter (greedy, strict rules)"),
    ("ll", "likelihood"),
    ("ll_letter", "letter likelihood"),
    ("blind/gen", "blind letter (grey image, lmms-eval rules)"),
    ("blind/gen_strict", "blind letter (grey image, strict rules)"),
    ("blind/ll", "blind likelihood (grey image)"),
    ("blind/ll_letter", "blind letter likelihood (grey image)"),
)


def format_mle_table(results: dict) -> str:
    """The MLE-Bench table as papers print it: one row per scoring (generated letter read by lmms-eval's rules and by the
    strict ones, likelihood), small / medium / large / average in percent, from a `results.json` document; then the
    blind-baseline rows (grey image) when they were run."""
    metrics = results["tasks"]["mle_bench"]["metrics"]
    lines = ["| MLE-Bench | small | medium | large | average |", "|---|---:|---:|---:|---:|"]
    for kind, label in MLE_TABLE_ROWS:
        cells = [metrics.get(f"{kind}/{c}") for c in ("small", "medium", "large", "average")]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(f"{100 * m['value']:.1f}" if m else "-" for m in cells) + " |")
    return "\n".join(lines)
