"""MLE-Bench: letter extraction, the three on-disk readers in the real schema, exact accuracies of a scripted model, chance level."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visprior.eval import mle_bench
from visprior.eval.generate import OptionScore
from visprior.eval.mle_bench import (
    LEVELS,
    build_prompt,
    evaluate_mle_bench,
    extract_letter,
    format_mle_table,
    load_mle_bench,
)
from visprior.eval.results import DatasetInfo

CHOICES = ["cube", "ball", "cone", "ring"]


@pytest.mark.parametrize(
    "text,letter",
    [
        ("A", "A"),
        ("(A)", "A"),
        ("A.", "A"),
        ("The answer is A", "A"),
        ("Option A", "A"),
        ("B. ball", "B"),
        ("(C) cone", "C"),
        ("Answer: D", "D"),
        ("the answer is (b).", "B"),
        ("b", "B"),  # lower-case single letter: accepted
        ("c.", "C"),
        ("I think it is C", "C"),
        ("ring", "D"),  # exactly one option's text
        ("", None),  # empty
        ("   ", None),
        ("A or B", None),  # several different letters: ambiguous, no answer
        ("B, C", None),
        ("A cat", None),  # the article is not an answer
        ("the answer is a cube", None),
        ("nothing", None),
    ],
)
def test_extract_letter(text, letter):
    assert extract_letter(text, CHOICES) == letter


def _png(index: int) -> bytes:
    """The gold index is written into the red channel, so a scripted model can 'see' the answer."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * index + 10, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n_per_level: int = 4) -> list[dict]:
    rows = []
    for level in LEVELS:
        for i in range(n_per_level):
            gold = i % 4
            rows.append(
                {
                    "image": _png(gold),
                    "question": f"Is there a {CHOICES[gold]}?",
                    "choices": CHOICES,
                    "answer": CHOICES[gold],
                    "sub_task": level,
                }
            )
    return rows


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [
            ("image", IMAGE_TYPE),
            ("question", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("sub_task", pa.string()),
        ]
    )
    data = [{**r, "image": {"bytes": r["image"], "path": f"img{i}.png"}} for i, r in enumerate(rows)]
    return pa.Table.from_pylist(data, schema=schema)


def write_imagefolder(root: Path, rows: list[dict]) -> Path:
    (root / "images").mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, r in enumerate(rows):
            (root / "images" / f"{i}.png").write_bytes(r["image"])
            f.write(json.dumps({**{k: v for k, v in r.items() if k != "image"}, "file_name": f"images/{i}.png"}) + "\n")
    return root


def write_parquet(root: Path, rows: list[dict]) -> Path:
    (root / "data").mkdir(parents=True)
    pq.write_table(_table(rows[:5]), root / "data" / "test-00000-of-00002.parquet")
    pq.write_table(_table(rows[5:]), root / "data" / "test-00001-of-00002.parquet")
    return root


def write_save_to_disk(root: Path, rows: list[dict]) -> Path:
    """The layout of `DatasetDict.save_to_disk`: dataset_dict.json, then per split state.json + arrow IPC streams."""
    split = root / "test"
    split.mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    table = _table(rows)
    with pa.OSFile(str(split / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (split / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "test"})
    )
    (split / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return root


def _gold_from_image(image: Image.Image) -> int:
    return (image.getpixel((0, 0))[0] - 10) // 40


def _scripted_generate(model, prompts, images, **kw):
    """Large: right, as 'The answer is X'; medium: right only for gold A/B, as '(X)'; small: always 'A or B' (ambiguous)."""
    out = []
    for prompt, (image,) in zip(prompts, images):
        gold = _gold_from_image(image)
        level = prompt.split("level=")[1].split("\n")[0]
        out.append(
            {
                "large": f"The answer is {'ABCD'[gold]}",
                "medium": f"({'ABCD'[gold if gold < 2 else 3 - gold]})",
                "small": "A or B",
            }[level]
        )
    return out


def _scripted_scores(model, prompts, options, images, **kw):
    """Likelihood: always prefers option index 1 ('ball')."""
    return [[OptionScore(0.0 if j == 1 else -1.0, 0.0 if j == 1 else -1.0, 1) for j in range(len(o))] for o in options]


@pytest.mark.parametrize("writer", [write_imagefolder, write_parquet, write_save_to_disk])
def test_readers_and_exact_accuracies(tmp_path, monkeypatch, writer):
    rows = _rows()
    path = writer(tmp_path / "mle", rows)
    items = load_mle_bench(path)
    assert len(items) == 12 and [it.gold for it in items] == [i % 4 for i in range(4)] * 3
    assert [it.level for it in items] == ["small"] * 4 + ["medium"] * 4 + ["large"] * 4
    assert build_prompt(items[1]).endswith(
        "B. ball\nC. cone\nD. ring\nAnswer with the option's letter from the given choices directly."
    )
    for it in items:  # let the scripted model know the level through the question text
        it.question += f" level={it.level}"
    monkeypatch.setattr(mle_bench, "generate", _scripted_generate)
    monkeypatch.setattr(mle_bench, "score_options", _scripted_scores)
    res = evaluate_mle_bench(None, items, dataset=DatasetInfo.of("mle", path, len(items)))
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["gen/large"] == 1.0 and m["gen/medium"] == 0.5 and m["gen/small"] == 0.0
    assert m["gen/average"] == pytest.approx(0.5)
    assert m["gen/answered"] == pytest.approx(8 / 12)
    assert m["ll/small"] == m["ll/medium"] == m["ll/large"] == 0.25
    assert res.metrics["gen/large"].n == 4


def _letter_reading_scores(model, prompts, options, images, **kw):
    """Letter options: the image's gold letter wins (the model 'sees'); option texts: always index 1 ('ball')."""
    out = []
    for opts, (image,) in zip(options, images):
        if list(opts) == list("ABCD"):
            gold = _gold_from_image(image)
            out.append([OptionScore(0.0 if j == gold else -1.0, 0.0 if j == gold else -1.0, 1) for j in range(4)])
        else:
            out.append([OptionScore(0.0 if j == 1 else -1.0, 0.0 if j == 1 else -1.0, 1) for j in range(len(opts))])
    return out


def test_letter_likelihood_scores_the_letters_a_to_d(tmp_path, monkeypatch):
    path = write_imagefolder(tmp_path / "mle", _rows())
    items = load_mle_bench(path)
    monkeypatch.setattr(mle_bench, "generate", _image_blind_generate)
    monkeypatch.setattr(mle_bench, "score_options", _letter_reading_scores)
    res = evaluate_mle_bench(None, items, dataset=DatasetInfo.of("mle", path, len(items)), blind_baseline=False)
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["ll_letter/small"] == m["ll_letter/medium"] == m["ll_letter/large"] == m["ll_letter/average"] == 1.0
    assert m["ll/average"] == 0.25
    assert "letter likelihood | 100.0 | 100.0 | 100.0 | 100.0" in format_mle_table(
        {"tasks": {"mle_bench": {"metrics": {k: {"value": v} for k, v in m.items()}}}}
    )


def _image_blind_generate(model, prompts, images, **kw):
    """Ignores the image: answers from the prompt text alone (the letter of the option 'cone' when offered, else B)."""
    return [f"({'ABCD'[CHOICES.index('cone')]})" if "cone" in p else "B" for p in prompts]


def _image_blind_scores(model, prompts, options, images, **kw):
    """Ignores the image: prefers option text 'ring' (a shape prior)."""
    return [[OptionScore(0.0 if c == "ring" else -1.0, 0.0 if c == "ring" else -1.0, 1) for c in o] for o in options]


def test_blind_baseline_equals_score_of_a_model_that_ignores_the_image(tmp_path, monkeypatch):
    path = write_imagefolder(tmp_path / "mle", _rows())
    items = load_mle_bench(path)
    monkeypatch.setattr(mle_bench, "generate", _image_blind_generate)
    monkeypatch.setattr(mle_bench, "score_options", _image_blind_scores)
    res = evaluate_mle_bench(None, items, dataset=DatasetInfo.of("mle", path, len(items)))
    m = {k: v.value for k, v in res.metrics.items()}
    for kind in ("gen", "ll"):
        for c in ("small", "medium", "large", "average"):
            assert m[f"blind/{kind}/{c}"] == m[f"{kind}/{c}"], (kind, c)
    assert m["ll/average"] == 0.25 and m["gen/average"] == 0.25 and m["blind/gen/answered"] == 1.0


def test_blind_baseline_shows_grey_images_and_can_be_switched_off(tmp_path, monkeypatch):
    path = write_imagefolder(tmp_path / "mle", _rows())
    items = load_mle_bench(path)
    for it in items:
        it.question += " level=large"
    seen: list[set] = []

    def scores_from_image(model, prompts, options, images, **kw):  # reads the gold index from the pixels
        seen.append({im.getpixel((3, 3)) for (im,) in images} | {im.size for (im,) in images})
        return [[OptionScore(0.0 if j == _gold_from_image(im) else -1.0, 0.0, 1) for j in range(4)] for (im,) in images]

    monkeypatch.setattr(mle_bench, "generate", _scripted_generate)
    monkeypatch.setattr(mle_bench, "score_options", scores_from_image)
    res = evaluate_mle_bench(None, items, dataset=DatasetInfo.of("mle", path, len(items)))
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["gen/average"] == 1.0 and m["blind/gen/average"] == 0.25  # grey reads as gold C: right 1 in 4
    assert seen[2] == seen[3] == {mle_bench.BLIND_GREY, (8, 8)}  # a uniform grey image of the original size
    table = format_mle_table({"tasks": {"mle_bench": {"metrics": {k: {"value": v} for k, v in m.items()}}}})
    rows = table.splitlines()
    assert len(rows) == 8 and rows[5].startswith("| blind letter (grey image) | ")
    assert rows[6] == "| blind likelihood (grey image) | 25.0 | 25.0 | 25.0 | 25.0 |"
    off = evaluate_mle_bench(None, items, dataset=DatasetInfo.of("mle", path, len(items)), blind_baseline=False)
    assert not any(k.startswith("blind/") for k in off.metrics) and len(seen) == 6  # text and letter scoring


def test_random_answers_score_near_chance(monkeypatch):
    rng = random.Random(0)
    items = [
        mle_bench.MLEItem(Image.new("RGB", (8, 8)), "q", CHOICES, CHOICES[i % 4], sub)
        for sub in LEVELS
        for i in range(400)
    ]
    monkeypatch.setattr(mle_bench, "generate", lambda m, p, i, **kw: [rng.choice("ABCD") for _ in p])
    res = evaluate_mle_bench(None, items, dataset=DatasetInfo("synthetic", "-", len(items), ""), likelihood=False)
    # n = 400 per level: binomial sd = sqrt(.25 * .75 / 400) ~ 0.022; allow 4 sd per level, 4 sd / sqrt(3) on the average.
    for level in ("small", "medium", "large"):
        assert abs(res.metrics[f"gen/{level}"].value - 0.25) < 4 * 0.0217
        lo, hi = res.metrics[f"gen/{level}"].ci95
        assert lo < res.metrics[f"gen/{level}"].value < hi
    assert abs(res.metrics["gen/average"].value - 0.25) < 4 * 0.0217 / 3**0.5


def test_real_pipeline_runs_on_a_tiny_vlm(tmp_path):
    from visprior.eval.toymodels import TinyVLM

    path = write_imagefolder(tmp_path / "mle", _rows(1))
    res = evaluate_mle_bench(TinyVLM(), load_mle_bench(path), dataset=DatasetInfo.of("mle", path, 3), max_new_tokens=3)
    assert set(res.metrics) >= {"gen/small", "gen/medium", "gen/large", "gen/average", "ll/average", "gen/answered"}
    assert all(0.0 <= v.value <= 1.0 for v in res.metrics.values())
