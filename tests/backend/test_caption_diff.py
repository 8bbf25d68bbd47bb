"""The words that change, read from the captions (core.caption_diff)."""
from __future__ import annotations

import torch

from analogon.core import caption_diff as CD


def test_word_difference_of_the_captions():
    ch = CD.caption_change("A large red striped circle.", "a large blue striped circle")
    assert ch.removed == ["red"] and ch.added == ["blue"]
    assert ch.context == ["a", "large", "striped", "circle"]
    # repeated words count as often as they occur
    ch = CD.caption_change("red red square", "red square")
    assert ch.removed == ["red"] and ch.added == []


def test_cut_keeps_the_position_of_the_first_dropped_word():
    c = CD.cut("a small red dotted star on grey", [2])
    assert (c.prefix, c.suffix, c.dropped) == ("a small", "dotted star on grey", ["red"])
    assert c.text == "a small dotted star on grey"
    c = CD.cut("a star", [])
    assert (c.prefix, c.suffix, c.text) == ("a star", "", "a star")


def _fake_space(groups):
    """Text features where words of one group are near each other (one axis per group)."""
    def features(texts):
        out = torch.zeros(len(texts), len(groups) + 1)
        for i, t in enumerate(texts):
            for g, members in enumerate(groups):
                if t in members:
                    out[i, g] = 1.0
                    out[i, -1] = 0.1 * (sorted(members).index(t) + 1)
            if not out[i].any():
                out[i, -1] = 1.0
        return out
    return features


COLOURS = {"red", "blue", "green", "crimson"}
SHAPES = {"circle", "square", "star"}


def test_b_own_value_is_the_removed_word_itself_or_the_nearest_word():
    ch = CD.caption_change("a red square", "a blue square")
    # B names A's old value: found without any text space
    assert CD.own_value_indices("a red star", ch, None) == [1]
    # B has its own value ('green'): the word nearest 'red' in the text space, not the shape
    f = _fake_space([COLOURS, SHAPES])
    assert CD.own_value_indices("a green star", ch, f) == [1]
    assert CD.own_value_indices("a star green", ch, f) == [2]
    # no text space: nothing is guessed
    assert CD.own_value_indices("a green star", ch, None) == []


def test_b_word_nearer_the_context_than_the_change_is_not_dropped():
    # only shapes in B besides the context: a shape is nearer the context word 'square' than
    # it is to 'red', so nothing of B is taken for its colour
    ch = CD.caption_change("a red square", "a blue square")
    f = _fake_space([COLOURS, SHAPES])
    assert CD.own_value_indices("a star", ch, f) == []


def test_conflict_prompts_for_a_colour_change():
    f = _fake_space([COLOURS, SHAPES])
    cp = CD.conflict_prompts("a red square on grey", "a blue square on grey", "a green star on grey", f)
    assert cp.a.text == "a square on grey" and cp.a_prime.text == "a square on grey"
    assert (cp.b.prefix, cp.b.suffix) == ("a", "star on grey")
    assert cp.describe()["b_dropped"] == ["green"]
