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
    extract_letter_lmms_eval,
    extract_letter_strict,
    format_mle_table,
    load_mle_bench,
)
from visprior.eval.results import DatasetInfo

CHOICES = ["cube", "ball", "cone", "ring"]


# Letters read by lmms-eval's `mle_bench` task and by our strict rules, with the options A. star B. circle C. hexagon
# D. square. The `lmms-eval` column was derived by hand from the rules of `_extract_answer_letter` in
# lmms_eval/tasks/mle_bench/utils.py (EvolvingLMMs-Lab/lmms-eval, as added in 06221cc4; the rules are restated above
# `extract_letter_lmms_eval`): the first nine rows are the table of issue 15, the next ones the cases its docstring lists
# ("A", "A.", "(A)", "A)", "The answer is A", "Answer: A", "Option A", a bare letter) and an empty output, then quirks of
# its rules (their order, no word boundary after the letter, `answer is:` without `the`, a leading article). The `strict` column
# follows `extract_letter_strict`'s docstring.
EXTRACTION_TABLE = [
    # output, lmms-eval, strict
    ("hexagon", None, "C"),
    ("hexagon (C)", None, "C"),
    ("star (A)", None, "A"),
    ("I think C", None, "C"),
    ("**B**", None, "B"),
    ("The correct option is B", None, "B"),
    ("a red circle", "A", None),
    ("A cat", "A", None),
    ("A or B", "A", None),
    ("A", "A", "A"),
    ("A.", "A", "A"),
    ("(A)", "A", "A"),
    ("A)", "A", "A"),
    ("The answer is A", "A", "A"),
    ("Answer: A", "A", "A"),
    ("Option A", "A", "A"),
    ("b", "B", "B"),
    ("d", "D", "D"),
    ("", None, None),
    ("   ", None, None),
    ("C. hexagon", "C", "C"),  # the toy world's lettered SFT reply
    ("c. hexagon", "C", None),  # strict reads a lower-case leading letter only when it stands alone
    ("(C) hexagon", "C", "C"),
    ("[B] circle", "B", "B"),
    ("D:", "D", "D"),
    ("A\nB", "A", "A"),
    ("the answer is (b).", "B", "B"),
    ("It is option b.", "B", "B"),
    ("The answer is: B", "B", "B"),
    ("the answer isD", "D", "D"),
    ("Answer - C", "C", "C"),
    ("The answer is apple", "A", None),  # no word boundary after the letter
    ("Answer: cube", "C", None),
    ("the answer is a cube", "A", None),
    ("answer is: B", None, "B"),  # `answer is` needs `the` before it in lmms-eval's first rule
    ("The correct answer is B", None, "B"),
    ("**Answer:** B", None, "B"),
    ("option: A", None, "A"),  # `option` must be followed by whitespace
    ("options A", None, "A"),
    ("I think it is C", None, "C"),
    ("B. The answer is C", "C", "B"),  # lmms-eval's rules are tried in order over the whole output
    ("A or option C", "C", "C"),
    ("option B, the answer is C", "C", None),
    ("B, C", None, None),  # a comma after the leading letter is not in lmms-eval's list; two letters: ambiguous
    ("square", None, "D"),
    ("ring", None, None),
    ("nothing", None, None),
    ("(e)", None, None),
]
TABLE_CHOICES = ["star", "circle", "hexagon", "square"]


@pytest.mark.parametrize("text,reference,strict", EXTRACTION_TABLE)
def test_extraction_table(text, reference, strict):
    assert extract_letter_lmms_eval(text) == reference
    assert extract_letter_strict(text, TABLE_CHOICES) == strict
    assert mle_bench.EXTRACTORS["gen"](text, TABLE_CHOICES) == reference
    assert mle_bench.EXTRACTORS["gen_strict"](text, TABLE_CHOICES) == strict


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
    # small answers "A or B": lmms-eval reads A (right for the one gold-A item in four), the strict rules no answer
    assert m["gen/large"] == 1.0 and m["gen/medium"] == 0.5 and m["gen/small"] == 0.25
    assert m["gen/average"] == pytest.approx((1.0 + 0.5 + 0.25) / 3) and m["gen/answered"] == 1.0
    assert m["gen_strict/large"] == 1.0 and m["gen_strict/medium"] == 0.5 and m["gen_strict/small"] == 0.0
    assert m["gen_strict/average"] == pytest.approx(0.5) and m["gen_strict/answered"] == pytest.approx(8 / 12)
    assert m["ll/small"] == m["ll/medium"] == m["ll/large"] == 0.25
    assert res.metrics["gen/large"].n == 4
    scoring = res.extra["scoring"]  # every metric family is named with the extraction behind it
    assert {k.rsplit("/", 1)[0] for k in res.metrics} == set(scoring)
    assert (
        "lmms-eval" in scoring["gen"]
        and "_extract_answer_letter" in scoring["gen"]
        and "strict" in scoring["gen_strict"]
    )
    assert scoring["blind/gen"].startswith(scoring["gen"]) and "grey" in scoring["blind/gen"]
    assert res.extra["examples"][0]["output"] == "A or B"
    assert res.extra["examples"][0]["gen"] == "A" and res.extra["examples"][0]["gen_strict"] is None


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
    for kind in ("gen", "gen_strict", "ll"):
        for c in ("small", "medium", "large", "average"):
            assert m[f"blind/{kind}/{c}"] == m[f"{kind}/{c}"], (kind, c)
    assert m["ll/average"] == 0.25 and m["gen/average"] == 0.25 and m["blind/gen/answered"] == 1.0
    assert m["gen_strict/average"] == m["blind/gen_strict/average"] == 0.25


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
    assert len(rows) == 10 and rows[2] == "| letter (greedy, lmms-eval rules) | 100.0 | 100.0 | 100.0 | 100.0 |"
    assert rows[3] == "| letter (greedy, strict rules) | 100.0 | 100.0 | 100.0 | 100.0 |"  # side by side
    assert rows[6].startswith("| blind letter (grey image, lmms-eval rules) | ")
    assert rows[7].startswith("| blind letter (grey image, strict rules) | ")
    assert rows[8] == "| blind likelihood (grey image) | 25.0 | 25.0 | 25.0 | 25.0 |"
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


def test_average_is_the_macro_average_over_the_levels_present(monkeypatch):
    """lmms-eval's `average`: the mean of the per-level accuracies of the levels in the run, not the pooled accuracy."""
    small = [mle_bench.MLEItem(Image.new("RGB", (8, 8)), "q", CHOICES, "cube", "existence_0-30") for _ in range(4)]
    large = [mle_bench.MLEItem(Image.new("RGB", (8, 8)), "q", CHOICES, "cube", "existence_60-100") for _ in range(2)]
    answers = iter(["A", "A", "A", "B", "A", "B"])  # small: 3 of 4 right, large: 1 of 2
    monkeypatch.setattr(mle_bench, "generate", lambda m, p, i, **kw: [next(answers) for _ in p])
    res = evaluate_mle_bench(
        None, small + large, dataset=DatasetInfo("s", "-", 6, ""), likelihood=False, blind_baseline=False
    )
    assert "gen/medium" not in res.metrics
    assert res.metrics["gen/average"].value == pytest.approx((0.75 + 0.5) / 2)  # pooled would be 4 / 6


def test_gold_letter_is_the_answer_position_in_choices(tmp_path):
    """As lmms-eval: the exact choice, else a case- and space-insensitive match; an answer among no choices is an error
    naming the file and the row (lmms-eval would score that row wrong)."""
    item = mle_bench.MLEItem(Image.new("RGB", (8, 8)), "q", CHOICES, " Cone ", "existence_0-30")
    assert item.gold == 2
    rows = _rows(1)
    rows[2]["answer"] = "B"  # a letter is not an answer text
    path = write_imagefolder(tmp_path / "mle", rows)
    with pytest.raises(ValueError, match=r"metadata.jsonl: row 2: answer 'B' is not one of the choices"):
        load_mle_bench(path)
