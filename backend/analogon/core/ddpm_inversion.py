"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli, 2023), on diffusers'
``DDIMScheduler`` API.

The DDPM sampler with η = 1 adds fresh noise at every step:

    x_{t-1} = μ_t(x_t, ε_θ(x_t)) + σ_t · z_t            (DDIM eq. 12 with η = 1)

Edit-friendly inversion picks the noise maps z_t so that sampling reproduces a given image:

1. x_0 is the image's latent. Each x_t (t over the schedule) is sampled *independently* as
   √ᾱ_t · x_0 + √(1 − ᾱ_t) · n_t with its own Gaussian n_t (Algorithm 1 of the paper) — this makes
   the z_t statistically "strong" and edits stay close to the image.
2. For every step, from the noisiest on: ε = ε_θ(x_t) (optionally classifier-free guided),
   μ = ``scheduler.step(ε, t, x_t, eta=1, variance_noise=0)``, z_t = (x_{t-1} − μ)/σ_t.
3. The stored trajectory is then *replaced* by what the sampler itself computes from z_t:
   x_{t-1} := ``scheduler.step(ε, t, x_t, eta=1, variance_noise=z_t).prev_sample``, and the next
   step's ε is computed at that value.

Because of step 3 the trajectory is exactly the one the sampler produces when it is run from the
first stored latent with the same conditioning and the stored z_t: reconstruction is exact by
construction (bit for bit when the UNet call is deterministic, and to float error otherwise).
Only when σ_t = 0 (a schedule with ``set_alpha_to_one=True`` at its last step) is z_t set to 0
and the last latent is the sampler's own estimate rather than the encoded image.

Steps before ``start`` (the steps a generation skips) are not inverted at all: their UNet calls
would be wasted. ``prediction_type`` (ε or v) is the scheduler's business: μ comes from its step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import diffusion
from .diffusion import Conditioning, noised


@dataclass
class Inversion:
    """The result of an edit-friendly inversion over ``timesteps[start:]``.

    ``xs[k]`` is the latent before step ``start + k`` (``xs[-1]`` is the final, clean latent: the
    reconstruction); ``zs[k]`` is the noise map that step uses."""

    timesteps: torch.Tensor  # (N,) the full schedule
    start: int
    xs: torch.Tensor  # (N - start + 1, C, h, w) float32
    zs: torch.Tensor  # (N - start, C, h, w) float32

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def x(self, i: int) -> torch.Tensor:
        """The latent before absolute step ``i`` (``i == steps`` gives the clean latent), (1, C, h, w)."""
        return self.xs[i - self.start][None]

    def z(self, i: int) -> torch.Tensor:
        return self.zs[i - self.start][None]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"timesteps": self.timesteps.cpu(), "xs": self.xs, "zs": self.zs,
                "start": torch.tensor([self.start])}

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], device=None) -> "Inversion":
        return cls(d["timesteps"].to(device), int(d["start"][0]),
                   d["xs"].to(device=device, dtype=torch.float32),
                   d["zs"].to(device=device, dtype=torch.float32))


def sigma(scheduler, t, eta: float = 1.0) -> float:
    """σ_t(η) of DDIM eq. 16 for the scheduler's step from t (as ``DDIMScheduler.step`` computes it)."""
    t = int(t)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a_t = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return float(eta * var.clamp(min=0) ** 0.5)


def ddpm_step(scheduler, eps: torch.Tensor, t, x: torch.Tensor, z: torch.Tensor | None,
              eta: float = 1.0) -> torch.Tensor:
    """One stochastic DDIM/DDPM step with the given noise map (zeros when ``z`` is None)."""
    if z is None:
        z = torch.zeros_like(x)
    return scheduler.step(eps.to(x.dtype), t, x, eta=eta, variance_noise=z.to(x.dtype)).prev_sample


def invert(bundle, scheduler, x0: torch.Tensor, cond: Conditioning,
           uncond: Conditioning | None = None, guidance: float = 1.0, start: int = 0,
           generator: torch.Generator | None = None, eta: float = 1.0,
           on_step: Callable[[int, int], None] | None = None) -> Inversion:
    """Invert the clean latent ``x0`` (1, C, h, w) over ``scheduler.timesteps[start:]``.

    ``scheduler`` must be a ``DDIMScheduler`` with ``set_timesteps`` done. ``generator`` (CPU)
    draws the independent noises of the x_t. ``on_step(k, total)`` runs after each UNet call (it
    may raise to cancel)."""
    if eta <= 0:
        raise ValueError("edit-friendly inversion needs eta > 0")
    timesteps = scheduler.timesteps
    n = int(timesteps.shape[0])
    if not (0 <= start < n):
        raise ValueError(f"start must be in [0, {n}), got {start}")
    x0 = x0.detach().to(dtype=torch.float32)
    dev = x0.device
    # 1. independent noisy versions of x0 at every timestep that is run
    xs = torch.empty((n - start + 1,) + tuple(x0.shape[1:]), dtype=torch.float32, device=dev)
    for k, t in enumerate(timesteps[start:]):
        noise = torch.randn(tuple(x0.shape), generator=generator, dtype=torch.float32).to(dev)
        xs[k] = noised(scheduler, x0, noise, t)[0]
    xs[-1] = x0[0]
    zs = torch.empty((n - start,) + tuple(x0.shape[1:]), dtype=torch.float32, device=dev)
    total = n - start
    # 2./3. noise maps, from the noisiest step on, re-recording the trajectory as sampled
    for k, t in enumerate(timesteps[start:]):
        x_t = xs[k][None]
        with torch.no_grad():
            eps = diffusion.predict_noise(bundle, x_t.to(bundle.unet.dtype), t, cond, uncond, guidance,
                                scheduler=scheduler).float()
        mu = ddpm_step(scheduler, eps, t, x_t, None, eta)
        s = sigma(scheduler, t, eta)
        z = (xs[k + 1][None] - mu) / s if s > 0 else torch.zeros_like(mu)
        zs[k] = z[0]
        xs[k + 1] = ddpm_step(scheduler, eps, t, x_t, z, eta)[0]
        if on_step is not None:
            on_step(k + 1, total)
    return Inversion(timesteps.detach().clone(), start, xs, zs)


def cached(cache, key: str, make: Callable[[], "Inversion"], meta: dict, device=None
           ) -> tuple[Inversion, bool]:
    """The inversion stored in ``cache`` (``core.cache.Cache``) under ``key``, or ``make()``'s,
    stored there with ``meta``: (inversion, whether it came from the cache)."""
    hit = cache.get(key)
    if hit is not None:
        return Inversion.from_tensors(hit, device=device), True
    inv = make()
    cache.put(key, inv.to_tensors(), meta)
    return inv, False


def reconstruct(bundle, scheduler, inv: Inversion, cond: Conditioning,
                uncond: Conditioning | None = None, guidance: float = 1.0, eta: float = 1.0
                ) -> torch.Tensor:
    """Sample from the inversion's first latent with its noise maps (the round trip)."""
    x = inv.x(inv.start)
    for i in range(inv.start, inv.steps):
        t = inv.timesteps[i]
        with torch.no_grad():
            eps = diffusion.predict_noise(bundle, x.to(bundle.unet.dtype), t, cond, uncond, guidance,
                                scheduler=scheduler).float()
        x = ddpm_step(scheduler, eps, t, x, inv.z(i), eta)
    return x
