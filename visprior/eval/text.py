"""Text-only evaluation: held-out perplexity per text category and accuracy on the toy reasoning / knowledge QA.

This is how VILA's "MMLU drop and recovery" and LSBS's language metrics are measured on the toy world, for an LM before
multimodal training (wrap it in `LanguageOnly`) and for a VLM's language model after. Perplexity is token-weighted within a
category: exp(total NLL / total predicted tokens), each document tokenized as in training (text, then `<|endoftext|>`) and
cut into windows of `max_length`; the first token of each window has no context and is not scored. QA uses the same plain
`Question: ...\nAnswer:` format the text corpora use: options are likelihood-scored when given, else the greedy answer's first
line must match after VQA-style normalisation — or, since the toy corpora write worked solutions ending in
"The answer is X.", the text after the last "the answer is" must.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visprior.data.formats import TextSample
from visprior.data.shards import iter_samples, resolve_shards
from visprior.eval.generate import generate, pick_option, score_options
from visprior.eval.results import Accumulator, DatasetInfo, Metric, TaskResult, sha256_files
from visprior.eval.vqa import exact_match


def read_texts(path: str | os.PathLike, limit: int | None = None) -> list[TextSample]:
    out = []
    for s in iter_samples(resolve_shards(path), "text"):
        assert isinstance(s, TextSample)
        out.append(s)
        if limit is not None and len(out) >= limit:
            break
    return out


@torch.no_grad()
def document_nll(model: nn.Module, text: str, max_length: int = 512) -> tuple[float, int]:
    """(summed NLL in nats, number of predicted tokens) of one document followed by the eos token."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    device = next(model.language_model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(ids), max_length):
        window = torch.tensor([ids[start : start + max_length]], device=device)  # [1, T]
        if window.shape[1] < 2:
            continue
        logits = model.language_model(inputs_embeds=model.embed(window)).logits[0, :-1].float()  # [T-1, V]
        total += float(F.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += window.shape[1] - 1
    return total, count


def perplexity(model: nn.Module, texts: Sequence[str], max_length: int = 512) -> tuple[float, Accumulator]:
    """Token-weighted perplexity of `texts`; the accumulator holds per-document mean NLL weighted by token count."""
    acc = Accumulator()
    for t in texts:
        nll, n = document_nll(model, t, max_length)
        if n:
            acc.update("nll", nll / n, weight=n)
    return math.exp(acc.mean("nll").value), acc


@dataclass
class TextQAItem:
    key: str
    question: str
    answer: str
    kind: str
    choices: list[str]


def load_text_qa(path: str | os.PathLike, limit: int | None = None) -> list[TextQAItem]:
    return [
        TextQAItem(
            s.key,
            s.meta["question"],
            str(s.meta["answer"]),
            s.meta.get("type", "all"),
            list(s.meta.get("choices") or []),
        )
        for s in read_texts(path, limit)
    ]


def final_answer(text: str) -> str:
    """The text after the last "the answer is" (worked solutions), else the whole output."""
    cut = text.lower().rfind("the answer is")
    return text[cut + len("the answer is") :] if cut >= 0 else text


def qa_correct(
    model: nn.Module, items: Sequence[TextQAItem], batch_size: int = 8, max_new_tokens: int = 64
) -> list[bool]:
    """Per item: likelihood-picked choice == answer, or the greedy worked answer's final answer == answer."""
    prompts = [f"Question: {it.question}\nAnswer:" for it in items]
    correct = [False] * len(items)
    mc = [i for i, it in enumerate(items) if it.choices]
    free = [i for i, it in enumerate(items) if not it.choices]
    if mc:
        scores = score_options(
            model, [prompts[i] for i in mc], [[" " + c for c in items[i].choices] for i in mc], batch_size=batch_size
        )
        for i, s in zip(mc, scores):
            correct[i] = items[i].choices[pick_option(s)] == items[i].answer
    if free:
        outs = generate(model, [prompts[i] for i in free], max_new_tokens=max_new_tokens, batch_size=batch_size,
                        stop=("\n", "<|endoftext|>", "<|im_end|>"))  # fmt: skip
        for i, out in zip(free, outs):
            correct[i] = exact_match(final_answer(out), [items[i].answer])
    return correct


def evaluate_text(
    model: nn.Module,
    data_dir: str | os.PathLike,
    *,
    categories: Sequence[str] | None = None,
    limit: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    seed: int = 0,
) -> TaskResult:
    """`ppl/{category}` for each `data_dir/eval/text/{category}` and `qa/{all,reasoning,knowledge}` on `data_dir/eval/text_qa`."""
    start = time.perf_counter()
    root = Path(data_dir) / "eval"
    cats = list(categories) if categories else sorted(p.name for p in (root / "text").iterdir() if p.is_dir())
    metrics: dict[str, Metric] = {}
    files, count = [], 0
    for cat in cats:
        texts = read_texts(root / "text" / cat, limit)
        ppl, acc = perplexity(model, [t.text for t in texts], max_length)
        nll = acc.mean("nll", seed=seed)
        metrics[f"ppl/{cat}"] = Metric(ppl, nll.n, (math.exp(nll.ci95[0]), math.exp(nll.ci95[1])), "bootstrap")
        files += resolve_shards(root / "text" / cat)
        count += len(texts)
    if (root / "text_qa").exists():
        items = load_text_qa(root / "text_qa", limit)
        qa = Accumulator()
        for it, ok in zip(items, qa_correct(model, items, batch_size)):
            qa.update("qa/all", float(ok))
            qa.update(f"qa/{it.kind}", float(ok))
        metrics.update({name: qa.accuracy(name) for name in qa.names()})
        files += resolve_shards(root / "text_qa")
        count += len(items)
    dataset = DatasetInfo("toyworld-text", str(root), count, sha256_files(files))
    return TaskResult("text", dataset, metrics, time.perf_counter() - start)
