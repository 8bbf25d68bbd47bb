"""Cross-Image Attention: zero-shot appearance transfer (Alaluf, Garibi, Patashnik, Averbuch-Elor
& Cohen-Or, 2023).

The output keeps the *structure* image's shape and takes the *appearance* image's look:

1. **Inversion** (§3.3). Both images are inverted with edit-friendly DDPM inversion
   (``core.ddpm_inversion``; η = 1, prompt "A photo of a {domain}"; paper: CFG 3.5, here 1 by
   default, see ``inversion_cfg``), which keeps a noise
   map z_t per step. Generation starts after ``skip_steps`` of the ``steps``-step DDIM schedule,
   from z^out = z^struct, and each output step re-uses the structure's noise maps.
2. **Cross-image attention** (eq. 2). In the decoder's self-attention at the two finest
   attention resolutions (64×64 and 32×32 for SD 1.5 at 512²; which of them: ``swap_levels``),
   the output's queries attend to the appearance's keys and values:
   softmax(Q_out K_appᵀ/√d) V_app (``core.attention``).
3. **Attention contrast** (eq. 3): A ← (A − μ(A))·β + μ(A) on the swapped maps, β = 1.67.
4. **Appearance guidance** (eq. 4): ε = ε_self + α(ε_× − ε_self), α = 3.5, where ε_× uses the
   swapped attention and ε_self the output's own.
5. **AdaIN** (eq. 5) of the output latent towards the appearance latent after steps 20–100,
   on foreground masks (``core.adain``; masks from the user or from self-segmentation of the
   attention maps, ``core.selfseg``: the segments off the image border and those the domain
   word picks).
6. **Structure injection** (§ Implementation): on some steps the keys/values come from the
   structure image instead, which holds the shape.
7. **Query preservation** (not in the paper; Chung, Hyun & Heo, *Style Injection in
   Diffusion*, CVPR 2024): in the swapped layers the output's queries are mixed with the
   structure's own, Q = γ·Q_struct + (1 − γ)·Q_out, from the structure's inversion trajectory at
   the same step (``query_preservation``, 0.75 as Chung et al.; 0 = the paper).
8. **FreeU** on the UNet (``core.freeu``): the authors' operator (backbone scaled and low-pass
   damped at every deep up-block input) or diffusers' ``enable_freeu`` (skip features filtered).

How this module computes it. One UNet call per step: the batch holds only what the step needs —
[output with swapped K/V, output with its own K/V, the reference (appearance or structure), the
structure for its queries when γ > 0 and the reference is not already the structure] —
and the references are *not* re-denoised: their latents at every step are the stored inversion
trajectories (exact reconstructions by construction). The authors run two UNet passes per step
(swap / no swap) over [out, appearance, structure], re-denoising both references with CFG 1
(which drifts slightly from their inversions). Steps where no layer swaps run the output alone.

Where the authors' code and the paper differ, the difference is a parameter (defaults follow the
code, which produced the published figures): ``range_semantics``, ``guidance_decay``,
``contrast_mode``, ``structure_every``/``structure_until``, ``adain`` masks, FreeU placement.

The edit map grades the transfer: before each step the output latent is reset to the structure's
own noised latent (from its inversion) where the edit map says "keep" (``core.editmap``).
"""
from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..core import images as im
from ..core.compositing import map_to_grid
from ..core.adain import adain
from ..core.attention import (
    CONTRAST_MODES, SwapController, decoder_attention_factors, decoder_self_attention_layers,
    installed, spatial_size,
)
from ..core.ddpm_inversion import Inversion, cached, invert
from ..core.diffusion import encode_prompt, make_scheduler, vae_decode, vae_encode
from ..core.editmap import THRESHOLD_KINDS, EditSchedule
from ..core.freeu import FREEU_OPERATORS, freeu
from ..core.previews import every, preview_latents
from ..core.selfseg import RULES as MASK_RULES, object_mask, to_latent, token_positions
from ..errors import InputError
from . import register
from .base import Inputs, JobContext, Method, MethodParams, MethodResult, ResultImage, Role

RangeSemantics = Literal["authors", "paper"]
AdainMode = Literal["masked", "whole", "off"]
ContrastMode = Literal["clip", "paper", "renormalize"]
EditCurve = Literal["linear", "quadratic", "cubic", "log", "sigmoid"]
FreeUOperator = Literal["authors", "diffusers"]
SwapLevels = Literal["auto", "fine", "coarse", "both"]
assert set(CONTRAST_MODES) == set(ContrastMode.__args__)
assert set(FREEU_OPERATORS) == set(FreeUOperator.__args__)
assert set(THRESHOLD_KINDS) == set(EditCurve.__args__)

_PCT = "In units of a 100-step schedule (scaled when `steps` differs); see `range_semantics`."


class AppearanceParams(MethodParams):
    domain: str = Field(
        "object", min_length=1, max_length=60,
        description="What the images show, in one word (animal, building, car, ...). It fills "
        "{domain} in the prompt and names the object for automatic AdaIN masks. Paper: "
        "\"A photo of a {domain}\".",
        title="Subject")
    prompt: str = Field(
        "A photo of a {domain}", min_length=1, max_length=300,
        description="Prompt for the inversion and the transfer; {domain} is replaced by the "
        "domain. Default from the paper (§4, implementation details).",
        title="Prompt", json_schema_extra={"advanced": True})
    steps: int = Field(100, ge=2, le=500, description="DDIM steps of the full schedule (paper: 100).",
        title="Steps")
    skip_steps: int = Field(
        32, ge=0, le=499,
        description="Steps of the schedule not run: the transfer starts from the inverted latent "
        "this many steps in (authors' code: 32 of 100, from edit-friendly DDPM inversion). "
        "More keeps more of the structure image.",
        title="Skipped steps")
    inversion_cfg: float = Field(
        1.0, ge=1.0, le=20.0,
        description="Classifier-free guidance of the inversion. The transfer runs with the prompt "
        "unguided (authors' code), so inverting unguided (1) makes the structure's noise maps "
        "redraw it exactly; the paper's 3.5 leaves a guided/unguided mismatch that redraws a "
        "drifted structure (docs/benchmarks-appearance.md), and costs twice the UNet calls.",
        title="Inversion guidance", json_schema_extra={"advanced": True})
    contrast: float = Field(
        1.67, ge=0.5, le=5.0,
        description="β, the contrast of the swapped attention maps (paper eq. 3: 1.67). 1 = off.",
        title="Attention contrast (β)", json_schema_extra={"advanced": True})
    contrast_mode: ContrastMode = Field(
        "clip",
        description="After the contrast: 'clip' clamps weights to [0, 1] without renormalising "
        "(authors' code), 'paper' keeps eq. 3 as written (rows sum to 1, weights may be negative), "
        "'renormalize' clamps at 0 and rescales rows to sum to 1.",
        title="Contrast mode", json_schema_extra={"advanced": True})
    guidance: float = Field(
        3.5, ge=0.0, le=10.0,
        description="α, appearance guidance (paper eq. 4: 3.5): ε = ε_self + α(ε_cross − ε_self). "
        "1 = the swapped prediction alone; 0 = no attention transfer.",
        title="Appearance guidance (α)")
    guidance_decay: bool = Field(
        True,
        description="Let α fall linearly to max(α/2, 1) over the run (authors' code; the paper "
        "keeps α constant). An α of 1 or less stays constant.",
        title="Let the guidance decay", json_schema_extra={"advanced": True})
    range_semantics: RangeSemantics = Field(
        "authors",
        description="How the step ranges below count. 'authors': from the first step run, i.e. "
        "after the skipped steps (authors' code; with the defaults every range runs to the end "
        "and the first 10 steps run without transfer). 'paper': positions in the full schedule.",
        title="Step ranges count from", json_schema_extra={"advanced": True})
    fine_start: int = Field(10, ge=0, le=100, description="First step of the swap in the finest "
                            "decoder attention layers (64×64 at 512² for SD 1.5). Paper: 10. " + _PCT,
        title="Fine swap from", json_schema_extra={"advanced": True, "unit": "step"})
    fine_end: int = Field(90, ge=0, le=100, description="End (exclusive) of the swap in the finest "
                          "layers. Paper: 90. " + _PCT,
        title="Fine swap until", json_schema_extra={"advanced": True, "unit": "step"})
    coarse_start: int = Field(10, ge=0, le=100, description="First step of the swap in the next "
                              "coarser decoder attention layers (32×32 at 512²). Paper: 10. " + _PCT,
        title="Coarse swap from", json_schema_extra={"advanced": True, "unit": "step"})
    coarse_end: int = Field(70, ge=0, le=100, description="End (exclusive) of the swap in the "
                            "coarser layers. Paper: 70. " + _PCT,
        title="Coarse swap until", json_schema_extra={"advanced": True, "unit": "step"})
    structure_every: int = Field(
        5, ge=0, le=100,
        description="Structure injection: every this many steps the keys/values come from the "
        "structure image instead (authors' code: 5; 0 = off). Holds the shape.",
        title="Structure injection every", json_schema_extra={"advanced": True, "unit": "steps"})
    structure_until: int = Field(
        40, ge=0, le=100, description="Structure injection only before this step (authors' code: 40). "
        + _PCT,
        title="Structure injection until", json_schema_extra={"advanced": True, "unit": "step"})
    adain: AdainMode = Field(
        "masked",
        description="AdaIN of the output towards the appearance (paper eq. 5). 'masked': "
        "statistics on the objects only — your mask layers where given, else the opacity of an "
        "image with transparent pixels, else automatic self-segmentation (paper); 'whole': "
        "whole images; 'off'.",
        title="AdaIN", json_schema_extra={"advanced": True})
    adain_start: int = Field(20, ge=0, le=100, description="AdaIN after steps from here (paper: 20). " + _PCT,
        title="AdaIN from", json_schema_extra={"advanced": True, "unit": "step"})
    adain_end: int = Field(100, ge=0, le=100, description="AdaIN up to this step, exclusive (paper: 100). " + _PCT,
        title="AdaIN until", json_schema_extra={"advanced": True, "unit": "step"})
    segments: int = Field(5, ge=2, le=12, description="k of the k-means self-segmentation for "
                          "automatic masks (authors' code: 5).",
        title="Segments of automatic masks", json_schema_extra={"advanced": True})
    mask_rule: Literal[MASK_RULES] = Field(  # type: ignore[valid-type]
        "auto",
        description="Which segments of the automatic masks are the object. 'noun' (paper): those "
        "the domain word's cross-attention picks; 'border': those that do not touch the image's "
        "edge; 'auto': those off the edge, plus the ones on it the domain word picks (the word "
        "alone where every segment touches the edge). Measured on toy-sd (docs/benchmarks-"
        "appearance.md): the word's rule found the object with IoU 0.10–0.14, 'auto' 0.81.",
        title="Automatic mask rule", json_schema_extra={"advanced": True})
    swap_levels: SwapLevels = Field(
        "auto",
        description="Which decoder attention levels swap keys/values: 'fine' (the finest, 64×64 "
        "at SD 1.5's 512²), 'coarse' (the next, 32×32), 'both' (paper), 'auto': both where the "
        "coarse level is like the paper's — no more layers than the fine one and at least 16 "
        "positions a side (SD 1.x / 2.x from 256²) — else the fine level alone (SDXL, whose 32² "
        "level holds 30 layers against 6; small working sizes).",
        title="Swap levels", json_schema_extra={"advanced": True})
    freeu: bool = Field(True, description="FreeU on the UNet during the run and the inversions "
                        "(paper: on).",
        title="FreeU", json_schema_extra={"advanced": True})
    freeu_operator: FreeUOperator = Field(
        "authors",
        description="'authors': the authors' code — the backbone's first half of channels × b "
        "and its lowest frequencies × s at every up-block input of the two deepest widths; "
        "'diffusers': diffusers' enable_freeu — backbone × b, the skip features' lowest "
        "frequencies × s, in the first two up blocks.",
        title="FreeU operator", json_schema_extra={"advanced": True})
    freeu_b1: float = Field(1.2, ge=0.5, le=2.0, description="FreeU backbone factor, stage 1 (authors: 1.2).",
        title="FreeU backbone 1", json_schema_extra={"advanced": True})
    freeu_b2: float = Field(1.4, ge=0.5, le=2.0, description="FreeU backbone factor, stage 2 (authors: 1.4).",
        title="FreeU backbone 2", json_schema_extra={"advanced": True})
    freeu_s1: float = Field(0.9, ge=0.0, le=1.5, description="FreeU skip factor, stage 1 (authors: 0.9).",
        title="FreeU skip 1", json_schema_extra={"advanced": True})
    freeu_s2: float = Field(0.2, ge=0.0, le=1.5, description="FreeU skip factor, stage 2 (authors: 0.2).",
        title="FreeU skip 2", json_schema_extra={"advanced": True})
    query_preservation: float = Field(
        0.75, ge=0.0, le=1.0,
        description="γ: in the swapped layers the output's queries become γ·Q_structure + "
        "(1 − γ)·Q_output, the structure's queries read from its inversion at the same step "
        "(query preservation; 0.75 as in Style Injection in Diffusion, CVPR 2024; the paper "
        "has none: 0). Holds the structure's shape while the keys and values bring the look "
        "(docs/benchmarks-appearance.md); costs one more batch element on swapped steps.",
        title="Query preservation (γ)", json_schema_extra={"advanced": True})
    edit_curve: EditCurve = Field(
        "linear", description="How the edit map's grey levels map to the step at which a pixel "
        "starts to change (core edit-map schedule).",
        title="Edit map curve", json_schema_extra={"advanced": True})

    @model_validator(mode="after")
    def _check(self):
        if self.skip_steps >= self.steps:
            raise ValueError(f"skip_steps ({self.skip_steps}) must be less than steps ({self.steps})")
        for a, b in (("fine_start", "fine_end"), ("coarse_start", "coarse_end"),
                     ("adain_start", "adain_end")):
            if getattr(self, a) > getattr(self, b):
                raise ValueError(f"{a} must not be after {b}")
        return self


def _content_sha(rgba: np.ndarray) -> str:
    h = hashlib.sha256(f"{rgba.shape}".encode())
    h.update(np.ascontiguousarray(rgba).tobytes())
    return h.hexdigest()


def _mask_map(inputs: Inputs, role: str, image_role: str, title: str) -> np.ndarray | None:
    li = inputs.get(role)
    if li is None:
        return None
    img = inputs.get(image_role)
    if img is not None and li.rgba.shape[:2] != img.rgba.shape[:2]:
        raise InputError(
            "size_mismatch",
            f"The {title} is {li.size[0]}×{li.size[1]} pixels but the {image_role} image is "
            f"{img.size[0]}×{img.size[1]}: a mask must have the size of its image.",
            {"role": role, "mask_size": list(li.size), "image_size": list(img.size)},
        )
    return im.map_from_rgba(li.rgba)


def _adain_mask(inputs: Inputs, role: str, image_role: str, title: str
                 ) -> tuple[np.ndarray | None, str | None]:
    """The AdaIN mask of one image and where it came from: the mask layer ("user"), else the
    opacity of an image with transparent pixels — an object on its own layer — ("alpha"), else
    (None, None): found automatically later."""
    given = _mask_map(inputs, role, image_role, title)
    if given is not None:
        return given, "user"
    alpha = im.alpha_of(inputs.get(image_role).rgba)
    return (alpha, "alpha") if float(alpha.min()) < 1.0 else (None, None)


# The coarse level swaps (under 'auto') only where its feature map is at least this many positions
# on its shorter side: the paper's coarse level is 32×32 at SD 1.5's 512² (16×16 at 256²); at 4×4
# one position covers a quarter of the picture, and swapping there moves the layout.
MIN_COARSE_SIDE = 16


def swap_factors_for(unet, factors: list[int], levels: str, latent_hw: tuple[int, int]
                     ) -> tuple[int | None, int | None]:
    """(fine, coarse) factors that swap for ``levels`` (None where a level does not). 'auto'
    keeps the coarse level where it is as the paper's is: no more self-attention layers than the
    fine level (not SDXL's 30 against 6) and a map of at least MIN_COARSE_SIDE positions a side."""
    fine = factors[0]
    coarse = factors[1] if len(factors) > 1 else None
    if levels == "auto" and coarse is not None:
        layers = decoder_self_attention_layers(unet)
        shallow = layers.get(coarse, 0) <= layers.get(fine, 0)
        wide = min(spatial_size(latent_hw, coarse)) >= MIN_COARSE_SIDE
        levels = "both" if shallow and wide else "fine"
    if levels == "fine":
        return fine, None
    if levels == "coarse":
        return None, coarse
    return fine, coarse


class Schedule:
    """When each mechanism is on, for run step j (absolute step i = skip + j)."""

    def __init__(self, p: AppearanceParams):
        self.p = p
        self.n = p.steps - p.skip_steps

    def _idx(self, v: int) -> int:
        return int(round(v * self.p.steps / 100.0))

    def pos(self, j: int) -> int:
        return j if self.p.range_semantics == "authors" else self.p.skip_steps + j

    def _in(self, j: int, start: int, end: int) -> bool:
        return self._idx(start) <= self.pos(j) < self._idx(end)

    def fine(self, j: int) -> bool:
        return self._in(j, self.p.fine_start, self.p.fine_end)

    def coarse(self, j: int) -> bool:
        return self._in(j, self.p.coarse_start, self.p.coarse_end)

    def inject(self, j: int) -> bool:
        e = self.p.structure_every
        return e > 0 and self.pos(j) % e == 0 and self.pos(j) < self._idx(self.p.structure_until)

    def adain(self, j: int) -> bool:
        return self.p.adain != "off" and self._in(j, self.p.adain_start, self.p.adain_end)

    def alpha(self, j: int) -> float:
        a = self.p.guidance
        if not self.p.guidance_decay or self.n <= 1:
            return a
        # falls, never rises: an α of 1 or less (0 = no transfer) stays as it is
        end = min(a, max(a / 2.0, 1.0))
        return float(np.linspace(a, end, self.n)[j])


class AppearanceTransfer(Method):
    id = "appearance"
    title = "Appearance transfer"
    description = ("Give the structure layer the look of the appearance layer (Cross-Image "
                   "Attention, zero-shot).")
    help = ("The result keeps the shapes of the Structure image and takes colours, textures and "
            "materials from the Appearance image, matched by meaning (head to head, wheel to "
            "wheel). Set the domain to what both show. Optional masks select the objects for the "
            "colour matching; the edit map grades where the transfer applies.")
    Params = AppearanceParams
    roles = (
        Role("structure", "Structure", help="The image whose shapes are kept; the result has its size."),
        Role("appearance", "Appearance", help="The image whose look is transferred; any size."),
        Role("structure_mask", "Structure mask", "mask", required=False,
             help="The object in the structure image (white), for colour matching. Same size as "
                  "the structure image. Paint both masks when the shape must hold: automatic "
                  "masks can miss the object and round its corners."),
        Role("appearance_mask", "Appearance mask", "mask", required=False,
             help="The object in the appearance image (white), for colour matching. Same size as the appearance image."),
    )
    target_role = "structure"
    demo_params = {"steps": 4, "skip_steps": 1}

    # -- inversion, cached --------------------------------------------------------------------
    def inversion(self, ctx: JobContext, sched, rgba: np.ndarray, size: im.Size, cond, uncond,
                   p: AppearanceParams, prompt: str, stage: str) -> tuple[Inversion, bool]:
        """The edit-friendly inversion of one image at the working size (cached): (inversion, hit)."""
        bundle = ctx.model
        sha = _content_sha(rgba)
        key = ctx.cache.key(
            "ef-ddpm-inversion", bundle.key, image=sha, size=list(size), steps=p.steps,
            start=p.skip_steps, prompt=prompt, cfg=float(p.inversion_cfg), eta=1.0, seed=ctx.seed,
            dtype=str(bundle.dtype),
            freeu=[p.freeu_operator, p.freeu_b1, p.freeu_b2, p.freeu_s1, p.freeu_s2] if p.freeu else False,
        )

        def make() -> Inversion:
            x0 = vae_encode(bundle, im.to_tensor(rgba, size)).float()
            # the noise of the inversion depends on the seed and the image (same image, same noise)
            noise_seed = int.from_bytes(hashlib.sha256(f"{ctx.seed}:{sha}".encode()).digest()[:6], "big")
            g = torch.Generator(device="cpu").manual_seed(noise_seed)
            return invert(bundle, sched, x0, cond, uncond, p.inversion_cfg, start=p.skip_steps,
                          generator=g, on_step=lambda k, n: ctx.progress(stage, k, n))

        inv, hit = cached(ctx.cache, key, make, {"what": "edit-friendly DDPM inversion",
                                                 "steps": p.steps, "start": p.skip_steps,
                                                 "prompt": prompt}, device=bundle.device)
        if hit:
            ctx.progress(stage, 1, 1)
        return inv, hit

    # -- automatic masks ------------------------------------------------------------------------
    def _auto_masks(self, ctx, ctl: SwapController, sched, xs: list[torch.Tensor], t, cond,
                    latent_hw, factors: list[int], prompt: str, noun: str, k: int,
                    rule: str) -> list[torch.Tensor | None]:
        bundle = ctx.model
        ctl.clear_capture()
        ctl.capture = tuple(range(len(xs)))
        ctl.set_step(latent_hw, {})
        try:
            with torch.no_grad():
                x = torch.cat(xs).to(bundle.unet.dtype)
                bundle.unet(sched.scale_model_input(x, t), t, **cond.repeat(len(xs)).unet_kwargs())
            positions = token_positions(bundle.tokenizer, prompt, noun)
            out: list[torch.Tensor | None] = []
            usable = [f for f in factors if f in ctl.self_maps]
            if not usable:
                return [None] * len(xs)
            f = usable[0]  # the finest captured resolution
            grid = spatial_size(latent_hw, f)
            self_maps = ctl.mean_self_map(f)
            cross = ctl.mean_cross_map(f)
            for e in range(len(xs)):
                noun = None
                if positions and cross is not None:
                    noun = cross[e][:, positions].mean(-1)
                m = object_mask(self_maps[e], grid, noun, k=k, rule=rule)
                out.append(to_latent(m, latent_hw) if m.sum() > 0 else None)
            return out
        finally:
            ctl.clear_capture()

    # -- the method -------------------------------------------------------------------------------
    def generate(self, ctx: JobContext, inputs: Inputs, params: MethodParams) -> MethodResult:
        p: AppearanceParams = params  # type: ignore[assignment]
        bundle = ctx.model
        struct = inputs.get("structure")
        app = inputs.get("appearance")
        if struct is None or app is None:
            raise InputError("missing_image", "Appearance transfer needs a Structure and an Appearance image.")
        im.check_not_empty(struct.rgba, "structure")
        im.check_not_empty(app.rgba, "appearance")
        s_mask, s_src = _adain_mask(inputs, "structure_mask", "structure", "structure mask")
        a_mask, a_src = _adain_mask(inputs, "appearance_mask", "appearance", "appearance mask")
        for role in ("edit_map", "mask"):
            for li in inputs.all(role):
                if li.rgba.shape[:2] != struct.rgba.shape[:2]:
                    raise InputError("size_mismatch",
                                     f"The {role.replace('_', ' ')} must have the structure image's size.",
                                     {"role": role})

        change = inputs.change_map()
        vf = bundle.vae_scale_factor
        size = im.native_size(im.size_of(struct.rgba), bundle.native_size, multiple=vf)
        latent_hw = (size[1] // vf, size[0] // vf)
        prompt = p.prompt.replace("{domain}", p.domain)
        notes: list[str] = []

        factors = decoder_attention_factors(bundle.unet)
        if not factors:
            raise InputError("unsupported_model", "This model's UNet has no decoder self-attention to swap.")
        fine, coarse = swap_factors_for(bundle.unet, factors, p.swap_levels, latent_hw)
        if fine is None and coarse is None:
            raise InputError("unsupported_model", "This model's decoder has a single attention level: "
                             "choose swap levels 'fine' or 'auto'.", {"swap_levels": p.swap_levels})

        unet = bundle.unet
        ctl = SwapController(beta=p.contrast, contrast_mode=p.contrast_mode, gamma=p.query_preservation)
        sch = Schedule(p)
        calls = elements = 0
        with installed(unet, ctl), freeu(unet, p.freeu_operator if p.freeu else None,
                                         p.freeu_s1, p.freeu_s2, p.freeu_b1, p.freeu_b2):
            cond, uncond = encode_prompt(bundle, prompt, "", image_hw=(size[1], size[0]))
            sched = make_scheduler(bundle, "ddim", p.steps)
            ctl.set_step(latent_hw, {})
            inv_s, hit_s = self.inversion(ctx, sched, struct.rgba, size, cond, uncond, p, prompt,
                                           "inverting structure")
            inv_a, hit_a = self.inversion(ctx, sched, app.rgba, size, cond, uncond, p, prompt,
                                           "inverting appearance")
            dev = bundle.device

            # masks for AdaIN, at latent size
            m_s = map_to_grid(s_mask, (latent_hw[1], latent_hw[0]), device=dev) if s_mask is not None else None
            m_a = map_to_grid(a_mask, (latent_hw[1], latent_hw[0]), device=dev) if a_mask is not None else None
            mask_source = {"structure": s_src, "appearance": a_src}
            auto_masks: dict[str, list[str]] = {}
            masks_ready = p.adain != "masked" or (m_s is not None and m_a is not None)
            if p.adain == "whole":
                m_s = m_a = None
                mask_source = {"structure": "whole", "appearance": "whole"}

            edit = EditSchedule(
                None if change is None else map_to_grid(change, (latent_hw[1], latent_hw[0]), device=dev),
                sch.n, p.edit_curve)
            x = inv_s.x(p.skip_steps).clone()
            stage = "transferring"
            previews = every(sch.n)  # latent projections: no VAE decode (core.previews)
            for j in range(sch.n):
                i = p.skip_steps + j
                t = sched.timesteps[i]
                x = edit.apply(j, x, inv_s.x(i))
                if sch.adain(j) and not masks_ready:
                    auto = self._auto_masks(ctx, ctl, sched, [inv_s.x(i), inv_a.x(i)], t, cond,
                                            latent_hw, factors, prompt, p.domain, p.segments,
                                            p.mask_rule)
                    calls += 1
                    elements += 2
                    for name, cur, got in (("structure", m_s, auto[0]), ("appearance", m_a, auto[1])):
                        if cur is None:
                            mask_source[name] = "auto" if got is not None else "whole"
                            if got is not None:  # reported: the latent grid, a "0"/"1" string a row
                                auto_masks[name] = ["".join("1" if v > 0.5 else "0" for v in row)
                                                    for row in got[0, 0].tolist()]
                            else:
                                notes.append(f"No object found in the {name} image for the colour "
                                             "matching; used the whole image.")
                    m_s = m_s if m_s is not None else auto[0]
                    m_a = m_a if m_a is not None else auto[1]
                    masks_ready = True

                swap_factors = [f for f, on in ((fine, sch.fine(j)), (coarse, sch.coarse(j)))
                                if on and f is not None]
                a = sch.alpha(j)
                ref = inv_s if sch.inject(j) else inv_a
                need_swap = bool(swap_factors) and a != 0.0
                need_self = not need_swap or a != 1.0
                batch: list[torch.Tensor] = []
                k_swap = k_self = k_ref = -1
                if need_swap:
                    k_swap = len(batch)
                    batch.append(x)
                if need_self:
                    k_self = len(batch)
                    batch.append(x)
                if need_swap:
                    k_ref = len(batch)
                    batch.append(ref.x(i))
                queries = {}
                if need_swap and p.query_preservation > 0.0:
                    k_struct = k_ref
                    if ref is not inv_s:
                        k_struct = len(batch)
                        batch.append(inv_s.x(i))
                    queries = {f: [(k_swap, k_struct)] for f in swap_factors}
                ctl.set_step(latent_hw, {f: [(k_swap, k_ref)] for f in swap_factors} if need_swap else {},
                             queries=queries)
                xin = torch.cat(batch).to(unet.dtype)
                with torch.no_grad():
                    eps = unet(sched.scale_model_input(xin, t), t,
                               **cond.repeat(len(batch)).unet_kwargs()).sample.float()
                calls += 1
                elements += len(batch)
                if need_swap and need_self:
                    e = eps[k_self:k_self + 1] + a * (eps[k_swap:k_swap + 1] - eps[k_self:k_self + 1])
                elif need_swap:
                    e = eps[k_swap:k_swap + 1]
                else:
                    e = eps[k_self:k_self + 1]
                out = sched.step(e, t, x, eta=1.0, variance_noise=inv_s.z(i))
                x = out.prev_sample
                if sch.adain(j):
                    x = adain(x, inv_a.x(i + 1), m_s, m_a)
                ctx.progress(stage, j + 1, sch.n)
                if (j + 1) % previews == 0 and j + 1 < sch.n:
                    preview_latents(ctx, out.pred_original_sample, j + 1)
            x = edit.finish(x, inv_s.x(p.steps))
            rgb = im.from_tensor(vae_decode(bundle, x))

        info = {
            "working_size": list(size),
            "prompt": prompt,
            "swap_resolutions": {"fine": list(spatial_size(latent_hw, fine)) if fine else None,
                                 "coarse": list(spatial_size(latent_hw, coarse)) if coarse else None},
            "swap_layers": sum(decoder_self_attention_layers(unet).get(f, 0) for f in (fine, coarse) if f),
            "steps_run": sch.n,
            "unet_calls": calls,
            "unet_batch_elements": elements,
            "adain_masks": mask_source if p.adain != "off" else None,
            **({"auto_masks": auto_masks} if auto_masks else {}),
            "inversion_cached": {"structure": hit_s, "appearance": hit_a},
        }
        if notes:
            info["notes"] = notes
        return MethodResult([ResultImage(rgb, label=f"appearance {p.domain}")], info=info)


register(AppearanceTransfer())
