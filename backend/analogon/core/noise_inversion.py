"""Initial-noise inversion: the x_T from which a short deterministic DDIM redraws an image.

Diffusion Image Analogies (Šubrtová et al., SIGGRAPH 2023), §3.2, eq. (3):

    n_B = argmin_n  ‖ U(n, c_B) − z_B ‖²  (+ ‖ D(U(n, c_B)) − B ‖² in pixels)

U is the whole k-step DDIM (η = 0, no classifier-free guidance) under the image's own learnt
conditioning c_B, made differentiable end to end; D is the VAE decoder. The authors solve it with
L-BFGS (lr 0.1, 10 outer iterations of up to 20 closure evaluations, each closure a 10-step DDIM
forward and backward: up to ~2,100 UNet forward+backward passes, ~9 min on an A100).

What is here:
- ``ddim_path``: the k-step DDIM on diffusers' own ``DDIMScheduler.step`` (stateless, so safe
  under recomputation), latents in float32, the UNet in its own dtype, optionally under
  ``torch.utils.checkpoint`` per UNet call (activations of one call at a time instead of k).
  The sampler of the analogy uses the same function, so the reconstruction and a λ = 0 sample
  are the same computation.
- ``invert_noise``: L-BFGS over x_T with the latent MSE plus a weighted pixel MSE after
  decoding (the decoder checkpointed too). The best x_T seen is kept (L-BFGS without line
  search may end on a worse point than one it visited). After the optimisation one plain
  pass records the reconstruction and the trajectory (the latent before each step), which the
  analogy's edit map uses as its "source".
- Start point: ``init="noised"`` is the authors' (B's latent noised to the first DDIM timestep
  with fresh noise); ``init="ddim_inversion"`` (default) runs diffusers' ``DDIMInverseScheduler``
  under c_B first (k UNet forwards, no gradients): a start that already nearly reconstructs B,
  so L-BFGS needs far fewer closures (measured in docs/benchmarks-dia.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .conditioning_inversion import frozen, model_modules
from .diffusion import Conditioning, make_scheduler, noised, vae_decode
from .gradients import LossScaler

MAX_SCALE_RETRIES = 24  # an fp16 overflow halves the loss scale: 2^16 reaches 1 in 16 halvings

NoiseInit = Literal["ddim_inversion", "noised"]
NOISE_INITS = ("ddim_inversion", "noised")


@dataclass(frozen=True)
class NoiseInversionSettings:
    """Everything that changes the inverted noise (all but ``checkpointing`` go into the key)."""

    steps: int = 10  # the DDIM the noise is inverted for (paper: 10)
    iterations: int = 3  # L-BFGS outer iterations (authors: 10)
    evaluations: int = 10  # L-BFGS max_iter per outer iteration (authors: torch's default 20)
    lr: float = 0.1  # authors: 0.1
    latent_weight: float = 1.0  # authors: 1
    pixel_weight: float = 1.0  # authors: 1
    init: NoiseInit = "ddim_inversion"  # authors: "noised"
    stop_loss: float = 8e-4  # authors: sufficient_loss
    seed: int = 0
    checkpointing: bool = True  # memory only: does not change the result

    def key_parts(self) -> dict:
        d = asdict(self)
        d.pop("checkpointing")
        return d

    @property
    def max_closures(self) -> int:
        # torch.optim.LBFGS: max_eval defaults to max_iter * 5 // 4
        return self.iterations * max(1, self.evaluations * 5 // 4)


class Counter:
    """UNet forward calls (recomputations under checkpointing included) and backward passes."""

    def __init__(self):
        self.forward = 0
        self.backward = 0


def unet_eps(bundle, scheduler, x: torch.Tensor, t, cond: Conditioning,
             counter: Counter | None = None) -> torch.Tensor:
    """The UNet's output for float32 latents ``x`` at ``t`` under ``cond`` (no guidance), float32."""
    if counter is not None:
        counter.forward += 1
    xin = scheduler.scale_model_input(x, t).to(bundle.unet.dtype)
    c = cond if cond.batch == x.shape[0] else cond.repeat(x.shape[0] // cond.batch)
    return bundle.unet(xin, t, **c.unet_kwargs()).sample.float()


def ddim_path(bundle, scheduler, x_T: torch.Tensor, timesteps, cond: Conditioning, *,
              grad: bool = False, checkpointing: bool = True, counter: Counter | None = None,
              keep_trajectory: bool = False, on_step: Callable[[int], None] | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run DDIM (η = 0, no guidance) from ``x_T`` over ``timesteps``. Returns (x_0, trajectory)
    where trajectory[i] is the latent before step i (only with ``keep_trajectory``)."""
    x = x_T.float()
    traj: list[torch.Tensor] = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for i, t in enumerate(timesteps):
            if keep_trajectory:
                traj.append(x.detach().clone())
            if grad and checkpointing:
                eps = checkpoint(lambda z, t=t: unet_eps(bundle, scheduler, z, t, cond, counter), x,
                                 use_reentrant=False)
            else:
                eps = unet_eps(bundle, scheduler, x, t, cond, counter)
            if grad and counter is not None:
                counter.backward += 1
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            if on_step is not None:
                on_step(i + 1)
    return x, traj


def ddim_inversion(bundle, z0: torch.Tensor, cond: Conditioning, steps: int,
                   counter: Counter | None = None, on_step=None) -> torch.Tensor:
    """Deterministic DDIM inversion of a clean latent to the first sampling timestep, with
    diffusers' ``DDIMInverseScheduler`` configured from the model's scheduler."""
    from diffusers import DDIMInverseScheduler

    inv = DDIMInverseScheduler.from_config(bundle.scheduler.config)
    inv.set_timesteps(steps, device=bundle.device)
    x = z0.float()
    with torch.no_grad():
        for i, t in enumerate(inv.timesteps):
            eps = unet_eps(bundle, inv, x, t, cond, counter)
            x = inv.step(eps, t, x).prev_sample
            if on_step is not None:
                on_step(i + 1)
    return x


@dataclass
class NoiseInversion:
    noise: torch.Tensor  # (1, 4, h, w) float32: x_T
    reconstruction: torch.Tensor  # (1, 4, h, w): DDIM(x_T, c_B)
    trajectory: torch.Tensor  # (k, 4, h, w): latent before each of the k steps
    losses: list[float] = field(default_factory=list)  # per closure evaluation
    loss_init: float = float("nan")  # at the start point
    loss_final: float = float("nan")  # at the returned x_T
    closures: int = 0
    unet_forward: int = 0
    unet_backward: int = 0
    seconds: float = 0.0
    cached: bool = False

    def info(self) -> dict:
        return {"loss_init": self.loss_init, "loss_final": self.loss_final, "closures": self.closures,
                "unet_forward": self.unet_forward, "unet_backward": self.unet_backward,
                "seconds": round(self.seconds, 3), "cached": self.cached}


def reconstruction_loss(bundle, x0: torch.Tensor, z_target: torch.Tensor, image: torch.Tensor | None,
                        settings: NoiseInversionSettings, grad: bool = False) -> torch.Tensor:
    loss = settings.latent_weight * F.mse_loss(x0, z_target.float())
    if settings.pixel_weight and image is not None:
        if grad and settings.checkpointing:
            pix = checkpoint(lambda z: vae_decode(bundle, z, grad=True), x0, use_reentrant=False)
        else:
            pix = vae_decode(bundle, x0, grad=grad)
        loss = loss + settings.pixel_weight * F.mse_loss(pix, image.to(pix.device, pix.dtype))
    return loss


def invert_noise(bundle, z_target: torch.Tensor, image: torch.Tensor | None, cond: Conditioning,
                 settings: NoiseInversionSettings,
                 progress: Callable[[int, int], None] | None = None,
                 tick: Callable[[], None] | None = None) -> NoiseInversion:
    """Find x_T with DDIM(x_T, cond) ≈ z_target (and its decoding ≈ image, (1, 3, H, W) in [-1, 1]).

    ``progress(closures_done, max_closures)`` is called per closure, ``tick()`` per UNet step
    (both may raise to cancel)."""
    t0 = time.perf_counter()
    sched = make_scheduler(bundle, "ddim", settings.steps)
    timesteps = sched.timesteps
    counter = Counter()
    z_target = z_target.float()
    on_step = (lambda i: tick()) if tick is not None else None
    with frozen(*model_modules(bundle)):
        if settings.init == "ddim_inversion":
            x_init = ddim_inversion(bundle, z_target, cond, settings.steps, counter, on_step)
        elif settings.init == "noised":
            g = torch.Generator("cpu").manual_seed(int(settings.seed))
            n = torch.randn(z_target.shape, generator=g).to(z_target.device)
            x_init = noised(sched, z_target, n, timesteps[0]).float()
        else:
            raise ValueError(f"unknown noise init {settings.init!r}; one of {NOISE_INITS}")

        x = x_init.detach().clone().requires_grad_(True)
        losses: list[float] = []
        best = {"loss": math.inf, "x": x_init.detach().clone()}
        scaler = LossScaler.for_bundle(bundle)
        total = settings.max_closures

        def closure():
            if progress is not None:
                progress(len(losses), total)
            for _ in range(MAX_SCALE_RETRIES):  # fp16: again with a smaller loss scale on overflow
                x0, _ = ddim_path(bundle, sched, x, timesteps, cond, grad=True,
                                  checkpointing=settings.checkpointing, counter=counter, on_step=on_step)
                loss = reconstruction_loss(bundle, x0, z_target, image, settings, grad=True)
                grads = scaler.grads(loss, [x])
                if grads is not None:
                    break
            x.grad = grads[0] if grads is not None else torch.full_like(x, math.nan)
            v = float(loss.detach())
            losses.append(v)
            if v < best["loss"]:
                best["loss"], best["x"] = v, x.detach().clone()
            return loss.detach()

        if settings.iterations > 0:
            opt = torch.optim.LBFGS([x], lr=settings.lr, max_iter=settings.evaluations)
            for _ in range(settings.iterations):
                opt.step(closure)
                if best["loss"] < settings.stop_loss or not math.isfinite(losses[-1]):
                    break
        noise = best["x"]
        x0, traj = ddim_path(bundle, sched, noise, timesteps, cond, counter=counter,
                             keep_trajectory=True, on_step=on_step)
        with torch.no_grad():
            loss_final = float(reconstruction_loss(bundle, x0, z_target, image, settings))
            if losses:
                loss_init = losses[0]
            else:
                x0i, _ = ddim_path(bundle, sched, x_init, timesteps, cond, counter=counter)
                loss_init = float(reconstruction_loss(bundle, x0i, z_target, image, settings))
    if progress is not None:
        progress(total, total)
    return NoiseInversion(
        noise=noise, reconstruction=x0, trajectory=torch.cat(traj), losses=losses,
        loss_init=loss_init, loss_final=loss_final, closures=len(losses),
        unet_forward=counter.forward, unet_backward=counter.backward,
        seconds=time.perf_counter() - t0,
    )


# -- caching ----------------------------------------------------------------------------------

CACHE_NAMESPACE = "noise-inversion/v1"


def cache_key(cache, bundle, image_sha: str, size: tuple[int, int], cond_key: str,
              settings: NoiseInversionSettings) -> str:
    """``cond_key`` identifies the conditioning the noise was inverted under (its own cache key)."""
    return cache.key(CACHE_NAMESPACE, bundle.key, image=image_sha, size=list(size), cond=cond_key,
                     dtype=str(bundle.unet.dtype), **settings.key_parts())


def cached_noise(cache, bundle, image_sha: str, z_target, image: torch.Tensor,
                 cond: Conditioning, cond_key: str, settings: NoiseInversionSettings,
                 progress=None, tick=None) -> NoiseInversion:
    """B's noise from the cache, or inverted and cached. ``z_target`` is B's latent or a function
    that makes it (then a cache hit costs no VAE encode)."""
    size = (int(image.shape[-1]), int(image.shape[-2]))
    key = cache_key(cache, bundle, image_sha, size, cond_key, settings) if cache is not None else None
    entry = cache.get_entry(key) if key is not None else None
    if entry is not None:
        tensors, meta = entry
        try:
            dev = bundle.device
            return NoiseInversion(
                noise=tensors["noise"].to(dev), reconstruction=tensors["reconstruction"].to(dev),
                trajectory=tensors["trajectory"].to(dev), losses=list(meta.get("losses", [])),
                loss_init=meta.get("loss_init", float("nan")),
                loss_final=meta.get("loss_final", float("nan")),
                closures=meta.get("closures", 0), cached=True)
        except KeyError:
            pass
    if callable(z_target):
        z_target = z_target()
    result = invert_noise(bundle, z_target, image, cond, settings, progress, tick)
    if key is not None:
        cache.put(key, {"noise": result.noise, "reconstruction": result.reconstruction,
                        "trajectory": result.trajectory},
                  {"losses": result.losses, "loss_init": result.loss_init,
                   "loss_final": result.loss_final, "closures": result.closures,
                   "seconds": result.seconds, "unet_forward": result.unet_forward,
                   "unet_backward": result.unet_backward})
    return result
