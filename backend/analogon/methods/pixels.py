"""PIXELS: progressive exemplar-based editing with painted edit maps (AAAI 2025).

The paper in four lines (§3, Algorithms 1 and 2):

1. Encode the source to z_src and every exemplar to z_k; bring each edit map to latent size.
2. Over the N timesteps that remain after the start strength (img2img truncation), thresholds
   θ_i (linear i/N by default; quadratic, cubic, log, sigmoid, Appendix E) rise from 0.
3. Step 0 starts from the *surgical latent*: the noised exemplars pasted into the noised source
   under their regions (Alg. 1 line 10; Alg. 2 lines 14/20 nest one paste per exemplar).
4. Before every step i the latent is reset to the noised composite wherever the keep map
   (1 − change) exceeds θ_i, then one denoiser step runs (Alg. 1 line 15). A pixel with change c
   thereby starts denoising at step ≈ N·(1 − c): it runs at strength c × the start strength.
   After the loop, pixels with no change at all are the clean source latent exactly.

Several exemplars run in one loop (``mode="single_pass"``, Algorithm 2: each exemplar its own
paste region and map, the schedule follows the union of the maps), or one pass per exemplar with
each pass's output as the next pass's source (``mode="iterative"``, Appendix B).

Where the authors' code and the paper differ (see docs/methods/pixels.md) this module chooses:
- maps are brighter = more change (the authors' are white = keep); converted in
  ``analogon.core.editmap`` and nowhere else;
- exemplars are placed by the canvas (layer position, scale, alpha) instead of being
  pre-composited at full size; several exemplars are supported (their code ships one);
- the exemplar is pasted where its map is at least ``paste_threshold`` (authors: exactly full
  change, the default here) and its opacity at least ``alpha_threshold``;
- the model spec is one pipeline: any SD 1.x / 2.x / SDXL base model, or the SDXL refiner
  itself (what the authors' SDXL script denoises with: one text encoder, five time ids with
  the aesthetic scores ``aesthetic_score`` / ``negative_aesthetic_score``, 6.0 / 2.5 as in
  diffusers and the authors' script).

The edited region (the bounding box of the map plus context) is processed at the model's native
scale and brought back to its own size; pixels where the map is black come back bit-identical.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..core import images as im
from ..core.compositing import change_map, union_maps
from ..core.diffusion import (
    AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE, SCHEDULER_NAMES, encode_prompt, img2img_timesteps, init_noise, make_scheduler, sample,
    vae_decode, vae_encode,
)
from ..core.editmap import THRESHOLD_KINDS, EditSchedule
from ..core.previews import step_previews
from ..core.surgery import (
    Box, Paste, SurgicalLatents, bbox, composite_over, context_box, crop, map_to_latent, paste_pixels,
    paste_region,
)
from ..errors import InputError
from . import register
from .base import BASE_VARIANTS, Inputs, JobContext, Method, MethodParams, MethodResult, ResultImage, Role

# Seeds: pass p draws the source noise (and the stochastic schedulers' step noise, as diffusers'
# img2img pipeline does with its one generator) from seed + p·PASS_STRIDE, exemplar k's noise
# from seed + p·PASS_STRIDE + 1 + k.
PASS_STRIDE = 1000


class PixelsParams(MethodParams):
    prompt: str = Field(
        "", max_length=2000,
        description="Optional text guiding the edit. The paper keeps it empty for all its "
                    "exemplar edits and shows that text still works alongside exemplars.",
        title="Prompt")
    negative_prompt: str = Field(
        "", max_length=2000,
        description="What the edit should avoid. Empty by default (the paper); the authors' SDXL "
                    "script uses a fixed negative prompt with the refiner.",
        title="Negative prompt", json_schema_extra={"advanced": True})
    steps: int = Field(
        50, ge=1, le=200,
        description="Denoising steps of the full schedule; only the last steps × strength run. "
                    "The authors use 100 Euler steps (40 run); 50 gives the same schedule at half "
                    "the cost.",
        title="Steps")
    strength: float = Field(
        0.25, ge=0.0, le=1.0,
        description="Start strength: how much a fully white map pixel may change (the loop runs the "
                    "last steps × strength timesteps; greyer pixels start later). The authors run "
                    "0.4 (denoising start 0.6); 0.25 is the largest strength at which the white "
                    "area keeps the exemplar's colour and texture as often as any lower one "
                    "(toy-sd, 30 cases: 73 % at 0.4, 83 % at 0.3, 93 % at 0.25 and 0.2; "
                    "docs/benchmarks-pixels.md); the grey of the map is where the scene blends. "
                    "Raise it when the exemplar is far from the source (paper Fig. 6).",
        title="Strength")
    guidance: float = Field(
        7.5, ge=0.0, le=30.0,
        description="Classifier-free guidance scale. 7.5 is diffusers' img2img default; the authors' "
                    "SDXL refiner script uses 17.5 with its negative prompt, which over-saturates "
                    "base models. With empty prompts on SD 1.x/2.x it has no effect.",
        title="Guidance (CFG)", json_schema_extra={"advanced": True})
    scheduler: Literal[SCHEDULER_NAMES] = Field(  # type: ignore[valid-type]
        "euler", description="Sampler. Euler is what the authors use.",
        title="Sampler", json_schema_extra={"advanced": True})
    threshold: Literal[THRESHOLD_KINDS] = Field(  # type: ignore[valid-type]
        "linear",
        description="How the map's grey levels become start times (paper Appendix E). Linear (the "
                    "paper's choice) balances; quadratic/cubic keep closer to the exemplar with "
                    "harder transitions; log blends more and follows the exemplar less; sigmoid "
                    "behaves like linear.",
        title="Edit map curve", json_schema_extra={"advanced": True})
    mode: Literal["single_pass", "iterative"] = Field(
        "single_pass",
        description="Several exemplars: all in one denoising pass (paper Algorithm 2), or one pass "
                    "per exemplar, each pass's result the next pass's source (Appendix B).",
        title="Several exemplars", json_schema_extra={"advanced": True})
    paste_threshold: float = Field(
        1.0, ge=0.01, le=1.0,
        description="The exemplar is pasted where its edit map is at least this bright. 1.0 = only "
                    "where the map is white (full change), as in the authors' code; grey map "
                    "around it lets the source blend into the exemplar. Lower it to paste under "
                    "grey map too (those pixels then keep more of the exemplar).",
        title="Paste threshold", json_schema_extra={"advanced": True, "unit": "map brightness"})
    alpha_threshold: float = Field(
        0.5, ge=0.01, le=1.0,
        description="The exemplar is pasted where its opacity on the canvas is at least this.",
        title="Exemplar opacity threshold", json_schema_extra={"advanced": True})
    aesthetic_score: float = Field(
        AESTHETIC_SCORE, ge=0.0, le=10.0,
        description="SDXL refiner only: the aesthetic score the edit is conditioned on (the "
                    "refiner was trained with LAION aesthetic scores as a time id). 6.0 is "
                    "diffusers' default; ignored by other models.",
        title="Aesthetic score (refiner)",
        json_schema_extra={"advanced": True, "variants": ["sdxl-refiner"]})
    negative_aesthetic_score: float = Field(
        NEGATIVE_AESTHETIC_SCORE, ge=0.0, le=10.0,
        description="SDXL refiner only: the aesthetic score of the unconditional (negative) side "
                    "of guidance; 2.5 is diffusers' default; ignored by other models.",
        title="Negative aesthetic score (refiner)",
        json_schema_extra={"advanced": True, "variants": ["sdxl-refiner"]})
    crop_to_edit: bool = Field(
        True,
        description="Work on the map's bounding box (plus context, at least the model's native "
                    "size a side) instead of the whole image: small edits on large images get the "
                    "model's full resolution, and nothing is blown up beyond the source's own.",
        title="Work on the edited area", json_schema_extra={"advanced": True})
    context: float = Field(
        0.5, ge=0.0, le=4.0,
        description="Context around the edit when cropping, as a fraction of the edit's longest "
                    "side on every side.",
        title="Context around the edit",
        json_schema_extra={"advanced": True, "unit": "× the edit's side"})


@dataclass
class ExemplarPlan:
    index: int  # 1-based, as the painter counts layers
    rgb: np.ndarray  # (h, w, 4) composite over the source, cropped to the box (opaque)
    region: torch.Tensor  # (1, 1, lh, lw) bool: where it is pasted
    pixels: np.ndarray  # (h, w) bool: the same, decided per pixel of the box


@dataclass
class PassPlan:
    exemplars: list[ExemplarPlan]
    change: torch.Tensor | None  # (1, 1, lh, lw) change map for the schedule; None = everywhere


@dataclass
class Plan:
    """Everything decided before any model call: sizes, crop, regions, maps, passes."""

    source: np.ndarray  # (H, W, 4) the full source
    box: Box  # the processed region on the source
    work: tuple[int, int]  # (w, h) at native scale, multiples of the VAE factor
    latent: tuple[int, int]  # (w, h) latent size
    source_crop: np.ndarray  # (h, w, 4)
    passes: list[PassPlan]
    change: np.ndarray | None  # (H, W) the union of all maps (× mask): where anything may change
    steps_run: int = 0
    info: dict = field(default_factory=dict)

    @property
    def nothing_to_do(self) -> bool:
        return self.change is not None and not (self.change > 0).any()


def _map_error(what: str, got: tuple[int, int], want: tuple[int, int], role: str) -> InputError:
    return InputError(
        "size_mismatch",
        f"The {what} is {got[0]}×{got[1]} pixels but the source is {want[0]}×{want[1]}: "
        "give it the source's size, or send it placed on the source canvas (x, y, scale).",
        {"role": role, "size": list(got), "source_size": list(want)},
    )


def plan_job(bundle, inputs: Inputs, params: PixelsParams) -> Plan:
    """Check the inputs and decide the work. Raises InputError before any compute."""
    src_layer = inputs.get("source")
    if src_layer is None:
        raise InputError("missing_image", "PIXELS needs a source image.", {"role": "source"})
    source = im.as_rgba(src_layer.rgba)
    im.check_not_empty(source, "source")
    size = im.size_of(source)

    exemplars = [im.as_rgba(li.rgba) for li in inputs.all("exemplar")]
    for k, ex in enumerate(exemplars, 1):
        name = "exemplar" if len(exemplars) == 1 else f"exemplar {k}"
        if im.size_of(ex) != size:
            raise _map_error(name, im.size_of(ex), size, "exemplar")
        if not (ex[..., 3] > 0).any():
            raise InputError(
                "empty_image",
                f"The {name} is fully transparent on the source canvas: nothing to paste. "
                "Is it placed off the canvas?", {"role": "exemplar", "index": k})

    maps = [im.map_from_rgba(li.rgba) for li in inputs.all("edit_map")]
    for k, m in enumerate(maps, 1):
        name = "edit map" if len(maps) == 1 else f"edit map {k}"
        if (m.shape[1], m.shape[0]) != size:
            raise _map_error(name, (m.shape[1], m.shape[0]), size, "edit_map")
    if len(maps) > 1 and exemplars and len(maps) != len(exemplars):
        raise InputError(
            "map_count",
            f"There are {len(exemplars)} exemplars and {len(maps)} edit maps: give one edit map "
            "shared by all exemplars, or one per exemplar in the same order.",
            {"exemplars": len(exemplars), "edit_maps": len(maps)})
    masks = [im.map_from_rgba(li.rgba) for li in inputs.all("mask")]
    for m in masks:
        if (m.shape[1], m.shape[0]) != size:
            raise _map_error("mask", (m.shape[1], m.shape[0]), size, "mask")
    # the shared rule (compositing.change_map): maps × union of the masks, per exemplar
    mask = union_maps(masks)
    if mask is not None:
        maps = [change_map([m], [mask]) for m in maps] or [mask]

    # the map of exemplar k (shared or its own), and the union where anything may change
    ex_maps: list[np.ndarray | None] = (
        [maps[k] if len(maps) > 1 else maps[0] for k in range(len(exemplars))] if maps
        else [None] * len(exemplars))
    change = union_maps(maps)  # = change_map(all edit maps, all masks)

    # the region processed, at native scale
    box = (0, 0, size[0], size[1])
    if params.crop_to_edit and change is not None:
        b = bbox(change)
        if b is not None:
            box = context_box(b, size, params.context, min_side=bundle.native_size)
    bw, bh = box[2] - box[0], box[3] - box[1]
    f = bundle.vae_scale_factor
    work = im.native_size((bw, bh), bundle.native_size, multiple=f)
    lat = (work[0] // f, work[1] // f)
    dev = bundle.device
    source_crop = crop(source, box)

    def latent_map(m: np.ndarray | None) -> torch.Tensor | None:
        return None if m is None else map_to_latent(crop(m, box), lat, device=dev)

    ex_plans: list[ExemplarPlan] = []
    for k, (ex, m) in enumerate(zip(exemplars, ex_maps), 1):
        ex_crop = crop(ex, box)
        ex_alpha, ex_map = ex_crop[..., 3].astype(np.float32) / 255.0, None if m is None else crop(m, box)
        region = paste_region(ex_alpha, ex_map, params.alpha_threshold, params.paste_threshold, lat,
                              device=dev)
        if not bool(region.any()):
            if change is not None and not (change > 0).any():
                continue  # a black map: nothing may change, the run returns the source
            name = "exemplar" if len(exemplars) == 1 else f"exemplar {k}"
            raise InputError(
                "exemplar_outside_edit",
                f"The {name} lies nowhere the edit map is at least {params.paste_threshold:.0%} "
                f"bright (and the exemplar at least {params.alpha_threshold:.0%} opaque), so it "
                "would not be used: paint the edit map white under it, move it, or lower "
                "'paste threshold'.", {"index": k})
        ex_plans.append(ExemplarPlan(k, composite_over(ex_crop, source_crop), region,
                                     paste_pixels(ex_alpha, ex_map, params.alpha_threshold,
                                                  params.paste_threshold)))

    if params.mode == "iterative" and len(ex_plans) > 1:
        passes = [PassPlan([e], latent_map(m)) for e, m in zip(ex_plans, ex_maps)]
    else:
        passes = [PassPlan(ex_plans, latent_map(change))]

    init = min(int(params.steps * params.strength), params.steps)
    if init < 1:
        raise InputError(
            "no_steps",
            f"With {params.steps} steps at strength {params.strength:g} no denoising step runs: "
            "raise the strength or the number of steps.",
            {"steps": params.steps, "strength": params.strength})
    return Plan(source=source, box=box, work=work, latent=lat, source_crop=source_crop,
                passes=passes, change=change)


def _digest(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def encode_cached(ctx: JobContext, rgba: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """VAE latent (distribution mean) of an image's RGB at ``size``, cached per model and pixels."""
    return encode_all(ctx, [rgba], size)[0]


def encode_all(ctx: JobContext, images: list[np.ndarray], size: tuple[int, int]) -> list[torch.Tensor]:
    """VAE latents of several images at one size, each cached per model and pixels: the cache's
    hits are read, the same pixels are encoded once, and each miss has a VAE call of its own.
    Not one batched call: the encoder's kernels give batch-dependent results in the last bits,
    so a source's latent (and its cache entry) would depend on the exemplars sent with it, and a
    black map would no longer return the source's own latent exactly; a batch saves nothing on
    a CPU (the cost is per pixel) and little on a GPU next to the loop."""
    bundle = ctx.model
    out: list[torch.Tensor | None] = [None] * len(images)
    keys: list[str | None] = [None] * len(images)
    todo: dict[str, list[int]] = {}  # the same pixels twice are encoded once
    for i, rgba in enumerate(images):
        digest = _digest(rgba[..., :3])
        if ctx.cache is not None:
            keys[i] = ctx.cache.key("pixels.latent", bundle.key, pixels=digest, size=list(size))
            hit = ctx.cache.get(keys[i])
            if hit is not None:
                out[i] = hit["latent"].to(bundle.device, bundle.unet.dtype)
                continue
        todo.setdefault(digest, []).append(i)
    for ids in todo.values():
        z = vae_encode(bundle, im.to_tensor(im.as_rgba(images[ids[0]]), size))
        for i in ids:
            out[i] = z
        if keys[ids[0]] is not None:
            ctx.cache.put(keys[ids[0]], {"latent": z}, {"size": list(size)})
    return out  # type: ignore[return-value]


def denoise(ctx: JobContext, plan: Plan, params: PixelsParams, progress_offset: int = 0) -> torch.Tensor:
    """The PIXELS loop(s): the final latent at the working size (not decoded)."""
    bundle = ctx.model
    w, h = plan.work
    ctx.progress("encode", None, None)
    cond, uncond = encode_prompt(bundle, params.prompt, params.negative_prompt, image_hw=(h, w),
                                 aesthetic=params.aesthetic_score,
                                 negative_aesthetic=params.negative_aesthetic_score)
    exemplars = [e for p in plan.passes for e in p.exemplars]
    latents = encode_all(ctx, [plan.source_crop] + [e.rgb for e in exemplars], plan.work)
    z = latents[0]
    ex_latents = {e.index: lat for e, lat in zip(exemplars, latents[1:])}

    total = None
    done = progress_offset
    for p, pp in enumerate(plan.passes):
        ctx.check_cancelled()
        sched = make_scheduler(bundle, params.scheduler, params.steps)
        ts = img2img_timesteps(sched, params.steps, params.strength)
        n = len(ts)
        plan.steps_run = n
        if total is None:
            total = progress_offset + n * len(plan.passes)
        gen = ctx.generator(offset=p * PASS_STRIDE)
        noise = init_noise(bundle, z.shape, gen)
        pastes = [Paste(ex_latents[e.index],
                        init_noise(bundle, z.shape, ctx.generator(offset=p * PASS_STRIDE + e.index)),
                        e.region) for e in pp.exemplars]
        surg = SurgicalLatents(sched, z, noise, pastes)
        schedule = EditSchedule(pp.change, n, params.threshold)

        def before_step(i, t, latents, schedule=schedule, surg=surg):
            return schedule.apply(i, latents, lambda: surg.at(t))

        def on_step(i, base=done, total=total):
            ctx.progress("denoise", base + i, total)

        latents = sample(bundle, sched, surg.at(ts[0]), ts, cond, uncond, params.guidance,
                         before_step=before_step, on_step=on_step, generator=gen,
                         on_prediction=step_previews(ctx, n))
        z = schedule.finish(latents, z)
        done += n
    return z


def render(ctx: JobContext, plan: Plan, latents: torch.Tensor) -> ResultImage:
    """Decode the processed region at the working size. Its base, the full-resolution picture
    the loop started from, is the source with each exemplar where it was pasted (later ones on
    top): carried up, the result keeps the exemplars' own detail as well as the source's."""
    ctx.progress("decode", None, None)
    rgb = im.from_tensor(vae_decode(ctx.model, latents))
    base = plan.source_crop.copy()
    for p in plan.passes:
        for e in p.exemplars:
            base[e.pixels] = e.rgb[e.pixels]
    return ResultImage(rgb, label="pixels", box=plan.box, base=base)


class PixelsMethod(Method):
    id = "pixels"
    title = "PIXELS exemplar edit"
    description = ("Paint how much may change where, place exemplars on the canvas, and get a "
                   "seamless edit (PIXELS, AAAI 2025).")
    help = ("Brighter edit map = more change, black = keep exactly. Place exemplar layers where "
            "they should appear: each is pasted where its map is white and blended in by the grey "
            "around it. Without exemplars it is a graded img2img edit guided by the prompt.")
    Params = PixelsParams
    roles = (
        Role("source", "Source", "image", required=True,
             help="The image to edit. The result has its size."),
        Role("exemplar", "Exemplars", "image", required=False, multiple=True,
             help="Images to paste in, placed on the source canvas (position, scale); their "
                  "opacity says where they apply. Optional: without one the edit is prompt-only."),
        Role("edit_map", "Edit maps", "map", required=False, multiple=True,
             help="Grey-scale, the source's size: brighter = more change, black = keep exactly. "
                  "One shared by all exemplars, or one per exemplar in the same order."),
    )
    target_role = "source"
    demo_params = {"steps": 4, "strength": 0.75, "scheduler": "ddim"}
    # the refiner too: PIXELS only denoises the last steps, which is what the refiner is for
    variants = BASE_VARIANTS + ("sdxl-refiner",)

    def generate(self, ctx: JobContext, inputs: Inputs, params: PixelsParams) -> MethodResult:
        plan = plan_job(ctx.model, inputs, params)
        ctx.preview_box(plan.box)
        info = {"box": list(plan.box), "working_size": list(plan.work), "passes": len(plan.passes),
                "exemplars": sum(len(p.exemplars) for p in plan.passes)}
        if plan.nothing_to_do:
            info["note"] = "The edit map is black everywhere: nothing may change."
            return MethodResult([ResultImage(plan.source.copy(), label="pixels")], info=info)
        latents = denoise(ctx, plan, params)
        out = render(ctx, plan, latents)
        info["steps_run"] = plan.steps_run
        ctx.preview(im.small_preview(out.rgba[..., :3]), None)
        return MethodResult([out], info=info)


register(PixelsMethod())
