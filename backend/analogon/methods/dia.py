"""Diffusion Image Analogies: A : A′ :: B : B′.

Šubrtová, Lukáč, Čech, Futschik, Shechtman, Sýkora. "Diffusion Image Analogies", SIGGRAPH 2023.

The text-encoder output of Stable Diffusion is treated as a vector space (paper §3):

1. Conditioning inversion (§3.1, eq. 2): for each of A, A′ and B, learn N input token
   embeddings whose CLIP text-encoder output c makes the UNet predict the noise of the image
   (augmented views, fixed timesteps, AdamW) — ``core.conditioning_inversion``.
2. Initial-noise inversion of B (§3.2, eq. 3): the x_T = n_B from which the k-step DDIM under
   c_B redraws B, by L-BFGS through the differentiable DDIM — ``core.noise_inversion``.
3. The analogy (eq. 1):  B′ = D(U(n_B, c_B + λ·(c_A′ − c_A)))  with a k-step DDIM (η = 0) and
   classifier-free guidance g against the empty prompt.

The paper's weakness is cost (minutes per inversion); a painter explores λ and g. So both
inversions are cached by image hash, model and every setting that changes them: a second
analogy with the same images runs only step 3, and a *sweep* returns one image per (g, λ)
variant in one job, the variants batched through the UNet.

The edit map grades the analogy across the canvas with the shared ``EditSchedule``: its
"noised source" at step i is B's own DDIM trajectory from n_B under c_B without guidance — the
λ = 0 path the noise was inverted for, which redraws B. Where the map is black the latent
follows that path (and ends on B's latent); where it is white the analogy runs freely; grey
levels leave the reconstruction path later (see docs/methods/dia.md).
"""
from __future__ import annotations

import hashlib
import time
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from ..core import conditioning_inversion as CI
from ..core import noise_inversion as NI
from ..core.diffusion import Conditioning, encode_prompt, make_scheduler, vae_decode, vae_encode
from ..core.editmap import THRESHOLD_KINDS, EditSchedule
from ..core.previews import every, preview_latents
from ..core import images as im
from ..core.compositing import map_to_grid
from ..core.images import (check_not_empty, check_same_size, from_tensor, native_size, size_of,
                           to_tensor)
from ..errors import InputError
from . import register
from .base import (Inputs, JobContext, LayerImage, Method, MethodParams, MethodResult, ResultImage,
                   Role)

LAMBDA_MIN, LAMBDA_MAX = -1.0, 3.0
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 20.0
MAX_VARIANTS = 64

Strength = Annotated[float, Field(ge=LAMBDA_MIN, le=LAMBDA_MAX)]
Guidance = Annotated[float, Field(ge=GUIDANCE_MIN, le=GUIDANCE_MAX)]


class Params(MethodParams):
    analogy_strength: float = Field(
        1.0, ge=LAMBDA_MIN, le=LAMBDA_MAX, title="Analogy strength (λ)",
        description="How much of the change A → A′ is added to B: c_B + λ·(c_A′ − c_A). 0 redraws B "
                    "unchanged, 1 is the plain analogy, above 1 exaggerates it, below 0 reverses it. "
                    "Default 1 (the paper's equation 1; the authors' grid spans 0–1.5).")
    guidance: float = Field(
        3.0, ge=GUIDANCE_MIN, le=GUIDANCE_MAX, title="Guidance (CFG)",
        description="Classifier-free guidance against the empty prompt. 1 = none (redraws B most "
                    "faithfully: the noise is inverted without guidance); higher values push harder "
                    "towards the learnt conditioning and the analogy. Default 3, from the authors' "
                    "grid {1, 2, 3, 5, 7, 9, 12}.")
    steps: int = Field(
        10, ge=2, le=50, title="Steps",
        description="DDIM steps of the sampler. The noise of B is inverted for exactly this sampler "
                    "and the token views use its timesteps, so changing it re-runs both inversions. "
                    "Default 10 (paper and authors).")
    sweep: bool = Field(
        False, title="Sweep",
        description="Return one image per combination of the strengths and guidances below instead "
                    "of one image: after the first run each variant costs one sampling pass.")
    sweep_strengths: list[Strength] = Field(
        [0.0, 0.5, 1.0, 1.5], max_length=32, title="Sweep strengths (λ)",
        description="The λ values of a sweep, in order. Default 0, 0.5, 1, 1.5 (the authors' range "
                    "0–1.5).",
        json_schema_extra={"advanced": True})
    sweep_guidance: list[Guidance] = Field(
        [], max_length=8, title="Sweep guidances",
        description="The guidance values of a sweep; empty = only the Guidance above. Results are "
                    "ordered by guidance, then by strength.",
        json_schema_extra={"advanced": True})
    sweep_batch: int = Field(
        4, ge=1, le=32, title="Variants per batch",
        description="How many sweep variants go through the UNet together (memory vs speed). "
                    "Default 4.",
        json_schema_extra={"advanced": True})
    n_tokens: int = Field(
        10, ge=1, le=74, title="Learnt tokens",
        description="How many input tokens are learnt per image (the rest stay end-of-text). Fewer "
                    "tokens keep only the salient content. Default 10 (paper).",
        json_schema_extra={"advanced": True})
    train_bos: bool = Field(
        False, title="Train the start token",
        description="Also learn the start-of-text slot, as the authors' code does (rows 0–9). "
                    "Default off: every real prompt has the same start token, so keeping it keeps the "
                    "conditioning text-like and the difference A′ − A zero in that row.",
        json_schema_extra={"advanced": True})
    token_iterations: int = Field(
        50, ge=1, le=5000, title="Token iterations",
        description="AdamW iterations of the conditioning inversion (per image, cached). The authors' "
                    "released config runs 10; the paper's ≈8 min per image on an A100 is several "
                    "hundred. Default 50 (5× the authors'): 200 gave the same analogies within "
                    "their intervals (docs/benchmarks-dia.md) at twice the time per job. Stops "
                    "early at loss 8e-4.",
        json_schema_extra={"advanced": True})
    token_lr: float = Field(
        0.01, gt=0.0, le=1.0, title="Token learning rate",
        description="AdamW learning rate of the token embeddings. Default 0.01 (authors).",
        json_schema_extra={"advanced": True})
    views: int = Field(
        8, ge=1, le=16, title="Views",
        description="Augmented views per token iteration: the image, its mirror, then random crops "
                    "of 85–99% of the area. Default 8 (authors).",
        json_schema_extra={"advanced": True})
    noise_iterations: int = Field(
        3, ge=0, le=50, title="Noise iterations",
        description="L-BFGS outer iterations of B's noise inversion (cached). 0 keeps the start "
                    "point. The authors run 10; default 3 (see docs/benchmarks-dia.md).",
        json_schema_extra={"advanced": True})
    noise_evaluations: int = Field(
        10, ge=1, le=50, title="Noise evaluations",
        description="L-BFGS iterations inside each outer iteration; each costs one differentiable "
                    "run of the whole sampler. Authors: 20 (torch's default); default 10: 3 × 10 "
                    "runs of the 10-step sampler = 300 UNet forward+backward passes.",
        json_schema_extra={"advanced": True})
    noise_lr: float = Field(
        0.1, gt=0.0, le=2.0, title="Noise learning rate",
        description="L-BFGS learning rate. Default 0.1 (authors).",
        json_schema_extra={"advanced": True})
    pixel_weight: float = Field(
        1.0, ge=0.0, le=100.0, title="Pixel loss weight",
        description="Weight of the pixel-space reconstruction loss (after decoding) next to the latent "
                    "loss. 0 skips the decoder in the inversion. Default 1 (authors).",
        json_schema_extra={"advanced": True})
    noise_init: Literal["ddim_inversion", "noised"] = Field(
        "ddim_inversion", title="Noise start",
        description="Where the noise optimisation starts: 'ddim_inversion' (deterministic DDIM "
                    "inversion of B, far closer) or 'noised' (B's latent with random noise, as the "
                    "authors). Default ddim_inversion.",
        json_schema_extra={"advanced": True})
    checkpointing: bool = Field(
        True, title="Gradient checkpointing",
        description="Recompute the UNet in the backward passes of both inversions instead of "
                    "storing its activations (per UNet call in the noise inversion, per block in the "
                    "token inversion): far less memory, ≈ one extra forward each. Same result.",
        json_schema_extra={"advanced": True})
    inversion_seed: int = Field(
        0, ge=0, le=2**31 - 1, title="Inversion seed",
        description="Seed of the inversions' random views and noise. The sampler itself is "
                    "deterministic; change this only to re-draw the inversions.",
        json_schema_extra={"advanced": True})
    edit_map_curve: Literal[THRESHOLD_KINDS] = Field(  # type: ignore[valid-type]
        "linear", title="Edit map curve",
        description="How grey levels of the edit map turn into the step at which a pixel leaves B's "
                    "reconstruction path (linear: grey 0.5 follows the analogy for the last half).",
        json_schema_extra={"advanced": True})


def over(top: LayerImage, under: LayerImage) -> LayerImage:
    """A′ painted on a layer of its own (transparent where nothing changes) is A′ composited
    over A; an opaque A′ is itself. The composite gets its own content hash (cache key)."""
    out = im.over(top.rgba, under.rgba)
    if out is top.rgba:
        return top
    h = hashlib.sha256(b"over:" + top.sha.encode() + b":" + under.sha.encode())
    return LayerImage(out, h.hexdigest())


def _variants(p: Params) -> list[tuple[float, float]]:
    """(guidance, λ) per result, ordered by guidance then λ."""
    if not p.sweep:
        return [(p.guidance, p.analogy_strength)]
    gs = list(p.sweep_guidance) or [p.guidance]
    ls = list(p.sweep_strengths) or [p.analogy_strength]
    return [(g, lam) for g in gs for lam in ls]


def label(guidance: float, lam: float) -> str:
    return f"λ={lam:g}, cfg={guidance:g}"


def _check_params(p: Params) -> list[tuple[float, float]]:
    variants = _variants(p)
    for g, lam in variants:
        if not (LAMBDA_MIN <= lam <= LAMBDA_MAX):
            raise InputError("bad_strength", f"The analogy strength λ={lam:g} is out of range: "
                             f"use a value from {LAMBDA_MIN:g} to {LAMBDA_MAX:g}.", {"strength": lam})
        if not (GUIDANCE_MIN <= g <= GUIDANCE_MAX):
            raise InputError("bad_guidance", f"The guidance {g:g} is out of range: use a value from "
                             f"{GUIDANCE_MIN:g} to {GUIDANCE_MAX:g}.", {"guidance": g})
    if len(variants) > MAX_VARIANTS:
        raise InputError("too_many_variants", f"A sweep of {len(variants)} images is too many: "
                         f"keep it to {MAX_VARIANTS} (strengths × guidances).")
    if p.sweep and not variants:
        raise InputError("empty_sweep", "The sweep has no strengths to try.")
    return variants


class DiffusionImageAnalogies(Method):
    id = "dia"
    title = "Diffusion Image Analogies"
    description = "A is to A′ as B is to B′: apply the change between two images to a third."
    help = (
        "Show the change with two images and apply it to a third.\n"
        "• A: a photo.  • A′: the same photo with the change — the easiest way is to duplicate the "
        "layer and paint the edit on the copy (a rough sketch of glasses, a smile, a new colour); "
        "a layer holding only the painted strokes works too: it is laid over A.  "
        "• B: another photo that should change the same way.\n"
        "A and A′ must have the same size; B may differ. Each is scaled to the model's working size "
        "(aspect kept) and the result comes back at B's size.\n"
        "The first run learns each image (minutes on a GPU); the results are kept, so the next "
        "runs with the same layers only sample. Turn on Sweep to get a strip of strengths (and "
        "guidances) in one go and pick the best. An edit map on B limits where the change may go."
    )
    Params = Params
    roles = (
        Role("a", "A (before)", help="A photo: the 'before' of the example change."),
        Role("a_prime", "A′ (after)",
             help="The same photo with the change: duplicate A and paint the edit on the copy "
                  "(or give only the strokes: transparent parts show A). Must have A's size."),
        Role("b", "B (target)", help="The image to change the same way. Any size."),
    )
    target_role = "b"
    demo_params = {"steps": 2, "token_iterations": 2, "views": 2, "noise_iterations": 1,
                   "noise_evaluations": 2, "sweep": True, "sweep_strengths": [0.0, 1.0]}

    # -- the job -------------------------------------------------------------------------
    def generate(self, ctx: JobContext, inputs: Inputs, params: MethodParams) -> MethodResult:
        p: Params = params  # type: ignore[assignment]
        bundle = ctx.model
        t_start = time.perf_counter()
        variants = _check_params(p)
        a, a2, b = (inputs.get(r) for r in ("a", "a_prime", "b"))
        for img, role in ((a, "A"), (a2, "A′"), (b, "B")):
            if img is None:
                raise InputError("missing_image", f"Diffusion Image Analogies needs the {role} image.")
            check_not_empty(img.rgba, role)
        check_same_size(a.rgba, a2.rgba, "A and A′ images")
        a2 = over(a2, a)
        if a.sha == a2.sha or np.array_equal(a.rgba[..., :3], a2.rgba[..., :3]):
            raise InputError("no_change", "A and A′ are the same image, so there is no change to "
                             "apply: paint the change on A′.")

        native = bundle.native_size
        size_a = native_size(size_of(a.rgba), native)
        size_b = native_size(size_of(b.rgba), native)
        dev = bundle.device
        x_a = to_tensor(a.rgba, size_a, device=dev)
        x_a2 = to_tensor(a2.rgba, size_a, device=dev)
        x_b = to_tensor(b.rgba, size_b, device=dev)

        cs = CI.ConditioningInversionSettings(
            n_tokens=p.n_tokens, train_bos=p.train_bos, iterations=p.token_iterations,
            lr=p.token_lr, views=p.views, steps=p.steps, seed=p.inversion_seed,
            checkpointing=p.checkpointing)
        ns = NI.NoiseInversionSettings(
            steps=p.steps, iterations=p.noise_iterations, evaluations=p.noise_evaluations,
            lr=p.noise_lr, pixel_weight=p.pixel_weight, init=p.noise_init,
            checkpointing=p.checkpointing, seed=p.inversion_seed)

        # 1. conditionings (cached per image)
        conds: dict[str, CI.ConditioningInversion] = {}
        for role, name, img, x in (("a", "A", a, x_a), ("a_prime", "A′", a2, x_a2), ("b", "B", b, x_b)):
            stage = f"learning {name}"
            conds[role] = CI.cached_conditioning(
                ctx.cache, bundle, img.sha, x, cs,
                progress=lambda i, n, s=stage: ctx.progress(s, i, n))
        c_a, c_a2, c_b = conds["a"].cond, conds["a_prime"].cond, conds["b"].cond

        # 2. B's initial noise under c_B (cached per image and conditioning)
        z_box: dict[str, torch.Tensor] = {}

        def z_b() -> torch.Tensor:
            """B's latent, encoded only when read: a cached noise without an edit map never is."""
            if "z" not in z_box:
                z_box["z"] = vae_encode(bundle, x_b).float()
            return z_box["z"]

        cond_key_b = CI.cache_key(ctx.cache, bundle, b.sha, size_b, cs) if ctx.cache is not None else ""
        noise = NI.cached_noise(
            ctx.cache, bundle, b.sha, z_b, x_b, c_b, cond_key_b, ns,
            progress=lambda i, n: ctx.progress("inverting B's noise", i, n),
            tick=ctx.check_cancelled)
        if not noise.cached:
            preview_latents(ctx, noise.reconstruction, None)

        # 3. the analogy, one sampling pass per batch of variants
        _, uncond = encode_prompt(bundle, "", "", image_hw=(size_b[1], size_b[0]))
        schedule = self._schedule(inputs, size_b, bundle, p)
        outs = self._sample(ctx, noise, z_b, c_a, c_a2, c_b, uncond, variants, schedule, p)

        images = [ResultImage(rgba=from_tensor(vae_decode(bundle, lat[None])), label=label(g, lam))
                  for (g, lam), lat in zip(variants, outs)]
        info = {
            "working_size": {"a": list(size_a), "b": list(size_b)},
            "resized": {"a": size_a != size_of(a.rgba), "b": size_b != size_of(b.rgba)},
            "variants": [label(g, lam) for g, lam in variants],
            "conditioning": {k: v.info() for k, v in conds.items()},
            "noise": noise.info(),
            "seconds": round(time.perf_counter() - t_start, 3),
        }
        return MethodResult(images=images, info=info)

    # -- pieces ----------------------------------------------------------------------------
    @staticmethod
    def _schedule(inputs: Inputs, size_b, bundle, p: Params) -> EditSchedule:
        change = inputs.change_map()
        if change is None:
            return EditSchedule(None, p.steps, p.edit_map_curve)
        f = bundle.vae_scale_factor
        lat = map_to_grid(change, (size_b[0] // f, size_b[1] // f), device=bundle.device)
        return EditSchedule(lat, p.steps, p.edit_map_curve)

    @staticmethod
    def _sample(ctx: JobContext, noise: NI.NoiseInversion, z_b, c_a: Conditioning,
                c_a2: Conditioning, c_b: Conditioning, uncond: Conditioning,
                variants: list[tuple[float, float]], schedule: EditSchedule, p: Params
                ) -> list[torch.Tensor]:
        """DDIM (η = 0) from n_B for every (guidance, λ) variant, ``sweep_batch`` at a time.
        ``z_b``: B's latent, or a function that encodes it (read only under an edit map)."""
        bundle = ctx.model
        sched = make_scheduler(bundle, "ddim", p.steps)
        timesteps = sched.timesteps
        batches = [variants[i: i + p.sweep_batch] for i in range(0, len(variants), p.sweep_batch)]
        total = len(batches) * len(timesteps)
        traj = noise.trajectory.to(bundle.device)
        done = 0
        outs: list[torch.Tensor] = []
        ctx.progress("sampling", 0, total)
        k_prev = every(total)
        for batch in batches:
            n = len(batch)
            cond = Conditioning.cat([c_b.lerp_delta(c_a2, c_a, lam) for _, lam in batch])
            g = torch.tensor([gg for gg, _ in batch], dtype=torch.float32,
                             device=bundle.device).view(n, 1, 1, 1)
            guided = bool((g != 1.0).any())
            both = Conditioning.cat([uncond.repeat(n), cond]) if guided else None
            x = noise.noise.to(bundle.device).float().repeat(n, 1, 1, 1)
            for i, t in enumerate(timesteps):
                x = schedule.apply(i, x, lambda i=i: traj[i: i + 1].expand_as(x))
                with torch.no_grad():
                    if guided:
                        xin = sched.scale_model_input(x, t).to(bundle.unet.dtype)
                        out = bundle.unet(torch.cat([xin, xin]), t, **both.unet_kwargs()).sample.float()
                        e_u, e_c = out.chunk(2)
                        eps = torch.where(g == 1.0, e_c, e_u + g * (e_c - e_u))
                    else:
                        eps = NI.unet_eps(bundle, sched, x, t, cond)
                    step = sched.step(eps, t, x, eta=0.0)
                    x = step.prev_sample
                done += 1
                ctx.progress("sampling", done, total)
                if done % k_prev == 0 and done < total:
                    preview_latents(ctx, step.pred_original_sample, done)
            if schedule.keep is not None:  # B's latent where nothing may change (encoded then)
                zb = z_b() if callable(z_b) else z_b
                x = schedule.finish(x, zb.expand_as(x))
            outs.extend(x)
        return outs


register(DiffusionImageAnalogies())
