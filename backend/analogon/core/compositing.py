"""The one way back from a model's working resolution into the painter's document.

Every method runs at the model's native scale (64 px on toy-sd, 512 on SD 1.5, 1024 on SDXL)
while a document is 2000–6000 px. This module brings a method's working-size picture back onto
the target at full resolution, for all four methods alike:

1. **Maps reach any grid through one function**, :func:`map_to_grid`: area-weighted when the grid
   is coarser (each grid cell is the mean of the map over its footprint, so a 1-px stroke on a
   4096 px map reaches a 64-cell grid as 1/64 of its cell, wherever it falls), linear when it is
   finer, then snapped at exactly 0 and 1 (:func:`snap_unit`).
2. **Recoloured or drawn, decided from the fit** (:func:`fit_change`): the model's output ``O`` is
   explained, per working pixel, as a local linear colour transform of the picture the model
   started from (the *base*, area-averaged to the working grid): ``O ≈ A·base + b``, fitted over a
   3×3 window with a ridge prior towards the identity (a guided filter, He, Sun & Tang, with the
   prior at "no change" instead of "flat"). Where a window has structure, the part of it the fit
   cannot explain, either way round, decides: an edge the model drew or removed is *new
   structure*, an edge kept under new colours is a *recolouring*. A flat area takes the decision
   from the pixels of its own colour around it (:func:`recoloured_around`): a change like theirs is
   a recolouring, one unlike theirs new (the inside of a drawn shape).
3. **Carried up** (:func:`carry_up`): where the model recoloured or kept the base, ``A`` and ``b``
   are upsampled and applied to the full-resolution base, so the base's grain and 1-px lines come
   back (exactly where nothing changed, under the new colour where it changed); where it drew new
   structure, its own picture, upscaled bicubically, with none of the base's lines or edges (no
   ghost of what it removed, no false-colour lines in what it painted); between the two a soft
   transition, and the model's picture replaces the base's structure in proportion to the map.
   The result is then made consistent with the model: its area average on the working grid is
   the model's picture (the whole change arrives), without ringing at new edges.
4. **Composited by the map** (:func:`change_weight`, :func:`follow_map`): every edge of the map,
   between any two values, becomes a ramp at least one working pixel wide (a soft brush's wider
   ramp stays its own), the weight never exceeds the map, and where the map is black the target's
   own bytes are kept, exactly.
5. **A layer that carries only the change** (:func:`bring_back`): besides the finished image, the
   result as a layer whose alpha is the weight times the target's alpha (0 where nothing may
   change), so that the composite a painter sees in Krita cannot change there whatever the source
   layer's alpha, opacity, blending mode or colour depth. Changed pixels are quantised to 8 bits
   with an ordered dither, so smooth gradients show no banding.
"""
from __future__ import annotations

import itertools
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


def _keys(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = −0.5): the bicubic of image editors."""
    t = np.abs(t)
    return np.where(t <= 1.0, (1.5 * t - 2.5) * t * t + 1.0,
                    np.where(t < 2.0, ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0, 0.0))


def resample_matrix(n_in: int, n_out: int, kind: str = "linear") -> torch.Tensor:
    """(n_out, n_in) weights that resample a 1-D signal: exact area overlap when shrinking
    (rows sum to 1; an input pixel's weight is the fraction of the output cell it covers),
    interpolation between pixel centres when enlarging (``kind`` "linear", as
    ``F.interpolate(..., align_corners=False)``, or "cubic", Keys' bicubic; borders replicated),
    the identity when equal."""
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
    if kind == "linear":
        pos = np.clip(pos, 0.0, n_in - 1)
        taps = np.floor(pos)[:, None] + np.arange(2)[None, :]
        weights = np.clip(1.0 - np.abs(pos[:, None] - taps), 0.0, None)
    elif kind == "cubic":
        taps = np.floor(pos)[:, None] + np.arange(-1, 3)[None, :]
        weights = _keys(pos[:, None] - taps)
    else:
        raise ValueError(f"unknown resampling kind {kind!r}")
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.repeat(np.arange(n_out), taps.shape[1])
    np.add.at(m, (rows, np.clip(taps, 0, n_in - 1).astype(np.int64).ravel()), weights.ravel())
    return torch.from_numpy(m.astype(np.float32))


def resample(x: torch.Tensor, size: Size, kind: str = "linear") -> torch.Tensor:
    """(..., H, W) to (..., h, w) with :func:`resample_matrix` on each axis."""
    w, h = size
    H, W = x.shape[-2], x.shape[-1]
    x = x.float()
    if W != w:
        x = x @ resample_matrix(W, w, kind).T.to(x.device)
    if H != h:
        x = resample_matrix(H, h, kind).to(x.device) @ x
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
                        eps: float = 2e-3, averaged: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel colour transforms that explain ``out`` by ``guide`` (both (3, h, w) in [0, 1]):
    ``A`` (3, 3, h, w) with out_c ≈ Σ_k A[k, c] guide_k + b_c, and ``b`` (3, h, w), fitted over
    the (2·radius+1)² window around each pixel by ridge regression towards A = I, then (when
    ``averaged``) averaged over the windows that hold the pixel."""
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
    if not averaged:
        return A.reshape(3, 3, h, w), b[0]
    A = _box3(A.reshape(1, 9, h, w), radius).reshape(3, 3, h, w)
    b = _box3(b, radius)[0]
    return A, b


def _chw(img: np.ndarray) -> torch.Tensor:
    """(h, w, 3|4) uint8, or float in [0, 255], to (3, h, w) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img[..., :3], dtype=np.float32)).permute(2, 0, 1) / 255.0


def _ramp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return ((x - low) / (high - low)).clamp(0.0, 1.0)


def fit_residual(guide: torch.Tensor, out: torch.Tensor, radius: int = 1,
                 eps: float = 2e-3) -> torch.Tensor:
    """(h, w): the RMS over each window of what the colour transform that explains ``out`` by
    ``guide`` (:func:`guided_coefficients`) leaves unexplained, in [0, 1] colour units."""
    A, b = guided_coefficients(guide, out, radius, eps)
    pred = (A * guide[:, None]).sum(0) + b
    return _box3(((out - pred) ** 2).mean(0, keepdim=True)[None], radius)[0, 0].sqrt()


def push_pull(value: torch.Tensor, conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` (c, h, w) where ``conf`` (h, w, in [0, 1]) is 1, and the confident values around
    it where it is lower: each pyramid level is the confidence-weighted mean of the finer one, and
    every level fills its doubt from the next coarser (Gortler et al.'s push-pull). Returns the
    filled value and its confidence (0 where nothing anywhere was confident)."""
    if min(conf.shape) <= 1:
        return value, conf
    num = F.avg_pool2d((value * conf)[None], 2, ceil_mode=True)[0]
    den = F.avg_pool2d(conf[None, None], 2, ceil_mode=True)[0, 0]
    v, c = push_pull(num / den.clamp_min(1e-6), (4.0 * den).clamp(max=1.0))
    up = F.interpolate(torch.cat([v * c, c[None]])[None], size=conf.shape, mode="bilinear",
                       align_corners=False)[0]
    filled = conf + (1.0 - conf) * up[-1]
    return (conf * value + (1.0 - conf) * up[:-1]) / filled.clamp_min(1e-6), filled


def recoloured_around(guide: torch.Tensor, A: torch.Tensor, b: torch.Tensor, sure: torch.Tensor,
                      bins: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """What each pixel would have become under the colour transform that the pixels *of its
    colour* around it went through, where ``sure`` (h, w) in [0, 1] says that they were recoloured
    or kept: (3, h, w), and how much is known about it (h, w). ``A``/``b``: each pixel's transform
    (:func:`guided_coefficients`). A bilateral grid over the guide's colour (``bins`` per channel,
    trilinear): each bin's transforms are filled over the grid by :func:`push_pull`, and each
    pixel takes the transforms of its own colour's bins."""
    h, w = guide.shape[-2:]
    coef = torch.cat([A.reshape(9, h, w), b], 0)
    pos = guide.clamp(0, 1) * (bins - 1)
    lo = pos.floor().clamp(max=bins - 2)
    frac = pos - lo
    corners = []
    for corner in itertools.product((0, 1), repeat=3):
        d = torch.tensor(corner, dtype=lo.dtype)[:, None, None]
        share = torch.where(d > 0, frac, 1.0 - frac).prod(0)
        index = ((lo + d) * torch.tensor([bins * bins, bins, 1.0])[:, None, None]).sum(0).long()
        corners.append((index, share))
    num, known = torch.zeros_like(coef), torch.zeros_like(sure)
    for k in torch.unique(torch.stack([i for i, _ in corners])).tolist():
        member = sum(torch.where(i == k, share, torch.zeros_like(share)) for i, share in corners)
        if float((member * sure).max()) <= 0:
            continue
        value, conf = push_pull(coef, member * sure)
        num += member * conf * value
        known += member * conf
    coef = num / known.clamp_min(1e-6)
    pred = (coef[:9].reshape(3, 3, h, w) * guide[:, None]).sum(0) + coef[9:]
    return pred, known.clamp(max=1.0)


LOW, HIGH = 0.02, 0.1  # RMS colour differences (5 and 25 levels) read as "none" and "certain"


@dataclass
class ChangeFit:
    """The model's picture ``out`` explained by the picture it started from, on the working grid:
    ``guide`` the base there, ``A``/``b`` the local colour transform (:func:`guided_coefficients`),
    and ``new`` (h, w) in [0, 1], where the model *drew new structure* (1) rather than recoloured
    or kept the base (0). All tensors; colours in [0, 1]."""

    guide: torch.Tensor
    out: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    new: torch.Tensor

    def new_share(self) -> float:
        """The part of the changed working pixels that the model drew anew (0 when none changed)."""
        changed = _ramp((self.out - self.guide).pow(2).mean(0).sqrt(), LOW, HIGH)
        return float((self.new * changed).sum() / changed.sum().clamp_min(1e-6))


def fit_change(out: np.ndarray, base: np.ndarray, radius: int = 1, eps: float = 2e-3,
               low: float = LOW, high: float = HIGH) -> ChangeFit:
    """Fit the model's working-size picture ``out`` ((h, w, 3|4) uint8) to ``base`` (the
    full-resolution picture it started from, area-averaged to the same grid) and decide, region by
    region, whether the model recoloured the base or drew new structure.

    Where a window has structure, the fit both ways decides: a colour transform explains a
    recolouring, a kept picture and a changed colour under the base's own edges; it cannot explain
    an edge the model drew where the base has none (the residual of ``out`` by the base) nor an
    edge of the base the model removed (the residual of the base by ``out``). Inside a flat area
    the model filled with one colour neither residual says anything: there the pixels of the same
    base colour around decide (:func:`recoloured_around`), and where none of that colour was
    surely kept or recoloured, the votes of the structure around. Only changed pixels can be new,
    and their neighbours (a change within one working pixel reaches the full-resolution pixels
    between them); with no vote at all, recoloured."""
    h, w = out.shape[:2]
    o = _chw(out)
    g = resample(_chw(base), (w, h))
    A, b = guided_coefficients(g, o, radius, eps)
    unexplained = torch.maximum(fit_residual(g, o, radius, eps), fit_residual(o, g, radius, eps))
    spread = torch.maximum(_box3(g.pow(2)[None], radius)[0] - _box3(g[None], radius)[0].pow(2),
                           _box3(o.pow(2)[None], radius)[0] - _box3(o[None], radius)[0].pow(2))
    spread = spread.clamp_min(0).mean(0).sqrt()  # the window's structure, base's or output's
    diff = (o - g).pow(2).mean(0)
    changed = _ramp(diff.sqrt(), low, high)
    near_change = _ramp(_box3(diff[None, None], radius)[0, 0].sqrt(), low, high)
    # where there is structure, the fit decides by the part of it that it cannot explain: a
    # third or more (an edge drawn, an edge removed) is new, unless it is only the grain's worth
    # (under 2·low); a tenth or less is a recolouring
    structure = _ramp(spread, low, high) * near_change
    lost = _ramp(unexplained / spread.clamp_min(1e-6), 0.1, 0.3)
    vote_new = structure * lost * _ramp(unexplained, low, 2.0 * low)
    vote_kept = structure * (1.0 - lost)
    conf = (vote_new + vote_kept).clamp(max=1.0)
    voted = vote_new / (vote_new + vote_kept).clamp_min(1e-6)
    # where there is none: what the pixels of the same base colour around became, where the model
    # surely kept them (unchanged) or recoloured them (a vote that the votes around agree with: a
    # lone window that reads as a recolouring on the edge of a drawn shape does not speak for it).
    # A change like theirs is a recolouring (a tint across a flat background, the inside of a
    # recoloured object); a change unlike theirs is new (the inside of a drawn shape)
    kept_around, new_around = (_box3(v[None, None], 2 * radius)[0, 0] for v in (vote_kept, vote_new))
    trusted = vote_kept * kept_around / (kept_around + new_around).clamp_min(1e-6)
    A_win, b_win = guided_coefficients(g, o, radius, eps, averaged=False)  # each window's own
    g_mean, o_mean = _box3(g[None], radius)[0], _box3(o[None], radius)[0]  # and its mean colours
    became, known = recoloured_around(g_mean, A_win, b_win, torch.maximum(trusted, 1.0 - changed))
    unlike = _ramp((o_mean - became).pow(2).mean(0).sqrt(), low, high)
    # and where no pixel of that colour was surely kept or recoloured (the inside of an erased
    # object): the votes around (with none at all: recoloured)
    voted_around, seen = push_pull(voted[None], conf)
    decided = conf * voted + (1.0 - conf) * (known * unlike + (1.0 - known) * seen * voted_around[0])
    new = F.max_pool2d((changed * decided)[None, None], 2 * radius + 1, stride=1,
                       padding=radius)[0, 0]
    return ChangeFit(g, o, A, b, new)


def carry_up(out: np.ndarray, base: np.ndarray, weight: np.ndarray | None = None,
             radius: int = 1, eps: float = 2e-3, strip: int = 512) -> np.ndarray:
    """The model's working-size picture ``out`` ((h, w, 3) uint8 or float in [0, 255]) brought to
    the size of ``base`` ((H, W, 3|4) uint8, the full-resolution picture the model started from):
    see the module's docstring. ``weight`` (H, W), the compositing weight: the model's own picture
    replaces the base's structure in proportion to it (None: 1). Returns (H, W, 3) float32 in
    [0, 255] (not rounded)."""
    H, W = base.shape[:2]
    h, w = out.shape[:2]
    if (h, w) == (H, W):
        return np.asarray(out)[..., :3].astype(np.float32)
    fit = fit_change(out, base, radius, eps)
    base_t = _chw(base)
    # colour transform (9 + 3) and decision (1) bilinear, the model's own picture bicubic
    cols = resample_matrix(w, W)
    coef = torch.cat([fit.A.reshape(9, h, w), fit.b, fit.new[None]], 0) @ cols.T
    own = fit.out @ resample_matrix(w, W, "cubic").T
    rows, rows_c = resample_matrix(h, H), resample_matrix(h, H, "cubic")
    wt = None if weight is None else torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
    res = torch.empty(3, H, W)

    def drawn_share(y0, y1):  # where the model's own picture replaces the base's structure
        n = rows[y0:y1] @ coef[12]
        return n if wt is None else n * wt[y0:y1]

    for y0 in range(0, H, strip):  # a strip at a time: bounded memory
        y1 = min(H, y0 + strip)
        c = rows[y0:y1] @ coef[:12]  # (12, y1-y0, W): A[k, c] at 3k+c, then b
        bs = base_t[:, y0:y1]
        recoloured = (c[9:12] + (c[0:9].reshape(3, 3, y1 - y0, W) * bs[:, None]).sum(0)).clamp_(0, 1)
        drawn = (rows_c[y0:y1] @ own).clamp_(0, 1)
        res[:, y0:y1] = recoloured + drawn_share(y0, y1) * (drawn - recoloured)
    # consistent with the model: the correction c, bilinear at full size, that makes the result's
    # area average on the working grid the model's picture (down(up(c)) is one small linear map
    # per axis, P_rows c P_colsᵀ, well conditioned, eigenvalues in [0.43, 1], where the document
    # is larger than the working grid; a least-squares fit on an axis where it is not); where the
    # model drew, within the range of its own picture around (no ringing at its new edges)
    gap = fit.out - resample(res, (w, h))
    p_rows = resample_matrix(H, h) @ rows
    p_cols = resample_matrix(W, w) @ cols
    fix = torch.linalg.pinv(p_rows) @ gap @ torch.linalg.pinv(p_cols).T @ cols.T
    k = 2 * radius + 1
    bounds = torch.cat([-F.max_pool2d(-fit.out[None], k, stride=1, padding=radius)[0],
                        F.max_pool2d(fit.out[None], k, stride=1, padding=radius)[0]]) @ cols.T
    for y0 in range(0, H, strip):
        y1 = min(H, y0 + strip)
        r = res[:, y0:y1] + rows[y0:y1] @ fix
        lo_hi = rows[y0:y1] @ bounds
        within = torch.minimum(torch.maximum(r, lo_hi[:3]), lo_hi[3:])
        res[:, y0:y1] = r + drawn_share(y0, y1) * (within - r)
    return (res.clamp_(0, 1) * 255.0).permute(1, 2, 0).numpy()


# -- weights ---------------------------------------------------------------------------------


def box_blur(x: np.ndarray, radius: float) -> np.ndarray:
    """Mean over a window of 2·radius + 1 pixels on each axis (edges replicated; a fractional
    radius weighs the two outermost pixels by its fraction), by running sums: O(pixels) for any
    radius, and exactly 0 where the window holds only zeros."""
    if radius <= 0:
        return x.astype(np.float32)
    out = x.astype(np.float64)
    pad = int(math.ceil(radius)) + 1
    k_lo, k_hi = math.floor(pad - radius), math.floor(pad + radius + 1)
    f_lo, f_hi = pad - radius - k_lo, pad + radius + 1 - k_hi
    for axis in (0, 1):
        n = out.shape[axis]
        widths = [(0, 0), (0, 0)]
        widths[axis] = (pad, pad)
        p = np.pad(out, widths, mode="edge")
        c = np.concatenate([np.zeros_like(np.take(p, [0], axis=axis)), np.cumsum(p, axis=axis)], axis)
        idx_lo, idx_hi = np.arange(n) + k_lo, np.arange(n) + k_hi
        hi = np.take(c, idx_hi, axis=axis) + f_hi * np.take(p, idx_hi, axis=axis)
        lo = np.take(c, idx_lo, axis=axis) + f_lo * np.take(p, idx_lo, axis=axis)
        out = (hi - lo) / (2 * radius + 1)
    return out.astype(np.float32)


def erode(x: np.ndarray, radius: int) -> np.ndarray:
    """Minimum over a (2r+1)² window (pixels outside the image do not count), by van Herk and
    Gil-Werman's running minimum: O(pixels) for any r."""
    out = x.astype(np.float32)
    if radius <= 0:
        return out
    k = 2 * int(radius) + 1
    for axis in (0, 1):
        v = np.moveaxis(out, axis, -1)
        n = v.shape[-1]
        padded = np.full(v.shape[:-1] + (-(-(n + k - 1) // k) * k,), np.inf, np.float32)
        padded[..., radius:radius + n] = v
        blocks = padded.reshape(v.shape[:-1] + (-1, k))
        ahead = np.minimum.accumulate(blocks, -1).reshape(padded.shape)  # from each block's start
        behind = np.minimum.accumulate(blocks[..., ::-1], -1)[..., ::-1].reshape(padded.shape)
        out = np.moveaxis(np.minimum(behind[..., :n], ahead[..., k - 1:k - 1 + n]), -1, axis)
    return np.ascontiguousarray(out)


def follow_map(m: np.ndarray, radius: float) -> np.ndarray:
    """The compositing weight of a change map ``m`` (H, W) in [0, 1]: the map eroded by
    ``radius`` (rounded up), then averaged over 2·radius + 1 pixels. Every edge of the map, between
    any two values, becomes a ramp at least that wide (a soft brush's wider ramp stays its own);
    where the map is constant over that width the weight is the map; the weight never exceeds the
    map, so it is exactly 0 wherever the map is 0 (the ramp into black lies inside the grey)."""
    if radius <= 0:
        return m.astype(np.float32)
    return box_blur(erode(m, math.ceil(radius)), radius)


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
                  radius: float) -> np.ndarray | None:
    """The compositing weight at full resolution: edit map × mask (each None = 1) through
    :func:`follow_map` with ``radius`` (:func:`ramp_radius`). None when everything may
    fully change."""
    w = None
    for m in (edit_map, mask):
        if m is not None:
            m = np.clip(m.astype(np.float32), 0.0, 1.0)
            w = m if w is None else w * m
    if w is None:
        return None
    if w.shape != tuple(shape):
        raise ValueError(f"weight of shape {w.shape} for an image of shape {shape}")
    if (w == 1.0).all():
        return w
    return follow_map(w, radius)


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


def ramp_radius(target_size: Size, work_size: Size) -> float:
    """The radius of :func:`follow_map` for a result of ``work_size`` brought to ``target_size``:
    a hard edge of the map becomes a ramp whose 10–90 % width (0.8 of a box's) is one working
    pixel, the scale of the change the model made, and 0.4 px (0 when the model worked at the
    document's own resolution: its edges are the map's)."""
    s = max(target_size[0] / max(1, work_size[0]), target_size[1] / max(1, work_size[1]))
    return 0.0 if s <= 1.0 else ((s + 0.4) / 0.8 - 1.0) / 2.0


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
    g_full = carry_up(np.asarray(out)[..., :3], region_b, w_region, radius, eps)
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
