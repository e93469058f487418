"""Interleaved documents: several images with text that refers to them, in reading order.

Two families: in-context documents that repeat one (image, text) pattern several times ("Image: <img> Colour of the star:
red. Image: <img> ..."), the structure from which VILA-style in-context learning can emerge, and album-like documents
whose prose mentions what each picture shows. Scenes are sampled so that each pattern's question has one answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from visprior.data.toyworld.describe import NUMBER_WORDS, detailed_caption, short_caption
from visprior.data.toyworld.world import (
    COLOURS,
    SHAPES,
    Scene,
    make_object,
    place,
    region,
    sample_background,
    sample_scene,
)

ICL_TASKS = ("colour_of", "count", "shape_of", "where")


def _scene_with(rng: random.Random, target_shape: str | None = None, target_colour: str | None = None) -> Scene:
    """A scene with exactly one object of `target_shape` (or one of `target_colour`) and a few others without it."""
    shape = target_shape or rng.choice(SHAPES)
    colour = target_colour or rng.choice(sorted(COLOURS))
    target = make_object(rng, shape, colour, rng.choice(("medium", "large")), 0.5, 0.5)
    target.x, target.y = place(rng, target.r, []) or (0.5, 0.5)
    objects = [target]
    for _ in range(rng.randint(0, 2)):
        s = rng.choice([x for x in SHAPES if x != target_shape]) if target_shape else rng.choice(SHAPES)
        c = (
            rng.choice([x for x in sorted(COLOURS) if x != target_colour])
            if target_colour
            else rng.choice(sorted(COLOURS))
        )
        o = make_object(rng, s, c, rng.choice(("small", "medium")), 0.5, 0.5)
        pos = place(rng, o.r, objects)
        if pos:
            o.x, o.y = pos
            objects.append(o)
    rng.shuffle(objects)
    return Scene(objects, sample_background(rng))


def icl_episode(rng: random.Random, task: str, k: int) -> tuple[list[Scene], list[tuple[str, str]], str]:
    """`k` scenes with (prompt, answer) pairs for one in-context task; also returns the document's header line."""
    scenes, qa = [], []
    if task == "colour_of":
        shape = rng.choice(SHAPES)
        for _ in range(k):
            s = _scene_with(rng, target_shape=shape)
            scenes.append(s)
            qa.append((f"Colour of the {shape}:", next(o.colour for o in s.objects if o.shape == shape)))
        return scenes, qa, f"What colour is the {shape}? A few examples."
    if task == "shape_of":
        colour = rng.choice(sorted(COLOURS))
        for _ in range(k):
            s = _scene_with(rng, target_colour=colour)
            scenes.append(s)
            qa.append((f"Shape of the {colour} object:", next(o.shape for o in s.objects if o.colour == colour)))
        return scenes, qa, f"Name the shape of the {colour} object."
    if task == "where":
        shape = rng.choice(SHAPES)
        for _ in range(k):
            s = _scene_with(rng, target_shape=shape)
            scenes.append(s)
            qa.append((f"Position of the {shape}:", region(next(o for o in s.objects if o.shape == shape))))
        return scenes, qa, f"Where is the {shape}?"
    for _ in range(k):
        s = sample_scene(rng, max_objects=5)
        scenes.append(s)
        qa.append(("Number of shapes:", str(len(s.objects))))
    return scenes, qa, "Counting shapes in pictures."


def icl_document(rng: random.Random) -> tuple[list[Scene], Callable[[list], list], dict]:
    """Scenes, a function that lays images and text out in order (images are rendered by the caller), and meta naming
    the task, its repeated prompt and the answers, so few-shot evaluation and tests can rebuild the pattern."""
    task = rng.choice(ICL_TASKS)
    scenes, qa, header = icl_episode(rng, task, rng.randint(3, 6))
    lead = rng.random() < 0.5
    meta = {"family": "icl", "task": task, "prompt": qa[0][0], "answers": [a for _, a in qa]}

    def layout(images: list) -> list:
        segs: list = [header + "\n"] if lead else []
        for img, (prompt, answer) in zip(images, qa):
            segs += ["Image: ", img, f" {prompt} {answer}.\n"]
        return segs

    return scenes, layout, meta


def album_document(rng: random.Random) -> tuple[list[Scene], Callable[[list], list], dict]:
    """A short album: prose that introduces, shows and comments on each picture, with cross-references between them."""
    scenes = [sample_scene(rng, max_objects=4) for _ in range(rng.randint(2, 4))]
    texts = [(short_caption(s, rng), detailed_caption(s, rng)) for s in scenes]
    title = rng.choice(("My shape album", "Pictures from the workshop", "Today's drawings", "A gallery of shapes"))
    before = [rng.random() < 0.5 for _ in scenes]

    def layout(images: list) -> list:
        segs: list = [f"{title}.\n"]
        for i, (img, (short, detailed)) in enumerate(zip(images, texts)):
            nth = NUMBER_WORDS[i + 1] if i + 1 < len(NUMBER_WORDS) else str(i + 1)
            if before[i]:
                segs += [f"Picture {nth}: {short}\n", img, f"\n{detailed}\n"]
            else:
                segs += [img, f"\nAbove, picture {nth} shows {short} {detailed}\n"]
            if i > 0:
                prev, cur = len(scenes[i - 1].objects), len(scenes[i].objects)
                more = "more" if cur > prev else "fewer" if cur < prev else "the same number of"
                segs.append(f"It has {more} shapes than the previous picture ({cur} against {prev}).\n")
        return segs

    return scenes, layout, {"family": "album"}


def document(rng: random.Random, icl_share: float = 0.6) -> tuple[list[Scene], Callable[[list], list], dict]:
    """One interleaved document: scenes, a layout function, and meta (`family` is "icl" or "album")."""
    return icl_document(rng) if rng.random() < icl_share else album_document(rng)
