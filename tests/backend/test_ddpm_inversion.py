"""Edit-friendly DDPM inversion: exact reconstruction by construction, on tiny models."""
from __future__ import annotations

import pytest
import torch

from analogon.core.ddpm_inversion import Inversion, invert, reconstruct, sigma
from analogon.core.diffusion import encode_prompt, make_scheduler


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine's 2 cores are shared: oversubscribed BLAS threads are 20x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _latent(seed=0, hw=(8, 8)):
    return torch.randn((1, 4) + hw, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance,start", [(3.5, 0), (1.0, 3)])
def test_round_trip_is_exact(tiny_sd, guidance, start):
    sched = make_scheduler(tiny_sd, "ddim", 8)
    cond, uncond = encode_prompt(tiny_sd, "A photo of a cat")
    x0 = _latent()
    inv = invert(tiny_sd, sched, x0, cond, uncond, guidance, start=start,
                 generator=torch.Generator().manual_seed(1))
    assert inv.xs.shape[0] == 8 - start + 1 and inv.zs.shape[0] == 8 - start
    # the recorded trajectory ends at the encoded latent (float error of mu + sigma * (x - mu)/sigma)
    assert (inv.xs[-1] - x0[0]).abs().max() < 1e-5
    rec = reconstruct(tiny_sd, sched, inv, cond, uncond, guidance)
    assert (rec - x0).abs().max() < 1e-5
    # and the sampler reproduces the recorded trajectory itself, bit for bit
    assert torch.equal(rec, inv.x(inv.steps))


def test_noise_maps_matter(tiny_sd):
    """The reconstruction depends on the stored z_t: other noise gives another image (the test
    above can fail)."""
    sched = make_scheduler(tiny_sd, "ddim", 6)
    cond, uncond = encode_prompt(tiny_sd, "A photo of a cat")
    x0 = _latent(2)
    inv = invert(tiny_sd, sched, x0, cond, uncond, 1.0, generator=torch.Generator().manual_seed(1))
    other = Inversion(inv.timesteps, inv.start, inv.xs, torch.randn_like(inv.zs))
    rec = reconstruct(tiny_sd, sched, other, cond, uncond, 1.0)
    assert (rec - x0).abs().max() > 1e-2


def test_seed_changes_noise_not_result(tiny_sd):
    sched = make_scheduler(tiny_sd, "ddim", 5)
    cond, uncond = encode_prompt(tiny_sd, "")
    x0 = _latent(3)
    a = invert(tiny_sd, sched, x0, cond, None, 1.0, generator=torch.Generator().manual_seed(1))
    b = invert(tiny_sd, sched, x0, cond, None, 1.0, generator=torch.Generator().manual_seed(1))
    c = invert(tiny_sd, sched, x0, cond, None, 1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.zs, b.zs) and not torch.allclose(a.zs, c.zs)
    for inv in (a, c):
        assert (reconstruct(tiny_sd, sched, inv, cond, None, 1.0) - x0).abs().max() < 1e-5


def test_v_prediction_round_trip(tiny_sd):
    sched = make_scheduler(tiny_sd, "ddim", 6, prediction_type="v_prediction")
    cond, uncond = encode_prompt(tiny_sd, "a dog")
    x0 = _latent(4, (8, 6))
    inv = invert(tiny_sd, sched, x0, cond, uncond, 2.0, start=1,
                 generator=torch.Generator().manual_seed(0))
    assert (reconstruct(tiny_sd, sched, inv, cond, uncond, 2.0) - x0).abs().max() < 1e-5


def test_round_trip_sdxl_and_serialisation(tiny_sdxl):
    sched = make_scheduler(tiny_sdxl, "ddim", 5)
    cond, uncond = encode_prompt(tiny_sdxl, "A photo of a car", image_hw=(48, 64))
    x0 = _latent(5, (6, 8))
    inv = invert(tiny_sdxl, sched, x0, cond, uncond, 3.5, start=2,
                 generator=torch.Generator().manual_seed(0))
    back = Inversion.from_tensors(inv.to_tensors())
    assert back.start == 2 and torch.equal(back.zs, inv.zs)
    assert (reconstruct(tiny_sdxl, sched, back, cond, uncond, 3.5) - x0).abs().max() < 1e-5


def test_sigma_matches_the_scheduler(tiny_sd):
    """sigma() is the std of the noise DDIMScheduler.step adds with eta=1."""
    sched = make_scheduler(tiny_sd, "ddim", 10)
    t = sched.timesteps[3]
    x, eps = _latent(6), _latent(7)
    zero = sched.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    one = sched.step(eps, t, x, eta=1.0, variance_noise=torch.ones_like(x)).prev_sample
    assert torch.allclose(one - zero, torch.full_like(x, sigma(sched, t)), atol=1e-6)


def test_bad_start_is_refused(tiny_sd):
    sched = make_scheduler(tiny_sd, "ddim", 4)
    cond, _ = encode_prompt(tiny_sd, "")
    with pytest.raises(ValueError):
        invert(tiny_sd, sched, _latent(), cond, start=4)


def test_the_shared_sampler_takes_the_noise_maps(tiny_sd):
    """``core.diffusion.sample`` with an inversion's noise maps is its reconstruction (guided);
    a scheduler without noise maps is refused."""
    from analogon.core.diffusion import sample

    sched = make_scheduler(tiny_sd, "ddim", 6)
    cond, uncond = encode_prompt(tiny_sd, "A photo of a cat")
    x0 = _latent(2)
    inv = invert(tiny_sd, sched, x0, cond, uncond, 3.0, start=2,
                 generator=torch.Generator().manual_seed(4))
    out = sample(tiny_sd, sched, inv.x(2), sched.timesteps[2:], cond, uncond, 3.0, eta=1.0,
                 noise_maps=lambda i: inv.z(2 + i), generator=torch.Generator().manual_seed(9))
    assert (out - x0).abs().max() < 1e-4
    # without them the same call draws its own noise and does not come back
    free = sample(tiny_sd, sched, inv.x(2), sched.timesteps[2:], cond, uncond, 3.0, eta=1.0,
                  generator=torch.Generator().manual_seed(9))
    assert (free - x0).abs().max() > 1e-2
    with pytest.raises(ValueError, match="noise maps"):
        sample(tiny_sd, make_scheduler(tiny_sd, "euler", 6), inv.x(2), sched.timesteps[2:], cond,
               noise_maps=lambda i: inv.z(2 + i))
