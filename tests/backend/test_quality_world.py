"""The quality cases in either toy world: toy128 cases at 128 px scored per object, the
reader's ceiling on them, transition coverage, PIXELS' adopt column, the world of a model
folder, and toy64's cases unchanged byte for byte."""
from __future__ import annotations

import functools
import hashlib
import json
import random
from collections import Counter

import numpy as np
import pytest

from analogon.models.toy import folder_world, model_world
from analogon.quality import cases as qc
from analogon.quality import main, run_quality, score_case
from analogon.toyworld import world

N = 30  # cases per kind where the brief asks for >= 30
KINDS = ("analogy", "exemplar", "exemplar_soft", "appearance")


@functools.lru_cache(maxsize=None)
def _cases(kind: str, n: int = N, seed: int = 0, world_name: str = "toy128"):
    return qc.build(kind, n, seed, world=world_name)


def _subject_of(case):
    return case.info.get("b") or case.info.get("source") or case.info.get("structure")


# -- toy64 stays as it was -----------------------------------------------------------------

def _slots_digest(cases) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(c.name.encode())
        for k in sorted(c.slots):
            a = np.ascontiguousarray(c.slots[k])
            h.update(k.encode())
            h.update(str(a.dtype).encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        if c.keep_region is not None:
            h.update(np.packbits(c.keep_region).tobytes())
    return h.hexdigest()


# Computed before the quality package learnt of worlds (10 cases per kind): the 64-px tables
# and tests stay valid only while these hold.
TOY64_DIGESTS = {
    ("analogy", 0): "8e0f5362b51727de0dc07a2bda0b9b16cb95a4ddb996795319e3e78e6e6577fa",
    ("analogy", 3): "c6d3f5df464f179da12f406ca71add78f301db931261ca358582d13e900673d4",
    ("exemplar", 0): "1c9e750f95af4df302062f010cc5f6614d374e1c71c513f529c9298e0f3630a4",
    ("exemplar", 3): "7e8084c07cfdc395ec4670af574c42a21ca098ace13c1a746ce11029be995aa3",
    ("exemplar_soft", 0): "d8b6351201607bc24edb0948aa0cfba9932f1fe6d8a57d7784045a8716b6d724",
    ("exemplar_soft", 3): "df2b26c5e83a632f5d7614a654f704e0fcea170806857ac3bc0b9560cde5d0d7",
    ("appearance", 0): "a773e5d3e10e45f7d07b60d879be4dc7e9714c60977e11f5258a7221f227dce6",
    ("appearance", 3): "4c215f7ca925eb64e8fd0a046ac840d9e445c80bb056d25106925c04fb1668b8",
}


@pytest.mark.parametrize("kind,seed", sorted(TOY64_DIGESTS))
def test_toy64_cases_are_byte_identical(kind, seed):
    cases = qc.build(kind, 10, seed)
    assert qc.build(kind, 10, seed, world="toy64")[0].name == cases[0].name
    assert all(c.world == "toy64" and c.size == 64 for c in cases)
    assert _slots_digest(cases) == TOY64_DIGESTS[(kind, seed)]


# -- toy128 cases --------------------------------------------------------------------------

SLOTS = {
    "analogy": {"a", "a_prime", "b"},
    "exemplar": {"source", "exemplar", "edit_map"},
    "exemplar_soft": {"source", "exemplar", "edit_map"},
    "appearance": {"structure", "appearance", "structure_object", "appearance_object"},
}
MAPS = {"edit_map", "structure_object", "appearance_object"}


@pytest.mark.parametrize("kind", KINDS)
def test_toy128_cases_are_built_at_128_px(kind):
    cases = qc.build(kind, 8, 1, world="toy128")
    assert [c.name for c in cases] == [c.name for c in qc.build(kind, 8, 1, world="toy128")]
    assert [c.name for c in cases] != [c.name for c in qc.build(kind, 8, 2, world="toy128")]
    for c in cases:
        assert c.world == "toy128" and c.size == 128 and c.truth["world"] == "toy128"
        assert set(c.slots) == SLOTS[kind], c.name
        for name, img in c.slots.items():
            assert img.dtype == np.uint8
            assert img.shape == ((128, 128) if name in MAPS else (128, 128, 3)), (c.name, name)
        assert c.truth_image.shape == (128, 128, 3)
        if c.keep_region is not None:
            assert c.keep_region.shape == (128, 128)
        src = _subject_of(c)
        for attr, value in c.changed.items():
            assert c.truth[attr] == value and src[attr] != value, c.name
        for key in c.kept:
            assert qc.value_of(c.truth, key) == qc.value_of(src, key), (c.name, key)
        # a scene's colours stay distinct (the reader tells objects apart by them)
        for scene in (src, c.truth):
            colours = [o["colour"] for o in world.objects(scene)]
            assert len(set(colours)) == len(colours), c.name


def test_toy128_analogies_are_consistent_and_name_one_object():
    for c in _cases("analogy"):
        attr, before, after = c.info["transition"]
        a, a_prime, b = c.info["a"], c.info["a_prime"], c.info["b"]
        assert c.changed == {attr: after}
        assert world.objects(a) == [a] and world.objects(a_prime) == [a_prime]
        assert qc.value_of(a, attr) == qc.value_of(b, attr) == before
        assert qc.value_of(a_prime, attr) == after
        assert c.truth == world.change(b, attr, after)
        differs = [k for k in qc.changeable("toy128") if k != attr
                   and qc.value_of(b, k) != qc.value_of(a, k)]
        assert len(differs) >= 2, c.name
        for slot in c.info["distractors"]:
            assert {f"{slot}.{k}" for k in qc.DISTRACTOR_KEPT} <= set(c.kept)
            if attr in qc.OBJECT_ATTRS:
                assert b[slot][attr] != before, c.name  # "the <before> one" is the subject
        for scene in (a, a_prime, b, c.truth):
            assert world.layout_ok(scene), c.name
    with_distractor = [c for c in _cases("analogy") if c.info["distractors"]]
    assert len(with_distractor) >= N // 3


def test_toy128_exemplar_maps_cover_the_subject_and_appearance_scenes_hold_one_object():
    for kind in ("exemplar", "exemplar_soft"):
        for c in _cases(kind)[:10]:
            white = c.slots["edit_map"] == 255
            subject = world.visible_masks(c.info["source"])[0]
            assert (white & subject).sum() >= 0.95 * subject.sum(), c.name
            assert not (c.keep_region & white).any()
            if c.info["distractors"]:
                # the distractor lies mostly outside the edit, where nothing may change (all
                # but a rim where it meets the subject; a soft map's halo takes up to half of
                # a small one: 0.49 at the least in 30 cases)
                other = world.visible_masks(c.info["source"])[1]
                assert (c.keep_region & other).sum() >= 0.4 * other.sum(), c.name
    for c in _cases("appearance")[:10]:
        for scene in (c.info["structure"], c.info["appearance"]):
            assert world.objects(scene) == [scene]
        assert c.info["appearance"]["background"] == c.info["structure"]["background"]
        assert c.info["appearance"]["backdrop"] == c.info["structure"]["backdrop"]


# -- scores on toy128 ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_toy128_truth_scores_at_the_ceiling(kind):
    """The truth image against its own case: every attribute of every object read back
    (change = keep = all = 1, and adopt = 1 where there is an edit map), for 30 cases."""
    cases = _cases(kind)
    assert len(cases) >= 30
    for c in cases:
        s = score_case(c, c.truth_image)
        assert (s["change"], s["keep"], s["all"], s["dist"]) == (1.0, 1.0, 1.0, 0.0), (c.name, s)
        if kind.startswith("exemplar"):
            assert s["adopt"] == 1.0 and s["outside"] == 0.0, (c.name, s)
        else:
            assert "adopt" not in s


def test_toy128_unchanged_target_changes_nothing():
    for c in _cases("analogy"):
        s = score_case(c, c.slots["b"])
        assert s["change"] == 0.0 and s["keep"] == 1.0 and s["all"] == 0.0, (c.name, s)
    for c in _cases("exemplar")[:10]:
        s = score_case(c, c.slots["source"])
        assert s["change"] == 0.0 and s["adopt"] == 0.0 and s["outside"] == 0.0, (c.name, s)


def _altered_distractor(case, attribute: str) -> dict:
    truth = case.truth
    slot = case.info["distractors"][0]
    used = {o["colour"] for o in world.objects(truth)}
    current = truth[slot][attribute]
    values = [v for v in world.WORLD128.attributes[attribute] if v != current
              and (attribute != "colour" or v not in used)]
    return world.change(truth, f"{slot}.{attribute}", values[0])


@pytest.mark.parametrize("kind", ["analogy", "exemplar"])
def test_toy128_a_distractor_altered_loses_keep(kind):
    cases = [c for c in _cases(kind) if c.info["distractors"]][:6]
    assert len(cases) == 6
    for i, c in enumerate(cases):
        attribute = qc.DISTRACTOR_KEPT[i % len(qc.DISTRACTOR_KEPT)]
        altered = _altered_distractor(c, attribute)
        s = score_case(c, world.render(altered))
        slot = c.info["distractors"][0]
        assert s["keep_by"][f"{slot}.{attribute}"] == 0.0, (c.name, attribute, s)
        assert s["keep"] < 1.0 and s["all"] == 0.0, (c.name, s)
        if attribute != "shape":  # the subject's look and place are untouched
            assert s["change"] == 1.0, (c.name, s)


def test_adopt_reads_only_the_white_part_of_the_map():
    c = next(c for c in _cases("exemplar") if c.changed == {"colour": c.truth["colour"]})
    truth = c.truth_image
    white = c.slots["edit_map"] == 255
    # the exemplar's look inside the map, anything outside it: adopted
    outside_wrong = np.where(white[..., None], truth, 255 - truth).astype(np.uint8)
    assert score_case(c, outside_wrong)["adopt"] == 1.0
    # the source's look inside the map: not adopted
    inside_source = np.where(white[..., None], c.slots["source"], truth).astype(np.uint8)
    assert score_case(c, inside_source)["adopt"] == 0.0


# -- transitions ---------------------------------------------------------------------------

def test_transitions_enumerate_every_pair_spreading_both_ends():
    values = world.WORLD128.textures
    pairs = qc.transitions(values, random.Random(0))
    assert len(pairs) == len(set(pairs)) == len(values) * (len(values) - 1)
    assert all(a != b for a, b in pairs)
    first = pairs[:len(values)]
    assert {a for a, _ in first} == {b for _, b in first} == set(values)
    assert pairs != qc.transitions(values, random.Random(1))


def test_toy128_analogies_cover_every_attribute_and_many_transitions():
    cases = _cases("analogy")
    seen = [c.info["transition"] for c in cases]
    attrs = qc.changeable("toy128")
    assert set(attrs) == {"shape", "colour", "size", "texture", "background", "backdrop"}
    per_attr = Counter(t[0] for t in seen)
    assert set(per_attr) == set(attrs) and min(per_attr.values()) >= N // len(attrs)
    distinct = set(seen)
    assert len(distinct) >= 25, distinct
    for attr in attrs:
        mine = {t for t in distinct if t[0] == attr}
        n_values = len(world.WORLD128.attributes[attr])
        # as many distinct transitions as cases, up to every pair the attribute has
        assert len(mine) == min(per_attr[attr], n_values * (n_values - 1)), (attr, mine)
        if per_attr[attr] <= n_values:
            assert len({t[1] for t in mine}) == len(mine)  # every case starts elsewhere
    # the cases follow the schedule, and 180 cases (every attribute 30 times) would show
    # every transition of every attribute
    assert seen == qc.schedule("analogy", attrs, N, 0)
    every = set(qc.schedule("analogy", attrs, 180, 0))
    assert len(every) == sum(len(v) * (len(v) - 1) for v in world.WORLD128.attributes.values())


def test_report_gives_per_attribute_change_and_transitions():
    rep = run_quality(methods=["no-such-method"], kinds=["analogy"], n=12, seed=0,
                      world="toy128", log=lambda s: None)
    assert rep["world"] == "toy128"
    rows = {r["method"]: r for r in rep["rows"]}
    assert set(rows["ground truth"]["change_by"]) == set(qc.changeable("toy128"))
    assert all(v == 0.0 for v in rows["B unchanged"]["change_by"].values())
    from analogon.quality import format_table

    table = format_table(rep)
    assert "world toy128" in table and "change by attribute" in table and "backdrop" in table


# -- the world of a model ------------------------------------------------------------------

def _folder(tmp_path, name, files):
    d = tmp_path / name
    for rel, content in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    return d


def test_the_world_of_a_model_folder(tmp_path):
    vae128 = {"vae/config.json": {"_class_name": "AutoencoderKL", "sample_size": 128}}
    vae64 = {"vae/config.json": {"_class_name": "AutoencoderKL", "sample_size": 64}}
    sd = {"vae/config.json": {"_class_name": "AutoencoderKL", "sample_size": 512}}
    assert folder_world(_folder(tmp_path, "a", {"toy_world.json": {"world": "toy128"}})) == "toy128"
    assert folder_world(_folder(tmp_path, "b", vae128)) == "toy128"
    assert folder_world(_folder(tmp_path, "c", vae64)) == "toy64"
    assert folder_world(_folder(tmp_path, "d", sd)) == "toy64"
    assert folder_world(_folder(tmp_path, "e", {})) == "toy64"
    # the file wins over the VAE; the export's record names the world too
    assert folder_world(_folder(tmp_path, "f", {**vae128,
                                                "toy_world.json": {"world": "toy64"}})) == "toy64"
    assert folder_world(_folder(tmp_path, "g", {"toyworld.json": {"world": "toy128",
                                                                  "seed": 0}})) == "toy128"
    # a broken or unknown entry is passed over
    assert folder_world(_folder(tmp_path, "h", {**vae128, "toy_world.json": "{nope"})) == "toy128"
    assert folder_world(_folder(tmp_path, "i", {**vae64,
                                                "toy_world.json": {"world": "toy999"}})) == "toy64"
    assert folder_world(_folder(tmp_path, "j", {"vae/config.json": "[]"})) == "toy64"


def test_the_world_of_a_model_spec(tmp_path):
    from analogon.models.toy import toy_sd_available, toy_sd_path

    folder = _folder(tmp_path, "m", {"model_index.json": {}, "toy_world.json": {"world": "toy128"}})
    assert model_world(str(folder)) == "toy128"
    assert model_world(str(tmp_path / "missing")) == "toy64"
    assert model_world(str(_folder(tmp_path, "n", {"toy_world.json": {"world": "toy128"}}))) \
        == "toy64"  # not a diffusers folder
    for spec in ("tiny-sd", "tiny-sdxl", "org/name", "", "model.safetensors"):
        assert model_world(spec) == "toy64"
    expected = folder_world(toy_sd_path()) if toy_sd_available() else "toy64"
    assert model_world("toy-sd") == expected
    assert model_world("toy-sd-64") == "toy64"  # whatever toy-sd is, the fast one is 64-px


def test_run_quality_measures_in_the_models_world(tmp_path):
    folder = _folder(tmp_path, "m", {"model_index.json": {}, "toy_world.json": {"world": "toy128"}})
    rep = run_quality(methods=["no-such-method"], kinds=["exemplar"], n=2, seed=0,
                      model=str(folder), log=lambda s: None)
    assert rep["world"] == "toy128" and rep["rows"][0]["cases"] == 2
    assert rep["rows"][0]["adopt"] == 1.0
    rep = run_quality(methods=["no-such-method"], kinds=["exemplar"], n=2, seed=0,
                      model=str(folder), world="toy64", log=lambda s: None)
    assert rep["world"] == "toy64"
    assert run_quality(methods=["no-such-method"], kinds=["exemplar"], n=1, model="tiny-sd",
                       log=lambda s: None)["world"] == "toy64"
    out = tmp_path / "q.json"
    assert main(["--methods", "no-such-method", "--kinds", "appearance", "-n", "2",
                 "--world", "toy128", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["world"] == "toy128"
    with pytest.raises(SystemExit):
        main(["--world", "toy32", "--json", str(out)])


def test_kinds_that_know_no_world_build_toy64_only(monkeypatch):
    monkeypatch.setitem(qc.KINDS, "old", lambda n, seed: qc.build("analogy", n, seed))
    assert len(qc.build("old", 2, 0)) == 2
    with pytest.raises(ValueError):
        qc.build("old", 2, 0, world="toy128")
    rep = run_quality(methods=["no-such-method"], kinds=["old", "appearance"], n=1,
                      world="toy128", log=lambda s: None)
    assert any(n.startswith("old: skipped") for n in rep["notes"])
    assert {r["kind"] for r in rep["rows"]} == {"appearance"}


def test_demo_case_in_either_world():
    from analogon.quality import demo_case

    for name, side in (("toy64", 64), ("toy128", 128)):
        images, source = demo_case("pixels", world=name)
        assert source.load(images["source"]).shape == (side, side, 4)
