"""Every method's results back into the document, with an optional high-resolution pass.

:func:`finish` is the one return path (``Method.run`` calls it after a method's ``generate``):
the edit maps and masks of the job become one compositing weight, each working-size result is
(optionally) refined at a higher resolution by :func:`refine`, and ``core.compositing`` carries
the change up to the target's resolution and composites it by the weight.

The high-resolution pass (:func:`refine`). A region much larger than the model's native size
comes back from the model as a small picture; carrying only the change up keeps the target's own
detail wherever the model recoloured or kept the base, and brings what the model *drew* (a new
edge, a new texture) as the model's own picture, upscaled: as sharp as the working grid allows,
no sharper. The pass redraws that at (or towards) the document's resolution the way painters'
upscalers do: the working result is carried up to a refine size of at most ``hires_max_pixels``
(default 16 × the model's native area), cut into tiles of the model's native size that overlap by
``hires_overlap``, and each tile is re-noised to ``hires_strength`` and denoised with the job's
prompt (when the method has one) under the same per-pixel start-time schedule as every edit map
(``core.editmap.EditSchedule``): a pixel of weight w is redrawn at strength w × hires_strength, a
pixel of weight 0 not at all. Only what the model *drew* is redrawn: the schedule's map is the
weight times the fit's decision (``compositing.fit_change``: where the base cannot explain the
result, or the result the base), so a recoloured or kept area keeps the base's own grain exactly
instead of getting the model's idea of it; tiles with nothing drawn are skipped. Tiles are blended
with linear ramps across their overlaps, so no seam shows; the job can be cancelled between any
two denoising steps. The refined picture then goes through the same carrying-up as any result.

When it runs (``hires``): "on" always (where the refine size exceeds the working size), "off"
never, and "auto" only where it can add detail, decided from what can be measured (:func:`auto`,
:func:`finish`): the model's native size is at least :data:`AUTO_MIN_NATIVE` px, the refine size is
more than :data:`AUTO_FACTOR` × the working size, and the fit decided that the model drew new
structure in at least :data:`AUTO_MIN_NEW` of the changed area (where it only recoloured, carrying
up already gives back the base's own detail at full resolution).

What "adds detail" means, and why the toy models (64 and 128 px) stay below the native-size bar:
``auto`` may run the pass for a kind of model only where, on seeded cases with a known answer, the
pass makes the changed area measurably more right at 1:1 (the interval of the paired gain above 0)
without making it measurably less whole (the interval of the paired loss reaching 0). toy-sd was
measured where the pass can matter most (``analogon bench hires-texture``, docs/resolution.md):
documents 4× and 8× its 128 px whose objects carry the model's own 12-px textures at 1:1, a PIXELS
edit that changes an object's texture. The pass does add detail there: the energy above the working
grid rises from 0.09 to 0.66 of the truth's at 4×, and the new texture reads right at 1:1 in 30 %
of the texture changes (none without the pass). But in the tiles it redraws the toy model paints
whole objects from the prompt: background-coloured gaps and new outlines take 16 % of the changed
object's area at 4× (26 % at 8× refined at 1:1, where the texture is right in 5 %; at its
automatic 2:1 size, none), in 8–20 × the seconds. It fails the second condition at both scales,
so ``auto`` leaves it off (the 64-px model failed the first: the pass moved its result away from
the known answer).

Why this design (measured by ``analogon bench resolution``): refining the *carried-up* picture
rather than re-running the method at a higher resolution keeps every method's own mechanism at
the scale it was made for (the inversions, the attention swaps and the CLIP conditionings are
all native-scale), costs only a low-strength img2img per tile, and the guided carrying-up after
it restores the target's own grain where even the pass cannot (below the refine scale).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import compositing as C
from .diffusion import encode_prompt, img2img_timesteps, init_noise, make_scheduler, noised, sample
from .diffusion import vae_decode, vae_encode
from .editmap import EditSchedule
from .images import as_rgba, from_tensor

AUTO_FACTOR = 1.5  # "auto" refines when the refine size is more than this × the working size
AUTO_MIN_NATIVE = 256  # ... for a model of at least this native size (px): toy-sd (128) fails
# the module's test at 4x and 8x (``analogon bench hires-texture``), the 64-px model too
AUTO_MIN_NEW = 0.02  # ... that drew new structure in at least this part of the changed area
AUTO_AREA = 16  # automatic max pixels: this × the model's native area


@dataclass
class HiresSettings:
    mode: str = "auto"  # auto | on | off
    strength: float = 0.3
    overlap: float = 0.25
    max_pixels: int = 0  # 0: AUTO_AREA × native²
    steps: int = 20
    prompt: str = ""
    negative_prompt: str = ""
    guidance: float = 1.0
    aesthetic_score: float | None = None  # the SDXL refiner's (None: the defaults)
    negative_aesthetic_score: float | None = None

    @classmethod
    def from_params(cls, params: Any) -> "HiresSettings":
        g = getattr
        prompt = g(params, "prompt", "") or ""
        return cls(mode=g(params, "hires", "auto"), strength=float(g(params, "hires_strength", 0.3)),
                   overlap=float(g(params, "hires_overlap", 0.25)),
                   max_pixels=int(g(params, "hires_max_pixels", 0)),
                   steps=int(g(params, "steps", 20) or 20), prompt=prompt,
                   negative_prompt=g(params, "negative_prompt", "") or "",
                   guidance=float(g(params, "guidance", 1.0) or 1.0) if prompt else 1.0,
                   aesthetic_score=g(params, "aesthetic_score", None),
                   negative_aesthetic_score=g(params, "negative_aesthetic_score", None))


def refine_size(region: tuple[int, int], work: tuple[int, int], native: int, s: HiresSettings,
                multiple: int = 8, cap: int | None = None) -> tuple[int, int] | None:
    """The size the pass works at for a region of ``region`` px whose result came back at
    ``work`` px, or None when no pass runs. ``cap``: the backend's maximum working pixels
    (its memory preset), over any larger ``max_pixels``."""
    if s.mode == "off" or s.strength <= 0:
        return None
    rw, rh = region
    max_px = s.max_pixels or AUTO_AREA * native * native
    if cap:
        max_px = min(max_px, int(cap))
    scale = min(1.0, math.sqrt(max_px / float(rw * rh)))
    w = max(multiple, int(rw * scale) // multiple * multiple)
    h = max(multiple, int(rh * scale) // multiple * multiple)
    grow = max(w / max(1, work[0]), h / max(1, work[1]))
    if grow <= 1.0 or (s.mode == "auto" and not auto(native, grow)):
        return None
    return w, h


def auto(native: int, grow: float) -> bool:
    """Whether ``hires: auto`` may run the pass for a model of ``native`` px whose result would
    be refined at ``grow`` × its working size (:func:`finish` then asks the fit whether the model
    drew anything: :data:`AUTO_MIN_NEW`). False for the toy models at any size: on toy-sd the
    pass draws its texture at 1:1 in a third of the cases at 4× and breaks the object in its
    tiles (see the module's docstring)."""
    return native >= AUTO_MIN_NATIVE and grow > AUTO_FACTOR


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` px covering [0, n) with at least ``overlap`` px shared
    between neighbours, spread evenly, the last one flush with the end."""
    if n <= tile:
        return [0]
    stride = max(1, tile - overlap)
    k = math.ceil((n - tile) / stride) + 1
    return [round(i * (n - tile) / (k - 1)) for i in range(k)]


def ramp(n: int, overlap: int, lo_edge: bool, hi_edge: bool) -> np.ndarray:
    """A 1-D blending window: rises over ``overlap`` px from the sides that have a neighbour
    (``lo_edge``/``hi_edge`` False), flat 1 elsewhere; never exactly 0."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        r = (np.arange(n, dtype=np.float32) + 0.5) / overlap
        if not lo_edge:
            w = np.minimum(w, r)
        if not hi_edge:
            w = np.minimum(w, r[::-1])
    return np.clip(w, 1e-3, 1.0)


def _rgb_tensor(rgb: np.ndarray, device, dtype) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1)[None].float()
    return (x / 127.5 - 1.0).to(device=device, dtype=dtype)


def refine(ctx, out: np.ndarray, base: np.ndarray, weight: np.ndarray, size: tuple[int, int],
           s: HiresSettings) -> tuple[np.ndarray, dict]:
    """The high-resolution pass over one region: ``out`` the working-size result, ``base`` the
    full-resolution picture the model started from, ``weight`` its (H, W) compositing weight;
    returns the refined picture (h, w, 3) uint8 at ``size`` and what was done."""
    bundle = ctx.model
    f = bundle.vae_scale_factor
    native = bundle.native_size
    W, H = size
    base_r = C.resample(torch.from_numpy(np.ascontiguousarray(base[..., :3])).permute(2, 0, 1).float(),
                        size).permute(1, 2, 0).numpy()
    # the result carried up to the refine size (unweighted: the weight is applied once, when
    # the refined picture is brought back onto the target)
    base_u8 = np.clip(base_r + 0.5, 0, 255).astype(np.uint8)
    start = C.carry_up(np.asarray(out)[..., :3], base_u8)
    # redraw only what the model drew (a new edge, a new texture): where it kept or recoloured
    # the base, the base's own detail already comes back exactly
    new = C.fit_change(np.asarray(out)[..., :3], base).new.numpy()
    new_r = C.resample(torch.from_numpy(new), size).clamp(0, 1).numpy()
    w_r = C.map_to_grid(weight, size)[0, 0].numpy() * new_r
    start_u8 = np.clip(np.floor(start + 0.5), 0, 255).astype(np.uint8)

    tw, th = max(f, min(native, W) // f * f), max(f, min(native, H) // f * f)
    ov = int(round(s.overlap * min(tw, th))) // f * f
    xs, ys = tile_starts(W, tw, ov), tile_starts(H, th, ov)
    tiles = [(x, y) for y in ys for x in xs if (w_r[y:y + th, x:x + tw] > 0).any()]

    acc = np.zeros((H, W, 3), np.float32)
    wsum = np.zeros((H, W), np.float32)
    cond, uncond = encode_prompt(bundle, s.prompt, s.negative_prompt, image_hw=(th, tw),
                                 aesthetic=s.aesthetic_score, negative_aesthetic=s.negative_aesthetic_score)
    sched = make_scheduler(bundle, "ddim", s.steps)
    ts = img2img_timesteps(sched, s.steps, s.strength)
    n = len(ts)
    total = n * len(tiles)
    ctx.progress("high-resolution pass", 0, total)
    for k, (x, y) in enumerate(tiles):
        ctx.check_cancelled()
        crop = start_u8[y:y + th, x:x + tw]
        z = vae_encode(bundle, _rgb_tensor(crop, bundle.device, bundle.vae.dtype))
        if n > 0:
            change = C.map_to_grid(w_r[y:y + th, x:x + tw], (tw // f, th // f), device=bundle.device)
            sch = EditSchedule(change, n)
            sched = make_scheduler(bundle, "ddim", s.steps)
            gen = ctx.generator(offset=7919 + k)
            eps = init_noise(bundle, z.shape, gen)

            def before(i, t, lat, sch=sch, z=z, eps=eps, sched=sched):
                return sch.apply(i, lat, lambda: noised(sched, z, eps, t))

            lat = sample(bundle, sched, noised(sched, z, eps, ts[0]), ts, cond, uncond, s.guidance,
                         before_step=before, generator=gen,
                         on_step=lambda i, k=k: ctx.progress("high-resolution pass", k * n + i, total))
            z = sch.finish(lat, z)
        rgb = from_tensor(vae_decode(bundle, z)).astype(np.float32)
        win = np.outer(ramp(th, ov, y == 0, y + th >= H), ramp(tw, ov, x == 0, x + tw >= W))
        acc[y:y + th, x:x + tw] += rgb * win[..., None]
        wsum[y:y + th, x:x + tw] += win
    done = wsum > 0
    refined = start.copy()
    refined[done] = acc[done] / wsum[done][:, None]
    refined = start + new_r[..., None] * (refined - start)  # the pass only where it redrew
    info = {"size": [W, H], "tiles": len(tiles), "tile": [tw, th], "overlap": ov, "steps": n,
            "strength": s.strength, "redrawn": round(float((w_r > 0).mean()), 4)}
    return np.clip(np.floor(refined + 0.5), 0, 255).astype(np.uint8), info


def finish(ctx, method, inputs, params, result):
    """Bring every result of ``method.generate`` back onto the job's target (see the module's
    docstring); returns the same ``MethodResult`` with finished images and layers."""
    from ..errors import InputError

    target_li = inputs.get(method.target_role)
    if target_li is None:
        return result
    target = as_rgba(target_li.rgba)
    H, W = target.shape[:2]
    shapes = {li.rgba.shape[:2] for role in ("edit_map", "mask") for li in inputs.all(role)}
    if shapes - {(H, W)}:
        raise InputError("size_mismatch", "The edit map and mask must have the target image's size.")
    change = inputs.change_map()
    settings = HiresSettings.from_params(params)
    infos = []
    for r in result.images:
        box = r.box or (0, 0, W, H)
        bw, bh = box[2] - box[0], box[3] - box[1]
        out = np.asarray(r.rgba)
        work = (out.shape[1], out.shape[0])
        weight = C.change_weight(change, None, (H, W), C.ramp_radius((bw, bh), work))
        base = as_rgba(r.base) if r.base is not None else target[box[1]:box[3], box[0]:box[2]]
        info: dict[str, Any] = {}
        w_box = np.ones((bh, bw), np.float32) if weight is None else weight[box[1]:box[3], box[0]:box[2]]
        size = refine_size((bw, bh), work, ctx.model.native_size, settings, ctx.model.vae_scale_factor,
                           cap=ctx.model.info.get("max_working_pixels")) if (w_box > 0).any() else None
        if size is not None and settings.mode == "auto" \
                and C.fit_change(out, base).new_share() < AUTO_MIN_NEW:
            size = None  # the model only recoloured: carrying up keeps the base's detail already
        if size is not None:
            out, info["hires"] = refine(ctx, out, base, w_box, size, settings)
        ret = C.bring_back(out, target, box=box, base=base, weight=weight)
        info.update(ret.info)
        r.rgba, r.layer, r.box, r.base = ret.image, ret.layer, None, None
        infos.append(info)
    result.info = {**result.info, "return": infos[0] if len(infos) == 1 else infos}
    return result
