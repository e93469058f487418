"""The toy world: layout, determinism, plain-webdataset readability, and answers that agree with the rendered pixels.

Checks recompute what they verify from independent evidence: MLE areas by counting target-coloured pixels in the PNG,
VQA answers from the object list with logic written here, and the object list against pixel colours of the image.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

LSBS_CATEGORIES = ("web", "encyclopedia", "literature", "visual", "math", "code", "academia")
DATASETS = {
    "pairs": "pair",
    "sft": "conversation",
    "sft_text": "conversation",
    "interleaved": "interleaved",
    "eval/vqa": "conversation",
    "eval/captions": "pair",
    "eval/text_qa": "text",
    "eval/shapes/train": "pair",
    "eval/shapes/test": "pair",
    **{f"text/{c}": "text" for c in LSBS_CATEGORIES},
    **{f"eval/text/{c}": "text" for c in LSBS_CATEGORIES},
}
MLE_LEVELS = {"existence_0-30": (0.0, 0.3), "existence_30-60": (0.3, 0.6), "existence_60-100": (0.6, 1.01)}


def _raw_samples(folder: Path) -> list[dict]:
    """Read a dataset with plain webdataset only (no visprior code): raw bytes per member."""
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    assert urls, f"no shards in {folder}"
    return list(wds.WebDataset(urls, shardshuffle=False))


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def _sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


# ------------------------------------------------------------------------------------------------------------ layout


def test_layout_and_manifests(toyworld_dir: Path) -> None:
    world = json.loads((toyworld_dir / "world.json").read_text())
    assert world["seed"] == 0 and world["preset"] == "smoke"
    assert set(world["vocabulary"]["shapes"]) >= {"circle", "square", "triangle", "star", "cross", "ring"}
    for path, kind in DATASETS.items():
        manifest = json.loads((toyworld_dir / path / "manifest.json").read_text())
        assert manifest["kind"] == kind, path
        assert manifest["num_samples"] == sum(s["num_samples"] for s in manifest["shards"]) > 0, path
        assert all((toyworld_dir / path / s["path"]).exists() for s in manifest["shards"]), path
        assert all(s["num_samples"] <= 64 for s in manifest["shards"]), path
    assert len(json.loads((toyworld_dir / "pairs/manifest.json").read_text())["shards"]) >= 3


def test_same_seed_gives_identical_bytes_with_any_number_of_workers(toyworld_dir: Path, tmp_path: Path) -> None:
    from visprior.data.toyworld import generate
    from visprior.reproduce import DERIVED_TASKS

    t0 = time.perf_counter()
    summary = generate(tmp_path / "again", preset="smoke", seed=0, workers=1)  # the fixture's ran on a process pool
    seconds = time.perf_counter() - t0
    print(f"\nsmoke preset generated in {seconds:.1f} s by one process: {sum(summary['counts'].values())} samples")
    first, second = _sha256_tree(toyworld_dir), _sha256_tree(tmp_path / "again")
    # not written by `generate`: the tokenizer (another fixture) and the tasks `reproduce` derives from the shards when a
    # recipe reads them (the smoke runs of tests/test_recipes.py share this toy world)
    later = ("tokenizer", *DERIVED_TASKS)
    first = {k: v for k, v in first.items() if k.split("/")[0] not in later}
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def test_different_seed_gives_different_scenes() -> None:
    from visprior.data.toyworld import datasets
    from visprior.data.toyworld.generate import dataset_rng

    a = [s.meta["objects"] for s in datasets.pairs(dataset_rng(0, "pairs"), 3, 32, 4)]
    b = [s.meta["objects"] for s in datasets.pairs(dataset_rng(1, "pairs"), 3, 32, 4)]
    assert a != b


# ------------------------------------------------------------------------------------------------ plain webdataset


def test_shards_read_back_with_plain_webdataset(toyworld_dir: Path) -> None:
    for path, kind in DATASETS.items():
        samples = _raw_samples(toyworld_dir / path)
        manifest = json.loads((toyworld_dir / path / "manifest.json").read_text())
        assert len(samples) == manifest["num_samples"], path
        assert len({s["__key__"] for s in samples}) == len(samples), f"duplicate keys in {path}"
        for s in samples:
            meta = json.loads(s["json"])
            if kind == "text":
                assert s["txt"].decode().strip(), path
            elif kind == "pair":
                assert _image(s["png"]).ndim == 3 and s["txt"].decode().strip(), path
            elif kind == "interleaved":
                images = [seg["image"] for seg in meta["segments"] if "image" in seg]
                assert images and all(name in s or name.split(".", 1)[1] in s for name in images), path
                assert any(seg.get("text", "").strip() for seg in meta["segments"])
            else:
                turns = meta["conversations"]
                assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2), path
                marks = sum(t["value"].count("<image>") for t in turns)
                assert marks == sum(1 for m in s if m.startswith("img")), path
                if marks:
                    assert marks == 1 and turns[0]["value"].startswith("<image>"), path


def test_sft_is_multi_turn_and_sft_text_is_text_only(toyworld_dir: Path) -> None:
    sft = [json.loads(s["json"]) for s in _raw_samples(toyworld_dir / "sft")]
    assert max(len(m["conversations"]) for m in sft) >= 4
    types = Counter(t for m in sft for t in m["question_types"])
    assert len(types) >= 7, types
    text_only = _raw_samples(toyworld_dir / "sft_text")
    assert all(not any(k.startswith("img") for k in s) for s in text_only)


# ------------------------------------------------------------------------------------------------------ MLE bench


def _mle_records(toyworld_dir: Path) -> list[dict]:
    lines = (toyworld_dir / "eval/mle_bench/metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_mle_schema_letters_and_distractors(toyworld_dir: Path) -> None:
    records = _mle_records(toyworld_dir)
    assert len(records) >= 90
    by_level: dict[str, Counter] = {lvl: Counter() for lvl in MLE_LEVELS}
    for r in records:
        assert r["question"] == "Which of the following objects appears in the image?"
        assert r["file_name"].startswith("images/") and (toyworld_dir / "eval/mle_bench" / r["file_name"]).exists()
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and r["answer"] in r["choices"]
        present = {o["shape"] for o in r["scene"]["objects"]}
        assert [c for c in r["choices"] if c in present] == [r["answer"]], "a distractor is in the image"
        by_level[r["sub_task"]][r["choices"].index(r["answer"])] += 1
    for level, letters in by_level.items():
        n = sum(letters.values())
        assert n >= 24, level
        assert max(letters.values()) - min(letters[i] for i in range(4)) <= (0 if n % 4 == 0 else 1), (level, letters)


def test_mle_answer_shapes_balanced_and_uninformative(toyworld_dir: Path) -> None:
    """Per level: every feasible shape is the answer equally often (±1), and is the answer in the same share of the
    questions that offer it, so a model that ignores the image cannot beat 25 % from shape priors."""
    world = json.loads((toyworld_dir / "world.json").read_text())
    excluded = world["mle_excluded_shapes"]
    assert excluded == {"existence_0-30": [], "existence_30-60": [], "existence_60-100": ["ring"]}
    shapes = world["vocabulary"]["shapes"]
    records = _mle_records(toyworld_dir)
    for level in MLE_LEVELS:
        rows = [r for r in records if r["sub_task"] == level]
        feasible = [s for s in shapes if s not in excluded[level]]
        answers = Counter(r["answer"] for r in rows)
        offered = Counter(c for r in rows for c in r["choices"])
        assert set(answers) == set(feasible) and set(offered) == set(feasible), (level, answers, offered)
        assert max(answers.values()) - min(answers.values()) <= 1, (level, answers)
        rates = {s: answers[s] / offered[s] for s in feasible}
        assert max(rates.values()) - min(rates.values()) <= 0.02, (level, rates)
        assert all(abs(v - 0.25) <= 0.02 for v in rates.values()), (level, rates)


def test_mle_ring_cannot_reach_the_large_level() -> None:
    """The exclusion recomputed at the render resolution: a centred ring of any radius covers < 60 % + margin."""
    from visprior.data.toyworld.mle import MARGIN, feasible_shapes
    from visprior.data.toyworld.render import coverage_mask
    from visprior.data.toyworld.world import Obj

    best = max(
        coverage_mask(Obj("ring", "red", "large", 0.5, 0.5, r / 100, (0, 0, 0)), 128).mean() for r in range(20, 120)
    )
    assert 0.55 < best < 0.6 + MARGIN
    assert "ring" not in feasible_shapes("existence_60-100") and "ring" in feasible_shapes("existence_30-60")


@pytest.mark.parametrize("n", [32, 33, 200, 203])
def test_mle_choice_design_is_exact(n: int) -> None:
    import random

    from visprior.data.toyworld.mle import design_choices

    for shapes in (("a", "b", "c", "d", "e", "f", "g", "h"), ("a", "b", "c", "d", "e", "f", "g")):
        design = design_choices(random.Random(n), shapes, n)
        assert len(design) == n
        answers = Counter(a for a, _ in design)
        distractors = Counter(d for _, ds in design for d in ds)
        assert max(answers.values()) - min(answers.values()) <= 1
        assert all(a not in ds and len(set(ds)) == 3 for a, ds in design)
        assert {s: 3 * answers[s] for s in shapes} == dict(distractors)


def test_mle_levels_match_pixel_counted_area(toyworld_dir: Path) -> None:
    """The target's colour is unique in the image, so counting pixels of that colour measures its visible area."""
    for r in _mle_records(toyworld_dir):
        img = _image((toyworld_dir / "eval/mle_bench" / r["file_name"]).read_bytes())
        target = np.asarray(r["target"]["rgb"], dtype=np.float32)
        area = float((np.linalg.norm(img - target, axis=-1) < 40).mean())
        assert abs(area - r["area"]) < 0.02, (r["file_name"], area, r["area"])
        lo, hi = MLE_LEVELS[r["sub_task"]]
        assert lo <= area < hi, (r["file_name"], r["sub_task"], area)
    small = [r["area"] for r in _mle_records(toyworld_dir) if r["sub_task"] == "existence_0-30"]
    assert min(small) < 0.05, "the small level should contain objects that are small at 64 px"


# ------------------------------------------------------------------------------------------------------------- VQA


def _match(o: dict, attrs: dict) -> bool:
    return all(o[k] == v for k, v in attrs.items())


def _one(objects: list[dict], attrs: dict) -> dict:
    hits = [o for o in objects if _match(o, attrs)]
    assert len(hits) == 1, f"reference {attrs} is ambiguous or empty"
    return hits[0]


def _expected_answer(qtype: str, q: dict, objects: list[dict]) -> str:
    count = lambda attrs: sum(_match(o, attrs) for o in objects)  # noqa: E731
    if qtype == "existence":
        return "yes" if count(q) else "no"
    if qtype == "counting":
        return str(count(q))
    if qtype in ("colour", "shape"):
        return _one(objects, q["target"])[q["attribute"]]
    if qtype == "spatial":
        a, b = _one(objects, q["a"]), _one(objects, q["b"])
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        rel = {"left": dx < 0, "right": dx > 0, "above": dy < 0, "below": dy > 0}[q["relation"]]
        assert abs(dx if q["relation"] in ("left", "right") else dy) > 0.05, "ambiguous spatial question"
        return "yes" if rel else "no"
    if qtype == "position":
        o = _one(objects, q["target"])
        row = "top" if o["y"] < 1 / 3 else "bottom" if o["y"] > 2 / 3 else ""
        col = "left" if o["x"] < 1 / 3 else "right" if o["x"] > 2 / 3 else ""
        return f"{row} {col}".strip() or "center"
    if qtype == "compare":
        return "yes" if count(q["more"]) > count(q["than"]) else "no"
    if qtype == "sum":
        return str(sum(o["shape"] in q["shapes"] for o in objects))
    if qtype == "which_exists":
        assert count(q), "the answer shape is not in the image"
        return q["shape"]
    raise AssertionError(f"unknown question type {qtype}")


def _inside_point(o: dict, size: int) -> tuple[int, int]:
    """A pixel well inside the object (rings are hollow: take a point on the band)."""
    dx = 0.78 * o["r"] if o["shape"] == "ring" else 0.0
    return int((o["y"]) * size), int((o["x"] + dx) * size)


def test_vqa_answers_agree_with_scene_and_pixels(toyworld_dir: Path) -> None:
    samples = _raw_samples(toyworld_dir / "eval/vqa")
    types = Counter()
    for s in samples:
        meta = json.loads(s["json"])
        types[meta["question_type"]] += 1
        objects = meta["objects"]
        assert meta["answer"] == _expected_answer(meta["question_type"], meta["query"], objects), meta["question"]
        reply = meta["conversations"][1]["value"]
        if meta["question_type"] == "which_exists":  # lettered: the reply is the answer's letter, then its text
            assert reply == f"{'ABCD'[meta['choices'].index(meta['answer'])]}. {meta['answer']}"
            assert sum(any(o["shape"] == c for o in objects) for c in meta["choices"]) == 1
        else:
            assert reply == meta["answer"]
        if "choices" in meta:
            assert meta["answer"] in meta["choices"] and len(set(meta["choices"])) == len(meta["choices"])
        img = _image(s["img0.png"])
        for o in objects:
            y, x = _inside_point(o, img.shape[0])
            assert np.linalg.norm(img[y, x] - np.asarray(o["rgb"])) < 30, (s["__key__"], o)
    assert len(types) == 9 and min(types.values()) >= len(samples) // 9 - 1, types
    assert {"yes", "no"} <= {json.loads(s["json"])["answer"] for s in samples}


def test_counting_answers_vary(toyworld_dir: Path) -> None:
    metas = [json.loads(s["json"]) for s in _raw_samples(toyworld_dir / "eval/vqa")]
    counts = Counter(m["answer"] for m in metas if m["question_type"] in ("counting", "sum"))
    assert len(counts) >= 3, counts


def test_pair_captions_name_every_shape(toyworld_dir: Path) -> None:
    for s in _raw_samples(toyworld_dir / "pairs"):
        caption, meta = s["txt"].decode(), json.loads(s["json"])
        for o in meta["objects"]:
            assert o["shape"] in caption and o["colour"] in caption, (caption, o)
            assert o["shape"] in meta["detailed"]
    for s in _raw_samples(toyworld_dir / "eval/captions"):
        assert len(json.loads(s["json"])["references"]) >= 2


def test_interleaved_has_in_context_patterns(toyworld_dir: Path) -> None:
    metas = [json.loads(s["json"]) for s in _raw_samples(toyworld_dir / "interleaved")]
    icl = [m for m in metas if m["family"] == "icl"]
    assert icl and any(m["family"] == "album" for m in metas)
    for m in icl:
        texts = [seg["text"] for seg in m["segments"] if "text" in seg]
        shots = [t for t in texts if t.startswith(" " + m["prompt"])]
        assert len(m["answers"]) >= 3
        assert shots == [f" {m['prompt']} {a}.\n" for a in m["answers"]]  # one prompt, repeated once per image
        assert sum("image" in seg for seg in m["segments"]) == len(m["answers"])
    assert len({m["task"] for m in icl}) >= 3


# ------------------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("category", LSBS_CATEGORIES)
def test_text_category_present_and_held_out(category: str, toyworld_dir: Path) -> None:
    train = _raw_samples(toyworld_dir / "text" / category)
    held = _raw_samples(toyworld_dir / "eval/text" / category)
    for s in train + held:
        assert json.loads(s["json"])["category"] == category
        assert len(s["txt"].decode().split()) >= 10
    train_texts = {s["txt"] for s in train}
    assert len(train_texts) > 0.9 * len(train), "documents should be varied"
    assert sum(s["txt"] in train_texts for s in held) <= 1, "held-out text repeats training text"


def test_text_qa_answers(toyworld_dir: Path) -> None:
    metas = [json.loads(s["json"]) for s in _raw_samples(toyworld_dir / "eval/text_qa")]
    assert {m["type"] for m in metas} == {"reasoning", "knowledge"}
    for m in metas:
        assert m["solution"].rstrip(".").endswith(m["answer"])
        if "choices" in m:
            assert m["answer"] in m["choices"] and len(m["choices"]) == 4
        if m["question"].startswith("What is "):
            expr = m["question"][len("What is ") : -1].replace(" x ", " * ")
            assert str(eval(expr)) == m["answer"]  # noqa: S307


def test_shapes_labels(toyworld_dir: Path) -> None:
    world = json.loads((toyworld_dir / "world.json").read_text())
    labels = world["shape_labels"]
    for split in ("train", "test"):
        metas = [json.loads(s["json"]) for s in _raw_samples(toyworld_dir / "eval/shapes" / split)]
        assert all(labels[m["label"]] == m["label_name"] for m in metas)
        assert len({m["label"] for m in metas}) == len(labels), split


def test_which_exists_items_offer_one_present_shape_and_are_answered_by_letter() -> None:
    import random

    from visprior.data.toyworld.describe import LETTER_INSTRUCTION, answer_text, question_text, vqa_item
    from visprior.data.toyworld.world import sample_scene

    rng = random.Random(0)
    letters = Counter()
    for _ in range(200):
        scene = sample_scene(rng, 5)
        item = vqa_item(scene, rng, "which_exists")
        assert item is not None
        present = {o.shape for o in scene.objects}
        assert len(set(item.choices)) == 4 and [c in present for c in item.choices].count(True) == 1
        letter, name = answer_text(item).split(". ")
        assert letter in "ABCD" and len(letter) == 1 and item.choices["ABCD".index(letter)] == item.answer
        assert name == item.answer and item.answer in present
        lines = question_text(item).splitlines()
        assert lines[1:5] == [f"{x}. {c}" for x, c in zip("ABCD", item.choices)] and lines[5] == LETTER_INSTRUCTION
        letters[letter] += 1
    assert set(letters) == set("ABCD") and min(letters.values()) > 30, letters  # the answer's letter is shuffled


def test_sft_trains_lettered_answers(toyworld_dir: Path) -> None:
    """Lettered replies are `C. hexagon`: lmms-eval's MLE-Bench rules and the strict ones both read the option's letter."""
    from visprior.eval.mle_bench import extract_letter_lmms_eval, extract_letter_strict

    sft = [json.loads(s["json"]) for s in _raw_samples(toyworld_dir / "sft")]
    lettered = [
        (turns[i]["value"], turns[i + 1]["value"])
        for m in sft
        for turns in [m["conversations"]]
        for i in range(0, len(turns), 2)
        if turns[i]["value"].endswith("from the given choices directly.")
    ]
    assert len(lettered) > len(sft) / 3
    for question, reply in lettered:
        options = dict(line.split(". ", 1) for line in question.removeprefix("<image>\n").splitlines()[1:5])
        letter, name = reply.split(". ", 1)
        assert options[letter] == name, (question, reply)
        assert extract_letter_lmms_eval(reply) == extract_letter_strict(reply, list(options.values())) == letter, reply
