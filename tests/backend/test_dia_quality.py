"""Diffusion Image Analogies on the trained toy world beats the trivial answers to
A : A′ :: B : ? (B returned unchanged, A′ returned). Seeded; skipped where toy-sd is not installed."""
from __future__ import annotations

import pytest

from analogon.models.toy import toy_sd_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not toy_sd_available(), reason="toy-sd is not trained in this checkout")]


def test_dia_beats_the_trivial_baselines():
    from analogon.quality import run_quality

    report = run_quality(["dia"], ["analogy"], n=5, seed=0, model="toy-sd", device="cpu",
                         log=lambda s: None)
    rows = {r["method"]: r for r in report["rows"] if r["kind"] == "analogy"}
    ours = rows["dia"]
    assert ours["cases"] == 5 and not ours.get("errors"), report["notes"]
    # B unchanged keeps everything and changes nothing; A′ returned changes but keeps little of B
    assert ours["change"] > rows["B unchanged"]["change"], ours
    assert ours["keep"] > rows["A′ returned"]["keep"], ours
