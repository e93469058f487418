"""Captioning on the toy caption set, scored with CIDEr-D written here (no Java, no network).

CIDEr-D as in coco-caption's `cider_scorer.py`: n-grams 1-4 weighted by tf-idf, document frequency counted over the reference
set (one document per image), the idf's log(N) taken with N = number of images; per n the clipped cosine
`sum min(h, r) * r / (|h| |r|)` times a Gaussian length penalty exp(-(len_h - len_r)^2 / (2 sigma^2)), sigma = 6, with
"length" the number of bigrams as in the reference code; averaged over n and references, times 10. The corpus score is the mean
over images. Tokenisation stands in for the PTB tokenizer: lower case, punctuation dropped, whitespace split.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image
from torch import nn

from visprior.data.formats import PairSample
from visprior.data.shards import iter_samples, resolve_shards
from visprior.eval.generate import chat_prompt, generate
from visprior.eval.results import Accumulator, DatasetInfo, TaskResult

_PUNCT = re.compile(r"[^\w\s']")
CAPTION_PROMPT = "<image>\nDescribe the image in one sentence."


def tokenize(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(words: Sequence[str], n_max: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def _vector(counts: Counter, df: Counter, log_n: float, n_max: int) -> tuple[list[dict], list[float], int]:
    vec: list[dict] = [{} for _ in range(n_max)]
    norm = [0.0] * n_max
    length = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        vec[n][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
        norm[n] += vec[n][gram] ** 2
        if n == 1:  # the reference implementation's "length" counts bigrams
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], *, n_max: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and the per-image scores; `references[i]` are image i's reference captions."""
    if len(candidates) != len(references):
        raise ValueError("one list of references per candidate")
    refs = [[_ngrams(tokenize(r), n_max) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_n = math.log(float(len(refs)))
    scores = []
    for cand, rs in zip(candidates, refs):
        vh, nh, lh = _vector(_ngrams(tokenize(cand), n_max), df, log_n, n_max)
        total = [0.0] * n_max
        for r in rs:
            vr, nr, lr = _vector(r, df, log_n, n_max)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for n in range(n_max):
                val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * penalty
        scores.append(10.0 * sum(total) / n_max / len(rs))
    return (sum(scores) / len(scores) if scores else 0.0), scores


@dataclass
class CaptionItem:
    key: str
    image: Image.Image
    references: list[str]


def load_captions(path: str | os.PathLike, limit: int | None = None) -> list[CaptionItem]:
    """Toy caption pair shards; references from meta `references`, else the pair's own text."""
    items = []
    for s in iter_samples(resolve_shards(path), "pair"):
        assert isinstance(s, PairSample)
        items.append(CaptionItem(s.key, s.image, list(s.meta.get("references") or [s.text])))
        if limit is not None and len(items) >= limit:
            break
    return items


def evaluate_captioning(
    model: nn.Module,
    items: Sequence[CaptionItem],
    *,
    dataset: DatasetInfo,
    prompt: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 24,
    seed: int = 0,
) -> TaskResult:
    """Greedy captions scored by CIDEr-D. `prompt=None` uses the chat instruction; pass "<image>" for a raw pre-trained model."""
    start = time.perf_counter()
    text = prompt if prompt is not None else chat_prompt(CAPTION_PROMPT)
    outs = generate(model, [text] * len(items), [[it.image] for it in items], max_new_tokens=max_new_tokens,
                    batch_size=batch_size, stop=("<|im_end|>", "<|endoftext|>", "\n"))  # fmt: skip
    _, per_image = cider_d(outs, [it.references for it in items])
    acc = Accumulator()
    for s in per_image:
        acc.update("cider_d", s)
    extra = {"examples": [{"output": o, "references": it.references} for o, it in list(zip(outs, items))[:3]]}
    return TaskResult(
        "caption", dataset, {"cider_d": acc.mean("cider_d", seed=seed)}, time.perf_counter() - start, extra
    )
