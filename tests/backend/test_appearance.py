"""The appearance method (Cross-Image Attention) end to end on the tiny models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from analogon.core import images as im
from analogon.core.diffusion import vae_decode, vae_encode
from analogon.errors import InputError, JobCancelled
from analogon.methods import get
from analogon.methods.base import Inputs, LayerImage

FAST = dict(steps=6, skip_steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def method():
    return get("appearance")


def _img(w, h, seed, smooth=True):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if smooth:
        yy, xx = np.mgrid[0:h, 0:w]
        a[..., 0] = (xx * 255 // max(1, w - 1)).astype(np.uint8)
        a[..., 1] = ((yy * 255 // max(1, h - 1)) ^ (seed * 40 % 256)).astype(np.uint8)
    a[..., 3] = 255
    return a


def _inputs(structure, appearance, **extra):
    d = {"structure": LayerImage(structure, "s"), "appearance": LayerImage(appearance, "a")}
    d.update({k: LayerImage(v, k) for k, v in extra.items()})
    return Inputs(d)


def _reconstruction(bundle, rgba):
    size = im.native_size(im.size_of(rgba), bundle.native_size, multiple=bundle.vae_scale_factor)
    x0 = vae_encode(bundle, im.to_tensor(rgba, size))
    return im.from_tensor(vae_decode(bundle, x0))


def _stock_state(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return (all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
            and all(getattr(b, "b1", None) is None and not b._forward_pre_hooks
                    for b in unet.up_blocks))


def test_same_image_without_contrast_or_guidance_reproduces_the_structure(tiny_sd, make_ctx, method):
    s = _img(64, 64, 1)
    p = method.Params(**FAST, contrast=1.0, guidance=1.0, guidance_decay=False, adain="off",
                      freeu=False, inversion_cfg=1.0, structure_every=0)
    ctx = make_ctx(tiny_sd, seed=3)
    res = method.run(ctx, _inputs(s, s.copy()), p)
    out = res.images[0].rgba[..., :3].astype(int)
    rec = _reconstruction(tiny_sd, s).astype(int)
    assert np.abs(out - rec).max() <= 1
    assert res.info["unet_calls"] == 4  # one UNet call per step run
    # a different appearance image does change the result (the check above can fail)
    other = method.run(make_ctx(tiny_sd, seed=3), _inputs(s, _img(64, 64, 7)), p)
    assert np.abs(other.images[0].rgba[..., :3].astype(int) - rec).mean() > 2


def test_guidance_zero_is_no_transfer_even_with_the_decay(tiny_sd, make_ctx, method):
    """α = 0 means no attention transfer: the decay lets α fall, never rise towards 1, so the
    output is the structure redrawn from its own inversion."""
    from analogon.methods.appearance import Schedule

    p = method.Params(**FAST, guidance=0.0, guidance_decay=True, adain="off", freeu=False)
    assert [Schedule(p).alpha(j) for j in range(Schedule(p).n)] == [0.0] * Schedule(p).n
    falling = Schedule(method.Params(**FAST, guidance=3.5))
    assert falling.alpha(0) == 3.5 and falling.alpha(falling.n - 1) == 1.75
    s = _img(64, 64, 1)
    res = method.run(make_ctx(tiny_sd, seed=3), _inputs(s, _img(64, 64, 7)), p)
    rec = _reconstruction(tiny_sd, s).astype(int)
    assert np.abs(res.images[0].rgba[..., :3].astype(int) - rec).max() <= 1


def test_transfer_defaults_run_and_report(tiny_sd, make_ctx, method):
    s, a = _img(64, 64, 2), _img(80, 48, 3)
    ctx = make_ctx(tiny_sd, seed=5)
    res = method.run(ctx, _inputs(s, a), method.Params(**FAST))
    out = res.images[0].rgba
    assert out.shape == (64, 64, 4) and out.dtype == np.uint8
    info = res.info
    assert info["prompt"] == "A photo of a object"
    assert info["swap_resolutions"] == {"fine": [8, 8], "coarse": None}  # 4×4: too coarse (auto)
    assert info["adain_masks"]["structure"] in ("auto", "whole")
    steps = [e for e in ctx.events if e[0] == "progress" and e[1] == "transferring"]
    assert [e[2] for e in steps] == [1, 2, 3, 4] and all(e[3] == 4 for e in steps)
    assert any(e[1] == "inverting structure" for e in ctx.events if e[0] == "progress")
    assert _stock_state(tiny_sd.unet)


def test_inversions_are_cached(tiny_sd, make_ctx, method):
    s, a = _img(64, 64, 4), _img(64, 64, 5)
    p = method.Params(**FAST)
    first = method.run(make_ctx(tiny_sd, seed=1), _inputs(s, a), p)
    second = method.run(make_ctx(tiny_sd, seed=1), _inputs(s, a), p)
    assert first.info["inversion_cached"] == {"structure": False, "appearance": False}
    assert second.info["inversion_cached"] == {"structure": True, "appearance": True}
    assert np.array_equal(first.images[0].rgba, second.images[0].rgba)
    third = method.run(make_ctx(tiny_sd, seed=2), _inputs(s, a), p)
    assert third.info["inversion_cached"] == {"structure": False, "appearance": False}


def test_black_edit_map_keeps_the_structure(tiny_sd, make_ctx, method):
    s, a = _img(64, 64, 6), _img(64, 64, 8)
    black = np.zeros((64, 64, 4), np.uint8)
    black[..., 3] = 255
    inputs = _inputs(s, a, edit_map=black)
    res = method.generate(make_ctx(tiny_sd), inputs, method.Params(**FAST))  # the loop itself
    rec = _reconstruction(tiny_sd, s).astype(int)
    assert np.abs(res.images[0].rgba[..., :3].astype(int) - rec).max() <= 1
    done = method.run(make_ctx(tiny_sd), inputs, method.Params(**FAST))  # brought back: exact
    assert np.array_equal(done.images[0].rgba, s) and (done.images[0].layer == 0).all()


def test_the_change_map_is_computed_once_per_job(tiny_sd, make_ctx, method, monkeypatch):
    from analogon.core import compositing

    calls = []
    real = compositing.job_change_map
    monkeypatch.setattr(compositing, "job_change_map", lambda i: calls.append(1) or real(i))
    s, a = _img(64, 64, 6), _img(64, 64, 8)
    grey = np.full((64, 64, 4), 128, np.uint8)
    grey[..., 3] = 255
    inputs = _inputs(s, a, edit_map=grey)
    done = method.run(make_ctx(tiny_sd), inputs, method.Params(**FAST))
    # the method's schedule and the return path's weight read the same map
    assert calls == [1]
    assert (done.images[0].layer[..., 3] > 0).any()


def test_user_masks_are_used(tiny_sd, make_ctx, method):
    s, a = _img(64, 64, 9), _img(48, 40, 10)
    sm = np.zeros((64, 64, 4), np.uint8)
    sm[16:48, 16:48] = 255
    am = np.zeros((40, 48, 4), np.uint8)
    am[:, :24] = 255
    res = method.run(make_ctx(tiny_sd), _inputs(s, a, structure_mask=sm, appearance_mask=am),
                     method.Params(**FAST))
    assert res.info["adain_masks"] == {"structure": "user", "appearance": "user"}
    whole = method.run(make_ctx(tiny_sd), _inputs(s, a, structure_mask=sm, appearance_mask=am),
                       method.Params(**FAST, adain="whole"))
    assert whole.info["adain_masks"] == {"structure": "whole", "appearance": "whole"}
    assert not np.array_equal(res.images[0].rgba, whole.images[0].rgba)


def test_an_object_on_a_transparent_layer_is_its_own_mask(tiny_sd, make_ctx, method):
    """Without a mask layer, the opacity of an image with transparent pixels is its AdaIN mask:
    the same result as giving that opacity as the mask layer; a mask layer still wins."""
    s, a = _img(64, 64, 9), _img(48, 40, 10)
    s[..., 3] = 0
    s[12:52, 20:44, 3] = 255
    alpha_as_mask = np.zeros((64, 64, 4), np.uint8)
    alpha_as_mask[..., :3] = s[..., 3:4]
    alpha_as_mask[..., 3] = 255
    p = method.Params(**FAST)
    own = method.generate(make_ctx(tiny_sd), _inputs(s, a), p)
    assert own.info["adain_masks"]["structure"] == "alpha"
    assert own.info["adain_masks"]["appearance"] in ("auto", "whole")  # opaque: found as before
    given = method.generate(make_ctx(tiny_sd), _inputs(s, a, structure_mask=alpha_as_mask), p)
    assert given.info["adain_masks"]["structure"] == "user"
    assert np.array_equal(own.images[0].rgba, given.images[0].rgba)
    other = np.zeros((64, 64, 4), np.uint8)
    other[40:, :, :] = 255
    wins = method.generate(make_ctx(tiny_sd), _inputs(s, a, structure_mask=other), p)
    assert wins.info["adain_masks"]["structure"] == "user"
    assert not np.array_equal(wins.images[0].rgba, own.images[0].rgba)


def test_mask_of_the_wrong_size_is_a_clear_error(tiny_sd, make_ctx, method):
    s, a = _img(64, 64, 11), _img(48, 40, 12)
    wrong = np.full((32, 32, 4), 255, np.uint8)
    ctx = make_ctx(tiny_sd)
    with pytest.raises(InputError) as e:
        method.run(ctx, _inputs(s, a, appearance_mask=wrong), method.Params(**FAST))
    assert e.value.code == "size_mismatch"
    assert "appearance mask" in e.value.message and "48×40" in e.value.message
    assert not [ev for ev in ctx.events if ev[0] == "progress"]  # refused before any work
    empty = np.zeros((64, 64, 4), np.uint8)
    with pytest.raises(InputError) as e:
        method.run(make_ctx(tiny_sd), _inputs(s, empty), method.Params(**FAST))
    assert e.value.code == "empty_image" and "appearance" in e.value.message


def test_cancel_stops_and_leaves_the_model_as_found(tiny_sd, make_ctx, method):
    s, a = _img(64, 64, 13), _img(64, 64, 14)
    before = dict(tiny_sd.unet.attn_processors)
    ctx = make_ctx(tiny_sd, cancel_after=3)
    with pytest.raises(JobCancelled):
        method.run(ctx, _inputs(s, a), method.Params(steps=20, skip_steps=2))
    assert len([e for e in ctx.events if e[0] == "progress"]) == 3
    assert _stock_state(tiny_sd.unet)
    after = tiny_sd.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_tiny_sdxl_odd_sizes(tiny_sdxl, make_ctx, method):
    s, a = _img(72, 40, 15), _img(30, 50, 16)
    res = method.run(make_ctx(tiny_sdxl), _inputs(s, a),
                     method.Params(**FAST, range_semantics="paper", contrast_mode="renormalize"))
    assert res.images[0].rgba.shape == (40, 72, 4)
    w, h = res.info["working_size"]
    assert w % 8 == 0 and h % 8 == 0 and w > h
    # SDXL has no attention at the latent's own resolution: the finest swapped layers are at 1/2
    assert res.info["swap_resolutions"]["fine"] == [-(-h // 16), -(-w // 16)]
    assert _stock_state(tiny_sdxl.unet)


@pytest.mark.parametrize("levels,swapped", [
    ("auto", {2: 4}),              # SDXL-shaped: the coarse level is deeper (6 > 4 layers): off
    ("both", {2: 4, 4: 6}),
    ("fine", {2: 4}),
    ("coarse", {4: 6}),
])
def test_swap_levels_on_a_deep_sdxl_unet(tiny_sdxl, make_ctx, method, monkeypatch, levels, swapped):
    """Which decoder self-attention layers swap, per level choice, on an SDXL-shaped UNet whose
    transformers are 2 and 3 blocks deep."""
    import analogon.methods.appearance as mod

    made = []

    class Spy(mod.SwapController):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.log = []
            made.append(self)

    monkeypatch.setattr(mod, "SwapController", Spy)
    s, a = _img(64, 64, 21), _img(64, 64, 22)
    res = method.run(make_ctx(tiny_sdxl), _inputs(s, a),
                     method.Params(steps=4, skip_steps=0, fine_start=0, coarse_start=0,
                                   structure_every=0, swap_levels=levels, freeu_operator="authors"))
    layers: dict[int, set[str]] = {}
    for name, factor, _ in made[0].log:
        layers.setdefault(factor, set()).add(name)
    assert {f: len(n) for f, n in layers.items()} == swapped
    assert res.info["swap_layers"] == sum(swapped.values())
    assert _stock_state(tiny_sdxl.unet)


def test_swap_levels_auto_on_sd(tiny_sd, make_ctx, method):
    """SD-shaped: the coarse level swaps where its map is wide enough (the paper's 32×32 at 512²),
    not at toy sizes where it is 4×4."""
    from analogon.core.attention import decoder_attention_factors
    from analogon.methods.appearance import swap_factors_for

    unet, factors = tiny_sd.unet, decoder_attention_factors(tiny_sd.unet)
    assert swap_factors_for(unet, factors, "auto", (64, 64)) == (1, 2)     # 512²: 64² and 32²
    assert swap_factors_for(unet, factors, "auto", (32, 48)) == (1, 2)     # 256×384: 16×24 coarse
    assert swap_factors_for(unet, factors, "auto", (16, 16)) == (1, None)  # 128²: 8×8 coarse
    assert swap_factors_for(unet, factors, "both", (8, 8)) == (1, 2)
    res = method.run(make_ctx(tiny_sd), _inputs(_img(64, 64, 23), _img(64, 64, 24)),
                     method.Params(**FAST))
    assert res.info["swap_resolutions"] == {"fine": [8, 8], "coarse": None}
    assert res.info["swap_layers"] == 2
    res = method.run(make_ctx(tiny_sd), _inputs(_img(64, 64, 23), _img(64, 64, 24)),
                     method.Params(**FAST, swap_levels="both"))
    assert res.info["swap_resolutions"] == {"fine": [8, 8], "coarse": [4, 4]}
    assert res.info["swap_layers"] == 4  # 2 + 2 (SD 1.5: 3 + 3)


def test_query_preservation_reads_the_structure_on_swapped_steps(tiny_sd, make_ctx, method, monkeypatch):
    """γ > 0: on every swapped step the output's queries are mixed with those of a batch element
    that holds the structure's inverted latent at that step (one more element unless the
    reference is the structure already); γ = 0 adds nothing."""
    import analogon.methods.appearance as mod

    seen = []
    real_set_step = mod.SwapController.set_step

    def spy(self, latent_hw, swaps=None, beta=None, queries=None, gamma=None):
        real_set_step(self, latent_hw, swaps, beta, queries, gamma)
        seen.append((dict(self.swaps), dict(self.queries), self.gamma))  # what the step runs with

    monkeypatch.setattr(mod.SwapController, "set_step", spy)
    s, a = _img(64, 64, 25), _img(64, 64, 26)
    base = method.run(make_ctx(tiny_sd), _inputs(s, a), method.Params(**FAST, query_preservation=0.0))
    assert all(not q for _, q, _ in seen)
    seen.clear()
    res = method.run(make_ctx(tiny_sd), _inputs(s, a), method.Params(**FAST, query_preservation=0.8))
    swapped = [(sw, q, g) for sw, q, g in seen if sw]
    assert swapped and all(set(q) == set(sw) and g == 0.8 for sw, q, g in swapped)
    for sw, q, _ in swapped:
        (dst, src), = q[1]
        assert dst == sw[1][0][0] and src != dst  # the swapped output asks with another element
    assert res.info["unet_batch_elements"] - base.info["unet_batch_elements"] == len(swapped)
    assert np.abs(res.images[0].rgba.astype(int) - base.images[0].rgba.astype(int)).max() > 0


def test_describe_for_the_panel(method):
    d = method.describe()
    assert d["target_role"] == "structure"
    assert [r["name"] for r in d["roles"]] == ["structure", "appearance", "structure_mask",
                                                "appearance_mask", "edit_map", "mask"]
    props = d["params"]["properties"]
    for name, prop in props.items():
        assert "default" in prop and prop.get("description"), name
    assert props["contrast"]["default"] == 1.67 and props["guidance"]["default"] == 3.5
    assert props["steps"]["default"] == 100 and props["skip_steps"]["default"] == 32
    assert set(props["range_semantics"]["enum"]) == {"authors", "paper"}


def test_runs_through_the_engine(tiny_sd, cache, method):
    from analogon.engine import MemorySource, execute, prepare

    class Models:
        def get(self, spec):
            return tiny_sd

    src = MemorySource()
    s, a = _img(64, 48, 17), _img(40, 40, 18)
    job = prepare("appearance", method.demo_params,
                  {"structure": src.add(s), "appearance": src.add(a)}, "tiny-sd", 4, "tiny-sd", src)
    result = execute(job, source=src, models=Models(), cache=cache)
    assert result.images[0].rgba.shape == (48, 64, 4)
    assert result.params["steps"] == method.demo_params["steps"]
