"""Toy VQA: open-ended (EvalAI-normalised exact match) and multiple choice (likelihood-scored), per question type.

Answers are normalised as lmms-eval normalises them for its open-ended VQA tasks (TextVQA, VizWiz, OK-VQA): its
`EvalAIAnswerProcessor` (lmms_eval/tasks/_task_utils/vqa_eval_metric.py, the VQA evaluation's processor as MMF ships it),
so an answer like "Two." matches "2" and a visprior exact match is the one lmms-eval would count. With the toy set's single
reference the VQA "min(#humans/3, 1)" accuracy is exact match. Multiple-choice questions are scored by the mean
log-likelihood of each choice, which needs no answer-format following.
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
from visprior.eval.mle_bench import blind_image
from visprior.eval.results import Accumulator, DatasetInfo, Metric, TaskResult

# The processor's steps, written from its behaviour (quirks kept, so the normalised strings are the same):
#   1. tokenise: lower-case, drop every `,` and `?`, split off `'s` (`it's red` -> `it 's red`, `square's` -> `square 's`),
#      then newlines and tabs become spaces and the ends are stripped;
#   2. punctuation: each of `_PUNCT` is deleted if it sits next to a space anywhere in the text *as it came in* (or the text
#      has a comma between digits), else replaced by a space; then every `.` not followed by a digit is deleted, at most 32
#      of them (the processor passes re.UNICODE, 32, where `re.sub` takes its count), so `3.` -> `3` but `3.5` stays;
#   3. words: number words zero-ten (and `none`) -> digits, articles dropped, contractions restored from `_CONTRACTIONS`.
#      Only its lower-case keys can match (words are lower-cased first), so `im` and `ive` stay as they are, and since `'s`
#      was split off in step 1, `what's` ends as `what 's` while `whats` becomes `what's`.
# lmms-eval's VQAv2 task runs steps 2 and 3 only (`normalize_answer(text, tokenize=False)`).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_STRIPPED = 32
_DIGIT_COMMA_DIGIT = re.compile(r"\d,+\d")


def _tokenize(text: str) -> str:
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def _punctuation(text: str) -> str:
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if delete or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=_PERIODS_STRIPPED)


def _words(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str, *, tokenize: bool = True) -> str:
    """lmms-eval's EvalAI answer normalisation (steps above); `tokenize=False` is its VQAv2 task's variant."""
    text = _tokenize(text) if tokenize else text.replace("\n", " ").replace("\t", " ").strip()
    return _words(_punctuation(text))


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
    model: nn.Module,
    items: Sequence[VQAItem],
    *,
    dataset: DatasetInfo,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    blind: bool = False,
) -> TaskResult:
    """Accuracy overall, for open and multiple-choice questions, and per question type.

    With `blind`, the same metrics again under `blind/` with every image replaced by a uniform grey one of its size (as
    MLE-Bench's blind baseline): what a model answers from the question and its language prior alone. A gain that stays
    on grey images is not a visual one.
    """
    start = time.perf_counter()
    prompts = [chat_prompt(it.question) for it in items]
    images = [[it.image] if it.image is not None else [] for it in items]
    runs = [("", images)]
    if blind:
        runs.append(("blind/", [[blind_image(img) for img in row] for row in images]))
    acc = Accumulator()
    for prefix, shown in runs:
        correct = score_items(model, items, prompts, shown, batch_size=batch_size, max_new_tokens=max_new_tokens)
        for it, ok in zip(items, correct):
            acc.update(f"{prefix}all", float(ok))
            acc.update(f"{prefix}{'mc' if it.choices else 'open'}", float(ok))
            acc.update(f"{prefix}type/{it.question_type}", float(ok))
    metrics: dict[str, Metric] = {name: acc.accuracy(name) for name in sorted(acc.names())}
    return TaskResult("vqa", dataset, metrics, time.perf_counter() - start, {"blind": blind})
