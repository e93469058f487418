"""Text-only evaluation: perplexity is exact on a uniform LM and token-weighted; QA scoring by likelihood and exact match."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visprior.data.formats import TextSample
from visprior.data.shards import write_shards
from visprior.eval import text as text_eval
from visprior.eval.generate import LanguageOnly, OptionScore
from visprior.eval.text import document_nll, document_nlls, evaluate_text, perplexity
from visprior.eval.toymodels import TinyVLM


def _bare_lm() -> LanguageOnly:
    m = TinyVLM(seed=3)
    return LanguageOnly(m.language_model, m.tokenizer)


def test_uniform_lm_has_perplexity_vocab_size():
    lm = _bare_lm()
    with torch.no_grad():
        lm.language_model.lm_head.weight.zero_()
    ppl, _ = perplexity(lm, ["a red cube", "two blue balls and more"], max_length=8)
    assert ppl == pytest.approx(len(lm.tokenizer), rel=1e-5)


def test_perplexity_is_token_weighted_and_windowed():
    lm = _bare_lm()
    docs = ["short", "a much longer document about shapes and colours"]
    parts = [document_nll(lm, d, max_length=16) for d in docs]
    assert parts[1][1] == len(docs[1]) + 1 - math.ceil((len(docs[1]) + 1) / 16)  # bytes + eos, minus one per window
    ppl, _ = perplexity(lm, docs, max_length=16)
    assert ppl == pytest.approx(math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts)), rel=1e-6)


def _one_window_at_a_time(lm: LanguageOnly, text: str, max_length: int) -> tuple[float, int]:
    """The reference: each window alone through the model, no padding."""
    ids = lm.tokenizer(text, add_special_tokens=False).input_ids + [lm.tokenizer.eos_token_id]
    total, count = 0.0, 0
    for start in range(0, len(ids), max_length):
        window = torch.tensor([ids[start : start + max_length]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = lm.language_model(inputs_embeds=lm.embed(window)).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += window.shape[1] - 1
    return total, count


def test_batched_windows_give_each_documents_own_nll():
    """Windows of different lengths share a right-padded batch: each document's NLL is what it gets alone."""
    lm = _bare_lm()
    docs = ["a", "red cube", "two blue balls beside a green cone on grey", "x" * 40, "shapes " * 9, "ab"]
    want = [_one_window_at_a_time(lm, d, 16) for d in docs]
    for batch_size in (1, 3, 64):
        got = document_nlls(lm, docs, max_length=16, batch_size=batch_size)
        assert [n for _, n in got] == [n for _, n in want]
        assert [v for v, _ in got] == pytest.approx([v for v, _ in want], rel=1e-5, abs=1e-5)
    assert want[0][1] == 1 and any(n > 16 for _, n in want)  # a one-window document and a several-window one


def test_final_answer():
    assert text_eval.final_answer("7 + 12 = 19. The answer is 19.") == " 19."
    assert text_eval.final_answer("green") == "green"


def test_evaluate_text_on_shards(tmp_path, monkeypatch):
    for cat in ("web", "math"):
        write_shards([TextSample(f"{cat}{i}", f"{cat} text {i}", {"category": cat}) for i in range(3)],
                     tmp_path / "eval" / "text" / cat, name=cat, kind="text")  # fmt: skip
    qa = [TextSample("q0", "Question: 2+2?\nAnswer: 4", {"question": "2+2?", "answer": "4", "type": "reasoning"}),
          TextSample("q1", "x", {"question": "corners of a square?", "answer": "4", "type": "knowledge",
                                 "choices": ["3", "4", "5", "6"]}),
          TextSample("q2", "x", {"question": "3+3?", "answer": "6", "type": "reasoning"})]  # fmt: skip
    write_shards(qa, tmp_path / "eval" / "text_qa", name="qa", kind="text")
    monkeypatch.setattr(text_eval, "generate", lambda m, p, **kw: ["2 + 2 = 4. The answer is four." for _ in p])
    monkeypatch.setattr(
        text_eval, "score_options", lambda m, p, o, **kw: [[OptionScore(-j, -j, 1) for j in range(4)] for _ in p]
    )
    res = evaluate_text(_bare_lm(), tmp_path, max_length=32)
    m = {k: v.value for k, v in res.metrics.items()}
    assert set(m) == {"ppl/math", "ppl/web", "qa/all", "qa/reasoning", "qa/knowledge"}
    assert m["qa/reasoning"] == 0.5 and m["qa/knowledge"] == 0.0 and m["qa/all"] == pytest.approx(1 / 3)
    lo, hi = res.metrics["ppl/web"].ci95
    assert lo <= m["ppl/web"] <= hi and res.dataset.count == 9
