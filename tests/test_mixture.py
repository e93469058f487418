"""Mixture: realised proportions match the weights, zero weight never drawn, bad weights named, exact resume."""

from __future__ import annotations

import math
from itertools import count, islice

import pytest

from visprior.data.mixture import Mixture, interleave


def test_proportions_match_weights_within_binomial_noise() -> None:
    n = 20_000
    mix = Mixture({"captions": 45, "interleaved": 45, "text": 10}, seed=0)
    for _ in range(n):
        mix.draw()
    for name, p in {"captions": 0.45, "interleaved": 0.45, "text": 0.10}.items():
        std = math.sqrt(p * (1 - p) / n)  # binomial std of a share over n independent draws
        assert abs(mix.proportions()[name] - p) < 4 * std, (name, mix.proportions())


def test_zero_weight_source_is_never_drawn() -> None:
    mix = Mixture({"a": 0.0, "b": 1.0, "c": 0.0, "d": 2.0, "e": 0.0}, seed=3)
    drawn = {mix.draw() for _ in range(5_000)}
    assert drawn == {"b", "d"}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"a": 1.0, "bad": -0.5}, "source 'bad' has weight -0.5"),
        ({"a": 1.0, "nan": float("nan")}, "source 'nan' has weight nan"),
        ({"a": 0, "b": 0}, r"all source weights are zero \('a', 'b'\)"),
        ({}, "at least one source"),
    ],
)
def test_bad_weights_are_refused_naming_the_source(weights: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mixture(weights)


def test_same_seed_same_sequence_and_resume_continues_exactly() -> None:
    weights = {"a": 3, "b": 1, "c": 1}
    full = list(islice(Mixture(weights, seed=7), 200))
    assert full == list(islice(Mixture(weights, seed=7), 200))
    assert full != list(islice(Mixture(weights, seed=8), 200))
    first = Mixture(weights, seed=7)
    head = [first.draw() for _ in range(73)]
    resumed = Mixture(weights, seed=123)  # the seed is irrelevant once a state is loaded
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed.draw() for _ in range(127)] == full
    assert resumed.counts == {k: full.count(k) for k in weights}


def test_interleave_pulls_from_the_drawn_source() -> None:
    mix = Mixture({"x": 1, "y": 1}, seed=0)
    pairs = list(islice(interleave(mix, {"x": count(), "y": count(1000)}), 50))
    xs = [v for s, v in pairs if s == "x"]
    ys = [v for s, v in pairs if s == "y"]
    assert xs == list(range(len(xs))) and ys == list(range(1000, 1000 + len(ys))) and xs and ys
    with pytest.raises(KeyError, match="'y'"):
        next(interleave(Mixture({"x": 1, "y": 1}), {"x": count()}))
