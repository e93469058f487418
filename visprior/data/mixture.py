"""Weighted, seeded, resumable choice of which source the next sample comes from (e.g. 45:45:10 captions:interleaved:text).

Each draw takes one uniform number from a numpy PCG64 generator and maps it onto the cumulative weights, so a given seed gives
the same source sequence everywhere, zero-weight sources are never drawn, and the generator's state (plain ints) goes into a
checkpoint: a resumed mixture continues the exact sequence.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights as floats; a negative or non-finite weight, or all zero, is an error naming the source(s)."""
    if not weights:
        raise ValueError("a mixture needs at least one source")
    out: dict[str, float] = {}
    for name, w in weights.items():
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"source {name!r} has weight {w}: weights must be finite and >= 0")
        out[name] = w
    if not any(out.values()):
        raise ValueError(f"all source weights are zero ({', '.join(repr(n) for n in out)}): at least one must be > 0")
    return out


class Mixture:
    """Draws source names with probability proportional to their weights; `state_dict` resumes the exact sequence."""

    def __init__(self, weights: Mapping[str, float], seed: int | list[int] = 0):
        self.weights = check_weights(weights)
        self.names = list(self.weights)
        total = sum(self.weights.values())
        self._cum = list(np.cumsum([w / total for w in self.weights.values()]))
        self._last = max(i for i, w in enumerate(self.weights.values()) if w > 0)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self.counts: dict[str, int] = dict.fromkeys(self.names, 0)

    def draw(self) -> str:
        """The next source name."""
        u = self._rng.random()
        # side="right" skips empty intervals, so a zero-weight source can never be picked; min() guards float round-off at 1.0
        name = self.names[min(bisect.bisect_right(self._cum, u), self._last)]
        self.counts[name] += 1
        return name

    def __iter__(self) -> Iterator[str]:
        while True:
            yield self.draw()

    def proportions(self) -> dict[str, float]:
        """Realised share of each source so far."""
        n = sum(self.counts.values())
        return {k: (v / n if n else 0.0) for k, v in self.counts.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.counts = {name: state["counts"].get(name, 0) for name in self.names}


def interleave(mixture: Mixture, iterators: Mapping[str, Iterator[Any]]) -> Iterator[tuple[str, Any]]:
    """`(source, item)` pairs, the source drawn by `mixture` each time; the iterators should be infinite."""
    missing = set(mixture.names) - set(iterators)
    if missing:
        raise KeyError(f"mixture sources without an iterator: {sorted(missing)}")
    for name in mixture:
        yield name, next(iterators[name])
