"""The one way back into the document (core.compositing) and the high-resolution pass
(core.hires): maps on grids, carrying only the change up, compositing by value, layers,
dithering, tiles. The rules of what a changed area looks like (ghosts, source lines, the change
carried, map edges) are in test_return_rules.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analogon.core import compositing as C
from analogon.core import hires as R
from analogon.core.images import over
from analogon.errors import JobCancelled


def textured(h, w, seed=0):
    """A photo-like picture: mid grey with grain, a disc, and 1-px lines."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 110.0) + rng.normal(0, 9, (h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h * 0.5) ** 2 + (xx - w * 0.45) ** 2 < (min(h, w) * 0.3) ** 2
    img[disc] = np.array([190.0, 70, 60]) + rng.normal(0, 9, (int(disc.sum()), 3))
    img[::23] = 25
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], -1), disc


def down(rgba, size):
    t = torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1).float()
    return C.resample(t, size).permute(1, 2, 0).numpy()


def lap_var(rgb):
    g = rgb[..., :3].astype(np.float32).mean(-1)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def psnr(a, b):
    mse = np.mean((a[..., :3].astype(np.float64) - b[..., :3].astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


# -- maps on grids ---------------------------------------------------------------------------

@pytest.mark.parametrize("x", [0, 17, 63, 64, 2000, 4095])
def test_a_one_pixel_stroke_reaches_the_grid_in_proportion_to_its_coverage(x):
    m = np.zeros((4096, 4096), np.float32)
    m[:, x] = 1.0  # a 1-px vertical stroke
    g = C.map_to_grid(m, (64, 64))[0, 0]
    col = x // 64
    assert torch.allclose(g[:, col], torch.full((64,), 1 / 64))  # wherever it falls
    assert float(g.sum()) == pytest.approx(64 / 64)
    assert (g[:, [c for c in range(64) if c != col]] == 0).all()


def test_map_to_grid_keeps_area_at_fractional_scales_and_snaps():
    m = np.zeros((300, 500), np.float32)
    m[100:130, 200:203] = 1.0
    g = C.map_to_grid(m, (64, 40))
    # area preserved: the mean over the grid is the mean over the map
    assert float(g.mean()) == pytest.approx(float(m.mean()), rel=1e-4)
    white = C.map_to_grid(np.full((300, 500), 0.99999994, np.float32), (64, 40))
    assert (white == 1.0).all()
    assert (C.map_to_grid(np.zeros((300, 500), np.float32), (64, 40)) == 0).all()


def test_resample_matrix_is_linear_interpolation_when_enlarging():
    x = torch.rand(1, 1, 7, 9)
    ours = C.resample(x, (31, 20))
    ref = torch.nn.functional.interpolate(x, size=(20, 31), mode="bilinear", align_corners=False)
    assert torch.allclose(ours, ref, atol=1e-5)


# -- carrying the change up ------------------------------------------------------------------

def test_no_change_gives_back_the_base_exactly():
    base, _ = textured(480, 640)
    g = C.carry_up(down(base, (64, 48)), base)
    assert np.abs(g - base[..., :3]).max() < 0.01  # grain and 1-px lines come back


def test_a_colour_change_keeps_the_detail_a_stretch_loses():
    base, disc = textured(480, 640)
    want = base.copy()
    want[disc, :3] = want[disc][:, [2, 1, 0]]  # the disc turns blue, grain and all
    out = down(want, (64, 48))
    g = C.carry_up(out, base)
    stretch = torch.nn.functional.interpolate(
        torch.from_numpy(out).permute(2, 0, 1)[None], size=(480, 640), mode="bicubic",
        align_corners=False)[0].permute(1, 2, 0).numpy()
    assert psnr(g, want) > psnr(stretch, want) + 6
    assert lap_var(g) > 0.8 * lap_var(want) > 100 * lap_var(np.clip(stretch, 0, 255))


def test_a_working_grid_finer_than_the_document_on_one_axis_comes_back_too():
    base, _ = textured(40, 64)
    out = np.full((64, 64, 3), 90, np.uint8)  # a square working size for a 64×40 region
    g = C.carry_up(out, base)
    assert g.shape == (40, 64, 3) and np.abs(g - 90).max() < 2


# -- compositing by value --------------------------------------------------------------------

def test_weights_zero_grey_and_one_give_target_blend_and_result():
    target, _ = textured(96, 128)
    out = np.full((12, 16, 3), 30, np.uint8)  # the model painted everything dark
    weight = np.zeros((96, 128), np.float32)
    weight[:, 32:64] = 0.3
    weight[:, 64:] = 1.0
    ret = C.bring_back(out, target, weight=weight)
    img, layer = ret.image, ret.layer
    assert np.array_equal(img[:, :32], target[:, :32])  # black: the target's own bytes
    assert (layer[:, :32] == 0).all()  # and nothing in the layer
    grey = slice(40, 56)  # inside the grey band, away from the feathered border
    full = slice(80, 128)
    g = C.carry_up(out, target, weight)
    blend = target[:, grey, :3] + 0.3 * (g[:, grey] - target[:, grey, :3])
    assert np.abs(img[:, grey, :3].astype(np.float32) - blend).max() <= 1.0
    # the grey band keeps the target's detail in proportion (most of its grain)
    assert lap_var(img[:, grey]) > 0.4 * lap_var(target[:, grey])
    assert np.abs(img[:, full, :3].astype(np.float32) - g[:, full]).max() <= 1.0
    assert np.array_equal(img[..., 3], target[..., 3])
    assert (layer[:, full, 3] == 255).all() and (layer[:, grey, 3] == 77).all()


def test_no_step_where_the_map_turns_black_on_a_smooth_input():
    h, w = 64, 256
    ramp = np.tile(np.linspace(60, 180, w, dtype=np.float32), (h, 1))
    target = np.stack([ramp, ramp, ramp, np.full((h, w), 255.0)], -1).astype(np.uint8)
    out = np.full((8, 32, 3), 230, np.uint8)  # a strong change
    weight = np.zeros((h, w), np.float32)
    weight[:, 128:] = 0.3
    radius = C.ramp_radius((w, h), (32, 8))
    ret = C.bring_back(out, target, weight=C.change_weight(weight, None, (h, w), radius))
    cols = ret.image[..., 0].astype(np.float32).mean(0)
    own = np.abs(np.diff(target[..., 0].astype(np.float32).mean(0))).max()
    assert np.abs(np.diff(cols)).max() <= own + 4  # no seam: at most 4 levels beyond the input's
    # without the ramp the step is the whole 0.3 of the change
    hard = C.bring_back(out, target, weight=weight).image[..., 0].astype(np.float32).mean(0)
    assert np.abs(np.diff(hard)).max() > own + 10
    assert np.array_equal(ret.image[:, :128], target[:, :128])


def test_layer_over_target_is_the_finished_image_and_honours_the_targets_alpha():
    target, _ = textured(48, 64)
    target[:, :, 3] = 255
    target[:24, 32:, 3] = 128  # a semi-transparent patch
    out = np.full((6, 8, 3), 200, np.uint8)
    weight = np.zeros((48, 64), np.float32)
    weight[:, 32:] = 1.0
    ret = C.bring_back(out, target, weight=weight)
    opaque = target[..., 3] == 255
    flat = over(ret.layer, target)
    assert np.abs(flat[opaque].astype(int) - ret.image[opaque].astype(int)).max() <= 1
    assert (ret.layer[:24, 32:, 3] == 128).all() and (ret.layer[24:, 32:, 3] == 255).all()
    assert (ret.layer[:, :32] == 0).all()


def test_the_weight_follows_the_map_between_any_two_values_and_never_exceeds_it():
    m = np.zeros((40, 120), np.float32)
    m[:, 20:60] = 0.3  # black -> grey -> white -> grey -> black
    m[:, 60:90] = 1.0
    m[:, 90:100] = 0.3
    f = C.follow_map(m, 3)
    assert (f[m == 0] == 0).all() and (f <= m + 1e-7).all()
    assert (f[:, 26:60] == np.float32(0.3)).all() and (f[:, 66:84] == 1.0).all()  # plateaus: the map
    row = f[20]
    assert np.all(np.abs(np.diff(row)) <= 0.7 / 7 + 1e-6)  # every edge a 7-px ramp: no step
    assert row[20] > 0 and row[23] == pytest.approx(0.3 * 4 / 7)  # into black: inside the grey
    e = C.erode(np.random.default_rng(0).random((30, 50)).astype(np.float32), 2)
    ref = torch.nn.functional.max_pool2d(-torch.from_numpy(np.random.default_rng(0).random((30, 50)).astype(
        np.float32))[None, None], 5, stride=1, padding=2)[0, 0].neg().numpy()
    assert np.array_equal(e, ref)


def test_dither_makes_gradients_without_bands_and_keeps_whole_values():
    x = np.tile(np.linspace(100, 104, 512, dtype=np.float32), (64, 1))[..., None]
    q = C.quantise(x)[..., 0].astype(np.float32)
    rounded = np.round(x[..., 0])
    # the local mean follows the true gradient (no 1-level bands of ~128 px)
    block = q.reshape(8, 8, 64, 8).mean((1, 3))
    truth = x[..., 0].reshape(8, 8, 64, 8).mean((1, 3))
    assert np.abs(block - truth).max() < 0.15
    assert np.abs(rounded.reshape(8, 8, 64, 8).mean((1, 3)) - truth).max() > 0.4
    whole = np.full((16, 16, 3), 77.0, np.float32)
    assert (C.quantise(whole) == 77).all()


# -- the high-resolution pass ----------------------------------------------------------------

def test_tiles_cover_the_region_with_the_overlap_asked():
    for n, tile, ov in [(64, 64, 16), (300, 64, 16), (1000, 512, 128), (65, 64, 0)]:
        starts = R.tile_starts(n, tile, ov)
        assert starts[0] == 0 and starts[-1] + tile == max(n, tile)
        assert all(b - a <= tile - ov for a, b in zip(starts, starts[1:]))
        covered = np.zeros(max(n, tile), bool)
        for s in starts:
            covered[s:s + tile] = True
        assert covered[:n].all()
    w = R.ramp(64, 16, lo_edge=True, hi_edge=False)
    assert w[0] == 1 and w[-1] < 0.05 and (w > 0).all()


def test_refine_size_follows_mode_and_max_pixels():
    on = R.HiresSettings(mode="on", max_pixels=0)
    assert R.refine_size((3000, 2000), (64, 40), 64, on) == (312, 208)  # 16 × 64² pixels
    assert R.refine_size((3000, 2000), (64, 40), 64, R.HiresSettings(mode="off")) is None
    auto = R.HiresSettings(mode="auto")
    assert R.refine_size((3000, 2000), (512, 336), 512, auto) == (2504, 1672)
    assert R.refine_size((700, 500), (512, 368), 512, auto) is None  # under 1.5 × the working size
    big = R.refine_size((4096, 4096), (512, 512), 512, R.HiresSettings(max_pixels=1024 * 1024))
    assert big == (1024, 1024)


def _pixels_job(size=(256, 192)):
    from analogon.methods.base import Inputs, LayerImage

    target, _ = textured(size[1], size[0], seed=3)
    m = np.zeros((size[1], size[0], 4), np.uint8)
    m[..., 3] = 255
    m[40:150, 60:200, :3] = 255
    return target, m, Inputs({"source": LayerImage(target, "s"), "edit_map": [LayerImage(m, "m")]})


def test_hires_pass_runs_tiles_keeps_black_pixels_and_can_be_cancelled(tiny_sd, make_ctx):
    from analogon.methods import get

    method = get("pixels")
    target, m, inputs = _pixels_job()
    p = method.Params(steps=4, strength=0.75, hires="on", hires_strength=0.5)
    ctx = make_ctx(tiny_sd)
    res = method.run(ctx, inputs, p)
    hi = res.info["return"]["hires"]
    assert hi["tiles"] >= 2 and hi["steps"] == 2
    stages = [e[1] for e in ctx.events if e[0] == "progress"]
    assert "high-resolution pass" in stages
    black = m[..., 0] == 0
    out = res.images[0].rgba
    assert np.array_equal(out[black], target[black])
    assert (res.images[0].layer[black] == 0).all()
    assert not np.array_equal(out[~black], target[~black])
    off = method.run(make_ctx(tiny_sd), inputs, p.model_copy(update={"hires": "off"}))
    assert "hires" not in off.info["return"]
    # cancel inside the pass: after the method's own steps, before the tiles are done
    n_before = sum(1 for e in ctx.events if e[0] == "progress" and e[1] != "high-resolution pass")
    with pytest.raises(JobCancelled):
        method.run(make_ctx(tiny_sd, cancel_after=n_before + 2), inputs, p)


def test_the_fit_tells_a_recolouring_from_new_structure():
    base, disc = textured(480, 640)
    recoloured = base.copy()
    recoloured[disc, :3] = recoloured[disc][:, [2, 1, 0]]
    fit = C.fit_change(down(recoloured, (64, 48)), base)
    assert fit.new.max() < 0.3 and fit.new_share() < 0.1
    drawn = base.copy()
    drawn[40:200, 420:600, :3] = (30, 200, 30)  # a square where the base is flat
    fit = C.fit_change(down(drawn, (64, 48)), base)
    assert fit.new[4:20, 42:60].min() > 0.95  # its edges and, decided by them, its inside
    assert fit.new[30:, :30].max() == 0  # the untouched part
    assert fit.new_share() > 0.9
