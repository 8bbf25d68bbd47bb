"""The quality harness: seeded cases with known truth, reader-based scores, baselines, the
table and the JSON report. Methods themselves are exercised on toy-sd in test_toy_sd.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analogon.quality import cases as qc
from analogon.quality import compare_reports, format_table, main, run_quality, score_case
from analogon.toyworld import world


def test_cases_are_seeded_and_consistent():
    a = qc.build("analogy", 5, seed=3)
    b = qc.build("analogy", 5, seed=3)
    assert [c.name for c in a] == [c.name for c in b]
    assert all(np.array_equal(x.slots["b"], y.slots["b"]) for x, y in zip(a, b))
    assert [c.name for c in qc.build("analogy", 5, seed=4)] != [c.name for c in a]
    for c in a:
        (attr, after), = c.changed.items()
        info = c.info
        # A and A' differ in exactly that attribute; B has A's "before" value
        assert {k for k in info["a"] if info["a"][k] != info["a_prime"][k]} == {attr}
        assert info["b"][attr] == info["a"][attr] != after
        assert c.truth == world.change(info["b"], attr, after)
        assert sum(info["b"][k] != info["a"][k] for k in qc.CHANGEABLE) >= 2


def test_every_kind_changes_what_it_says():
    for kind in ("analogy", "exemplar", "appearance"):
        for c in qc.build(kind, 6, seed=0):
            tgt = c.info.get("b") or c.info.get("source") or c.info.get("structure")
            for attr, value in c.changed.items():
                assert c.truth[attr] == value and tgt[attr] != value, (kind, c.name)
            for attr in c.kept:
                assert c.truth[attr] == tgt[attr]


def test_scores_truth_and_baselines():
    c = qc.build("analogy", 1, seed=0)[0]
    perfect = score_case(c, c.truth_image)
    assert perfect["change"] == 1.0 and perfect["keep"] == 1.0 and perfect["dist"] == 0.0
    unchanged = score_case(c, c.slots["b"])
    assert unchanged["change"] == 0.0 and unchanged["keep"] == 1.0 and unchanged["dist"] > 0
    ex = qc.build("exemplar", 1, seed=0)[0]
    s = score_case(ex, ex.slots["source"])
    assert s["outside"] == 0.0
    noisy = np.clip(ex.slots["source"].astype(int) + 40, 0, 255).astype(np.uint8)
    assert score_case(ex, noisy)["outside"] > 0.1


def test_run_quality_baselines_only_and_skips_unknown_methods():
    rep = run_quality(methods=["no-such-method"], kinds=["analogy", "appearance"], n=4, seed=1)
    rows = {(r["method"], r["kind"]): r for r in rep["rows"]}
    assert rows[("ground truth", "analogy")]["all"] == 1.0
    assert rows[("B unchanged", "analogy")]["change"] == 0.0
    assert rows[("appearance returned", "appearance")]["keep"] < 1.0
    assert any("no-such-method" in n for n in rep["notes"])
    table = format_table(rep)
    assert "ground truth" in table and "B unchanged" in table and "change" in table


def test_registry_accepts_new_kinds_and_methods(monkeypatch):
    monkeypatch.setitem(qc.KINDS, "same", lambda n, seed: [
        qc.Case(kind="same", name=f"same-{i}", slots={"x": c.slots["b"]}, truth=c.info["b"],
                changed={}, kept=("shape", "colour"), baselines={"x back": "x"}, target="x")
        for i, c in enumerate(qc.build("analogy", n, seed))])
    # a builder that takes no world= draws toy64 cases: measured there, skipped with a note
    # in the world of toy-sd (toy128)
    rep = run_quality(methods=["nothing"], kinds=["same"], n=3, world="toy64")
    row = next(r for r in rep["rows"] if r["method"] == "x back")
    assert row["cases"] == 3 and row["keep"] == 1.0
    rep = run_quality(methods=["nothing"], kinds=["same"], n=3)
    assert rep["world"] == "toy128" and not any(r["method"] == "x back" for r in rep["rows"])
    assert any(n.startswith("same: skipped") and "toy64 cases only" in n for n in rep["notes"])


def test_main_writes_json_and_prints_table(tmp_path, capsys):
    out = tmp_path / "q.json"
    rc = main(["--methods", "no-such-method", "--kinds", "exemplar", "-n", "3", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["n"] == 3 and any(r["method"] == "exemplar returned" for r in rep["rows"])
    assert "exemplar returned" in capsys.readouterr().out
    assert main(["--kinds", "nonsense", "--json", str(out)]) == 2


def test_demo_case_gives_each_method_its_roles_from_the_toy_world():
    from analogon.methods import all_methods
    from analogon.quality import demo_case

    for m in all_methods():
        case = demo_case(m.id)
        assert case is not None, m.id
        images, source = case
        required = {r.name for r in m.all_roles() if r.required}
        assert required <= set(images), (m.id, images.keys())
        for ref in images.values():
            for sha in ref if isinstance(ref, list) else [ref]:
                assert source.load(sha).shape[2] == 4
    assert demo_case("no-such-method") is None


def test_model_baselines_run_next_to_the_methods_of_their_kind(monkeypatch):
    """A registered model baseline runs through the engine for each case of its kind (with
    per-case parameters), and only when a method measured on that kind runs."""
    seen = []

    def params_for(case):
        seen.append(case.name)
        return {"prompt": case.changed.get("colour", "")}

    monkeypatch.setitem(qc.METHODS, "pixels", qc.MethodCases(
        ("exemplar",), {"source": "source"}, {"steps": 2, "strength": 0.5}))
    monkeypatch.setattr(qc, "MODEL_BASELINES", {})
    qc.register_baseline("exemplar", "img2img", "pixels", {"source": "source"},
                         {"steps": 2, "strength": 0.5}, params_for=params_for)
    rep = run_quality(methods=["pixels"], kinds=["exemplar"], n=2, seed=0, model="tiny-sd",
                      device="cpu", log=lambda s: None)
    row = next(r for r in rep["rows"] if r["method"] == "img2img")
    assert row["cases"] == 2 and row["baseline"] and "errors" not in row
    assert set(row["change_by"]) <= {"colour", "texture"}
    assert len(seen) == 2 and [c["method"] for c in rep["cases"]].count("img2img") == 2
    # no method of that kind asked for: the model is not loaded for the baseline
    seen.clear()
    rep = run_quality(methods=["no-such-method"], kinds=["exemplar"], n=2, model="tiny-sd",
                      device="cpu", log=lambda s: None)
    assert not seen and all(r["method"] != "img2img" for r in rep["rows"])


def test_set_overrides_reach_the_measured_methods_only(monkeypatch):
    """`--set KEY=VALUE` goes on top of each measured method's parameters (JSON values), not
    onto the baselines; the report records it."""
    from analogon.quality import _Runner, parse_overrides

    assert parse_overrides(["guidance=2", "adain=off", "freeu=false", "x=[1, 2]"]) == {
        "guidance": 2, "adain": "off", "freeu": False, "x": [1, 2]}
    with pytest.raises(ValueError):
        parse_overrides(["guidance"])
    got = []

    def fake_run(self, method_id, roles, params, case, seed):
        got.append((method_id, dict(params)))
        return case.slots[case.target]

    monkeypatch.setattr(_Runner, "run", fake_run)
    monkeypatch.setitem(qc.METHODS, "pixels", qc.MethodCases(
        ("exemplar",), {"source": "source"}, {"steps": 2, "strength": 0.5}, note="Why."))
    monkeypatch.setattr(qc, "MODEL_BASELINES", {})
    qc.register_baseline("exemplar", "img2img", "pixels", {"source": "source"}, {"steps": 3})
    rep = run_quality(methods=["pixels"], kinds=["exemplar"], n=1, seed=0, model="tiny-sd",
                      device="cpu", log=lambda s: None, overrides={"strength": 0.25})
    assert got == [("pixels", {"steps": 3}), ("pixels", {"steps": 2, "strength": 0.25})]
    assert rep["overrides"] == {"strength": 0.25}
    # the note says why, then the settings that ran: written from them, the override included
    assert "pixels: Why. Settings: steps=2, strength=0.25." in rep["notes"]
    assert qc.METHODS["pixels"].params == {"steps": 2, "strength": 0.5}  # the registry unchanged
    out_rc = main(["--methods", "pixels", "--set", "oops"])
    assert out_rc == 2


def test_a_cache_folder_given_is_used_and_kept(monkeypatch, tmp_path):
    """`--cache DIR`: the jobs run with that folder as their cache, and it outlives the run (a
    later run that changes only sampling settings reuses the inversions); without it the cache
    is private and removed at the end."""
    from analogon.quality import _Runner

    used = []

    def fake_run(self, method_id, roles, params, case, seed):
        self.cache.put(self.cache.key("probe", case.name), {"x": torch.zeros(1)}, {})
        used.append(self.cache.folder)
        return case.slots[case.target]

    monkeypatch.setattr(_Runner, "run", fake_run)
    monkeypatch.setitem(qc.METHODS, "pixels", qc.MethodCases(
        ("exemplar",), {"source": "source"}, {"steps": 2}, note="Why."))
    keep = tmp_path / "kept"
    assert main(["--methods", "pixels", "--kinds", "exemplar", "-n", "1", "--model", "tiny-sd",
                 "--no-baselines", "--cache", str(keep), "--json", str(tmp_path / "q.json")]) == 0
    assert used == [keep] and any(keep.rglob("*.safetensors"))
    run_quality(methods=["pixels"], kinds=["exemplar"], n=1, seed=0, model="tiny-sd",
                device="cpu", baselines=False, log=lambda s: None)
    private = used[-1]
    assert private != keep and not private.exists()


def test_rows_carry_bootstrap_intervals_of_their_cases():
    from analogon.quality import _aggregate, interval

    # all alike: no spread; a half-and-half set: an interval around 0.5 inside [0, 1]
    assert interval([1.0] * 10) == [1.0, 1.0]
    lo, hi = interval([0.0, 1.0] * 15)
    assert 0.25 < lo < 0.5 < hi < 0.75
    assert interval([0.0, 1.0] * 15) == [lo, hi]  # seeded: the same cases, the same interval
    wide, narrow = interval([0.0, 1.0] * 5), interval([0.0, 1.0] * 50)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]
    row = _aggregate([{"change": c, "keep": 1.0} for c in (0.0, 1.0, 1.0, 0.0)])
    assert row["interval"]["keep"] == [1.0, 1.0] and row["interval"]["change"][0] < 0.5
    rep = run_quality(methods=["no-such-method"], kinds=["analogy"], n=6, seed=2)
    table = format_table(rep)
    # the trivial answers' keep varies from case to case: its interval is printed
    a_back = next(r for r in rep["rows"] if r["method"] == "A′ returned")
    assert a_back["interval"]["keep"][0] <= a_back["keep"] <= a_back["interval"]["keep"][1]
    assert "95% A′ returned" in table and "95% ground truth" not in table


def test_mask_iou_scores_a_methods_automatic_masks_against_the_objects():
    from analogon.quality import _aggregate, mask_iou

    truth = np.zeros((8, 8), np.uint8)
    truth[:4, :4] = 255  # the object: the top-left quarter
    case = qc.Case(kind="appearance", name="c", slots={"structure_object": truth},
                   truth={}, changed={}, kept=(), baselines={}, target="structure")
    exact = {"auto_masks": {"structure": [[1, 0], [0, 0]]}}
    assert mask_iou(case, exact) == {"structure": 1.0}
    half = {"auto_masks": {"structure": ["11", "00"]}}  # rows as the methods write them
    assert mask_iou(case, half) == {"structure": 0.5}
    # no mask found: the method used the whole image, which the IoU counts as such
    assert mask_iou(case, {"adain_masks": {"structure": "whole"}}) == {"structure": 0.25}
    # masks the painter gave, or a role the case has no object for, are not scored
    assert mask_iou(case, {"adain_masks": {"structure": "user", "appearance": "whole"}}) == {}
    row = _aggregate([{"mask_iou": {"structure": 1.0}}, {"mask_iou": {"structure": 0.25}}])
    assert row["mask_iou"] == {"structure": 0.625} and row["mask_iou_half"] == {"structure": 0.5}


def test_shards_of_a_run_merge_into_the_whole_run(monkeypatch, tmp_path):
    """`--shard K/N` runs the model on cases K, K + N, … with each case's own seed; `--merge`
    puts the shards together into the report the whole run writes (rows re-aggregated over all
    cases, intervals included); shards of different runs, or a shard missing, are refused."""
    from analogon.quality import _Runner

    ran = []

    def fake_run(self, method_id, roles, params, case, seed):
        ran.append((case.name, seed))
        # some cases right, some left unchanged: rows whose means and intervals differ by case
        return case.truth_image if seed % 3 else case.slots[case.target]

    monkeypatch.setattr(_Runner, "run", fake_run)
    monkeypatch.setitem(qc.METHODS, "pixels", qc.MethodCases(
        ("exemplar",), {"source": "source"}, {"steps": 2}, note="Why."))
    monkeypatch.setattr(qc, "MODEL_BASELINES", {})
    # a model baseline measured before the method: the merged cases keep the measured order
    qc.register_baseline("exemplar", "z baseline", "pixels", {"source": "source"}, {"steps": 3})
    common = ["--methods", "pixels", "--kinds", "exemplar", "-n", "7", "--seed", "3",
              "--model", "tiny-sd"]
    assert main([*common, "--json", str(tmp_path / "all.json")]) == 0
    whole_runs = sorted(ran)
    ran.clear()
    for k in range(3):
        assert main([*common, "--shard", f"{k}/3", "--json", str(tmp_path / f"s{k}.json")]) == 0
    assert sorted(ran) == whole_runs  # every case once, with the whole run's seed
    s1 = json.loads((tmp_path / "s1.json").read_text())
    assert s1["shard"] == [1, 3] and [d["index"] for d in s1["cases"]] == [1, 4, 1, 4]
    shards = [str(tmp_path / f"s{k}.json") for k in range(3)]
    assert main(["--merge", *shards, "--json", str(tmp_path / "merged.json")]) == 0
    whole = json.loads((tmp_path / "all.json").read_text())
    merged = json.loads((tmp_path / "merged.json").read_text())

    def drop_seconds(rows):
        return [{k: v for k, v in r.items() if k != "seconds_per_case"} for r in rows]

    assert drop_seconds(merged["rows"]) == drop_seconds(whole["rows"])
    assert merged["cases"] == whole["cases"]
    assert 0 < next(r for r in merged["rows"] if r["method"] == "pixels")["change"] < 1
    # a missing shard, a shard twice, a shard of another run: refused, nothing written
    assert main(["--merge", *shards[:2], "--json", str(tmp_path / "m2.json")]) == 2
    assert main(["--merge", shards[0], *shards[:2], "--json", str(tmp_path / "m3.json")]) == 2
    other = json.loads(Path(shards[2]).read_text()) | {"seed": 4}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["--merge", *shards[:2], str(tmp_path / "other.json"),
                 "--json", str(tmp_path / "m4.json")]) == 2
    assert not any((tmp_path / f"m{i}.json").exists() for i in (2, 3, 4))
    assert main([*common, "--shard", "3/3"]) == 2


def test_compare_gives_paired_differences_over_the_shared_cases(tmp_path, capsys):
    """`--compare FIRST SECOND`: per row both reports have, the mean of SECOND − FIRST over the
    cases both measured (matched by name) with a bootstrap interval of those differences; reports
    of other cases are refused."""
    def report(seed, vals):
        return {"world": "toy128", "seed": seed, "rows": [], "cases": [
            {"method": "dia", "kind": "analogy", "case": f"c{i}", "change": v, "keep": 1.0,
             "all": v, "dist": 0.1 - v / 10} for i, v in enumerate(vals)]}

    # the first run misses 3 of 20 cases that the second makes; case c20 only in the second
    a = report(0, [1.0] * 10 + [0.0] * 10)
    b = report(0, [1.0] * 13 + [0.0] * 7 + [1.0])
    (row,) = compare_reports(a, b)
    assert (row["method"], row["kind"], row["cases"]) == ("dia", "analogy", 20)
    assert row["change"] == pytest.approx(0.15) and row["keep"] == 0.0
    lo, hi = row["change_95"]
    assert 0.0 <= lo < 0.15 < hi <= 0.35 and row["dist"] == pytest.approx(-0.015)
    assert "adopt" not in row
    with pytest.raises(ValueError):
        compare_reports(a, report(1, [1.0] * 20))
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps(a))
    fb.write_text(json.dumps(b))
    assert main(["--compare", str(fa), str(fb), "--json", str(tmp_path / "c.json")]) == 0
    assert "+0.150" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == [row]


def test_the_autoencoder_baseline_is_the_slot_encoded_and_decoded(monkeypatch):
    """Whole-image kinds carry a baseline that is their source through the model's autoencoder
    alone (the distance any method that redraws the image starts from); it is measured next to
    the methods, from exactly one encode and decode at the working size."""
    from analogon.core import images as im
    from analogon.core.diffusion import vae_decode, vae_encode
    from analogon.quality import _Runner

    real_run = _Runner.run
    bundles = []

    def fake_run(self, method_id, roles, params, case, seed):
        if method_id == qc.AUTOENCODER:
            bundles.append(self.models.get(self.model))
            return real_run(self, method_id, roles, params, case, seed)
        return case.slots[case.target]

    monkeypatch.setattr(_Runner, "run", fake_run)
    monkeypatch.setitem(qc.METHODS, "pixels", qc.MethodCases(("analogy",), {"source": "b"}, {}))
    rep = run_quality(methods=["pixels"], kinds=["analogy"], n=2, seed=0, model="tiny-sd",
                      device="cpu", log=lambda s: None)
    row = next(r for r in rep["rows"] if r["method"] == "B through the autoencoder")
    assert row["baseline"] and row["cases"] == 2 and "errors" not in row
    bundle = bundles[0]
    for c in qc.build("analogy", 2, 0, world=rep["world"]):
        b = c.slots["b"]
        size = im.native_size((b.shape[1], b.shape[0]), bundle.native_size, bundle.vae_scale_factor)
        with torch.no_grad():
            rt = im.from_tensor(vae_decode(bundle, vae_encode(
                bundle, im.to_tensor(im.as_rgba(b), size, bundle.device, bundle.vae.dtype))))
        if size != (b.shape[1], b.shape[0]):
            rt = im.resize_rgba(im.rgb_to_rgba(rt), (b.shape[1], b.shape[0]))[..., :3]
        got = next(d for d in rep["cases"]
                   if d["method"] == "B through the autoencoder" and d["case"] == c.name)
        assert got["dist"] == pytest.approx(score_case(c, rt)["dist"], abs=1e-9)
        assert got["dist"] != score_case(c, b)["dist"]  # not B itself
