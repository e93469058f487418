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
from visprior.models.language import IGNORE_INDEX


def read_texts(path: str | os.PathLike, limit: int | None = None) -> list[TextSample]:
    out = []
    for s in iter_samples(resolve_shards(path), "text"):
        assert isinstance(s, TextSample)
        out.append(s)
        if limit is not None and len(out) >= limit:
            break
    return out


def _document_ids(model: nn.Module, text: str) -> list[int]:
    tok = model.tokenizer
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


@torch.no_grad()
def document_nlls(
    model: nn.Module, texts: Sequence[str], max_length: int = 512, batch_size: int = 16
) -> list[tuple[float, int]]:
    """(summed NLL in nats, number of predicted tokens) of each document followed by the eos token.

    The windows of all documents go through the model `batch_size` at a time, sorted by length so a batch pads little.
    Rows are right-padded and attention is causal, so a window's tokens never see its padding: the numbers are those of
    one window at a time up to float rounding, at a fraction of the calls (the toy world's 1,400 held-out documents took
    1,400 forward passes of one row).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = []  # (document index, token ids)
    for d, text in enumerate(texts):
        ids = _document_ids(model, text)
        cuts = [ids[s : s + max_length] for s in range(0, len(ids), max_length)]
        windows += [(d, w) for w in cuts if len(w) > 1]  # a one-token window predicts nothing
    windows.sort(key=lambda w: len(w[1]))
    device = next(model.language_model.parameters()).device
    totals, counts = [0.0] * len(texts), [0] * len(texts)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for _, ids in chunk], device=device)  # [B, T]
        targets = torch.tensor([ids[1:] + [IGNORE_INDEX] * (width - len(ids)) for _, ids in chunk], device=device)
        logits = model.language_model(inputs_embeds=model.embed(input_ids)).logits[:, :-1].float()  # [B, T-1, V]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
        for (d, ids), value in zip(chunk, nll.tolist()):
            totals[d] += value
            counts[d] += len(ids) - 1
    return list(zip(totals, counts))


def document_nll(model: nn.Module, text: str, max_length: int = 512) -> tuple[float, int]:
    """(summed NLL in nats, number of predicted tokens) of one document followed by the eos token."""
    return document_nlls(model, [text], max_length)[0]


def perplexity(
    model: nn.Module, texts: Sequence[str], max_length: int = 512, batch_size: int = 16
) -> tuple[float, Accumulator]:
    """Token-weighted perplexity of `texts`; the accumulator holds per-document mean NLL weighted by token count."""
    acc = Accumulator()
    for nll, n in document_nlls(model, texts, max_length, batch_size):
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
        ppl, acc = perplexity(model, [t.text for t in texts], max_length, batch_size)
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
