"""CIDEr-D against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from visprior.eval.captioning import cider_d


def test_identical_caption_hand_computed():
    # Two images, one reference each. "a" occurs in both images' references: df = 2 = N, idf weight log(2) - log(2) = 0.
    # Every other n-gram has weight log 2. Candidate == reference: cosine 1 for n = 1, 2, 3, no 4-grams (0).
    # Score = 10 * (1 + 1 + 1 + 0) / 4 = 7.5 for each image.
    corpus, per = cider_d(["a red cube", "a blue ball"], [["a red cube"], ["a blue ball"]])
    assert per == pytest.approx([7.5, 7.5]) and corpus == pytest.approx(7.5)


def test_partial_match_hand_computed():
    # Image 1: candidate "a red ball" vs reference "a red cube" (image 2's reference: "a blue ball").
    # unigrams: h = {a:0, red:w, ball:w}, r = {a:0, red:w, cube:w}, w = log 2 -> (w*w) / (sqrt2 w * sqrt2 w) = 1/2
    # bigrams: h = {"a red":w, "red ball":w (df 0 -> weight log2)}, r = {"a red":w, "red cube":w} -> 1/2
    # trigrams: no overlap -> 0; equal lengths -> no penalty. Score = 10 * (1/2 + 1/2) / 4 = 2.5
    _, per = cider_d(["a red ball", "a blue ball"], [["a red cube"], ["a blue ball"]])
    assert per[0] == pytest.approx(2.5)


def test_length_penalty_hand_computed():
    # "red cube" vs "a red cube": unigrams cos 1; bigrams h = {"red cube"}, r = {"a red", "red cube"} -> 1/sqrt2;
    # lengths (bigram counts) 1 vs 2 -> penalty exp(-1 / 72).
    _, per = cider_d(["red cube", "a blue ball"], [["a red cube"], ["a blue ball"]])
    assert per[0] == pytest.approx(10 * math.exp(-1 / 72) * (1 + 1 / math.sqrt(2)) / 4)


def test_clipping_and_multiple_references():
    # Repeating a matching word cannot raise the score above the unrepeated caption's n = 1 term (clipping by min).
    refs = [["a red cube", "the red cube"], ["a blue ball", "one blue ball"]]
    _, once = cider_d(["red cube", "blue ball"], refs)
    _, many = cider_d(["red red red cube", "blue ball"], refs)
    assert many[0] < once[0]
    assert cider_d(["", "blue ball"], refs)[1][0] == 0.0
