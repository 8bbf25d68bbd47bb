"""The `dia` method (Diffusion Image Analogies) on the tiny models: the λ = 0 identity, caching,
sweeps, edit maps, invalid inputs, cancel, SD and SDXL."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from analogon import engine
from analogon.core import conditioning_inversion as CI
from analogon.core import noise_inversion as NI
from analogon.core.cache import Cache
from analogon.core.diffusion import encode_prompt, make_scheduler, sample, vae_decode, vae_encode
from analogon.core.images import from_tensor, native_size, size_of, to_tensor
from analogon.errors import AnalogonError, InputError, JobCancelled
from analogon.methods import get
from analogon.methods.base import Inputs, JobContext, LayerImage
from analogon.methods.dia import MAX_VARIANTS, DiffusionImageAnalogies, Params

FAST = dict(steps=2, token_iterations=2, views=2, noise_iterations=1, noise_evaluations=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are latency-bound: one thread is much faster on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shared_cache():
    """One in-memory cache for the module, so tests on the same images share inversions."""
    return Cache(None)


class UnetCalls:
    def __init__(self, unet):
        self.n = 0
        self._h = unet.register_forward_pre_hook(lambda *a: self._inc())

    def _inc(self):
        self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


def _img(h, w, seed, alpha=255):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    a[..., 3] = alpha
    return a


def _layer(rgba):
    h = hashlib.sha256(f"{rgba.shape[1]}x{rgba.shape[0]}:".encode())
    h.update(rgba.tobytes())
    return LayerImage(rgba, h.hexdigest())


A = _img(48, 64, 1)
A2 = A.copy()
A2[8:24, 8:40, :3] = (250, 20, 20)  # the change, painted on a copy of A
B = _img(64, 64, 2)


def _inputs(a=A, a2=A2, b=B, **extra):
    d = {"a": _layer(a), "a_prime": _layer(a2), "b": _layer(b)}
    d.update({k: _layer(v) for k, v in extra.items()})
    return Inputs(d)


def _ctx(bundle, cache, cancel_after=None):
    events = []

    def progress(stage, step, total):
        events.append((stage, step, total))

    ctx = JobContext(bundle, cache, 0, progress=progress,
                     cancelled=lambda: cancel_after is not None and len(events) >= cancel_after)
    ctx.events = events
    return ctx


def _run(bundle, cache, inputs=None, **params):
    m = get("dia")
    p = Params(**{**FAST, **params})
    ctx = _ctx(bundle, cache)
    return m.run(ctx, inputs or _inputs(), p), ctx


def _b_state(bundle, cache, b=B, **params):
    """c_B and B's inverted noise for these params, straight from the cache (they must be there)."""
    p = Params(**{**FAST, **params})
    li = _layer(b)
    size = native_size(size_of(b), bundle.native_size)
    x = to_tensor(b, size)
    cs = CI.ConditioningInversionSettings(n_tokens=p.n_tokens, train_bos=p.train_bos,
                                          iterations=p.token_iterations, lr=p.token_lr,
                                          views=p.views, steps=p.steps, seed=p.inversion_seed)
    ns = NI.NoiseInversionSettings(steps=p.steps, iterations=p.noise_iterations,
                                   evaluations=p.noise_evaluations, lr=p.noise_lr,
                                   pixel_weight=p.pixel_weight, init=p.noise_init,
                                   checkpointing=p.checkpointing, seed=p.inversion_seed)
    with UnetCalls(bundle.unet) as calls:
        c = CI.cached_conditioning(cache, bundle, li.sha, x, cs)
        n = NI.cached_noise(cache, bundle, li.sha, vae_encode(bundle, x), x, c.cond,
                            CI.cache_key(cache, bundle, li.sha, size, cs), ns)
    assert calls.n == 0 and c.cached and n.cached
    return c.cond, n


def test_lambda_zero_reproduces_b_and_cache_hit_runs_only_the_sampler(tiny_sd, shared_cache):
    with UnetCalls(tiny_sd.unet) as cold:
        r0, ctx = _run(tiny_sd, shared_cache, analogy_strength=0.0, guidance=1.0)
    stages = [e[0] for e in ctx.events]
    assert {"learning A", "learning A′", "learning B", "inverting B's noise", "sampling"} <= set(stages)
    c_b, noise = _b_state(tiny_sd, shared_cache)
    # λ = 0, no guidance: exactly the reconstruction the noise inversion stored
    recon = from_tensor(vae_decode(tiny_sd, noise.reconstruction))
    assert np.array_equal(r0.images[0].rgba[..., :3], recon)
    assert r0.images[0].label == "λ=0, cfg=1"
    # a second analogy with the same images: no inversion, only `steps` UNet calls (one batch)
    with UnetCalls(tiny_sd.unet) as warm:
        r1, _ = _run(tiny_sd, shared_cache, analogy_strength=0.0, guidance=3.0)
    assert warm.n == FAST["steps"] < cold.n
    assert all(v["cached"] for v in r1.info["conditioning"].values()) and r1.info["noise"]["cached"]
    # λ = 0 with guidance: exactly sampling B's noise with c_B and the shared sampler loop
    sched = make_scheduler(tiny_sd, "ddim", FAST["steps"])
    _, uncond = encode_prompt(tiny_sd, "", "")
    ref = sample(tiny_sd, sched, noise.noise, sched.timesteps, c_b, uncond, 3.0, eta=0.0)
    assert np.array_equal(r1.images[0].rgba[..., :3], from_tensor(vae_decode(tiny_sd, ref)))


def test_sweep_returns_labelled_variants_in_order(tiny_sd, shared_cache):
    _run(tiny_sd, shared_cache)  # inversions (shared with the other tests when already there)
    with UnetCalls(tiny_sd.unet) as calls:
        r, ctx = _run(tiny_sd, shared_cache, sweep=True, sweep_strengths=[0.0, 1.0, 2.0],
                      sweep_guidance=[1.0, 3.0], sweep_batch=4)
    labels = [im.label for im in r.images]
    assert labels == ["λ=0, cfg=1", "λ=1, cfg=1", "λ=2, cfg=1",
                      "λ=0, cfg=3", "λ=1, cfg=3", "λ=2, cfg=3"]
    assert r.info["variants"] == labels
    # 6 variants in batches of 4: two sampling passes, nothing else
    assert calls.n == 2 * FAST["steps"]
    assert [e for e in ctx.events if e[0] == "sampling"][-1][1:] == (4, 4)
    # the analogy changes B, more with a larger λ
    px = [im.rgba[..., :3].astype(int) for im in r.images]
    d1, d2 = np.abs(px[1] - px[0]).mean(), np.abs(px[2] - px[0]).mean()
    assert 0 < d1 < d2
    # a variant is the same whether it runs alone or inside a sweep batch of one
    alone, _ = _run(tiny_sd, shared_cache, analogy_strength=1.0, guidance=1.0)
    single, _ = _run(tiny_sd, shared_cache, sweep=True, sweep_strengths=[0.0, 1.0],
                     sweep_guidance=[1.0], sweep_batch=1)
    assert np.array_equal(single.images[1].rgba, alone.images[0].rgba)


def test_edit_map_keeps_black_areas_on_b(tiny_sd, shared_cache):
    _run(tiny_sd, shared_cache)
    m = DiffusionImageAnalogies()
    p = Params(**FAST, analogy_strength=1.5)
    c_b, noise = _b_state(tiny_sd, shared_cache)
    ctx = _ctx(tiny_sd, shared_cache)
    grey = np.zeros((64, 64, 4), np.uint8)
    grey[..., 3] = 255
    grey[:, 32:, :3] = 255  # right half: change freely; left half: keep
    z_b = vae_encode(tiny_sd, to_tensor(B, (64, 64))).float()
    conds = {k: CI.cached_conditioning(shared_cache, tiny_sd, _layer(v).sha, to_tensor(v, s),
                                       CI.ConditioningInversionSettings(
                                           iterations=2, views=2, steps=2)).cond
             for k, v, s in (("a", A, (64, 48)), ("a2", A2, (64, 48)))}
    _, uncond = encode_prompt(tiny_sd, "", "")

    def sample_with(inputs):
        sched = m._schedule(inputs, (64, 64), tiny_sd, p)
        return m._sample(ctx, noise, lambda: z_b, conds["a"], conds["a2"], c_b, uncond,
                         [(3.0, 1.5)], sched, p)[0]

    free = sample_with(_inputs())
    mapped = sample_with(_inputs(edit_map=grey))
    white = grey.copy()
    white[..., :3] = 255
    assert torch.equal(sample_with(_inputs(edit_map=white)), free)  # all white = no map
    assert torch.equal(mapped[..., :3], z_b[0, ..., :3])  # black columns end on B's latent
    assert not torch.equal(mapped[..., 5:], z_b[0, ..., 5:])  # white ones follow the analogy


def test_other_size_b_and_sdxl(tiny_sdxl, shared_cache):
    b = _img(37, 90, 7)  # odd, non-square, another size than A
    with UnetCalls(tiny_sdxl.unet) as calls:
        r, _ = _run(tiny_sdxl, shared_cache, _inputs(b=b), sweep=True, sweep_strengths=[0.0, 1.0])
    assert calls.n > 0
    assert [im.rgba.shape for im in r.images] == [b.shape, b.shape]
    assert r.info["working_size"] == {"a": [64, 48], "b": [64, 24]}
    assert (r.images[0].rgba[..., 3] == 255).all()


def test_through_the_engine_with_demo_params(tiny_sd):
    class Models:
        def get(self, spec):
            return tiny_sd

    src = engine.MemorySource()
    images = {"a": src.add(A), "a_prime": src.add(A2), "b": src.add(B)}
    m = get("dia")
    job = engine.prepare("dia", m.demo_params, images, "tiny-sd", 1, "tiny-sd", src)
    res = engine.execute(job, source=src, models=Models(), cache=Cache(None))
    assert len(res.images) == len(m.demo_params["sweep_strengths"])
    assert res.images[0].rgba.shape == B.shape
    # the schema is what the panel builds its form from: every field has a default and a tooltip
    schema = m.describe()["params"]
    for name, prop in schema["properties"].items():
        assert "default" in prop and prop.get("description"), name
    assert [r["name"] for r in m.describe()["roles"]][:3] == ["a", "a_prime", "b"]
    assert "copy" in m.help and "A′" in m.help


@pytest.mark.parametrize("bad, code", [
    (dict(a=np.zeros((48, 64, 4), np.uint8)), "empty_image"),
    (dict(b=_img(64, 64, 2, alpha=0)), "empty_image"),
    (dict(a2=_img(40, 64, 3)), "size_mismatch"),
    (dict(a2=A), "no_change"),
])
def test_invalid_images_are_refused_before_any_compute(tiny_sd, bad, code):
    with UnetCalls(tiny_sd.unet) as calls, pytest.raises(InputError) as e:
        _run(tiny_sd, Cache(None), _inputs(**bad))
    assert e.value.code == code and calls.n == 0
    assert e.value.message[0].isupper() and e.value.message.endswith(".")
    if code == "empty_image":
        assert ("A image" if "a" in bad else "B image") in e.value.message


def test_out_of_range_strength_and_guidance_are_refused(tiny_sd):
    for bad in (dict(analogy_strength=3.5), dict(guidance=0.5),
                dict(sweep_strengths=[0.0, -2.0]), dict(sweep_guidance=[30.0])):
        with pytest.raises(ValidationError):
            Params(**bad)
        with pytest.raises(AnalogonError) as e:
            engine.validate_params(get("dia"), bad)
        assert e.value.code == "invalid_params"
    # parameters that bypassed validation still get a readable error before compute
    with UnetCalls(tiny_sd.unet) as calls:
        for p, code in ((Params.model_construct(**{**Params().model_dump(), "analogy_strength": 9.0}),
                         "bad_strength"),
                        (Params.model_construct(**{**Params().model_dump(), "sweep": True,
                                                   "sweep_strengths": [0.0] * 33,
                                                   "sweep_guidance": [1.0, 2.0]}),
                         "too_many_variants")):
            with pytest.raises(InputError) as e:
                get("dia").run(_ctx(tiny_sd, Cache(None)), _inputs(), p)
            assert e.value.code == code
            assert "λ=9" in e.value.message or str(MAX_VARIANTS) in e.value.message
    assert calls.n == 0


def test_cancel_stops_the_job(tiny_sd):
    m = get("dia")
    ctx = _ctx(tiny_sd, Cache(None), cancel_after=2)
    with UnetCalls(tiny_sd.unet) as calls, pytest.raises(JobCancelled):
        m.run(ctx, _inputs(), Params(**{**FAST, "token_iterations": 50}))
    # stopped inside the first inversion: two of its iterations ran, nothing after it
    assert {e[0] for e in ctx.events} == {"learning A"}
    assert calls.n <= 4


def test_a_prime_as_strokes_on_their_own_layer_is_laid_over_a():
    from analogon.methods.dia import over

    strokes = np.zeros_like(A)
    strokes[8:24, 8:40] = (250, 20, 20, 255)  # only the painted change, transparent elsewhere
    composite = over(_layer(strokes), _layer(A))
    assert np.array_equal(composite.rgba, A2)  # the same pixels as painting on a copy of A
    assert composite.sha != _layer(strokes).sha
    opaque = _layer(A2)
    assert over(opaque, _layer(A)) is opaque
    half = strokes.copy()
    half[..., 3] = np.where(strokes[..., 3] > 0, 128, 0)
    mixed = over(_layer(half), _layer(A)).rgba.astype(int)
    expect = np.round(A2[..., :3] * (128 / 255) + A[..., :3] * (127 / 255))
    assert np.abs(mixed[8:24, 8:40, :3] - expect[8:24, 8:40]).max() <= 1
