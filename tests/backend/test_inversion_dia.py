"""The two inversions of Diffusion Image Analogies (core.conditioning_inversion, core.noise_inversion)
on the tiny models: templates, views, loss decrease, the sampler identity, caching."""
from __future__ import annotations

import pytest
import torch

from analogon.core import conditioning_inversion as CI
from analogon.core import noise_inversion as NI
from analogon.core.cache import Cache
from analogon.core.diffusion import encode_prompt, make_scheduler, vae_encode
from analogon.core.text_embeddings import prompt_tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are latency-bound: one intra-op thread is several times faster on a shared
    2-core machine (no spinning OpenMP workers). Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class UnetCalls:
    """Counts UNet forward calls with a hook (checkpoint recomputations count too)."""

    def __init__(self, unet):
        self.n = 0
        self._h = unet.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def close(self):
        self._h.remove()


def _image(h=64, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    # some structure, so crops and flips differ visibly
    x[:, 0, : h // 2] = 0.8
    return x


FAST_C = CI.ConditioningInversionSettings(iterations=3, lr=0.05, views=2, steps=2)
FIXED_C = CI.ConditioningInversionSettings(iterations=3, lr=0.02, views=2, steps=2, noise="fixed")
FAST_N = NI.NoiseInversionSettings(steps=2, iterations=1, evaluations=3)


def test_template_starts_from_the_empty_prompt(tiny_sd):
    tpl = CI.token_template(tiny_sd, n_tokens=10, train_bos=False)
    empty = prompt_tokens(tiny_sd, "")
    # SD 1.x pads with end-of-text: the template is [BOS, EOT×76], the empty prompt exactly
    assert torch.equal(tpl.embeds[0], empty.embeds[0])
    assert (tpl.start, tpl.n, tpl.eos) == (1, 10, 11)
    cond = CI.conditioning_from_active(tiny_sd, tpl, tpl.initial_active(), (64, 64))
    ref, _ = encode_prompt(tiny_sd, "")
    torch.testing.assert_close(cond.hidden, ref.hidden, rtol=0, atol=1e-6)

    bos = CI.token_template(tiny_sd, n_tokens=10, train_bos=True)
    assert (bos.start, bos.n, bos.eos) == (0, 10, 10)
    # with train_bos the first trainable row starts as the BOS embedding (the authors' rows 0..9)
    assert torch.equal(bos.initial_active()[0][0, 0], empty.embeds[0][0, 0])


def test_template_sdxl_has_both_encoders_and_pools_after_the_tokens(tiny_sdxl):
    tpl = CI.token_template(tiny_sdxl, n_tokens=4)
    assert len(tpl.embeds) == 2 and tpl.eos == 5
    cond = CI.conditioning_from_active(tiny_sdxl, tpl, tpl.initial_active(), (64, 96))
    assert cond.pooled is not None and cond.time_ids is not None
    assert cond.time_ids[0].tolist() == [64, 96, 0, 0, 64, 96]
    with pytest.raises(ValueError):
        CI.token_template(tiny_sdxl, n_tokens=76)


def test_views_and_timesteps():
    g = torch.Generator().manual_seed(0)
    img = _image(48, 80)
    v = CI.augmented_views(img, 6, (0.85, 0.99), g)
    assert v.shape == (6, 3, 48, 80)
    assert torch.equal(v[0], img[0]) and torch.equal(v[1], img[0].flip(-1))
    assert not torch.allclose(v[2], img[0]) and not torch.allclose(v[2], v[3])
    ts = torch.tensor([901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    picked = CI.view_timesteps(ts, 8, g)
    assert len(set(picked.tolist())) == 8 and set(picked.tolist()) <= set(ts.tolist())
    assert len(CI.view_timesteps(ts, 12, g)) == 12  # cycled when views > steps


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sdxl"])
def test_conditioning_inversion_lowers_its_loss_and_keeps_the_bos_row(fixture, request):
    bundle = request.getfixturevalue(fixture)
    img = _image(64, 64)
    calls = UnetCalls(bundle.unet)
    try:
        r = CI.invert_conditioning(bundle, img, FIXED_C)
    finally:
        calls.close()
    # with one noise draw the objective is deterministic: the optimisation lowered it
    assert r.eval_after < r.eval_before
    assert r.losses[-1] < r.losses[0] and r.losses[0] == pytest.approx(r.eval_before, rel=1e-5)
    assert len(r.losses) == r.iterations == FIXED_C.iterations
    assert calls.n == r.unet_calls == FIXED_C.iterations + 2
    ref, _ = encode_prompt(bundle, "")
    if not bundle.is_sdxl:
        # the encoder is causal and BOS is not trained: row 0 is the empty prompt's row 0 exactly
        assert torch.equal(r.cond.hidden[:, 0], ref.hidden[:, 0])
        assert not torch.allclose(r.cond.hidden[:, 1], ref.hidden[:, 1])
    else:
        assert r.cond.pooled.shape == ref.pooled.shape
    # no weight collected a gradient, and the weights require grad again afterwards as before
    assert all(p.grad is None for p in bundle.unet.parameters())


@pytest.fixture(scope="module")
def b_cond(tiny_sd):
    img = _image(64, 64, seed=3)
    return img, CI.invert_conditioning(tiny_sd, img, FAST_C).cond


@pytest.mark.parametrize("init", ["noised", "ddim_inversion"])
def test_noise_inversion_lowers_its_loss_and_reconstructs_from_its_noise(tiny_sd, b_cond, init):
    img, cond = b_cond
    z = vae_encode(tiny_sd, img)
    s = NI.NoiseInversionSettings(steps=2, iterations=1, evaluations=3, init=init)
    r = NI.invert_noise(tiny_sd, z, img, cond, s)
    assert r.loss_final < r.loss_init
    assert r.closures >= 2 and r.unet_backward == 2 * r.closures
    # the stored reconstruction is the sampler's output from the returned noise, exactly
    sched = make_scheduler(tiny_sd, "ddim", 2)
    x0, traj = NI.ddim_path(tiny_sd, sched, r.noise, sched.timesteps, cond, keep_trajectory=True)
    assert torch.equal(x0, r.reconstruction)
    assert torch.equal(torch.cat(traj), r.trajectory) and torch.equal(r.trajectory[0:1], r.noise)


def test_noise_init_from_ddim_inversion_starts_closer(tiny_sd, b_cond):
    img, cond = b_cond
    z = vae_encode(tiny_sd, img)
    losses = {}
    for init in NI.NOISE_INITS:
        s = NI.NoiseInversionSettings(steps=2, iterations=0, init=init)
        losses[init] = NI.invert_noise(tiny_sd, z, img, cond, s).loss_final
    assert losses["ddim_inversion"] < losses["noised"]


def test_checkpointing_changes_memory_not_the_result(tiny_sd, b_cond):
    img, cond = b_cond
    z = vae_encode(tiny_sd, img)
    base = NI.NoiseInversionSettings(steps=2, iterations=1, evaluations=2, init="noised")
    on = NI.invert_noise(tiny_sd, z, img, cond, base)
    off = NI.invert_noise(tiny_sd, z, img, cond,
                          NI.NoiseInversionSettings(**{**base.__dict__, "checkpointing": False}))
    torch.testing.assert_close(on.noise, off.noise, rtol=1e-5, atol=1e-6)
    # recomputation: one extra forward per step and closure
    assert on.unet_forward - off.unet_forward == 2 * on.closures
    assert base.key_parts() == NI.NoiseInversionSettings(
        **{**base.__dict__, "checkpointing": False}).key_parts()


def test_cache_hits_skip_the_unet(tiny_sd, tmp_path):
    cache = Cache(tmp_path / "c")
    img = _image(64, 64, seed=5)
    z = vae_encode(tiny_sd, img)
    calls = UnetCalls(tiny_sd.unet)
    try:
        c1 = CI.cached_conditioning(cache, tiny_sd, "sha-b", img, FAST_C)
        ck = CI.cache_key(cache, tiny_sd, "sha-b", (64, 64), FAST_C)
        n1 = NI.cached_noise(cache, tiny_sd, "sha-b", z, img, c1.cond, ck, FAST_N)
        cold = calls.n
        fresh = Cache(tmp_path / "c")  # from disk this time
        c2 = CI.cached_conditioning(fresh, tiny_sd, "sha-b", img, FAST_C)
        n2 = NI.cached_noise(fresh, tiny_sd, "sha-b", z, img, c2.cond, ck, FAST_N)
        assert calls.n == cold > 0
    finally:
        calls.close()
    assert c2.cached and n2.cached and not c1.cached and not n1.cached
    assert torch.equal(c1.cond.hidden, c2.cond.hidden)
    assert torch.equal(n1.noise, n2.noise) and torch.equal(n1.trajectory, n2.trajectory)
    # another setting that changes the result is another entry
    other = CI.ConditioningInversionSettings(**{**FAST_C.__dict__, "n_tokens": 3})
    assert CI.cache_key(cache, tiny_sd, "sha-b", (64, 64), other) != ck


def test_token_checkpointing_changes_memory_not_the_result(tiny_sd):
    img = _image(64, 64, seed=9)
    on = CI.invert_conditioning(tiny_sd, img, FIXED_C)
    assert not tiny_sd.unet.is_gradient_checkpointing  # switched back off afterwards
    off = CI.invert_conditioning(tiny_sd, img, CI.ConditioningInversionSettings(
        **{**FIXED_C.__dict__, "checkpointing": False}))
    torch.testing.assert_close(on.cond.hidden, off.cond.hidden, rtol=1e-5, atol=1e-5)
    assert CI.cache_key(Cache, tiny_sd, "x", (64, 64), FIXED_C) == CI.cache_key(
        Cache, tiny_sd, "x", (64, 64), CI.ConditioningInversionSettings(
            **{**FIXED_C.__dict__, "checkpointing": False}))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_training_target_matches_the_prediction_type(kind):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=kind, clip_sample=False)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([601])
    x = sched.add_noise(z0, eps, t)
    target = CI.diffusion_target(sched, z0, eps, t)
    # a model that outputs the target exactly lets the sampler recover the clean latent
    out = sched.step(target, 601, x, eta=0.0)
    torch.testing.assert_close(out.pred_original_sample, z0, atol=1e-4, rtol=1e-4)


def test_v_prediction_model_inverts(tiny_sd, b_cond):
    """SD 2.x (768) predicts v: the scheduler config decides, for both inversions and the sampler."""
    from diffusers import DDIMScheduler

    img, cond = b_cond
    saved = tiny_sd.pipe.scheduler
    tiny_sd.pipe.scheduler = DDIMScheduler.from_config(saved.config, prediction_type="v_prediction")
    try:
        z = vae_encode(tiny_sd, img)
        c = CI.invert_conditioning(tiny_sd, img, FIXED_C)
        assert c.eval_after < c.eval_before
        r = NI.invert_noise(tiny_sd, z, img, cond, NI.NoiseInversionSettings(
            steps=2, iterations=1, evaluations=3, pixel_weight=0.0))
        assert r.loss_final < r.loss_init
    finally:
        tiny_sd.pipe.scheduler = saved
