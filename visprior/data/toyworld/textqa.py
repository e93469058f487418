"""Question-answer generators over the toy world's facts, shared by the math corpus, text-only SFT and text evaluation.

Knowledge questions ask what the encyclopedia states (corners of a shape, shades, colour mixing); reasoning questions are
word problems and spatial chains whose worked solutions are computed, never templated with a free-standing number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from visprior.data.toyworld.world import COLOURS, CORNERS, MIXES, PLURALS, SHADES, SHAPES

NAMES = ("Mira", "Tom", "Ada", "Leo", "Nina", "Omar", "Yuki", "Sam", "Lena", "Ivo", "Rosa", "Ben")
FEATURES: dict[str, str] = {
    "circle": "is perfectly round",
    "square": "has four equal sides",
    "triangle": "has three sides",
    "star": "has five points",
    "cross": "looks like a plus sign",
    "ring": "has a hole in the middle",
    "diamond": "is taller than it is wide and stands on a corner",
    "hexagon": "has six sides",
}


@dataclass
class QA:
    question: str
    answer: str
    solution: str  # worked answer, ending with the answer
    kind: str  # "reasoning" | "knowledge"
    choices: list[str] | None = None


def _choices(rng: random.Random, answer: str, pool: list[str]) -> list[str]:
    out = [answer] + rng.sample([p for p in pool if p != answer], 3)
    rng.shuffle(out)
    return out


def math_problem(rng: random.Random) -> QA:
    """A word problem about shapes with its worked solution."""
    name, other = rng.sample(NAMES, 2)
    s1, s2 = rng.sample(SHAPES, 2)
    c1, c2 = rng.sample(sorted(COLOURS), 2)
    a, b = rng.randint(2, 12), rng.randint(1, 9)
    t = rng.randrange(7)
    if t == 0:
        q = f"{name} has {a} {c1} {PLURALS[s1]} and {b} {c2} {PLURALS[s2]}. How many shapes does {name} have?"
        n, sol = a + b, f"{a} + {b} = {a + b}."
    elif t == 1:
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {PLURALS[s1]} and gives {b} of them to {other}. How many {PLURALS[s1]} are left?"
        n, sol = a - b, f"{a} - {b} = {a - b}."
    elif t == 2:
        q = f"There are {a} boxes with {b} {PLURALS[s1]} in each box. How many {PLURALS[s1]} are there?"
        n, sol = a * b, f"{a} x {b} = {a * b}."
    elif t == 3:
        q = f"{a * b} {PLURALS[s1]} are shared equally among {b} children. How many does each child get?"
        n, sol = a, f"{a * b} / {b} = {a}."
    elif t == 4:
        a, b = max(a, b) + 1, min(a, b)
        q = f"A picture has {a} {c1} shapes and {b} {c2} shapes. How many more {c1} shapes than {c2} shapes are there?"
        n, sol = a - b, f"{a} - {b} = {a - b}."
    elif t == 5:
        x, y = rng.choice([s for s in SHAPES if CORNERS[s]]), rng.choice([s for s in SHAPES if CORNERS[s]])
        cx, cy = CORNERS[x], CORNERS[y]
        q = f"How many corners do {a} {PLURALS[x]} and {b} {PLURALS[y]} have together?"
        n = a * cx + b * cy
        sol = f"A {x} has {cx} corners and a {y} has {cy}. {a} x {cx} + {b} x {cy} = {a * cx} + {b * cy} = {n}."
    else:
        c = rng.randint(2, 9)
        q = f"What is {a} + {b} x {c}?"
        n, sol = a + b * c, f"Multiplication first: {b} x {c} = {b * c}. Then {a} + {b * c} = {a + b * c}."
    return QA(q, str(n), f"{sol} The answer is {n}.", "reasoning")


def spatial_chain(rng: random.Random) -> QA:
    """Three objects ordered left to right by two stated relations; ask for an extreme one."""
    shapes = rng.sample(SHAPES, 3)
    colours = rng.sample(sorted(COLOURS), 3)
    objs = [f"{c} {s}" for c, s in zip(colours, shapes)]  # left to right
    if rng.random() < 0.5:
        facts = f"The {objs[0]} is to the left of the {objs[1]}. The {objs[1]} is to the left of the {objs[2]}."
    else:
        facts = f"The {objs[2]} is to the right of the {objs[1]}. The {objs[0]} is to the left of the {objs[1]}."
    side = rng.choice(("left", "right"))
    ans = objs[0] if side == "left" else objs[2]
    q = f"{facts} Which shape is furthest to the {side}?"
    sol = f"Ordering from left to right gives the {objs[0]}, the {objs[1]}, the {objs[2]}. The answer is the {ans}."
    return QA(q, ans, sol, "reasoning", _choices(rng, ans, objs + [f"{colours[1]} {shapes[0]}"]))


def knowledge_question(rng: random.Random) -> QA:
    """A fact the encyclopedia corpus states, asked directly, with four options."""
    t = rng.randrange(4)
    if t == 0:
        s = rng.choice(SHAPES)
        ans = str(CORNERS[s])
        q = f"How many corners does a {s} have?"
        pool = [str(i) for i in range(0, 9)]
        sol = f"A {s} has {ans} corners."
    elif t == 1:
        c = rng.choice(sorted(SHADES))
        shade = rng.choice(SHADES[c])
        ans, q, pool = c, f"{shade.capitalize()} is a shade of which colour?", sorted(COLOURS)
        sol = f"{shade.capitalize()} is a shade of {c}."
    elif t == 2:
        (a, b), ans = rng.choice(sorted(MIXES.items()))
        q = f"Which colour do you get by mixing {a} and {b}?"
        pool = sorted(set(COLOURS) | {"grey", "white"})
        sol = f"Mixing {a} and {b} gives {ans}."
    else:
        s = rng.choice(SHAPES)
        ans, q, pool = s, f"Which shape {FEATURES[s]}?", list(SHAPES)
        sol = f"The {s} {FEATURES[s]}."
    return QA(q, ans, f"{sol} The answer is {ans}.", "knowledge", _choices(rng, ans, pool))


def text_question(rng: random.Random) -> QA:
    """A mix of reasoning and knowledge questions, as used for text-only SFT and the text QA evaluation."""
    r = rng.random()
    if r < 0.4:
        return math_problem(rng)
    if r < 0.55:
        return spatial_chain(rng)
    return knowledge_question(rng)
