"""The one way back from a model's working resolution into the painter's document.

Every method runs at the model's native scale (64 px on toy-sd, 512 on SD 1.5, 1024 on SDXL)
while a document is 2000–6000 px. This module brings a method's working-size picture back onto
the target at full resolution, for all four methods alike:

1. **Maps reach any grid through one function**, :func:`map_to_grid`: area-weighted when the grid
   is coarser (each grid cell is the mean of the map over its footprint, so a 1-px stroke on a
   4096 px map reaches a 64-cell grid as 1/64 of its cell, wherever it falls), linear when it is
   finer, then snapped at exactly 0 and 1 (:func:`snap_unit`).
2. **Only the change is carried up** (:func:`guided_upsample`): the model's output ``O`` is
   explained, per working pixel, as a local linear colour transform of the picture the model
   started from (the *base*, area-averaged to the working grid): ``O ≈ A·base + b`` fitted over a
   3×3 window with a ridge prior towards the identity (a guided filter, He, Sun & Tang, with the
   prior at "no change" instead of "flat"). The coefficients are upsampled and applied to the
   full-resolution base, so where the model kept the picture (A ≈ I, b ≈ 0) the base's own grain
   and 1-px lines come back exactly; where it changed the colour, the detail is kept under the new
   colour; where it drew something the base does not have, the fit falls back to the smooth
   output (which the optional high-resolution pass, ``core.hires``, then refines).
3. **Composited by the map's value** (:func:`change_weight`): the weight is the edit map times the
   mask, feathered inward over about one working pixel where it meets black, so a grey 0.3 band
   keeps 70 % of the target and the transition into "keep" has no seam. Where the weight is 0 the
   target's own bytes are kept, exactly.
4. **A layer that carries only the change** (:func:`bring_back`): besides the finished image, the
   result as a layer whose alpha is the weight times the target's alpha (0 where nothing may
   change), so that the composite a painter sees in Krita cannot change there whatever the source
   layer's alpha, opacity, blending mode or colour depth. Changed pixels are quantised to 8 bits
   with an ordered dither, so smooth gradients show no banding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .images import Size, as_rgba

# -- maps on grids ---------------------------------------------------------------------------


def snap_unit(t: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Values within ``eps`` of 0 or 1 become exactly 0 or 1: a white layer's luminance or a
    filtered all-white area can come out as 0.99999994 in float32, and "exactly full change" /
    "exactly keep" decide the schedule's resets, the paste rule and the final latent."""
    t = t.clamp(0.0, 1.0)
    t = torch.where(t >= 1.0 - eps, torch.ones_like(t), t)
    return torch.where(t <= eps, torch.zeros_like(t), t)


def resample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights that resample a 1-D signal: exact area overlap when shrinking
    (rows sum to 1; an input pixel's weight is the fraction of the output cell it covers),
    linear interpolation between pixel centres when enlarging (clamped at the borders, as
    ``F.interpolate(..., align_corners=False)``), the identity when equal."""
    if n_in == n_out:
        return torch.eye(n_in)
    if n_out < n_in:
        scale = n_in / n_out
        lo = np.arange(n_out, dtype=np.float64)[:, None] * scale  # cell i covers [lo, hi)
        hi = lo + scale
        j = np.arange(n_in, dtype=np.float64)[None, :]
        overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
        return torch.from_numpy((overlap / scale).astype(np.float32))
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    j0 = np.floor(pos).astype(np.int64)
    j1 = np.minimum(j0 + 1, n_in - 1)
    f = (pos - j0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, j0), 1.0 - f)
    np.add.at(m, (rows, j1), f)
    return torch.from_numpy(m)


def resample(x: torch.Tensor, size: Size) -> torch.Tensor:
    """(..., H, W) to (..., h, w) with :func:`resample_matrix` on each axis."""
    w, h = size
    H, W = x.shape[-2], x.shape[-1]
    x = x.float()
    if W != w:
        x = x @ resample_matrix(W, w).T.to(x.device)
    if H != h:
        x = resample_matrix(H, h).to(x.device) @ x
    return x


def map_to_grid(m: np.ndarray | torch.Tensor, size: Size, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """An (H, W) map in [0, 1] to (1, 1, h, w) at ``size`` = (w, h): the one way every map and
    mask reaches a latent (or any working) grid. Area-weighted when shrinking, so a thin stroke
    reaches the cells it covers in proportion to its coverage; then snapped at 0 and 1."""
    t = torch.as_tensor(np.ascontiguousarray(m, dtype=np.float32) if isinstance(m, np.ndarray) else m)
    t = resample(t.float(), size)
    return snap_unit(t)[None, None].to(device=device, dtype=dtype)


# -- the change, carried up ------------------------------------------------------------------


def _box3(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)² window, counting only pixels inside the image."""
    if r <= 0:
        return x
    shape = x.shape
    x = x.reshape(1, -1, shape[-2], shape[-1])
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False).reshape(shape)


def guided_coefficients(guide: torch.Tensor, out: torch.Tensor, radius: int = 1,
                        eps: float = 2e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel colour transforms that explain ``out`` by ``guide`` (both (3, h, w) in [0, 1]):
    ``A`` (3, 3, h, w) with out_c ≈ Σ_k A[k, c] guide_k + b_c, and ``b`` (3, h, w), fitted over
    (2·radius+1)² windows by ridge regression towards A = I, then averaged over the windows."""
    I, p = guide[None].float(), out[None].float()
    mu_i, mu_p = _box3(I, radius), _box3(p, radius)  # (1, 3, h, w)
    ii = _box3(I[:, :, None] * I[:, None], radius) - mu_i[:, :, None] * mu_i[:, None]  # (1,3,3,h,w)
    ip = _box3(I[:, :, None] * p[:, None], radius) - mu_i[:, :, None] * mu_p[:, None]  # [k, c]
    eye = torch.eye(3, dtype=ii.dtype)[None, :, :, None, None]
    lhs = (ii + eps * eye).permute(0, 3, 4, 1, 2)  # (1, h, w, 3, 3)
    rhs = (ip + eps * eye).permute(0, 3, 4, 1, 2)
    A = torch.linalg.solve(lhs, rhs).permute(0, 3, 4, 1, 2)  # (1, 3k, 3c, h, w)
    b = mu_p - (A * mu_i[:, :, None]).sum(1)
    h, w = A.shape[-2:]
    A = _box3(A.reshape(1, 9, h, w), radius).reshape(3, 3, h, w)
    b = _box3(b, radius)[0]
    return A, b


def novelty(out: np.ndarray, base: np.ndarray, radius: int = 1, eps: float = 2e-3,
            low: float = 0.02, high: float = 0.1) -> np.ndarray:
    """Where the model drew something the base does not explain, per pixel of ``out``'s grid
    ((h, w) in [0, 1]): the RMS residual of the guided fit (what carrying the change up cannot
    reproduce at full resolution), mapped from ``low`` (0) to ``high`` (1) in [0, 1] colour units.
    A recolouring, a kept picture or a changed colour under the base's own edges scores 0; a new
    edge or texture where the base is flat scores 1."""
    h, w = out.shape[:2]
    base_t = torch.from_numpy(np.ascontiguousarray(base[..., :3])).permute(2, 0, 1).float() / 255.0
    out_t = torch.from_numpy(np.ascontiguousarray(out[..., :3])).permute(2, 0, 1).float() / 255.0
    guide = resample(base_t, (w, h))
    A, b = guided_coefficients(guide, out_t, radius, eps)
    pred = (A * guide[:, None]).sum(0) + b
    r = _box3(((out_t - pred) ** 2).mean(0, keepdim=True)[None], radius)[0, 0].sqrt()
    return ((r - low) / (high - low)).clamp(0, 1).numpy()


def guided_upsample(out: np.ndarray, base: np.ndarray, radius: int = 1, eps: float = 2e-3,
                    strip: int = 512) -> np.ndarray:
    """The model's working-size picture ``out`` ((h, w, 3) uint8 or float in [0, 255]) brought to
    the size of ``base`` ((H, W, 3|4) uint8, the full-resolution picture the model started
    from), carrying only the change: see the module's docstring. Returns (H, W, 3) float32 in
    [0, 255] (not rounded)."""
    H, W = base.shape[:2]
    h, w = out.shape[:2]
    base_t = torch.from_numpy(np.ascontiguousarray(base[..., :3])).permute(2, 0, 1).float() / 255.0
    out_t = torch.from_numpy(np.ascontiguousarray(out[..., :3])).permute(2, 0, 1).float() / 255.0
    if (h, w) == (H, W):
        return out_t.permute(1, 2, 0).numpy() * 255.0
    guide = resample(base_t, (w, h))
    A, b = guided_coefficients(guide, out_t, radius, eps)
    coef = torch.cat([A.reshape(9, h, w), b], 0)  # (12, h, w)
    coef = coef @ resample_matrix(w, W).T  # (12, h, W): columns once, rows a strip at a time
    rows = resample_matrix(h, H)
    res = np.empty((H, W, 3), np.float32)
    for y0 in range(0, H, strip):  # bilinear coefficients a strip at a time: bounded memory
        y1 = min(H, y0 + strip)
        c = torch.matmul(rows[y0:y1], coef)  # (12, y1-y0, W): A[k, c] at 3k+c, then b
        bs = base_t[:, y0:y1]
        for ch in range(3):
            g = c[9 + ch].clone()
            for k in range(3):
                g.addcmul_(c[3 * k + ch], bs[k])
            res[y0:y1, :, ch] = (g.clamp_(0, 1) * 255.0).numpy()
    return res


# -- weights ---------------------------------------------------------------------------------


def box_blur(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)² window (edges replicated), by running sums: O(pixels) for any r."""
    if radius <= 0:
        return x.astype(np.float32)
    r = int(radius)
    out = x.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r + 1, r)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
        n = out.shape[axis]
        hi = np.take(c, np.arange(2 * r + 1, 2 * r + 1 + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        out = (hi - lo) / (2 * r + 1)
    return out.astype(np.float32)


def feather_inward(support: np.ndarray, radius: int) -> np.ndarray:
    """1 deep inside ``support`` (bool), ramping to ≈ 0 at its border over ``radius`` pixels,
    exactly 0 outside: the weight never leaves the support, and never steps at its edge."""
    if radius <= 0:
        return support.astype(np.float32)
    outside = box_blur((~support).astype(np.float32), radius)
    f = np.clip(1.0 - 2.0 * outside, 0.0, 1.0)
    f[~support] = 0.0
    return f


def union_maps(maps) -> np.ndarray | None:
    """Pixel-wise maximum of the given [0, 1] maps (None entries ignored); None when none."""
    out = None
    for m in maps:
        if m is None:
            continue
        m = np.clip(np.asarray(m, np.float32), 0.0, 1.0)
        out = m if out is None else np.maximum(out, m)
    return out


def change_map(edit_maps, masks) -> np.ndarray | None:
    """THE rule for a job's change map, shared by every method and the return path:
    (union of the edit maps) × (union of the masks); None when there are neither.

    Why: a painter who paints two masks means "here, and also there" — each stroke adds a
    region that may change, as two brush strokes on one mask layer would; intersecting them
    would leave only where the strokes overlap, usually nothing, so the second mask would
    *undo* the first. The same holds for several edit maps: each says how much may change
    where it is painted, and a pixel painted on two takes the larger change. Between the two
    roles the mask is a gate on the edit map (outside every mask nothing changes; inside, the
    edit map grades how much), so they multiply; either missing counts as 1."""
    edit, mask = union_maps(edit_maps), union_maps(masks)
    if edit is None:
        return mask
    if mask is None:
        return edit
    if edit.shape != mask.shape:
        raise ValueError(f"edit map of shape {edit.shape} and mask of shape {mask.shape}")
    return edit * mask


def job_change_map(inputs) -> np.ndarray | None:
    """:func:`change_map` of a job's ``edit_map`` and ``mask`` layers (any number of each)."""
    from .images import map_from_rgba

    return change_map([map_from_rgba(li.rgba) for li in inputs.all("edit_map")],
                      [map_from_rgba(li.rgba) for li in inputs.all("mask")])


def change_weight(edit_map: np.ndarray | None, mask: np.ndarray | None, shape: tuple[int, int],
                  feather: int) -> np.ndarray | None:
    """The compositing weight at full resolution: edit map × mask (each None = 1), feathered
    inward by ``feather`` pixels where it meets exact 0. None when everything may fully change."""
    w = None
    for m in (edit_map, mask):
        if m is not None:
            m = np.clip(m.astype(np.float32), 0.0, 1.0)
            w = m if w is None else w * m
    if w is None:
        return None
    if w.shape != tuple(shape):
        raise ValueError(f"weight of shape {w.shape} for an image of shape {shape}")
    support = w > 0
    if support.all():
        return w
    return w * feather_inward(support, feather)


# -- quantising ------------------------------------------------------------------------------

_BAYER8 = np.array([[0, 32, 8, 40, 2, 34, 10, 42], [48, 16, 56, 24, 50, 18, 58, 26],
                    [12, 44, 4, 36, 14, 46, 6, 38], [60, 28, 52, 20, 62, 30, 54, 22],
                    [3, 35, 11, 43, 1, 33, 9, 41], [51, 19, 59, 27, 49, 17, 57, 25],
                    [15, 47, 7, 39, 13, 45, 5, 37], [63, 31, 55, 23, 61, 29, 53, 21]], np.float32)


def dither(shape: tuple[int, int], y0: int = 0, x0: int = 0) -> np.ndarray:
    """An ordered-dither offset in (−0.5, 0.5) for each pixel of ``shape``, fixed per document
    position: added before rounding, a smooth float gradient becomes 8-bit without bands, and a
    value that is already whole stays what it is."""
    H, W = shape
    ys = (np.arange(H) + y0) % 8
    xs = (np.arange(W) + x0) % 8
    return (_BAYER8[ys][:, xs] + 0.5) / 64.0 - 0.5


def quantise(x: np.ndarray, y0: int = 0, x0: int = 0) -> np.ndarray:
    """(H, W, C) float in [0, 255] to uint8 with :func:`dither`."""
    d = dither(x.shape[:2], y0, x0)[..., None]
    return np.clip(np.floor(x + d + 0.5), 0, 255).astype(np.uint8)


# -- bringing a result back ------------------------------------------------------------------

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive


@dataclass
class Returned:
    """A result on the target: ``image`` (the finished picture, the target's own bytes where
    nothing may change) and ``layer`` (only the change: alpha 0 where nothing may change)."""

    image: np.ndarray
    layer: np.ndarray
    info: dict


def feather_radius(target_size: Size, work_size: Size) -> int:
    """About one working pixel, in document pixels: the scale of the change the model made
    (0 when the model worked at the document's own resolution: its edges are the map's)."""
    s = max(target_size[0] / max(1, work_size[0]), target_size[1] / max(1, work_size[1]))
    return 0 if s <= 1.0 else int(min(64, math.ceil(s)))


def bring_back(out: np.ndarray, target: np.ndarray, *, box: Box | None = None,
               base: np.ndarray | None = None, weight: np.ndarray | None = None,
               radius: int = 1, eps: float = 2e-3) -> Returned:
    """Bring a working-size result ``out`` ((h, w, 3|4) uint8: the model's picture of ``box``, by
    default the whole target) back onto ``target`` ((H, W, 4) uint8).

    ``base`` is the full-resolution picture of the box the model started from (default: the
    target's own pixels there); ``weight`` the (H, W) compositing weight (:func:`change_weight`;
    None: full change everywhere in the box)."""
    target = as_rgba(target)
    H, W = target.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, W, H)
    region_t = target[y0:y1, x0:x1]
    region_b = as_rgba(base) if base is not None else region_t
    if region_b.shape[:2] != region_t.shape[:2]:
        raise ValueError(f"base of shape {region_b.shape} for a box of {region_t.shape}")
    w_region = np.ones((y1 - y0, x1 - x0), np.float32) if weight is None else weight[y0:y1, x0:x1]

    image = target.copy()
    layer = np.zeros_like(target)
    info = {"working_size": [int(out.shape[1]), int(out.shape[0])], "box": [x0, y0, x1, y1]}
    changed = w_region > 0
    if not changed.any():
        info["changed_pixels"] = 0
        return Returned(image, layer, info)
    # only the rows and columns where anything changes are carried up
    ys, xs = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
    cy0, cy1, cx0, cx1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    g_full = guided_upsample(np.asarray(out)[..., :3], region_b, radius, eps) \
        if out.shape[:2] != region_b.shape[:2] else np.asarray(out)[..., :3].astype(np.float32)
    g = g_full[cy0:cy1, cx0:cx1]
    t = region_t[cy0:cy1, cx0:cx1]
    wv = w_region[cy0:cy1, cx0:cx1]
    ch = wv > 0
    gy, gx = y0 + cy0, x0 + cx0
    mixed = t[..., :3].astype(np.float32) + wv[..., None] * (g - t[..., :3].astype(np.float32))
    q_mixed = quantise(mixed, gy, gx)
    q_g = quantise(g, gy, gx)
    sub_img = image[gy:gy + (cy1 - cy0), gx:gx + (cx1 - cx0)]
    sub_img[..., :3][ch] = q_mixed[ch]
    sub_layer = layer[gy:gy + (cy1 - cy0), gx:gx + (cx1 - cx0)]
    sub_layer[..., :3][ch] = q_g[ch]
    a = np.floor(wv * t[..., 3].astype(np.float32) + 0.5).astype(np.uint8)
    sub_layer[..., 3] = np.where(ch, a, 0)
    sub_layer[..., :3][sub_layer[..., 3] == 0] = 0
    info["changed_pixels"] = int(ch.sum())
    return Returned(image, layer, info)
