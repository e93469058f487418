"""VQA answer normalisation and scoring per question type; k-shot prompt construction."""

from __future__ import annotations

import pytest
from PIL import Image

from visprior.data.formats import ConversationSample
from visprior.data.shards import write_shards
from visprior.eval import vqa
from visprior.eval.fewshot import build_fewshot_prompt, evaluate_fewshot
from visprior.eval.generate import OptionScore
from visprior.eval.results import DatasetInfo
from visprior.eval.vqa import VQAItem, evaluate_vqa, exact_match, load_vqa, normalize_answer

# What lmms-eval's EvalAIAnswerProcessor (lmms_eval/tasks/_task_utils/vqa_eval_metric.py) outputs, worked out from its
# steps (restated above `_CONTRACTIONS` in visprior/eval/vqa.py) and checked against the processor itself outside the
# repository; the rows marked * read differently under visprior's earlier normalisation.
NORMALISED = [
    ("Two.", "2"),
    ("The red cube", "red cube"),
    ("isnt", "isn't"),
    ("yes!", "yes"),
    ("a   Ball ", "ball"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("left-side", "left side"),
    ("none", "0"),
    ("Is it?", "is it"),
    ("it's red", "it 's red"),  # * `'s` is split off
    ("It's red.", "it 's red"),  # *
    ("square's", "square 's"),  # *
    ("the square's corner", "square 's corner"),  # *
    ("what's", "what 's"),  # *
    ("whats", "what's"),  # the contraction table restores it, so `whats` and `what's` differ
    ("3.", "3"),  # * a period not followed by a digit goes, even after one
    ("a.b", "ab"),
    ("red,blue", "redblue"),  # * commas are dropped before punctuation is handled
    ("1,000 a-b", "1000 b"),  # * `-` becomes a space (no comma is left by then), then the article `a` goes
    ("x-y z(-w", "x y z w"),  # * whether `-` is deleted is decided on the text before `(` became a space
    ("im", "im"),  # * only lower-case keys of the contraction table can match
    ("lets", "lets"),  # *
    ("shes", "shes"),  # *
    ("." * 40, "." * 8),  # * at most 32 periods go
]


@pytest.mark.parametrize("raw,norm", NORMALISED)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize(
    "raw,norm",
    [
        ("it's red", "it's red"),
        ("square's", "square's"),
        ("red,blue", "red blue"),
        ("1,000 a-b", "1000 ab"),
        ("3.", "3"),
    ],
)
def test_normalize_answer_as_lmms_eval_vqav2(raw, norm):
    """lmms-eval's VQAv2 task skips the tokenising step: `'s` stays, commas are punctuation, a digit comma deletes all."""
    assert normalize_answer(raw, tokenize=False) == norm


def test_exact_match_uses_normalisation():
    assert exact_match("Three", ["3"]) and exact_match("the cube.", ["cube"]) and not exact_match("cubes", ["cube"])
    assert exact_match("It's red.", ["it's red"]) and exact_match("square 's", ["square's"])
    assert not exact_match("whats", ["what's"])  # as lmms-eval scores it


def _img(i: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0))


def _write_vqa(path) -> None:
    samples = []
    for i in range(6):
        meta = {"question_type": "count", "answer": str(i % 3)} if i < 3 else {
            "question_type": "colour", "answer": "red", "choices": ["blue", "red"]}  # fmt: skip
        conv = [{"from": "human", "value": f"<image>\nQ{i}?"}, {"from": "gpt", "value": meta["answer"]}]
        samples.append(ConversationSample(f"q{i}", conv, [_img(i)], meta))
    write_shards(samples, path, name="vqa", kind="conversation")


def test_vqa_per_type_exact(tmp_path, monkeypatch):
    _write_vqa(tmp_path / "vqa")
    items = load_vqa(tmp_path / "vqa")
    assert [it.question_type for it in items] == ["count"] * 3 + ["colour"] * 3 and items[3].choices == ["blue", "red"]
    # open: answers "zero" (right only for q0, via number normalisation); choices: always prefers "red" (all right)
    monkeypatch.setattr(vqa, "generate", lambda m, p, i, **kw: ["Zero." for _ in p])
    monkeypatch.setattr(
        vqa, "score_options", lambda m, p, o, i, **kw: [[OptionScore(-2, -2, 1), OptionScore(-1, -1, 1)] for _ in p]
    )
    res = evaluate_vqa(None, items, dataset=DatasetInfo.of("vqa", tmp_path / "vqa", len(items)))
    m = {k: v.value for k, v in res.metrics.items()}
    assert m["type/count"] == pytest.approx(1 / 3) and m["type/colour"] == 1.0
    assert m["open"] == pytest.approx(1 / 3) and m["mc"] == 1.0 and m["all"] == pytest.approx(4 / 6)


def test_blind_vqa_scores_the_same_questions_on_grey_images(tmp_path, monkeypatch):
    """`vqa/blind/*` is the control for a language prior: same prompts, every image a uniform grey one of its size."""
    from visprior.eval.mle_bench import BLIND_GREY

    _write_vqa(tmp_path / "vqa")
    items = load_vqa(tmp_path / "vqa")
    seen = []

    def answers_from_pixels(model, prompts, images, **kw):  # reads the answer off the image: right only when it sees it
        seen.append([im.getpixel((3, 3)) for (im,) in images])
        return [str(i % 3) if im.getpixel((3, 3)) != BLIND_GREY else "no idea" for i, (im,) in enumerate(images)]

    monkeypatch.setattr(vqa, "generate", answers_from_pixels)
    monkeypatch.setattr(vqa, "score_options", lambda m, p, o, i, **kw: [[OptionScore(-2, -2, 1), OptionScore(-1, -1, 1)]
                                                                        for _ in p])  # fmt: skip
    info = DatasetInfo.of("vqa", tmp_path / "vqa", len(items))
    m = {k: v.value for k, v in evaluate_vqa(None, items, dataset=info, blind=True).metrics.items()}
    assert m["open"] == 1.0 and m["blind/open"] == 0.0  # the open answers needed the image
    assert m["mc"] == m["blind/mc"] == 1.0  # the choices' prior ("red") does not
    assert m["blind/all"] == pytest.approx(3 / 6) and m["blind/type/count"] == 0.0
    assert seen[1] == [BLIND_GREY] * 3 and BLIND_GREY not in seen[0]
    off = evaluate_vqa(None, items, dataset=info)
    assert not any(k.startswith("blind/") for k in off.metrics) and len(seen) == 3


def _support(n: int) -> list[VQAItem]:
    return [VQAItem(f"s{i}", _img(i), f"<image>\nWhat is {i}?", str(i), "t") for i in range(n)]


@pytest.mark.parametrize("k", [0, 4, 8])
def test_kshot_prompt_has_k_support_images_in_order_never_the_query(k):
    support = _support(12)
    query = support[5]
    p = build_fewshot_prompt(query, support, k, seed=0)
    assert len(p.images) == k + 1 and p.text.count("<image>") == k + 1
    assert "s5" not in p.support_keys and len(set(p.support_keys)) == k
    idx = [int(key[1:]) for key in p.support_keys]
    assert p.images[:k] == [support[i].image for i in idx] and p.images[-1] is query.image
    positions = [p.text.index(f"What is {i}?\nAnswer: {i}\n\n") for i in idx]
    assert positions == sorted(positions)
    assert p.text.endswith("<image>\nQuestion: What is 5?\nAnswer:") and p.text.count("What is 5?") == 1
    assert build_fewshot_prompt(query, support, k, seed=0) == p


def test_kshot_shots_depend_on_seed_and_query_only():
    support = _support(12)
    a = build_fewshot_prompt(support[0], support, 4, seed=0).support_keys
    assert a == build_fewshot_prompt(support[0], list(support), 4, seed=0).support_keys
    assert a != build_fewshot_prompt(support[0], support, 4, seed=1).support_keys
    with pytest.raises(ValueError):
        build_fewshot_prompt(support[0], support[:4], 4)


def test_fewshot_runs_on_a_tiny_vlm():
    from visprior.eval.toymodels import TinyVLM

    support = _support(10)
    res = evaluate_fewshot(TinyVLM(), support[:2], support, dataset=DatasetInfo("s", "-", 2, ""), max_new_tokens=2)
    assert set(res.metrics) == {"0-shot", "4-shot", "8-shot"} and all(m.n == 2 for m in res.metrics.values())


def test_fewshot_answers_end_at_the_chat_end_token_too(monkeypatch):
    """An instruction-tuned VLM closes its answer with `<|im_end|>` even in the plain few-shot format; the answer is the
    text before it (as every other generated evaluation reads it), not `no<|im_end|><|im_end|>...`, which never matches."""
    from visprior.eval.generate import truncate_at_stop

    def chat_tuned(model, prompts, images, *, stop, **kw):  # what generate returns for this continuation and `stop`
        return [truncate_at_stop("no<|im_end|><|im_end|> left", stop).strip() for _ in prompts]

    monkeypatch.setattr(vqa, "generate", chat_tuned)
    queries = [VQAItem("q", _img(0), "<image>\nIs there a star?", "no", "exist")]
    res = evaluate_fewshot(None, queries, _support(6), dataset=DatasetInfo("s", "-", 1, ""), shots=(0, 4))
    assert res.metrics["0-shot"].value == res.metrics["4-shot"].value == 1.0, res.metrics
