"""Sample streams of the toy world, one generator per dataset, each fed its own seeded `random.Random`.

Each function yields `formats` samples in a fixed order, so the same rng state gives the same samples (and, through
`write_shards`, the same bytes). Scenes are never shared between datasets: every dataset draws its own from its own rng.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict

from visprior.data.formats import ConversationSample, InterleavedSample, PairSample, TextSample
from visprior.data.toyworld import corpora, interleaved
from visprior.data.toyworld.describe import (
    QUESTION_TYPES,
    answer_text,
    caption_references,
    detailed_caption,
    question_text,
    short_caption,
    vqa_item,
    vqa_items,
)
from visprior.data.toyworld.render import render
from visprior.data.toyworld.textqa import text_question
from visprior.data.toyworld.world import COLOURS, SHAPES, Scene, make_object, place, sample_background, sample_scene

SOURCE = "toyworld"
DESCRIBE_PROMPTS = ("Describe the image in detail.", "What is in this picture? Give a detailed description.")
CAPTION_PROMPTS = ("Write a short caption for the image.", "Caption this image briefly.")


def _objects(scene: Scene, areas: list[float]) -> list[dict]:
    return [{**asdict(o), "area": round(a, 6)} for o, a in zip(scene.objects, areas)]


def pairs(rng: random.Random, n: int, size: int, max_objects: int) -> Iterator[PairSample]:
    for i in range(n):
        scene = sample_scene(rng, max_objects)
        r = render(scene, size)
        meta = {"detailed": detailed_caption(scene, rng), "objects": _objects(scene, r.areas), "source": SOURCE}
        yield PairSample(f"pair-{i:07d}", r.image, short_caption(scene, rng), meta)


DESCRIBE_SHARE = 0.15
"""Conversations opening with a detailed description. Their long answers dominate a token-averaged loss: at 0.4 (with
bare-letter replies) descriptions and captions were 86 % of the supervised SFT tokens and lettered existence answers 1.7 %,
and the toy VLM stayed at chance on them; at 0.15 with `name (letter)` replies: 62 % and 17 % (measured on shard 0, world
version 3)."""
WHICH_EXISTS_SHARE = 0.5
"""Extra lettered existence questions in SFT conversations: the skill MLE-Bench measures, as LLaVA-1.5 mixes in A-OKVQA."""


def sft(rng: random.Random, n: int, size: int, max_objects: int) -> Iterator[ConversationSample]:
    """Multi-turn LLaVA conversations: a detailed description and/or VQA of every type, `<image>` in the first turn."""
    for i in range(n):
        scene = sample_scene(rng, max_objects)
        r = render(scene, size)
        turns: list[tuple[str, str]] = []
        if rng.random() < DESCRIBE_SHARE:
            turns.append((rng.choice(DESCRIBE_PROMPTS), detailed_caption(scene, rng)))
        elif rng.random() < 0.2:
            turns.append((rng.choice(CAPTION_PROMPTS), short_caption(scene, rng)))
        items = vqa_items(scene, rng, rng.randint(1, 3))
        if rng.random() < WHICH_EXISTS_SHARE and all(it.question_type != "which_exists" for it in items):
            extra = vqa_item(scene, rng, "which_exists")
            items += [extra] if extra is not None else []
        turns += [(question_text(it), answer_text(it)) for it in items]
        conv = []
        for t, (q, a) in enumerate(turns):
            conv += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
        meta = {"source": SOURCE, "question_types": [it.question_type for it in items]}
        yield ConversationSample(f"sft-{i:07d}", conv, [r.image], meta)


def sft_text(rng: random.Random, n: int) -> Iterator[ConversationSample]:
    """Text-only conversations (math, spatial reasoning and knowledge QA) with worked answers."""
    for i in range(n):
        conv, kinds = [], []
        for _ in range(rng.randint(1, 2)):
            qa = text_question(rng)
            q = (
                f"{qa.question}\nOptions: {', '.join(qa.choices)}."
                if qa.choices and rng.random() < 0.5
                else qa.question
            )
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": qa.solution}]
            kinds.append(qa.kind)
        yield ConversationSample(f"sft_text-{i:07d}", conv, [], {"source": SOURCE, "types": kinds})


def interleaved_docs(rng: random.Random, n: int, size: int) -> Iterator[InterleavedSample]:
    for i in range(n):
        scenes, layout, meta = interleaved.document(rng)
        segments = layout([render(s, size).image for s in scenes])
        yield InterleavedSample(f"doc-{i:07d}", segments, {"source": SOURCE, **meta})


def vqa_eval(rng: random.Random, n: int, size: int, max_objects: int) -> Iterator[ConversationSample]:
    """One question per sample, question types in equal turns; meta carries the query and objects for checking."""
    for i in range(n):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        item = None
        while item is None:
            scene = sample_scene(rng, max_objects, min_objects=2 if qtype == "spatial" else 1)
            item = vqa_item(scene, rng, qtype)
        r = render(scene, size)
        conv = [
            {"from": "human", "value": f"<image>\n{question_text(item)}"},
            {"from": "gpt", "value": answer_text(item)},
        ]
        meta = {
            "question_type": qtype,
            "question": item.question,
            "answer": item.answer,
            "query": item.query,
            "objects": _objects(scene, r.areas),
            "source": SOURCE,
        }
        if item.choices:
            meta["choices"] = item.choices
        yield ConversationSample(f"vqa-{i:07d}", conv, [r.image], meta)


def captions_eval(rng: random.Random, n: int, size: int, max_objects: int) -> Iterator[PairSample]:
    for i in range(n):
        scene = sample_scene(rng, max_objects)
        r = render(scene, size)
        refs = caption_references(scene, rng)
        meta = {"references": refs, "objects": _objects(scene, r.areas), "source": SOURCE}
        yield PairSample(f"cap-{i:07d}", r.image, refs[0], meta)


def shapes(rng: random.Random, n: int, size: int, split: str) -> Iterator[PairSample]:
    """One shape per image, random colour, size, place and background; label = index in `SHAPES`."""
    for i in range(n):
        label = rng.randrange(len(SHAPES))
        obj = make_object(rng, SHAPES[label], rng.choice(sorted(COLOURS)), rng.choice(("medium", "large")), 0.5, 0.5)
        obj.x, obj.y = place(rng, obj.r, []) or (0.5, 0.5)
        r = render(Scene([obj], sample_background(rng)), size)
        meta = {"label": label, "label_name": SHAPES[label], "colour": obj.colour, "source": SOURCE}
        yield PairSample(f"shape-{split}-{i:07d}", r.image, f"a {obj.colour} {obj.shape}", meta)


def text(
    rng: random.Random, category: str, n: int, split: str = "train", seen: set[str] | None = None, exclude: bool = False
) -> Iterator[TextSample]:
    """`n` documents of `category`. Train adds its texts to `seen`; held-out (`exclude=True`) redraws texts found there,
    so perplexity is measured on documents the model has not read (after a bounded number of redraws, a repeat is kept)."""
    for i in range(n):
        doc = corpora.document(category, rng)
        for _ in range(50):
            if not (exclude and seen is not None and doc in seen):
                break
            doc = corpora.document(category, rng)
        if seen is not None and not exclude:
            seen.add(doc)
        meta = {"category": category, "source": SOURCE, "split": split}
        yield TextSample(f"{category}-{split}-{i:07d}", doc, meta)


def text_qa(rng: random.Random, n: int) -> Iterator[TextSample]:
    for i in range(n):
        qa = text_question(rng)
        meta = {
            "question": qa.question,
            "answer": qa.answer,
            "type": qa.kind,
            "solution": qa.solution,
            "source": SOURCE,
        }
        if qa.choices:
            meta["choices"] = qa.choices
        yield TextSample(f"textqa-{i:07d}", f"Question: {qa.question}\nAnswer: {qa.solution}", meta)
