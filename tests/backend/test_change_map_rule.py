"""One rule for several masks and edit maps (core.compositing.change_map), used by every method
and by the return path: union within a role, product between edit maps and masks."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from analogon.core import compositing as C
from analogon.methods.base import Inputs, LayerImage

S = 64


def layer(values: np.ndarray, name: str) -> LayerImage:
    g = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    rgba = np.dstack([g, g, g, np.full_like(g, 255)])
    return LayerImage(rgba, name)


def halves():
    left = np.zeros((S, S), np.float32)
    left[:, : S // 2] = 1.0
    return left, 1.0 - left


def two_masks_inputs(extra=None) -> Inputs:
    left, right = halves()
    grey = np.full((S, S), 0.5, np.float32)
    imgs = {"mask": [layer(left, "m1"), layer(right, "m2")], "edit_map": [layer(grey, "e1")]}
    imgs.update(extra or {})
    return Inputs(imgs)


EXPECTED = np.full((S, S), 128 / 255, np.float32)  # grey edit map × (left ∪ right)


def test_the_rule():
    left, right = halves()
    grey = np.full((S, S), 0.5, np.float32)
    # two masks: here and there (union), not only where they overlap
    assert np.array_equal(C.change_map([], [left, right]), np.ones((S, S), np.float32))
    # two edit maps: the larger change wins
    assert np.allclose(C.change_map([grey, left], []), np.maximum(grey, left))
    # an edit map inside a mask: the mask gates it
    assert np.allclose(C.change_map([grey], [left]), grey * left)
    assert C.change_map([], []) is None
    assert np.allclose(C.job_change_map(two_masks_inputs()), EXPECTED, atol=1e-6)


def _bundle():
    return SimpleNamespace(vae_scale_factor=8, device=torch.device("cpu"), native_size=S)


def test_dia_uses_the_rule():
    from analogon.methods import dia

    sched = dia.DiffusionImageAnalogies._schedule(two_masks_inputs(), (S, S), _bundle(), dia.Params())
    # the whole canvas may change (at the edit map's 0.5); an intersection would keep it all
    assert sched.change is not None
    assert torch.allclose(sched.change, torch.full_like(sched.change, 128 / 255), atol=1e-5)


def test_difference_uses_the_rule():
    from analogon.methods import difference

    change = difference.DifferenceMethod._change_map(two_masks_inputs(), (S, S), _bundle())
    assert torch.allclose(change, torch.full_like(change, 128 / 255), atol=1e-5)


def test_pixels_uses_the_rule():
    from analogon.methods import pixels

    src = np.zeros((S, S, 4), np.uint8)
    src[..., :3] = 90
    src[..., 3] = 255
    inputs = two_masks_inputs({"source": LayerImage(src, "src")})
    plan = pixels.plan_job(_bundle(), inputs, pixels.PixelsParams(crop_to_edit=False))
    assert np.allclose(plan.change, EXPECTED, atol=1e-6)
