"""Difference Inversion on the trained toy world beats the trivial answers to A : A′ :: B : ?
(B returned unchanged, A′ returned). Seeded; skipped where toy-sd is not installed."""
from __future__ import annotations

import pytest

from analogon.models.toy import toy_sd_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not toy_sd_available(), reason="toy-sd is not trained in this checkout")]


def test_difference_beats_the_trivial_baselines():
    from analogon.quality import run_quality

    report = run_quality(["difference"], ["analogy"], n=5, seed=0, model="toy-sd", device="cpu",
                         log=lambda s: None)
    rows = {r["method"]: r for r in report["rows"] if r["kind"] == "analogy"}
    ours = rows["difference"]
    assert ours["cases"] == 5 and not ours.get("errors"), report["notes"]
    b_unchanged, a_prime = rows["B unchanged"], rows["A′ returned"]
    # B returned as it is keeps everything and changes nothing; A′ returned changes but keeps
    # little of B. The analogy must do better than the first at the change and better than the
    # second at keeping B.
    assert ours["change"] > b_unchanged["change"], ours
    assert ours["keep"] > a_prime["keep"], ours
