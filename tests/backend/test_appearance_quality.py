"""Appearance transfer on the trained toy world (skipped when toy-sd is not installed): seeded,
it must adopt the appearance more often than plain img2img of the structure with the same
prompt, steps and seed does, and keep the structure more often than returning the appearance
does."""
from __future__ import annotations

import pytest


def test_registered_quality_cases():
    from analogon.quality import cases as cases_mod
    from analogon.quality.cases_appearance import PARAMS
    from analogon.methods import get

    spec = cases_mod.METHODS["appearance"]
    assert spec.kinds == ("appearance",) and spec.params == PARAMS
    get("appearance").Params(**PARAMS)  # valid parameters
    # the variant row gives the method the objects' masks, through its own mask roles
    roles = {r.name for r in get("appearance").all_roles()}
    (extra,) = spec.variants.values()
    assert set(extra) == {"structure_mask", "appearance_mask"} <= roles
    assert not set(spec.roles) & set(extra)


def test_case_masks_are_the_objects_and_only_the_variant_reads_them():
    import numpy as np

    from analogon.quality import case_images
    from analogon.quality import cases as cases_mod
    from analogon.toyworld.reader import read

    spec = cases_mod.METHODS["appearance"]
    (extra,) = spec.variants.values()
    for case in cases_mod.build("appearance", 3, 5):
        for image_slot, mask_slot in (("structure", "structure_object"),
                                      ("appearance", "appearance_object")):
            mask = case.slots[mask_slot]
            assert mask.dtype == np.uint8 and mask.shape == case.slots[image_slot].shape[:2]
            assert set(np.unique(mask)) == {0, 255}
            # the mask is where the reader finds the object, drawn white on black
            white = np.stack([mask] * 3, -1)
            assert read(white)["shape"] == case.info[image_slot]["shape"]
        plain, _ = case_images("appearance", spec.roles, case)
        masked, _ = case_images("appearance", {**spec.roles, **extra}, case)
        assert set(plain) == {"structure", "appearance"}
        assert set(masked) == {"structure", "appearance", "structure_mask", "appearance_mask"}


def test_appearance_cases_carry_the_img2img_baselines():
    from analogon.methods import get
    from analogon.quality import cases as cases_mod
    from analogon.quality.cases_appearance import PARAMS

    baselines = dict(cases_mod.MODEL_BASELINES["appearance"])
    round_trip = baselines.pop("structure through the autoencoder")
    assert (round_trip.method, round_trip.roles) == (cases_mod.AUTOENCODER, {"image": "structure"})
    assert set(baselines) == {"img2img, same prompt", "img2img, look in words"}
    case = cases_mod.build("appearance", 1, 0)[0]
    for b in baselines.values():
        params = get(b.method).Params(**b.params_of(case))  # valid pixels parameters
        assert b.roles == {"source": "structure"}
        # the transfer's schedule: the same steps run
        assert params.steps == PARAMS["steps"]
        assert round(params.steps * params.strength) == PARAMS["steps"] - PARAMS["skip_steps"]
    same = baselines["img2img, same prompt"].params_of(case)
    assert same["prompt"] == "a shape" and same["guidance"] == 1.0
    words = baselines["img2img, look in words"].params_of(case)
    assert words["prompt"] == f"a {case.changed['colour']} {case.changed['texture']} shape"


def test_beats_plain_img2img_on_toy_sd():
    from analogon.models.toy import toy_sd_available

    if not toy_sd_available():
        pytest.skip("toy-sd is not installed (train it with `analogon train-toy`)")
    from analogon.quality import format_table, run_quality

    report = run_quality(methods=["appearance"], kinds=["appearance"], n=4, seed=0,
                         model="toy-sd", device="cpu", log=lambda s: None)
    rows = {r["method"]: r for r in report["rows"]}
    ours, img2img = rows["appearance"], rows["img2img, same prompt"]
    assert not ours.get("errors") and not img2img.get("errors"), report["notes"]
    assert ours["change"] > img2img["change"], (ours, img2img)
    # Measured on toy-sd (128 px), these four cases, with the automatic masks' "auto" rule: the
    # colour taken in 4 of 4 (texture in 1: change 5 of 8) against none for img2img with the
    # same prompt; the structure kept in 15 of 16 attributes (shape 4 of 4); every mask found
    # the object (IoU 0.76-0.89). The paper's noun rule picked the outline or the background
    # here (shape kept in 1 of 4, IoU 0.11-0.19). Bounds: one case of margin.
    assert ours["change"] >= 4 / 8, ours
    assert ours["change_by"]["colour"] >= 3 / 4, ours
    assert ours["change_by"]["colour"] > img2img["change_by"]["colour"], (ours, img2img)
    assert ours["keep"] >= 11 / 16 and ours["keep_by"]["shape"] >= 3 / 4, ours
    assert set(ours["mask_iou"]) == {"structure", "appearance"}, ours
    assert all(v >= 0.6 for v in ours["mask_iou"].values()), ours
    assert all(v >= 3 / 4 for v in ours["mask_iou_half"].values()), ours
    # With the objects' masks given the structure holds as well: measured keep 13 of 16
    # (shape 3 of 4) against 9 of 16 (shape 0) for the appearance image returned; change 5 of 8.
    masked = rows["appearance, masks given"]
    assert not masked.get("errors"), report["notes"]
    assert masked["keep"] >= 12 / 16, masked
    assert masked["keep_by"]["shape"] >= 2 / 4 > rows["appearance returned"]["keep_by"]["shape"]
    assert masked["change"] >= 4 / 8, masked
    # masks the case gives are not scored
    assert "mask_iou" not in masked, masked
    assert "mask IoU appearance " in format_table(report)
