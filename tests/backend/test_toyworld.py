"""The toy world: deterministic renders, captions, one-attribute changes, the reader's
accuracy on renders, and the word-level tokenizer."""
from __future__ import annotations

import random

import numpy as np
import pytest

from analogon.toyworld import world
from analogon.toyworld.reader import agreement, read
from analogon.toyworld.vocab import WORDS, build_tokenizer, vocab


def test_render_is_deterministic_and_sized():
    rng = random.Random(5)
    for _ in range(5):
        s = world.random_scene(rng, two=0.5)
        a, b = world.render(s, 64), world.render(dict(s), 64)
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
        assert np.array_equal(a, b)
        assert world.render(s, 128).shape == (128, 128, 3)


def test_scenes_are_seeded():
    a = [world.random_scene(random.Random(3)) for _ in range(3)]
    b = [world.random_scene(random.Random(3)) for _ in range(3)]
    assert a == b


def test_different_attributes_render_differently():
    base = world.make_scene("circle", "red", "large", "plain", "grey")
    img = world.render(base)
    for attr, values in world.ATTRIBUTES.items():
        for v in values:
            if v != base[attr]:
                assert not np.array_equal(world.render(world.change(base, attr, v)), img), (attr, v)


def test_caption_names_every_attribute():
    s = world.make_scene("circle", "red", "large", "striped", "grey")
    assert world.caption(s) == "a large red striped circle on a grey background"
    s2 = world.make_scene("star", "blue", "small", "plain", "white")
    assert world.caption(s2) == "a small blue plain star on a white background"
    assert world.caption(s, omit={"size", "background"}) == "a red striped circle"
    two = world.random_scene(random.Random(0), two=1.0)
    assert " and a " in world.caption(two)


def test_change_changes_one_attribute_only():
    s = world.make_scene("square", "green", "small", "dotted", "beige", x=0.2, y=0.8)
    c = world.change(s, "colour", "purple")
    assert c["colour"] == "purple" and s["colour"] == "green"
    assert {k for k in s if s[k] != c[k]} == {"colour"}
    big = world.change(s, "size", "large")  # stays inside the image
    lo, hi = world._fit_range("large")
    assert lo <= big["x"] <= hi and lo <= big["y"] <= hi
    with pytest.raises(ValueError, match="colour must be one of"):
        world.change(s, "colour", "pink")


def test_training_split_never_shows_held_out_pairs():
    rng = random.Random(0)
    for _ in range(500):
        s = world.random_scene(rng, split="train")
        assert (s["shape"], s["colour"]) not in world.HELD_OUT_PAIRS
    held = world.random_scene(random.Random(1), split="heldout")
    assert world.is_held_out(held)
    # every shape and every colour still appears in training
    assert {p[0] for p in world.HELD_OUT_PAIRS} == set(world.SHAPES)
    assert len({p[1] for p in world.HELD_OUT_PAIRS}) == len(world.HELD_OUT_PAIRS)


def test_reader_accuracy_on_renders_is_at_least_99_percent():
    rng = random.Random(2024)
    attrs = ("shape", "colour", "size", "texture", "background")
    hits = {k: 0 for k in attrs}
    n = 150
    for _ in range(n):
        s = world.random_scene(rng, split="any")
        ok = agreement(read(world.render(s, 64)), s, attrs)
        for k in attrs:
            hits[k] += ok[k]
    acc = {k: hits[k] / n for k in attrs}
    assert min(acc.values()) >= 0.99, acc


def test_reader_finds_two_objects_and_positions():
    rng = random.Random(7)
    for _ in range(15):
        s = world.random_scene(rng, two=1.0)
        r = read(world.render(s, 64))
        assert len(r["objects"]) == 2
        got = sorted(r["objects"], key=lambda o: o["x"])
        want = sorted([s, s["second"]], key=lambda o: o["x"])
        for g, w in zip(got, want):
            assert (g["shape"], g["colour"], g["texture"]) == (w["shape"], w["colour"], w["texture"])
            assert abs(g["x"] - w["x"]) < 0.03 and abs(g["y"] - w["y"]) < 0.03


def test_reader_works_at_other_sizes_and_on_empty_images():
    s = world.make_scene("triangle", "orange", "large", "striped", "black", x=0.4, y=0.6)
    r = read(world.render(s, 128))
    assert agreement(r, s) == {k: True for k in ("shape", "colour", "size", "texture", "background")}
    empty = np.full((64, 64, 3), world.BACKGROUNDS["white"], np.uint8)
    r = read(empty)
    assert r["background"] == "white" and r["shape"] is None and r["objects"] == []


def test_tokenizer_is_word_level_and_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer()
    v = vocab()
    for w in WORDS:
        assert tok(w).input_ids == [0, v[w + "</w>"], 1], w
    ids = tok("a large red striped circle on a grey background").input_ids
    assert len(ids) == 2 + 9
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "a small blue dotted diamond on a beige background"
    assert again(text, padding="max_length", max_length=77).input_ids == \
        tok(text, padding="max_length", max_length=77).input_ids
    assert again.model_max_length == 77
