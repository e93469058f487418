"""Words about a scene: short and detailed captions, and VQA items whose answers are computed from the scene itself.

Every VQA item carries a machine-readable `query` next to its natural-language question, so a checker can recompute the
answer from the object list without parsing English. Objects are only referred to by descriptions that pick out exactly
one of them ("the star", "the red star", "the small red star"), and spatial questions are only asked when the two
objects are clearly apart along the asked axis.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from visprior.data.toyworld.world import COLOURS, PLURALS, SHAPES, Obj, Scene, region

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
QUESTION_TYPES = ("existence", "counting", "colour", "shape", "spatial", "position", "compare", "sum", "which_exists")
LETTERS = "ABCD"
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's instruction for lettered multiple choice (its A-OKVQA / ScienceQA data); MLE-Bench prompts with it too."""
WHICH_PROMPTS = (
    "Which of the following objects appears in the image?",
    "Which of these shapes is in the picture?",
    "Which one of the following can you see in the image?",
)
SPATIAL_GAP = 0.08  # minimum centre distance along the asked axis (fraction of the image side)


@dataclass
class VQAItem:
    question_type: str
    question: str
    answer: str
    query: dict[str, Any]
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def count_phrase(n: int, shape: str, colour: str | None = None) -> str:
    words = NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)
    if n == 1:
        words = "an" if (colour or shape)[0] in "aeiou" else "a"
    noun = shape if n == 1 else PLURALS[shape]
    return f"{words} {colour + ' ' if colour else ''}{noun}"


def join_words(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def matches(obj: Obj, attrs: dict[str, str]) -> bool:
    return all(getattr(obj, k) == v for k, v in attrs.items())


def unique_ref(obj: Obj, objects: list[Obj], use_shape: bool = True) -> dict[str, str] | None:
    """The fewest attributes (shape, colour, size) that pick out `obj` alone, or None."""
    keys = (
        [("shape",), ("colour", "shape"), ("size", "colour", "shape")]
        if use_shape
        else [("colour",), ("size", "colour")]
    )
    for ks in keys:
        attrs = {k: getattr(obj, k) for k in ks}
        if sum(matches(o, attrs) for o in objects) == 1:
            return attrs
    return None


def ref_text(attrs: dict[str, str]) -> str:
    words = [attrs[k] for k in ("size", "colour") if k in attrs]
    return "the " + " ".join(words + [attrs.get("shape", "object")])


def short_caption(scene: Scene, rng: random.Random) -> str:
    groups = Counter((o.colour, o.shape) for o in scene.objects)
    parts = [count_phrase(n, s, c) for (c, s), n in sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))]
    lead = rng.choice(("", "a picture of ", "an image showing ", "a drawing of "))
    return f"{lead}{join_words(parts)} on {scene.background.description}."


def relation(a: Obj, b: Obj, axis: str) -> str | None:
    """'left'/'right' or 'above'/'below' of a relative to b, None when too close to call."""
    if axis == "x":
        d = a.x - b.x
        return None if abs(d) < SPATIAL_GAP else ("left" if d < 0 else "right")
    d = a.y - b.y
    return None if abs(d) < SPATIAL_GAP else ("above" if d < 0 else "below")


REL_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def detailed_caption(scene: Scene, rng: random.Random) -> str:
    objs = scene.objects
    n = len(objs)
    head = f"The image shows {NUMBER_WORDS[n] if n < 11 else n} shape{'s' if n > 1 else ''} on {scene.background.description}."
    sents = [head]
    for o in sorted(objs, key=lambda o: (o.y > 1 / 3) + (o.y > 2 / 3) + o.x / 10):
        art = "An" if o.size[0] in "aeiou" else "A"
        where = region(o)
        sents.append(
            f"{art} {o.size} {o.colour} {o.shape} is {'in the center' if where == 'center' else 'at the ' + where}."
        )
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    rng.shuffle(pairs)
    said = 0
    for a, b in pairs:
        ra, rb = unique_ref(a, objs), unique_ref(b, objs)
        rel = relation(a, b, rng.choice("xy"))
        if ra and rb and rel and said < 2:
            sents.append(f"{ref_text(ra).capitalize()} is {REL_WORDS[rel]} {ref_text(rb)}.")
            said += 1
    return " ".join(sents)


def caption_references(scene: Scene, rng: random.Random, k: int = 3) -> list[str]:
    """Several reference captions (short variants and one detailed) for caption evaluation."""
    refs = {short_caption(scene, rng) for _ in range(4 * k)}
    return sorted(refs)[: k - 1] + [detailed_caption(scene, rng)]


# ----------------------------------------------------------------------------------------------------------------- VQA


def _mc(rng: random.Random, answer: str, pool: list[str], k: int = 4) -> list[str]:
    choices = [answer] + rng.sample([p for p in pool if p != answer], k - 1)
    rng.shuffle(choices)
    return choices


def _existence(scene: Scene, rng: random.Random) -> VQAItem:
    present = sorted({o.shape for o in scene.objects})
    shape = rng.choice(present) if rng.random() < 0.5 else rng.choice(SHAPES)
    if rng.random() < 0.4:
        colour = rng.choice(sorted({o.colour for o in scene.objects}) + sorted(COLOURS))
        q = {"shape": shape, "colour": colour}
        text = f"Is there {'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} in the image?"
    else:
        q, text = {"shape": shape}, f"Is there a {shape} in the image?"
    ans = "yes" if any(matches(o, q) for o in scene.objects) else "no"
    return VQAItem("existence", text, ans, q)


def _which_exists(scene: Scene, rng: random.Random) -> VQAItem | None:
    """Lettered four-way choice with exactly one present shape (the other three absent); see `answer_text` for the reply."""
    present = sorted({o.shape for o in scene.objects})
    absent = [s for s in SHAPES if s not in present]
    if len(absent) < len(LETTERS) - 1:
        return None
    answer = rng.choice(present)
    choices = [answer] + rng.sample(absent, len(LETTERS) - 1)
    rng.shuffle(choices)
    return VQAItem("which_exists", rng.choice(WHICH_PROMPTS), answer, {"shape": answer}, choices, {"lettered": True})


def _counting(scene: Scene, rng: random.Random) -> VQAItem:
    kind = rng.choice(("shape", "colour", "all"))
    if kind == "shape":
        q = {"shape": rng.choice(sorted({o.shape for o in scene.objects}) + list(SHAPES[:2]))}
        text = f"How many {PLURALS[q['shape']]} are there?"
    elif kind == "colour":
        q = {"colour": rng.choice(sorted({o.colour for o in scene.objects}))}
        text = f"How many {q['colour']} shapes are there?"
    else:
        q, text = {}, "How many shapes are in the image?"
    return VQAItem("counting", text, str(sum(matches(o, q) for o in scene.objects)), q)


def _attribute(scene: Scene, rng: random.Random, attr: str) -> VQAItem | None:
    objs = list(scene.objects)
    rng.shuffle(objs)
    for o in objs:
        ref = unique_ref(o, scene.objects, use_shape=(attr == "colour"))
        if ref is None or attr in ref:
            continue
        if attr == "colour":
            text = f"What colour is {ref_text(ref)}?"
            pool = sorted(COLOURS)
        else:
            text = f"What shape is {ref_text(ref)}?"
            pool = list(SHAPES)
        ans = getattr(o, attr)
        choices = _mc(rng, ans, pool) if rng.random() < 0.5 else None
        return VQAItem(attr, text, ans, {"target": ref, "attribute": attr}, choices)
    return None


def _spatial(scene: Scene, rng: random.Random) -> VQAItem | None:
    objs = scene.objects
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        ra, rb = unique_ref(a, objs), unique_ref(b, objs)
        axis = rng.choice("xy")
        rel = relation(a, b, axis)
        if not (ra and rb and rel):
            continue
        asked = rng.choice(("left", "right") if axis == "x" else ("above", "below"))
        text = f"Is {ref_text(ra)} {REL_WORDS[asked]} {ref_text(rb)}?"
        return VQAItem("spatial", text, "yes" if asked == rel else "no", {"a": ra, "b": rb, "relation": asked})
    return None


def _position(scene: Scene, rng: random.Random) -> VQAItem | None:
    objs = list(scene.objects)
    rng.shuffle(objs)
    for o in objs:
        ref = unique_ref(o, scene.objects)
        if ref:
            return VQAItem("position", f"Where is {ref_text(ref)} in the image?", region(o), {"target": ref})
    return None


def _compare(scene: Scene, rng: random.Random) -> VQAItem:
    attr = rng.choice(("colour", "shape"))
    pool = sorted({getattr(o, attr) for o in scene.objects}) + (sorted(COLOURS) if attr == "colour" else list(SHAPES))
    a = rng.choice(pool[:3])
    b = rng.choice([p for p in pool if p != a])
    na = sum(getattr(o, attr) == a for o in scene.objects)
    nb = sum(getattr(o, attr) == b for o in scene.objects)
    text = (
        f"Are there more {a} shapes than {b} shapes?"
        if attr == "colour"
        else f"Are there more {PLURALS[a]} than {PLURALS[b]}?"
    )
    return VQAItem("compare", text, "yes" if na > nb else "no", {"more": {attr: a}, "than": {attr: b}})


def _sum(scene: Scene, rng: random.Random) -> VQAItem:
    present = sorted({o.shape for o in scene.objects})
    s1 = rng.choice(present)
    s2 = rng.choice([s for s in present + list(SHAPES) if s != s1])
    n = sum(o.shape in (s1, s2) for o in scene.objects)
    return VQAItem("sum", f"How many {PLURALS[s1]} and {PLURALS[s2]} are there in total?", str(n), {"shapes": [s1, s2]})


def vqa_item(scene: Scene, rng: random.Random, question_type: str) -> VQAItem | None:
    """One question of `question_type` about `scene`, or None when the scene cannot support it unambiguously."""
    if question_type in ("colour", "shape"):
        return _attribute(scene, rng, question_type)
    fn = {"existence": _existence, "counting": _counting, "spatial": _spatial, "position": _position}
    fn.update({"compare": _compare, "sum": _sum, "which_exists": _which_exists})
    return fn[question_type](scene, rng)


def vqa_items(scene: Scene, rng: random.Random, k: int) -> list[VQAItem]:
    """Up to `k` questions of distinct types about `scene`."""
    types = list(QUESTION_TYPES)
    rng.shuffle(types)
    out = []
    for t in types:
        item = vqa_item(scene, rng, t)
        if item is not None:
            out.append(item)
        if len(out) == k:
            break
    return out


def question_text(item: VQAItem) -> str:
    """The question as shown to a model; multiple-choice items list their options (lettered ones one per line)."""
    if item.choices and item.meta.get("lettered"):
        lines = [f"{letter}. {choice}" for letter, choice in zip(LETTERS, item.choices, strict=True)]
        return "\n".join([item.question, *lines, LETTER_INSTRUCTION])
    if item.choices:
        return f"{item.question}\nOptions: {', '.join(item.choices)}."
    return item.question


def answer_text(item: VQAItem) -> str:
    """The reply a model is trained to give: for lettered items the option's letter, then its text (`C. hexagon`).

    The letter leads because that is the form lmms-eval's `mle_bench` task reads (a leading letter followed by `.`; a letter
    after the name, `hexagon (C)`, reads as no answer there), so the toy VLM's generated-letter score is measured as the
    benchmark measures it. The option's text follows so the reply still names the object. Earlier measurement on the toy
    VLM (frozen shape-aware tower, 16 image tokens), with other replies: the bare letter stayed at chance on MLE-Bench after
    6,400 examples, the name first (`circle (B)`) reached 43-46 % after 4,800.
    """
    if item.choices and item.meta.get("lettered"):
        return f"{LETTERS[item.choices.index(item.answer)]}. {item.answer}"
    return item.answer
