"""The toy worlds (toy64 and toy128): deterministic renders, captions, one-attribute changes,
layouts, the reader's accuracy on renders, and the word-level tokenizer."""
from __future__ import annotations

import random

import numpy as np
import pytest

from analogon.toyworld import world
from analogon.toyworld.reader import agreement, agreement_all, match_objects, read
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


# -- toy128 ------------------------------------------------------------------------------

def _scenes128(seed: int, n: int, **kw) -> list[dict]:
    rng = random.Random(seed)
    return [world.random_scene(rng, world="toy128", split="any", **kw) for _ in range(n)]


def _obj(shape, colour, size, texture, x, y):
    return {"shape": shape, "colour": colour, "size": size, "texture": texture, "x": x, "y": y}


def _three() -> dict:
    """A graded scene of three overlapping objects."""
    return world.make_scene(
        "circle", "red", "large", "striped", "grey", 0.42, 0.42, world="toy128",
        backdrop="graded", second=_obj("square", "blue", "small", "dotted", 0.7, 0.68),
        third=_obj("star", "yellow", "small", "hatched", 0.3, 0.72))


def test_toy128_textures_differ_between_neighbouring_latent_cells():
    """A pattern that repeats within one 8-px cell is the same in every cell, so a factor-8
    autoencoder can only paint it flat; toy128's textures and backdrop lines must not."""
    for tex in world.WORLD128.textures[1:]:
        s = world.make_scene("square", "red", "large", tex, "grey", world="toy128")
        img = world.render(s)[40:88, 40:88].astype(int)  # inside the square: 6x6 cells
        cells = {img[y:y + 8, x:x + 8].tobytes() for y in range(0, 48, 8)
                 for x in range(0, 48, 8)}
        assert len(cells) >= 3, tex
        assert read(world.render(s), world="toy128")["objects"][0]["texture"] == tex
    bg = world.render(world.make_scene(background="grey", world="toy128",
                                       backdrop="patterned"))
    cells = {bg[y:y + 8, x:x + 8].tobytes() for y in range(0, 128, 8) for x in range(0, 128, 8)}
    assert len(cells) >= 3


def test_toy128_renders_deterministically_at_its_own_size():
    for s in _scenes128(5, 6, two=1.0):
        a = world.render(s)
        assert a.dtype == np.uint8 and a.shape == (128, 128, 3)
        assert np.array_equal(a, world.render(dict(s), 128))
    s = _three()
    img = world.render(s)
    # The backdrop and the objects behind others show.
    assert not np.array_equal(img, world.render(world.change(s, "backdrop", "patterned")))
    assert not np.array_equal(img, world.render(world.change(s, "colour", "green")))
    assert img[1, 1].astype(int).sum() > img[-2, 1].astype(int).sum()  # graded: light on top


def test_toy128_caption_names_every_object_and_the_backdrop():
    s = world.make_scene("circle", "red", "large", "striped", "grey", world="toy128",
                         backdrop="graded",
                         second=_obj("square", "blue", "small", "dotted", 0.7, 0.7))
    assert world.caption(s) == ("a large red striped circle and a small blue dotted square "
                                "on a graded grey background")
    assert world.caption(world.change(s, "backdrop", "plain")) == (
        "a large red striped circle and a small blue dotted square on a grey background")
    assert world.caption(s, omit={"backdrop"}).endswith("square on a grey background")
    assert world.caption(_three()) == (
        "a large red striped circle and a small blue dotted square and a small yellow hatched "
        "star on a graded grey background")


def test_toy128_change_reaches_the_second_and_third_objects():
    s = _three()
    c = world.change(s, "second.colour", "green")
    assert c["second"]["colour"] == "green" and s["second"]["colour"] == "blue"
    assert {k for k in s if s[k] != c[k]} == {"second"}
    assert {k for k in s["second"] if s["second"][k] != c["second"][k]} == {"colour"}
    big = world.change(world.change(s, "third.x", 0.95), "third.size", "large")
    lo, hi = world._fit_range("large", world.WORLD128)
    assert big["third"]["size"] == "large" and big["third"]["x"] == hi
    assert lo <= big["third"]["y"] <= hi
    with pytest.raises(ValueError, match="no third object"):
        world.change({**s, "third": None}, "third.colour", "green")
    with pytest.raises(ValueError, match="texture must be one of"):
        world.change(s, "third.texture", "woven")


def test_toy128_training_split_never_shows_held_out_pairs():
    for s in [world.random_scene(random.Random(i), world="toy128", split="train", two=1.0)
              for i in range(150)]:
        assert not any((o["shape"], o["colour"]) in world.HELD_OUT_PAIRS
                       for o in world.objects(s))
    for i in range(20):
        held = world.random_scene(random.Random(i), world="toy128", split="heldout", two=1.0)
        assert (held["shape"], held["colour"]) in world.HELD_OUT_PAIRS


def test_toy128_layout_keeps_every_object_visible():
    cell = 8 * 8  # one position of the 16x16 latent
    for s in _scenes128(11, 40, two=1.0):
        objs = world.objects(s)
        assert len({o["colour"] for o in objs}) == len(objs)
        assert world.layout_ok(s)
        img = world.render(s).astype(np.float64)
        for o, vis in zip(objs, world.visible_masks(s)):
            full = np.asarray(world._shape_mask(o["shape"], o["x"] * 128, o["y"] * 128,
                                                world.WORLD128.radius[o["size"]] * 128,
                                                128)) > 127
            assert vis.sum() >= 0.6 * full.sum() and vis.sum() >= 24 * cell
            # What the mask calls visible is this object's colour or its ink in the render.
            px = img[world._erode_by(vis, 2)]
            rgb = np.array(world.COLOURS[o["colour"]], np.float64)
            t = np.clip(px @ rgb / (rgb @ rgb), world.SHADE, 1.0)
            assert np.abs(px - t[:, None] * rgb).max() <= 3.0


def test_toy128_reader_accuracy_per_object_and_attribute():
    attrs = ("shape", "colour", "size", "texture")
    hits = {k: [] for k in attrs + ("background", "backdrop", "count")}
    offsets = []
    for s in _scenes128(2026, 150, two=0.6):
        r = read(world.render(s), world="toy128")
        ok = agreement_all(r, s)
        for o in ok["objects"]:
            for k in attrs:
                hits[k].append(o[k])
        for k in ("background", "backdrop", "count"):
            hits[k].append(ok[k])
        offsets += [max(abs(g["x"] - o["x"]), abs(g["y"] - o["y"]))
                    for o, g in match_objects(r, s) if g is not None]
    acc = {k: sum(v) / len(v) for k, v in hits.items()}
    assert len(hits["shape"]) > 200  # objects, not scenes
    assert min(acc.values()) >= 0.99, acc
    assert max(offsets) < 0.03


def test_toy128_reader_reads_every_shape_size_and_texture_alone():
    rng = random.Random(3)
    w = world.WORLD128
    for shape in world.SHAPES:
        for size in world.SIZES:
            for texture in w.textures:
                lo, hi = world._fit_range(size, w)
                s = world.make_scene(shape, rng.choice(tuple(world.COLOURS)), size, texture,
                                     rng.choice(tuple(world.BACKGROUNDS)), rng.uniform(lo, hi),
                                     rng.uniform(lo, hi), world="toy128",
                                     backdrop=rng.choice(w.backdrops))
                r = read(world.render(s), world=w)
                assert len(r["objects"]) == 1
                assert agreement(r, s) == dict.fromkeys(
                    ("shape", "colour", "size", "texture", "background"), True), s
                assert r["backdrop"] == s["backdrop"], s
                assert abs(r["x"] - s["x"]) < 0.03 and abs(r["y"] - s["y"]) < 0.03


def test_toy128_reader_on_empty_backgrounds():
    for background in world.BACKGROUNDS:
        for backdrop in world.WORLD128.backdrops:
            s = world.make_scene(background=background, world="toy128", backdrop=backdrop)
            r = read(world.background_image(s), world="toy128")
            assert (r["background"], r["backdrop"]) == (background, backdrop)
            assert r["objects"] == [] and r["shape"] is None


def test_toy128_agreement_pairs_objects_by_colour_then_position():
    s = _three()
    assert world.layout_ok(s)
    r = read(world.render(s), world="toy128")
    assert [o["colour"] for o in r["objects"]] == ["red", "blue", "yellow"]  # largest first
    assert [g["colour"] for _, g in match_objects(r, s)] == ["red", "blue", "yellow"]
    every = dict.fromkeys(("shape", "colour", "size", "texture"), True)
    assert agreement_all(r, s) == {"objects": [every] * 3, "background": True,
                                   "backdrop": True, "count": True}
    wrong = world.change(world.change(s, "third.texture", "checked"), "backdrop", "plain")
    got = agreement_all(r, wrong)
    assert got["objects"][2] == {**every, "texture": False}
    assert got["objects"][:2] == [every] * 2 and not got["backdrop"]
    # A colour the reading does not have: paired by position, only the colour disagrees.
    recoloured = world.change(s, "second.colour", "purple")
    pairs = match_objects(r, recoloured)
    assert pairs[1][1]["colour"] == "blue"
    assert agreement_all(r, recoloured)["objects"][1] == {**every, "colour": False}
    # An object the reading misses agrees on nothing.
    lost = {**r, "objects": r["objects"][:2]}
    assert agreement_all(lost, s)["objects"][2] == dict.fromkeys(every, False)
    assert not agreement_all(lost, s)["count"]


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


def test_score_objects_counts_every_object_and_sees_a_wrong_one():
    from analogon.toyworld.evaluate import score_objects

    rng = random.Random(11)
    scenes = [world.random_scene(rng, world="toy128", count=2) for _ in range(4)]
    images = [world.render(s) for s in scenes]
    right = score_objects(images, scenes)
    assert right["objects"] == 8
    assert all(right[k] == 1.0 for k in ("shape", "colour", "size", "texture", "background",
                                          "backdrop", "count"))
    # one scene's back object drawn in another texture: 1 of 8 objects wrong in texture only
    other = next(t for t in world.WORLD128.textures if t != scenes[0]["texture"])
    images[0] = world.render(world.change(scenes[0], "texture", other))
    wrong = score_objects(images, scenes)
    assert wrong["texture"] == 7 / 8 and wrong["shape"] == 1.0 and wrong["colour"] == 1.0


def test_toy128_heldout_scenes_put_every_held_out_pair_on_the_first_object():
    from analogon.toyworld.evaluate import heldout_scenes, score

    scenes = heldout_scenes(12, seed=3, world="toy128")
    assert [(s["shape"], s["colour"]) for s in scenes[:5]] == list(world.HELD_OUT_PAIRS)
    assert any(len(world.objects(s)) > 1 for s in scenes)
    for s in scenes:
        colours = [o["colour"] for o in world.objects(s)]
        assert len(set(colours)) == len(colours) and world.layout_ok(s)
    perfect = score([world.render(s) for s in scenes], scenes)
    assert perfect["shape_and_colour"] == 1.0 and perfect["shape"] == 1.0
    # the first object drawn as another shape: the held-out pair is missed
    other = next(sh for sh in world.SHAPES if sh != scenes[0]["shape"])
    moved = world.change(scenes[0], "shape", other)
    images = [world.render(moved)] + [world.render(s) for s in scenes[1:]]
    assert score(images, scenes)["shape_and_colour"] == 11 / 12
