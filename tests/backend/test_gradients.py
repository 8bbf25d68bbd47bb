"""Gradients through half-precision models (core.gradients): the inversions' and the DIFF
training's gradients in fp16 match fp32 (cosine ≥ 0.99, norm within 5 %) on a latent shaped
like SD 1.5's at 512² (64×64), on CPU; without the loss scaling they do not keep their norm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from analogon.core.conditioning_inversion import (
    conditioning_from_active, diffusion_target, frozen, model_modules, token_template,
)
from analogon.core.diffusion import encode_prompt, make_scheduler, vae_encode
from analogon.core.gradients import LossScaler
from analogon.core.noise_inversion import NoiseInversionSettings, ddim_path, reconstruction_loss
from analogon.models import LoadOptions, load_bundle

SIZE = 512  # a 64×64 latent, as SD 1.5 at 512²


@pytest.fixture(scope="module")
def bundles():
    return {dt: load_bundle("tiny-sd", LoadOptions(device="cpu", dtype=dt)) for dt in ("float32", "float16")}


def _image(seed=0, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g) * 2 - 1


def token_gradient(bundle, scaler: LossScaler | None):
    """d(the conditioning inversion's loss)/d(its token rows), one view, one timestep."""
    g = torch.Generator().manual_seed(1)
    template = token_template(bundle, 4)
    rows = []
    for a in template.initial_active():
        rows.append((a + 0.05 * torch.randn(a.shape, generator=g)).requires_grad_(True))
    sched = make_scheduler(bundle, "ddim", 10)
    with frozen(*model_modules(bundle)):
        latents = vae_encode(bundle, _image().to(bundle.vae.dtype)).float()
        noise = torch.randn(latents.shape, generator=g)
        t = sched.timesteps[[3]]
        cond = conditioning_from_active(bundle, template, rows, (SIZE, SIZE))
        pred = bundle.unet(sched.add_noise(latents, noise, t).to(bundle.unet.dtype), t, **cond.unet_kwargs()).sample
        loss = F.mse_loss(pred.float(), diffusion_target(sched, latents, noise, t).float())
        grads = scaler.grads(loss, rows) if scaler else torch.autograd.grad(loss, rows)
    return torch.cat([x.flatten() for x in grads]).double()


def noise_gradient(bundle, scaler: LossScaler | None):
    """d(the noise inversion's reconstruction loss)/d(x_T) through two DDIM steps and the VAE
    decoder (at 256²: the decoder's fp16 backward pass is slow on CPU)."""
    settings = NoiseInversionSettings(steps=2)
    sched = make_scheduler(bundle, "ddim", settings.steps)
    g = torch.Generator().manual_seed(2)
    image = _image(3, 256)
    with frozen(*model_modules(bundle)):
        z_target = vae_encode(bundle, image.to(bundle.vae.dtype)).float()
        cond, _ = encode_prompt(bundle, "a red circle")
        x = torch.randn(z_target.shape, generator=g).requires_grad_(True)
        x0, _ = ddim_path(bundle, sched, x, sched.timesteps, cond, grad=True)
        loss = reconstruction_loss(bundle, x0, z_target, image, settings, grad=True)
        grads = scaler.grads(loss, [x]) if scaler else torch.autograd.grad(loss, [x])
    return grads[0].flatten().double()


@pytest.mark.parametrize("gradient", [token_gradient, noise_gradient])
def test_fp16_gradients_match_fp32(bundles, gradient):
    ref = gradient(bundles["float32"], LossScaler.for_bundle(bundles["float32"]))
    half = gradient(bundles["float16"], LossScaler.for_bundle(bundles["float16"]))
    assert torch.isfinite(half).all()
    assert float(F.cosine_similarity(half, ref, dim=0)) >= 0.99
    assert abs(float(half.norm() / ref.norm()) - 1) < 0.05


def test_without_loss_scaling_fp16_loses_the_gradient():
    """What the scaling is for, on the trained toy model (the tiny model's random weights keep
    their gradients large): plain fp16 loses part of the token gradient's norm to underflow
    (about a fifth with emulated fp16 kernels, a tenth on CPUs with native fp16 arithmetic,
    AVX512-FP16); scaled, it keeps it, many times closer than plain."""
    toy = {dt: load_bundle("toy-sd-64", LoadOptions(device="cpu", dtype=dt)) for dt in ("float32", "float16")}
    ref = token_gradient(toy["float32"], None)
    plain = token_gradient(toy["float16"], None)
    scaled = token_gradient(toy["float16"], LossScaler.for_bundle(toy["float16"]))
    lost = 1 - float(plain.norm() / ref.norm())
    off = abs(float(scaled.norm() / ref.norm()) - 1)
    assert lost > 0.05 and off < 0.05 and off < lost / 5


def test_scaler_skips_an_overflow_and_halves_then_grows():
    x = torch.ones(3, requires_grad=True)
    s = LossScaler(torch.float16, init_scale=2.0 ** 16, growth_interval=2)
    big = (x.half() * 20000).sum()  # finite (60000), but × 2^16 overflows fp16 in the backward pass
    assert s.grads(big, [x]) is None and s.scale == 2.0 ** 15 and s.overflows == 1
    small = (x.half() * 0.5).sum()
    g = s.grads(small, [x])
    assert g is not None and torch.equal(g[0], torch.full((3,), 0.5))
    s.grads((x.half() * 0.5).sum(), [x])
    assert s.scale == 2.0 ** 16  # two clean steps: doubled


def test_scaler_is_plain_autograd_outside_fp16():
    x = torch.ones(2, requires_grad=True)
    for dt in (torch.float32, torch.bfloat16):
        s = LossScaler(dt)
        assert not s.active and s.scale == 1.0 and s.info() == {}
        (g,) = s.grads((x * 3).sum(), [x])
        assert torch.equal(g, torch.full((2,), 3.0))
    s = LossScaler(torch.float16, init_scale=2.0 ** 10)
    assert s.backward((x.half() * 2).sum(), [x]) and torch.equal(x.grad, torch.full((2,), 2.0))
