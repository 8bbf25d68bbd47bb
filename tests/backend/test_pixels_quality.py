"""PIXELS on the trained toy world: the exemplar's attribute is read back inside the painted
region and everything outside stays as it was. Skipped where toy-sd is not installed."""
from __future__ import annotations

import numpy as np
import pytest

from analogon.models.toy import toy_sd_available

pytestmark = pytest.mark.skipif(not toy_sd_available(), reason="toy-sd is not trained in this checkout")


def test_exemplar_attribute_is_adopted_inside_and_the_rest_is_kept():
    from analogon.quality import run_quality

    report = run_quality(["pixels"], ["exemplar", "exemplar_soft"], n=4, seed=1, model="toy-sd",
                         device="cpu", baselines=False, log=lambda s: None)
    cases = report["cases"]
    assert len(cases) == 8, report["notes"]
    for c in cases:
        assert c["outside"] == 0.0, c["case"]  # outside the map: the source's own bytes
        assert c["read"]["background"] == c["truth"]["background"], c["case"]
    # Rates on toy-sd (128 px, default strength 0.25; measured, these eight cases: the
    # object's shape kept in 8 of 8, the changed attribute read back in 8 of 8, and inside the
    # white of the map alone the exemplar's colour and texture both in 8 of 8 — at the authors'
    # 0.4 the attribute came back in 7; one case of margin each). A broken paste or schedule
    # (exemplar ignored, source wiped) drops these to about 0.
    kept_shape = np.mean([c["read"]["shape"] == c["truth"]["shape"] for c in cases])
    changed = np.mean([c["change"] for c in cases])
    adopted = np.mean([c["adopt"] for c in cases])
    detail = [(c["case"], c["read"]) for c in cases]
    assert kept_shape >= 7 / 8, detail
    assert changed >= 7 / 8, detail
    assert adopted >= 7 / 8, detail
