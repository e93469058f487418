"""Toy VQA: open-ended (VQAv2-normalised exact match) and multiple choice (likelihood-scored), per question type.

The normalisation follows the official VQAv2 evaluation script (punctuation, number words to digits, articles, contractions),
so an answer like "Two." matches "2". With the toy set's single reference the VQA "min(#humans/3, 1)" accuracy is exact match.
Multiple-choice questions are scored by the mean log-likelihood of each choice, which needs no answer-format following.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image
from torch import nn

from visprior.data.formats import ConversationSample
from visprior.data.shards import iter_samples, resolve_shards
from visprior.eval.generate import chat_prompt, generate, pick_option, score_options
from visprior.eval.results import Accumulator, DatasetInfo, Metric, TaskResult

_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "ive": "i've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "youve": "you've", "lets": "let's", "shes": "she's",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?<!\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """VQAv2 answer normalisation: lower case, punctuation, number words -> digits, no articles, fixed contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(r) for r in references)


@dataclass
class VQAItem:
    key: str
    image: Image.Image | None
    question: str  # the user turn, with its <image> mark
    answer: str
    question_type: str
    choices: list[str] = field(default_factory=list)


def load_vqa(path: str | os.PathLike, limit: int | None = None) -> list[VQAItem]:
    """Toy VQA conversation shards: the first human turn is the question; meta holds `question_type`, `answer`, `choices`."""
    items = []
    for s in iter_samples(resolve_shards(path), "conversation"):
        assert isinstance(s, ConversationSample)
        human = next(t["value"] for t in s.conversations if t["from"] == "human")
        gpt = next((t["value"] for t in s.conversations if t["from"] == "gpt"), "")
        image = s.images[0] if s.images else None
        if image is None:
            human = human.replace("<image>", "").strip()
        items.append(
            VQAItem(s.key, image, human, str(s.meta.get("answer", gpt)), s.meta.get("question_type", "all"),
                    list(s.meta.get("choices") or []))
        )  # fmt: skip
        if limit is not None and len(items) >= limit:
            break
    return items


def score_items(
    model: nn.Module,
    items: Sequence[VQAItem],
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    stop: Sequence[str] = ("<|im_end|>", "<|endoftext|>", "\n"),
    choice_prefix: str = "",
) -> list[bool]:
    """Correctness per item: generation + exact match for open questions, likelihood of `choice_prefix + choice` otherwise."""
    correct = [False] * len(items)
    open_idx = [i for i, it in enumerate(items) if not it.choices]
    mc_idx = [i for i, it in enumerate(items) if it.choices]
    if open_idx:
        outs = generate(model, [prompts[i] for i in open_idx], [images[i] for i in open_idx],
                        max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop)  # fmt: skip
        for i, out in zip(open_idx, outs):
            correct[i] = exact_match(out, [items[i].answer])
    if mc_idx:
        options = [[choice_prefix + c for c in items[i].choices] for i in mc_idx]
        scores = score_options(model, [prompts[i] for i in mc_idx], options, [images[i] for i in mc_idx],
                               batch_size=batch_size)  # fmt: skip
        for i, s in zip(mc_idx, scores):
            correct[i] = items[i].choices[pick_option(s)] == items[i].answer
    return correct


def evaluate_vqa(
    model: nn.Module, items: Sequence[VQAItem], *, dataset: DatasetInfo, batch_size: int = 8, max_new_tokens: int = 8
) -> TaskResult:
    """Accuracy overall, for open and multiple-choice questions, and per question type."""
    start = time.perf_counter()
    prompts = [chat_prompt(it.question) for it in items]
    images = [[it.image] if it.image is not None else [] for it in items]
    correct = score_items(model, items, prompts, images, batch_size=batch_size, max_new_tokens=max_new_tokens)
    acc = Accumulator()
    for it, ok in zip(items, correct):
        acc.update("all", float(ok))
        acc.update("mc" if it.choices else "open", float(ok))
        acc.update(f"type/{it.question_type}", float(ok))
    metrics: dict[str, Metric] = {name: acc.accuracy(name) for name in sorted(acc.names())}
    return TaskResult("vqa", dataset, metrics, time.perf_counter() - start)
