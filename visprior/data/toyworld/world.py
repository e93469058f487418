"""The toy world's vocabulary and scene sampling: what can exist, and where it sits.

A scene is a background plus 1..N objects, each a shape with a colour, a named size and a position, all in normalised
coordinates (0..1, y down) so the same scene can be rendered at any resolution. Sampling only uses the `random.Random`
passed in, never global state, so a seed fixes every scene. Object colours are saturated or dark and backgrounds are
light and desaturated, which keeps every object visible and lets tests find an object by its colour.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (235, 205, 20),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "purple": (135, 50, 185),
    "pink": (235, 95, 175),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}
SHADES: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet", "ruby"),
    "orange": ("amber", "tangerine", "apricot"),
    "yellow": ("lemon", "gold", "mustard"),
    "green": ("emerald", "olive", "lime"),
    "blue": ("navy", "azure", "cobalt"),
    "purple": ("violet", "plum", "lilac"),
    "pink": ("rose", "salmon", "magenta"),
    "brown": ("chocolate", "tan", "chestnut"),
    "black": ("ebony", "jet", "charcoal"),
}
# Circumradius as a fraction of the image side, per named size.
SIZES: dict[str, tuple[float, float]] = {"small": (0.045, 0.065), "medium": (0.09, 0.12), "large": (0.15, 0.2)}

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 244),
    "light grey": (214, 214, 214),
    "cream": (245, 238, 215),
    "beige": (228, 215, 190),
    "pale blue": (205, 225, 245),
    "pale green": (210, 238, 212),
    "pale pink": (245, 215, 225),
    "lavender": (225, 218, 242),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noise", "stripes")

# Facts the text corpora state about the shapes; they are true of how `render` draws them.
SIDES: dict[str, int] = {
    "circle": 0,
    "square": 4,
    "triangle": 3,
    "star": 10,
    "cross": 12,
    "ring": 0,
    "diamond": 4,
    "hexagon": 6,
}
CORNERS: dict[str, int] = {
    "circle": 0,
    "square": 4,
    "triangle": 3,
    "star": 5,
    "cross": 12,
    "ring": 0,
    "diamond": 4,
    "hexagon": 6,
}
MIXES: dict[tuple[str, str], str] = {
    ("red", "yellow"): "orange",
    ("blue", "yellow"): "green",
    ("red", "blue"): "purple",
    ("red", "white"): "pink",
    ("black", "white"): "grey",
    ("green", "red"): "brown",
}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Background:
    kind: str
    colour: str
    colour2: str
    angle: float = 0.0
    seed: int = 0

    @property
    def description(self) -> str:
        if self.kind == "gradient":
            return f"a gradient from {self.colour} to {self.colour2}"
        if self.kind == "stripes":
            return f"a {self.colour} background with faint stripes"
        if self.kind == "noise":
            return f"a speckled {self.colour} background"
        return f"a plain {self.colour} background"


@dataclass
class Scene:
    objects: list[Obj]
    background: Background
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [asdict(o) for o in self.objects], "background": asdict(self.background)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        objs = [Obj(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"]]
        return Scene(objs, Background(**d["background"]))


def jittered_rgb(rng: random.Random, colour: str, amount: int = 10) -> tuple[int, int, int]:
    """A shade of `colour` close to its canonical value, so colour names stay recognisable."""
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in COLOURS[colour])  # type: ignore[return-value]


def sample_background(rng: random.Random) -> Background:
    names = sorted(BACKGROUND_COLOURS)
    colour, colour2 = rng.sample(names, 2)
    return Background(rng.choice(BACKGROUND_KINDS), colour, colour2, rng.uniform(0, 360), rng.randrange(2**31))


def make_object(rng: random.Random, shape: str, colour: str, size: str, x: float, y: float) -> Obj:
    lo, hi = SIZES[size]
    return Obj(shape, colour, size, x, y, rng.uniform(lo, hi), jittered_rgb(rng, colour))


def place(rng: random.Random, r: float, others: list[Obj], tries: int = 60) -> tuple[float, float] | None:
    """A centre for a radius-`r` object that stays inside the frame and clear of `others` (None if none found)."""
    m = r + 0.02
    for _ in range(tries):
        x, y = rng.uniform(m, 1 - m), rng.uniform(m, 1 - m)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (r + o.r + 0.03) ** 2 for o in others):
            return x, y
    return None


def sample_scene(rng: random.Random, max_objects: int = 5, min_objects: int = 1) -> Scene:
    """A scene of non-overlapping objects. Half the scenes draw from a small palette, so counts above one are common."""
    n = rng.randint(min_objects, max_objects)
    shapes, colours = list(SHAPES), sorted(COLOURS)
    if rng.random() < 0.5:
        shapes = rng.sample(shapes, rng.randint(1, 3))
        colours = rng.sample(colours, rng.randint(1, 3))
    objects: list[Obj] = []
    for _ in range(n):
        size = rng.choices(list(SIZES), weights=(3, 4, 2))[0]
        obj = make_object(rng, rng.choice(shapes), rng.choice(colours), size, 0.5, 0.5)
        pos = place(rng, obj.r, objects)
        if pos is None:
            continue
        obj.x, obj.y = pos
        objects.append(obj)
    if not objects:  # always at least one object: a lone one fits anywhere
        obj = make_object(rng, rng.choice(shapes), rng.choice(colours), "medium", 0.5, 0.5)
        objects.append(obj)
    return Scene(objects, sample_background(rng))


def region(obj: Obj) -> str:
    """The object's place in a 3x3 grid, in words ("top left", "center", ...)."""
    col = "left" if obj.x < 1 / 3 else "right" if obj.x > 2 / 3 else ""
    row = "top" if obj.y < 1 / 3 else "bottom" if obj.y > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def vocabulary() -> dict[str, Any]:
    """Everything a scene can contain, as written to `world.json`."""
    return {
        "shapes": list(SHAPES),
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shades": {k: list(v) for k, v in SHADES.items()},
        "sizes": {k: list(v) for k, v in SIZES.items()},
        "background_colours": {k: list(v) for k, v in BACKGROUND_COLOURS.items()},
        "background_kinds": list(BACKGROUND_KINDS),
        "regions": ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"],
    }
