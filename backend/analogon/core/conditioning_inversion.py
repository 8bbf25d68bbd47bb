"""Conditioning inversion: the text-encoder output that makes the UNet "explain" an image.

Diffusion Image Analogies (Šubrtová et al., SIGGRAPH 2023), §3.1, eq. (2):

    K* = argmin_K  Σ_views  ‖ ε − ε_θ(z_t(view), t_view, C(K)) ‖²,      c = C(K*)

where K are *input token embeddings* (before position embeddings) and C is the model's CLIP
text encoder. Optimising K rather than c keeps c in the encoder's range ("mimic meaningful word
token sequences"), which is what makes c_A′ − c_A a usable direction.

How it is done here (the authors' released code as reference, ⚠ where we chose differently):

- Template: the token sequence a real N-token prompt has, ``[BOS, t_1 … t_N, EOT, pad …]``,
  with t_1 … t_N trainable and initialised from the end-of-text embedding, so the start is the
  empty prompt ``[BOS, EOT×76]`` exactly (SD 1.x, whose pad token is EOT).
  ⚠ The authors train rows 0…N−1, i.e. the BOS slot too. ``train_bos=True`` does that.
  Default ``False``: row 0 of every real prompt's conditioning is the same vector (the encoder is
  causal, so the BOS output depends on the BOS input only); keeping it fixed keeps c text-like and
  makes row 0 of c_A′ − c_A exactly zero, as it would be between two real prompts.
- SDXL: both encoders get their own N trainable rows; the pooled embedding is the second
  encoder's projected state at the first end-of-text slot after the trainable rows, exactly as
  ``encode_prompt`` pools a real N-token prompt.
- Views: the image, its horizontal flip and random resized crops (area 0.85–0.99, aspect kept,
  random position, resized back): the paper's flip/scale/translate augmentation. Drawn once.
- Each view has a fixed timestep drawn (seeded permutation) from the sampling DDIM's own
  timesteps. ⚠ The authors' ``randperm(batch_size)`` over 10 timesteps never uses the two
  noisiest ones; here views take a permutation of *all* k timesteps (cycled when views > k).
- Fresh noise every iteration; loss = MSE between the UNet output and its target for the
  scheduler's ``prediction_type`` (ε, v or x0); AdamW, lr 0.01; stop early at loss 8e-4.
- The conditioning used afterwards is the encoder *output* (a ``Conditioning``); that is what
  the cache holds (plus the learnt rows for inspection).

Only the trainable rows are optimiser parameters (the authors zero the other rows' gradients
but AdamW's weight decay still shrinks them; here they stay exactly as the template says).
Model weights are frozen for the duration (``frozen``) so no weight gradients are computed.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .diffusion import Conditioning, make_scheduler, vae_encode
from .gradients import LossScaler
from .text_embeddings import encoders, token_embedding, tokenize

ProgressFn = Callable[[int, int], None]


@contextlib.contextmanager
def frozen(*modules):
    """Weights do not require gradients inside the block (restored after)."""
    saved = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            saved.append((p, p.requires_grad))
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def block_checkpointing(unet, on: bool = True):
    """diffusers' own gradient checkpointing of the UNet's blocks inside the block (restored
    after): activations of one block at a time are kept for the backward pass."""
    switch = on and getattr(unet, "_supports_gradient_checkpointing", False) \
        and not getattr(unet, "is_gradient_checkpointing", True)
    if switch:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if switch:
            unet.disable_gradient_checkpointing()


def model_modules(bundle) -> list:
    return [bundle.unet, bundle.vae, bundle.text_encoder, bundle.text_encoder_2]


@dataclass(frozen=True)
class ConditioningInversionSettings:
    """Everything that changes the learnt conditioning (all of it goes into the cache key)."""

    n_tokens: int = 10  # paper and authors' code: N = 10
    train_bos: bool = False  # ⚠ authors: True (rows 0..N-1); see module docstring
    iterations: int = 200
    lr: float = 0.01  # authors: AdamW lr 0.01
    views: int = 8  # authors: batch of 8 (original, flip, 6 crops)
    crop_scale: tuple[float, float] = (0.85, 0.99)  # authors: RandomResizedCrop scale
    steps: int = 10  # the sampling DDIM's steps: the views' timesteps come from it
    stop_loss: float = 8e-4  # authors: sufficient_loss
    seed: int = 0
    # "fresh": new noise every iteration (authors); "fixed": one draw for the whole run, a
    # deterministic objective (used by tests and for reproducing a loss curve exactly)
    noise: str = "fresh"
    # diffusers' block checkpointing of the UNet during the backward pass: memory only
    checkpointing: bool = True

    def key_parts(self) -> dict:
        d = asdict(self)
        d.pop("checkpointing")
        d["crop_scale"] = list(self.crop_scale)
        return d


@dataclass
class TokenTemplate:
    """Per encoder: the full input-embedding sequence and where the trainable rows are."""

    embeds: list[torch.Tensor]  # per encoder (1, L, D_i), fixed rows
    start: int  # first trainable row
    n: int  # number of trainable rows
    eos: int  # the first end-of-text slot after them (the pooled position)

    def splice(self, active: list[torch.Tensor]) -> list[torch.Tensor]:
        """The full sequences with the trainable rows put in (differentiable in ``active``)."""
        out = []
        for full, rows in zip(self.embeds, active):
            rows = rows.to(full.dtype)
            out.append(torch.cat([full[:, : self.start], rows, full[:, self.start + self.n:]], dim=1))
        return out

    def initial_active(self) -> list[torch.Tensor]:
        return [e[:, self.start: self.start + self.n].detach().float().clone() for e in self.embeds]


def token_template(bundle, n_tokens: int, train_bos: bool = False) -> TokenTemplate:
    """The ids of a real ``n_tokens``-token prompt for every encoder, its trainable slots holding
    the end-of-text embedding (``train_bos``: the BOS slot is trainable too, as in the authors'
    code, and the trainable rows start at 0)."""
    encs = encoders(bundle)
    length = encs[0][0].model_max_length
    start = 0 if train_bos else 1
    if n_tokens < 1 or start + n_tokens >= length:
        raise ValueError(f"n_tokens must be from 1 to {length - 1 - start}")
    eos = start + n_tokens
    embeds = []
    for tok, te in encs:
        empty = tokenize(tok, "", bundle.device)[0]  # [BOS, EOT, pad...]: the model's own padding
        bos, eot = int(empty[0]), int(tok.eos_token_id)
        pad = int(empty[-1])
        ids = torch.full((1, length), pad, dtype=torch.long, device=bundle.device)
        ids[0, 0] = bos
        # trainable slots start as EOT (with train_bos, slot 0 starts as BOS), then the real EOT
        ids[0, 1: eos + 1] = eot
        with torch.no_grad():
            embeds.append(token_embedding(te)(ids))
    return TokenTemplate(embeds, start, n_tokens, eos)


def conditioning_from_active(bundle, template: TokenTemplate, active: list[torch.Tensor],
                             image_hw: tuple[int, int]) -> Conditioning:
    from .text_embeddings import conditioning_from_embeds

    return conditioning_from_embeds(bundle, template.splice(active), template.eos, image_hw=image_hw)


# -- views ------------------------------------------------------------------------------------

def augmented_views(image: torch.Tensor, n_views: int, crop_scale: tuple[float, float],
                    generator: torch.Generator) -> torch.Tensor:
    """(V, 3, H, W): the image, its horizontal flip, then random resized crops (area fraction
    drawn from ``crop_scale``, aspect kept, random position) resized back to (H, W)."""
    _, _, h, w = image.shape
    views = [image]
    if n_views >= 2:
        views.append(torch.flip(image, dims=[3]))
    lo, hi = crop_scale
    while len(views) < n_views:
        s = lo + (hi - lo) * float(torch.rand((), generator=generator))
        ch, cw = max(1, round(h * math.sqrt(s))), max(1, round(w * math.sqrt(s)))
        y = int(torch.randint(0, h - ch + 1, (), generator=generator))
        x = int(torch.randint(0, w - cw + 1, (), generator=generator))
        crop = image[:, :, y: y + ch, x: x + cw].float()
        views.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                                   antialias=True).to(image.dtype))
    return torch.cat(views[:n_views])


def view_timesteps(timesteps: torch.Tensor, n_views: int, generator: torch.Generator) -> torch.Tensor:
    """One fixed timestep per view: a seeded permutation of the schedule's timesteps, cycled."""
    perm = torch.randperm(len(timesteps), generator=generator)
    idx = perm[torch.arange(n_views) % len(timesteps)]
    return timesteps.detach().cpu()[idx]


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet should output for ``prediction_type`` (ε, v or x0)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


# -- the optimisation -------------------------------------------------------------------------

@dataclass
class ConditioningInversion:
    cond: Conditioning  # the encoder output (time_ids for the working size on SDXL)
    active: list[torch.Tensor]  # the learnt rows per encoder (1, N, D_i)
    losses: list[float] = field(default_factory=list)  # training loss per iteration (fresh noise)
    eval_before: float = float("nan")  # loss on one held-out noise draw, before ...
    eval_after: float = float("nan")  # ... and after the optimisation
    iterations: int = 0
    unet_calls: int = 0
    seconds: float = 0.0
    cached: bool = False

    def info(self) -> dict:
        return {"iterations": self.iterations, "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "eval_before": self.eval_before, "eval_after": self.eval_after,
                "unet_calls": self.unet_calls, "seconds": round(self.seconds, 3), "cached": self.cached}


def invert_conditioning(bundle, image: torch.Tensor, settings: ConditioningInversionSettings,
                        progress: ProgressFn | None = None) -> ConditioningInversion:
    """Learn the conditioning of ``image`` ((1, 3, H, W) in [-1, 1], at the working size)."""
    t0 = time.perf_counter()
    dev = bundle.device
    hw = (int(image.shape[-2]), int(image.shape[-1]))
    g = torch.Generator("cpu").manual_seed(int(settings.seed))
    sched = make_scheduler(bundle, "ddim", settings.steps)
    template = token_template(bundle, settings.n_tokens, settings.train_bos)
    active = [a.requires_grad_(True) for a in template.initial_active()]
    unet_dtype = bundle.unet.dtype
    calls = 0

    with frozen(*model_modules(bundle)), block_checkpointing(bundle.unet, settings.checkpointing):
        views = augmented_views(image.float().cpu(), settings.views, settings.crop_scale, g)
        latents = torch.cat([vae_encode(bundle, v[None]) for v in views]).float()
        ts = view_timesteps(sched.timesteps, settings.views, g)
        ts_dev = ts.to(dev)
        held_noise = torch.randn(latents.shape, generator=g).to(dev)

        def loss_for(noise: torch.Tensor, rows) -> torch.Tensor:
            nonlocal calls
            cond = conditioning_from_active(bundle, template, rows, hw).repeat(latents.shape[0])
            noisy = sched.add_noise(latents, noise, ts)
            target = diffusion_target(sched, latents, noise, ts)
            calls += 1
            pred = bundle.unet(noisy.to(dev, unet_dtype), ts_dev, **cond.unet_kwargs()).sample
            return F.mse_loss(pred.float(), target.to(dev).float())

        latents = latents.to(dev)
        with torch.no_grad():
            eval_before = float(loss_for(held_noise, active))
        opt = torch.optim.AdamW(active, lr=settings.lr)
        scaler = LossScaler.for_bundle(bundle)
        losses: list[float] = []
        it = 0
        for it in range(settings.iterations):
            if progress is not None:
                progress(it, settings.iterations)
            if settings.noise == "fixed":
                noise = held_noise
            else:
                noise = torch.randn(latents.shape, generator=g).to(dev)
            loss = loss_for(noise, active)
            losses.append(float(loss.detach()))
            if losses[-1] < settings.stop_loss:
                break
            opt.zero_grad(set_to_none=True)
            if scaler.backward(loss, active):  # False: an fp16 overflow, skipped (scale halved)
                opt.step()
        else:
            it = settings.iterations
        if progress is not None:
            progress(settings.iterations, settings.iterations)
        with torch.no_grad():
            final = [a.detach() for a in active]
            eval_after = float(loss_for(held_noise, final))
            cond = conditioning_from_active(bundle, template, final, hw)
    return ConditioningInversion(
        cond=cond, active=[a.clone() for a in final], losses=losses, eval_before=eval_before,
        eval_after=eval_after, iterations=it, unet_calls=calls,
        seconds=time.perf_counter() - t0,
    )


# -- caching ----------------------------------------------------------------------------------

CACHE_NAMESPACE = "conditioning-inversion/v1"


def cache_key(cache, bundle, image_sha: str, size: tuple[int, int],
              settings: ConditioningInversionSettings) -> str:
    return cache.key(CACHE_NAMESPACE, bundle.key, image=image_sha, size=list(size),
                     dtype=str(bundle.unet.dtype), **settings.key_parts())


def cached_conditioning(cache, bundle, image_sha: str, image: torch.Tensor,
                        settings: ConditioningInversionSettings,
                        progress: ProgressFn | None = None) -> ConditioningInversion:
    """``invert_conditioning`` through the cache: keyed by image hash, working size, model and
    every setting. A hit runs no UNet at all."""
    from .diffusion import time_ids

    size = (int(image.shape[-1]), int(image.shape[-2]))
    key = cache_key(cache, bundle, image_sha, size, settings) if cache is not None else None
    entry = cache.get_entry(key) if key is not None else None
    if entry is not None:
        tensors, meta = entry
        try:
            dt, dev = bundle.unet.dtype, bundle.device
            hidden = tensors["hidden"].to(dev, dt)
            pooled = tensors["pooled"].to(dev, dt) if "pooled" in tensors else None
            ids = None
            if pooled is not None:
                ids = time_ids(bundle, (size[1], size[0]), dev, dt)
            active = [tensors[f"active_{i}"] for i in range(len(encoders(bundle)))]
            return ConditioningInversion(
                cond=Conditioning(hidden, pooled, ids), active=active,
                losses=list(meta.get("losses", [])), eval_before=meta.get("eval_before", float("nan")),
                eval_after=meta.get("eval_after", float("nan")), iterations=meta.get("iterations", 0),
                unet_calls=0, seconds=0.0, cached=True)
        except KeyError:
            pass  # an entry from another layout: recompute
    result = invert_conditioning(bundle, image, settings, progress)
    if key is not None:
        tensors = {"hidden": result.cond.hidden}
        if result.cond.pooled is not None:
            tensors["pooled"] = result.cond.pooled
        for i, a in enumerate(result.active):
            tensors[f"active_{i}"] = a
        cache.put(key, tensors, {"losses": result.losses, "eval_before": result.eval_before,
                                 "eval_after": result.eval_after, "iterations": result.iterations,
                                 "seconds": result.seconds, "unet_calls": result.unet_calls})
    return result
