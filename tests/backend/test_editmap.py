"""The shared edit-map schedule: thresholds, per-step resets, the final latent."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analogon.core.editmap import THRESHOLD_KINDS, EditSchedule, threshold, thresholds


@pytest.mark.parametrize("kind", THRESHOLD_KINDS)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 40, 100])
def test_thresholds_start_at_zero_are_monotone_and_in_unit_interval(kind, n):
    th = thresholds(kind, n)
    assert th.shape == (n,)
    assert th[0] == 0.0
    assert np.all(th >= 0.0) and np.all(th < 1.0)
    assert np.all(np.diff(th) > 0)  # strictly rising: every step frees more pixels


def test_threshold_values_follow_the_paper():
    n = 10
    for i in range(n):
        assert threshold("linear", i, n) == pytest.approx(i / n)
        assert threshold("quadratic", i, n) == pytest.approx((i / n) ** 2)
        assert threshold("cubic", i, n) == pytest.approx((i / n) ** 3)
        assert threshold("log", i, n) == pytest.approx(math.log1p(i) / math.log1p(n))
    # the sigmoid keeps the authors' shape σ(6·i/N − 3), rescaled to start at 0
    s = [threshold("sigmoid", i, n) for i in range(n)]
    raw = [1 / (1 + math.exp(-(6 * i / n - 3))) for i in range(n)]
    lo, hi = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-3))
    assert s == pytest.approx([(r - lo) / (hi - lo) for r in raw])
    # the documented ordering: cubic ≤ quadratic ≤ linear ≤ log (Appendix E, Fig. 11)
    for i in range(n):
        c, q, l, g = (threshold(k, i, n) for k in ("cubic", "quadratic", "linear", "log"))
        assert c <= q <= l <= g


def test_unknown_threshold_kind_is_refused():
    with pytest.raises(ValueError):
        threshold("exponential", 1, 4)
    with pytest.raises(ValueError):
        EditSchedule(torch.zeros(1, 1, 2, 2), 4, "exponential")


def test_a_pixel_with_change_c_starts_at_ceil_n_times_one_minus_c():
    n = 20
    change = torch.tensor([0.0, 0.13, 0.37, 0.52, 0.88, 1.0]).reshape(1, 1, 1, 6)
    start = EditSchedule(change, n, "linear").start_step()[0, 0, 0].int().tolist()
    # n·(1 − c) = 20, 17.4, 12.6, 9.6, 2.4, 0: black is never freed, white from the first step
    assert start == [20, 18, 13, 10, 3, 0]


def test_apply_resets_only_where_keep_exceeds_theta():
    n = 4
    change = torch.tensor([[[[0.0, 0.3, 0.6, 1.0]]]])
    sched = EditSchedule(change, n)
    lat = torch.full((1, 4, 1, 4), 5.0)
    src = torch.full((1, 4, 1, 4), -1.0)
    calls = []

    def lazy():
        calls.append(1)
        return src

    expected_reset = {0: [1, 1, 1, 0], 1: [1, 1, 1, 0], 2: [1, 1, 0, 0], 3: [1, 0, 0, 0]}
    for i in range(n):
        out = sched.apply(i, lat, lazy)
        got = (out[0, 0, 0] == -1.0).int().tolist()
        assert got == expected_reset[i], (i, got)
        free = torch.tensor(got) == 0
        assert torch.all(out[0, :, 0, free] == 5.0)  # the others continue from the latent
    assert len(calls) == n  # the noised source is computed lazily, once per step


def test_no_map_means_no_resets_and_a_white_map_the_same():
    lat = torch.randn(1, 4, 3, 5)
    src = torch.randn(1, 4, 3, 5)
    none = EditSchedule(None, 5)
    white = EditSchedule(torch.ones(1, 1, 3, 5), 5)
    assert not none.active
    for i in range(5):
        assert none.apply(i, lat, src) is lat
        assert torch.equal(white.apply(i, lat, src), lat)
    assert torch.equal(white.finish(lat, src), lat)


def test_finish_sets_black_pixels_to_the_clean_source_exactly():
    change = torch.zeros(1, 1, 2, 2)
    change[..., 0, 0] = 1e-3  # barely grey: not exactly black, so it keeps the loop's value
    sched = EditSchedule(change, 3)
    lat = torch.randn(1, 4, 2, 2)
    src = torch.randn(1, 4, 2, 2)
    out = sched.finish(lat, src)
    assert torch.equal(out[..., 0, 0], lat[..., 0, 0])
    for y, x in ((0, 1), (1, 0), (1, 1)):
        assert torch.equal(out[..., y, x], src[..., y, x])
