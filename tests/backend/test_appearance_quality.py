"""Appearance transfer on the trained toy world (skipped when toy-sd is not installed): seeded,
it must adopt the appearance more often than returning the structure does, while keeping the
structure's shape more often than returning the appearance does."""
from __future__ import annotations

import pytest


def test_registered_quality_cases():
    from analogon.quality import cases as cases_mod
    from analogon.quality.cases_appearance import PARAMS
    from analogon.methods import get

    spec = cases_mod.METHODS["appearance"]
    assert spec.kinds == ("appearance",) and spec.params == PARAMS
    get("appearance").Params(**PARAMS)  # valid parameters


def test_beats_the_trivial_baselines_on_toy_sd():
    from analogon.models.toy import toy_sd_available

    if not toy_sd_available():
        pytest.skip("toy-sd is not installed (train it with `analogon train-toy`)")
    from analogon.quality import run_quality

    report = run_quality(methods=["appearance"], kinds=["appearance"], n=4, seed=0,
                         model="toy-sd", device="cpu", log=lambda s: None)
    rows = {r["method"]: r for r in report["rows"]}
    ours = rows["appearance"]
    assert ours["change"] > rows["structure unchanged"]["change"]
    assert ours["keep"] > rows["appearance returned"]["keep"]
