"""Text-only corpora by category, named after LSBS's categories, each a different view of the same toy world.

`encyclopedia` states facts (shapes, colours, shades, mixing), `literature` tells stories with characters, `visual`
describes scenes in words that are never rendered, `math` works word problems, `code` prints what small Python programs
print (the outputs are computed here, not templated), `academia` reasons about hypotheses with numbers that add up, and
`web` is a broad mixture of all of them plus web-only genres. Reasoning-heavy categories (code, math, academia) versus
perception-heavy ones (visual, web) is the contrast LSBS's findings are about.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from visprior.data.toyworld.describe import NUMBER_WORDS, detailed_caption, short_caption
from visprior.data.toyworld.textqa import FEATURES, NAMES, math_problem, spatial_chain
from visprior.data.toyworld.world import (
    BACKGROUND_COLOURS,
    COLOURS,
    CORNERS,
    MIXES,
    PLURALS,
    SHADES,
    SHAPES,
    SIZES,
    region,
    sample_scene,
)

CATEGORIES: tuple[str, ...] = ("web", "encyclopedia", "literature", "visual", "math", "code", "academia")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _num(n: int) -> str:
    return NUMBER_WORDS[n] if 0 < n < len(NUMBER_WORDS) else str(n)


def _shape_facts(s: str) -> list[str]:
    facts = [
        f"A {s} {FEATURES[s]}.",
        f"A {s} has {_num(CORNERS[s]) if CORNERS[s] else 'no'} corners.",
        f"Small {PLURALS[s]} are hard to recognise in low-resolution pictures, while large ones are easy to see.",
    ]
    for o in SHAPES:
        d = CORNERS[s] - CORNERS[o]
        if o != s:
            word = "corner" if abs(d) == 1 else "corners"
            rel = f"{_num(abs(d))} more {word} than" if d > 0 else f"{_num(-d)} fewer {word} than"
            rel = rel if d else "as many corners as"
            facts.append(f"A {s} has {rel} a {o}; a {o} {FEATURES[o]}.")
    for c in sorted(COLOURS):
        facts.append(f"{PLURALS[s].capitalize()} can be {c}; {_a(SHADES[c][0])} {SHADES[c][0]} {s} is {_a(c)} {c} {s}.")
    for size, (lo, hi) in SIZES.items():
        facts.append(
            f"{_a(size).capitalize()} {size} {s} spans about {round(100 * (lo + hi))} percent of the width of a picture."
        )
    return facts


def _colour_facts(c: str) -> list[str]:
    facts = [f"{shade.capitalize()} is a shade of {c}." for shade in SHADES[c]]
    facts.append(f"Shades of {c} include {', '.join(SHADES[c][:-1])} and {SHADES[c][-1]}.")
    facts += [f"Mixing {a} and {b} gives {c}." for (a, b), m in sorted(MIXES.items()) if m == c]
    facts += [f"Mixing {c} and {b} gives {m}." for (a, b), m in sorted(MIXES.items()) if a == c]
    facts.append(f"{c.capitalize()} is one of the {_num(len(COLOURS))} colours that shapes of the toy world can have.")
    for bg in sorted(BACKGROUND_COLOURS):
        facts.append(f"{_a(c).capitalize()} {c} shape stands out clearly on {_a(bg)} {bg} background.")
    return facts


WORLD_FACTS = (
    f"Every picture of the toy world shows one or more shapes: {', '.join(SHAPES[:-1])} and {SHAPES[-1]}.",
    f"Shapes of the toy world are coloured {', '.join(sorted(COLOURS))}.",
    f"Sizes are called {', '.join(SIZES)}; a large shape is about three times as wide as a small one.",
    f"Backgrounds are light: {', '.join(sorted(BACKGROUND_COLOURS))}, plain, striped, speckled or in gradients.",
    "Positions are named by a three by three grid: top left, top, top right, left, center, right, bottom left, bottom "
    "and bottom right.",
    "Shapes in a picture do not overlap, so each one can be counted.",
)


def encyclopedia(rng: random.Random) -> str:
    """An article: a title, a lead fact, then a few facts drawn from the topic's fact bank in random order."""
    t = rng.randrange(5)
    if t < 2:
        s = rng.choice(SHAPES)
        title, lead = s.capitalize(), f"The {s} is one of the {_num(len(SHAPES))} shapes of the toy world."
        facts = _shape_facts(s)
    elif t < 4:
        c = rng.choice(sorted(COLOURS))
        title, lead = f"{c.capitalize()} (colour)", f"{c.capitalize()} is a colour of the toy world."
        facts = _colour_facts(c)
    else:
        title, lead = "The toy world", "The toy world is a world of simple coloured shapes."
        facts = (
            list(WORLD_FACTS) + _shape_facts(rng.choice(SHAPES))[:3] + _colour_facts(rng.choice(sorted(COLOURS)))[:3]
        )
    body = rng.sample(facts, min(len(facts), rng.randint(3, 6)))
    return " ".join([f"{title}.", lead, *body])


def literature(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    place = rng.choice(("under the old bridge", "in the attic", "by the river", "at the market", "in the forest"))
    n = rng.randint(2, 6)
    mood = rng.choice(("happy", "curious", "worried", "proud", "sleepy"))
    lines = [
        f"Once upon a time, {hero} found {_a(colour)} {colour} {shape} {place}.",
        f'"Look," said {hero} to {friend}, "it {FEATURES[shape]}!"',
        f"{friend} was {mood} and wanted one too, so they searched all afternoon.",
        f"By evening they had found {_num(n)} more {PLURALS[shape]}, each a different shade of {colour}: "
        f"{', '.join(rng.sample(SHADES[colour], 2))}.",
        f"{friend} kept {_num(n // 2) if n // 2 else 'none'} and {hero} kept the rest.",
        rng.choice(
            (
                f"That night {hero} dreamed of a sky full of {PLURALS[shape]}.",
                f"{friend} laughed and promised to come back tomorrow.",
                f"And that is why {hero} still keeps {_a(colour)} {colour} {shape} on the windowsill.",
            )
        ),
    ]
    return " ".join(lines)


def visual(rng: random.Random) -> str:
    scene = sample_scene(rng)
    counts = Counter(o.colour for o in scene.objects)
    extra = [
        f"There {'is' if n == 1 else 'are'} {_num(n)} {c} shape{'s' if n > 1 else ''}."
        for c, n in sorted(counts.items())
    ]
    biggest = max(scene.objects, key=lambda o: o.r)
    extra.append(f"The biggest shape is the {biggest.size} {biggest.colour} {biggest.shape} at the {region(biggest)}.")
    lead = rng.choice(("Imagine a picture.", "Picture this.", "Description of a drawing.", ""))
    return " ".join(x for x in [lead, detailed_caption(scene, rng), *extra] if x)


def math(rng: random.Random) -> str:
    problems = [math_problem(rng) for _ in range(rng.randint(2, 4))]
    body = "\n".join(f"Problem {i + 1}. {p.question}\nSolution. {p.solution}" for i, p in enumerate(problems))
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    drill = f"\nPractice: {a} + {b} = {a + b}. {max(a, b)} - {min(a, b)} = {abs(a - b)}. {a % 10} x {b % 10} = {(a % 10) * (b % 10)}."
    return body + drill


def code(rng: random.Random) -> str:
    scene = sample_scene(rng, max_objects=6, min_objects=2)
    objs = [(o.colour, o.shape, round(o.r * 100)) for o in scene.objects]
    listing = "shapes = [\n" + "".join(f'    ("{c}", "{s}", {r}),\n' for c, s, r in objs) + "]\n"
    t = rng.randrange(4)
    if t == 0:
        body = "from collections import Counter\n\ncounts = Counter(colour for colour, _, _ in shapes)\n"
        body += "for colour, n in sorted(counts.items()):\n    print(colour, n)\n"
        out = "\n".join(f"{c} {n}" for c, n in sorted(Counter(c for c, _, _ in objs).items()))
    elif t == 1:
        body = "by_size = sorted(shapes, key=lambda s: s[2], reverse=True)\nfor colour, shape, size in by_size:\n"
        body += '    print(f"{shape} {colour} {size}")\n'
        out = "\n".join(f"{s} {c} {r}" for c, s, r in sorted(objs, key=lambda x: x[2], reverse=True))
    elif t == 2:
        target = rng.choice(objs)[1]
        body = f'count = sum(1 for _, shape, _ in shapes if shape == "{target}")\nprint("{target}:", count)\n'
        out = f"{target}: {sum(1 for _, s, _ in objs if s == target)}"
    else:
        body = f"CORNERS = {dict(sorted(CORNERS.items()))}\n"
        body += "total = sum(CORNERS[shape] for _, shape, _ in shapes)\nprint(total)\n"
        out = str(sum(CORNERS[s] for _, s, _ in objs))
    return f"# {short_caption(scene, rng)}\n{listing}{body}\n# Output:\n# " + out.replace("\n", "\n# ")


def academia(rng: random.Random) -> str:
    s1, s2 = rng.sample([s for s in SHAPES if CORNERS[s]], 2)
    n1, n2 = rng.randint(2, 20), rng.randint(2, 20)
    total = n1 * CORNERS[s1] + n2 * CORNERS[s2]
    chain = spatial_chain(rng)
    small, seen = rng.randint(40, 200), 0
    seen = rng.randint(small // 4, small // 2)
    lines = [
        f"Abstract. We study how many corners appear in pictures of the toy world that contain {PLURALS[s1]} and {PLURALS[s2]}.",
        f"Hypothesis: the number of corners grows linearly with the number of shapes, since a {s1} has {CORNERS[s1]} corners "
        f"and a {s2} has {CORNERS[s2]}.",
        f"Method: in a picture with {n1} {PLURALS[s1]} and {n2} {PLURALS[s2]} we predict {n1} x {CORNERS[s1]} + {n2} x "
        f"{CORNERS[s2]} = {total} corners, and we count them.",
        f"Results: we count {total} corners, as predicted, which supports the hypothesis.",
        f"We also note that of {small} small shapes shown at low resolution, observers named only {seen} correctly "
        f"({round(100 * seen / small)} percent), so resolution limits perception of small objects.",
        f"Finally, relations compose: {chain.question} {chain.solution}",
    ]
    return " ".join(lines)


def _web_only(rng: random.Random) -> str:
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    user = f"{rng.choice(NAMES).lower()}{rng.randint(1, 999)}"
    t = rng.randrange(3)
    if t == 0:
        price = rng.randint(1, 20)
        return (
            f"SALE! {colour.capitalize()} {PLURALS[shape]} for only ${price} each. Buy {_num(3)}, pay for {_num(2)}: "
            f"${2 * price} in total. Free shipping on orders of {PLURALS[shape]} above $50. Click here to order."
        )
    if t == 1:
        return (
            f"Forum > Shapes > Help\n{user} wrote: how do I tell a {shape} from a "
            f"{rng.choice([s for s in SHAPES if s != shape])} in a tiny picture?\nReply: a {shape} {FEATURES[shape]}. "
            f"Zoom in if it is small; small shapes lose their corners at low resolution.\nThanks, that worked!"
        )
    return (
        f"Top {_num(3)} {colour} things this week: 1. {_a(colour)} {colour} {shape}; 2. {rng.choice(SHADES[colour])} paint; "
        f"3. a poster of {PLURALS[rng.choice(SHAPES)]}. Posted by {user}. {rng.randint(2, 400)} likes."
    )


def web(rng: random.Random) -> str:
    """Broad mixture: any category's text, sometimes with web boilerplate around it, or a web-only genre."""
    r = rng.random()
    if r < 0.35:
        return _web_only(rng)
    gen = GENERATORS[rng.choice(CATEGORIES[1:])]
    text = gen(rng)
    if r < 0.6:
        return f"Home | Blog | Contact\n{text}\nShare this page. Comments ({rng.randint(0, 50)})"
    return text


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "web": web,
    "encyclopedia": encyclopedia,
    "literature": literature,
    "visual": visual,
    "math": math,
    "code": code,
    "academia": academia,
}


def document(category: str, rng: random.Random) -> str:
    """One document of `category` (one of `CATEGORIES`)."""
    return GENERATORS[category](rng)
