"""Section `resolution`: what a result looks like back in a painter's document at 1:1.

The documents (:func:`scene`) hold fine detail a model at its native size cannot: film grain,
1-px dark lines (and one 3-px line), and three objects: one the edit *erases* (a red disc), one
it *recolours* (a green disc turning purple, its lines kept) and one it *draws* where there was
none (a blue square, flat: no lines, no grain), while the whole picture takes a colour tint. The
edit map is a white rectangle around the three objects, a grey (0.3) band around it and black
outside; one side's white→grey edge is a soft ramp, the others are hard. The *ideal* is that edit
painted at the document's own resolution; the stand-in for the model (``standin``) is the ideal
area-averaged to the working size of a model of the given native size, so the return path's
every loss is measured against a known answer. A second set (``held-out``: other colours,
shapes, places and scales, lines along columns, a transposed layout) is measured with the same
code and was not used to tune anything.

The real methods (``pixels``, ``pixels-retouch``, ``appearance``, ``dia``, ``difference``) run on
the same document and map with the toy model; their output has no known ideal, so the ghost and
the three line measures are left out; instead the line contrast is reported, in working pixels
the model changed by more than 25 levels, where the return path decided the model drew new
structure (``lines_new``) and where it decided it recoloured (``lines_kept``).

Measures (:func:`measure`; levels are 8-bit luminance):

- ``black``: fraction of byte-identical pixels where the map is 0;
- ``ghost``: what is left of the erased object's edge: the difference between 3-px bands just
  inside and just outside it (off the lines, where the edge crosses them), beyond the ideal's (the
  document's own edge: ``doc_edge``);
- ``lines_drawn``: the contrast of the source's 1-px lines inside the drawn square, as a fraction
  of the source's; ``lines_recoloured``: inside the recoloured disc, as a fraction of the ideal's;
  ``lines_bg``: on the tinted background around the objects, as a fraction of the ideal's;
- ``carried``: the result area-averaged to the working grid against the model's picture there,
  where the map is white (one ramp inside its edge): Σ (R − T)·(O − T) / Σ (O − T)², 1 when all
  of the change arrived;
- ``step`` / ``ramp`` across four map edges (white→grey hard ``wg``, grey→black ``gb``, the soft
  white→grey ``wg_soft`` and the grey→black beside it ``gb2``): the largest jump between
  neighbouring pixels of the change (levels) and the change's 10–90 % width (px), beside the map's
  own width (``map_ramp``) and the working pixel (``work_px``);
- ``grey``: the change in the grey band's interior as a fraction of the change the model made
  there (target 0.3) and ``grey_detail``: the source's own detail above the working grid that is
  still in the result there, Σ dR·dT / Σ dT²;
- ``white_detail``: the energy of the detail above the working grid where the map is white, as a
  fraction of the source's, and ``white_err``: the RMS difference to the ideal there (levels):
  what the high-resolution pass is for (``return+hires`` rows: it adds detail where the error
  drops, not where the energy merely rises);
- ``drawn_edge``: the 10–90 % width of the drawn square's edge (px), beside a bicubic stretch of
  the same output (``bicubic_edge``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import register
from ._memory import PeakMemory

SIZES = [(3000, 2000)]
QUICK_SIZES = [(1200, 800)]
LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)


def _add_arguments(p) -> None:
    p.add_argument("--resolution-model", default="toy-sd",
                   help="model spec for the real methods of the resolution section (default toy-sd)")
    p.add_argument("--resolution-sizes", default=None,
                   help="document sizes, e.g. 1200x800,3000x2000 (default 3000x2000; --quick 1200x800)")
    p.add_argument("--resolution-methods", default="standin,pixels,pixels-retouch,appearance,dia,difference",
                   help="cases: standin (the known-output stand-in) and real methods")
    p.add_argument("--resolution-natives", default="64,512",
                   help="the stand-in's native sizes (default 64: toy-sd, and 512: SD 1.5)")
    p.add_argument("--resolution-hires", action="store_true",
                   help="also run the real methods with the high-resolution pass on (return+hires)")
    p.add_argument("--resolution-figures", metavar="DIR", default=None,
                   help="write 1:1 crops (input | ideal | stretch | return) of the stand-in here")


# -- the documents -----------------------------------------------------------------------------

SETS: dict[str, dict[str, Any]] = {
    # bench: tuned on
    "bench": dict(bg=(235, 235, 235), period=23, strength=0.35, thick=0.3, grain=9.0,
                  gain=(0.72, 0.92, 1.0), offset=(0, 0, 10),
                  erased=("disc", 0.24, 0.5, 0.12, (200, 50, 45)),
                  recoloured=("disc", 0.45, 0.5, 0.12, (60, 140, 70)), permute=(2, 0, 1),
                  drawn=("box", 0.66, 0.5, 0.10, (40, 90, 200)),
                  white=(0.12, 0.15, 0.82, 0.85), grey=0.12, soft=0.06, transpose=False),
    # held-out: other colours, shapes, places, line period and strength, grain; transposed
    "held-out": dict(bg=(196, 186, 160), period=17, strength=0.5, thick=0.75, grain=13.0,
                     gain=(1.0, 0.82, 0.78), offset=(25, 0, 0),
                     erased=("box", 0.3, 0.3, 0.1, (40, 60, 160)),
                     recoloured=("disc", 0.45, 0.62, 0.12, (220, 180, 40)), permute=(1, 2, 0),
                     drawn=("disc", 0.6, 0.35, 0.1, (30, 160, 90)),
                     white=(0.15, 0.12, 0.72, 0.86), grey=0.1, soft=0.05, transpose=True),
}


@dataclass
class Scene:
    """A document in the canonical layout (lines along rows, map edges left and right)."""

    doc: np.ndarray  # (H, W, 4) uint8
    ideal: np.ndarray  # (H, W, 3) uint8: the edit painted at the document's resolution
    map: np.ndarray  # (H, W) float32
    sdf: dict[str, np.ndarray]  # per object: signed distance to its edge (negative inside)
    line_rows: np.ndarray  # (H,) bool: the 1-px lines
    mid_rows: np.ndarray  # (H,) bool: rows half a period from any line
    clear_rows: np.ndarray  # (H,) bool: inside the white rows, away from every object
    edges: dict[str, tuple[int, int, int]]  # name: (lo, edge, hi) columns for a profile
    transpose: bool

    def shown(self, x: np.ndarray) -> np.ndarray:
        """A canonical picture as the painter's document has it (transposed for ``held-out``)."""
        return np.ascontiguousarray(x.swapaxes(0, 1)) if self.transpose else x

    canonical = shown  # a transposition is its own inverse


def _sdf(kind: str, cx: float, cy: float, size: float, xx, yy) -> np.ndarray:
    if kind == "disc":
        return np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - size
    return np.maximum(np.abs(xx - cx), np.abs(yy - cy)) - size


def scene(w: int, h: int, which: str = "bench", seed: int = 0) -> Scene:
    """The document, its ideal edit and its edit map (see the module's docstring), ``w`` × ``h``
    as the painter has it."""
    spec = SETS[which]
    W, H = (h, w) if spec["transpose"] else (w, h)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    m = min(W, H)
    sdf, cover = {}, {}
    for name in ("erased", "recoloured", "drawn"):
        kind, fx, fy, fs, _ = spec[name]
        sdf[name] = _sdf(kind, fx * W, fy * H, fs * m, xx, yy)
        cover[name] = np.clip(0.5 - sdf[name] / 1.5, 0.0, 1.0)[..., None]  # a 1.5 px edge
    bg = np.array(spec["bg"], np.float32)
    doc = np.broadcast_to(bg, (H, W, 3)).copy()
    for name in ("erased", "recoloured"):
        doc += cover[name] * (np.array(spec[name][4], np.float32) - doc)
    line_rows = np.arange(H) % spec["period"] == 0
    t0 = int(spec["thick"] * H)
    shade = np.ones(H, np.float32)
    shade[line_rows] = spec["strength"]
    shade[t0:t0 + 3] = spec["strength"]
    doc *= shade[:, None, None]
    grain = rng.normal(0.0, spec["grain"], doc.shape).astype(np.float32)
    doc_f = doc + grain
    # the ideal: the erased disc is the background (lines and grain continue), the recoloured one
    # has its colours permuted (lines kept), the drawn square is flat; then the tint everywhere
    ideal = np.broadcast_to(bg, (H, W, 3)) * shade[:, None, None] + grain
    ideal += cover["recoloured"] * (doc_f[..., list(spec["permute"])] - ideal)
    ideal += cover["drawn"] * (np.array(spec["drawn"][4], np.float32) - ideal)
    ideal = ideal * np.array(spec["gain"], np.float32) + np.array(spec["offset"], np.float32)

    x0, y0, x1, y1 = (int(round(v * s)) for v, s in zip(spec["white"], (W, H, W, H)))
    g, soft = int(round(spec["grey"] * m)), int(round(spec["soft"] * W))
    inside_y = (yy >= y0) & (yy < y1)
    mp = np.zeros((H, W), np.float32)
    mp[(yy >= y0 - g) & (yy < y1 + g) & (xx >= x0 - g) & (xx < x1 + soft + g)] = 0.3
    mp[inside_y & (xx >= x0) & (xx < x1)] = 1.0
    ramp = np.clip(1.0 - 0.7 * (xx - x1 + 0.5) / soft, 0.3, 1.0)
    mp = np.where(inside_y & (xx >= x1) & (xx < x1 + soft), ramp, mp)

    reach = max(sdf[n].min() for n in sdf)  # (negative) the largest object's half size
    top = min(int(fy * H - fs * m) for _, _, fy, fs, _ in (spec[n] for n in sdf))
    bottom = max(int(fy * H + fs * m) for _, _, fy, fs, _ in (spec[n] for n in sdf))
    rows = np.arange(H)
    margin = max(4, int(-reach * 0.1))
    clear = ((rows >= y0 + margin) & (rows < top - margin)) | ((rows > bottom + margin) & (rows < y1 - margin))
    clear &= np.abs(rows - t0 - 1) > 3
    mid = (rows % spec["period"]) == spec["period"] // 2
    edges = {"gb": (0, x0 - g, x0 - g // 2), "wg": (x0 - g // 2, x0, x0 + g),
             "wg_soft": (x1 - g, x1 + soft // 2, x1 + soft + g // 2),
             "gb2": (x1 + soft + g // 2, x1 + soft + g, min(W, x1 + soft + 2 * g))}
    rgba = np.concatenate([np.clip(np.round(doc_f), 0, 255).astype(np.uint8),
                           np.full((H, W, 1), 255, np.uint8)], -1)
    sc = Scene(rgba, np.clip(np.round(ideal), 0, 255).astype(np.uint8), mp, sdf, line_rows, mid,
               clear, edges, spec["transpose"])
    if sc.transpose:
        sc.doc, sc.ideal, sc.map = sc.shown(sc.doc), sc.shown(sc.ideal), sc.shown(sc.map)
    return sc


def map_rgba(m: np.ndarray) -> np.ndarray:
    g = np.clip(np.round(m * 255), 0, 255).astype(np.uint8)
    return np.stack([g, g, g, np.full_like(g, 255)], -1)


def standin(sc: Scene, native: int) -> np.ndarray:
    """The model's picture of the ideal edit at its working size (area-averaged, 8 bits)."""
    from ..core.compositing import resample
    from ..core.images import native_size

    H, W = sc.doc.shape[:2]
    w, h = native_size((W, H), native)
    t = torch.from_numpy(sc.ideal[..., :3].astype(np.float32)).permute(2, 0, 1)
    return np.clip(np.round(resample(t, (w, h)).permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)


# -- the measures ------------------------------------------------------------------------------

def _lum(x: np.ndarray) -> np.ndarray:
    return x[..., :3].astype(np.float32) @ LUMA


def _down(x: np.ndarray, work: tuple[int, int]) -> np.ndarray:
    from ..core.compositing import resample

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t.permute(2, 0, 1) if t.ndim == 3 else t
    d = resample(t, work)
    return (d.permute(1, 2, 0) if d.ndim == 3 else d).numpy()


def _proj(r: np.ndarray, d: np.ndarray) -> float | None:
    """Σ r·d / Σ d²: how much of ``d`` is in ``r``."""
    dd = float((d.astype(np.float64) ** 2).sum())
    return round(float((r.astype(np.float64) * d).sum()) / dd, 3) if dd > 1e-6 else None


def _width(p: np.ndarray) -> float | None:
    """The 10–90 % width (px, interpolated) of a monotone-ish step profile ``p``, after a
    [¼, ½, ¼] smoothing that takes out the ordered dither's column pattern (a sharp step then
    measures 1.6 px)."""
    p = np.convolve(np.pad(p, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")
    n = max(2, len(p) // 6)
    lo, hi = float(np.median(p[:n])), float(np.median(p[-n:]))
    if abs(hi - lo) < 1e-6:
        return None
    q = (p - lo) / (hi - lo)

    def cross(level):
        i = int(np.argmax(q >= level))
        if i == 0:
            return 0.0
        return i - 1 + (level - q[i - 1]) / max(q[i] - q[i - 1], 1e-9)

    return round(abs(cross(0.9) - cross(0.1)), 1)


def _line_contrast(x: np.ndarray, sc: Scene, region: np.ndarray) -> float:
    """‖mean colour on the 1-px lines − mean colour half a period away‖ inside ``region``."""
    lines, mid = region & sc.line_rows[:, None], region & sc.mid_rows[:, None]
    if not lines.any() or not mid.any():
        return float("nan")
    f = x[..., :3].astype(np.float32)
    return float(np.linalg.norm(f[lines].mean(0) - f[mid].mean(0)))


def _sdf_profile(lum: np.ndarray, sdf: np.ndarray, keep: np.ndarray, reach: int) -> np.ndarray:
    """Mean of ``lum`` in 1-px bands of ``sdf`` from −reach to +reach (where ``keep``)."""
    bins = np.floor(sdf).astype(np.int64)
    sel = keep & (bins >= -reach) & (bins < reach)
    sums = np.bincount(bins[sel] + reach, lum[sel], 2 * reach)
    counts = np.bincount(bins[sel] + reach, None, 2 * reach)
    return sums / np.maximum(counts, 1)


def measure(sc: Scene, result: np.ndarray, out: np.ndarray, known: bool = True,
            new: np.ndarray | None = None) -> dict[str, Any]:
    """The measures of the module's docstring for ``result`` (the finished document) of the
    model's working-size picture ``out``. ``known``: ``out`` is the stand-in (the ideal is the
    answer); ``new``: the return path's decision on the working grid (for ``lines_new``)."""
    from ..core.compositing import erode, ramp_radius

    doc, ideal, R = sc.canonical(sc.doc), sc.canonical(sc.ideal), sc.canonical(result)
    O = sc.canonical(np.asarray(out)[..., :3]).astype(np.float32)
    H, W = doc.shape[:2]
    h, w = O.shape[:2]
    work = (w, h)
    s = max(W / w, H / h)
    mp = sc.map
    mp = sc.canonical(mp)
    row: dict[str, Any] = {"work_px": round(s, 1)}
    black = mp == 0
    row["black"] = round(float((doc[black] == R[black]).all(-1).mean()), 6) if black.any() else None

    lum_d, lum_r, lum_i = _lum(doc), _lum(R), _lum(ideal)
    white = mp >= 1.0
    if known:
        sd = sc.sdf["erased"]
        gy, gx = np.gradient(sd)
        # off the lines, where the edge crosses them (where lines run along an edge, their own
        # blur at the working size would read as a ghost)
        where = ~(sc.line_rows | np.roll(sc.line_rows, 1) | np.roll(sc.line_rows, -1))[:, None] \
            & (np.abs(gx) > np.abs(gy))
        ins, outs = (sd > -4) & (sd <= -1) & where, (sd >= 1) & (sd < 4) & where

        def edge(lum):
            return float(lum[ins].mean() - lum[outs].mean())

        row["doc_edge"] = round(abs(edge(lum_d)), 1)
        row["ghost"] = round(abs(edge(lum_r) - edge(lum_i)), 2)
        deep = lambda n: (sc.sdf[n] < -(s + 4)) & white  # noqa: E731
        row["lines_drawn"] = round(_line_contrast(R, sc, deep("drawn")) / _line_contrast(doc, sc, deep("drawn")), 3)
        row["lines_recoloured"] = round(_line_contrast(R, sc, deep("recoloured"))
                                        / _line_contrast(ideal, sc, deep("recoloured")), 3)
        bg = white & np.all([sc.sdf[n] > s + 4 for n in sc.sdf], 0)
        row["lines_bg"] = round(_line_contrast(R, sc, bg) / _line_contrast(ideal, sc, bg), 3)
    elif new is not None:
        def cells(a):  # a working-grid map on the document's pixels
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
            return torch.nn.functional.interpolate(t, size=(H, W), mode="nearest")[0, 0].numpy()

        repainted = cells(np.sqrt(((O - _down(doc[..., :3], work)) ** 2).mean(-1)) > 25.0) > 0.5
        deep_white = erode(white.astype(np.float32), int(2 * s)) > 0
        for key, sel in (("lines_new", cells(new) >= 0.9), ("lines_kept", cells(new) <= 0.1)):
            reg = deep_white & repainted & sel
            c = _line_contrast(R, sc, reg) / _line_contrast(doc, sc, reg) if reg.sum() > 1000 else float("nan")
            row[key] = None if np.isnan(c) else round(c, 3)

    # the change carried, where the map is white (working cells wholly inside, a ramp from its edge)
    ramp = int(np.ceil(2 * ramp_radius((W, H), work) + 1))
    inner = erode(white.astype(np.float32), ramp) > 0
    down_t, down_r = _down(doc[..., :3], work), _down(R[..., :3], work)
    cells_white = _down(inner.astype(np.float32), work) >= 1.0 - 1e-6
    row["carried"] = _proj((down_r - down_t)[cells_white], (O - down_t)[cells_white])

    # the map's edges: the change's profile along the clear rows
    change = (lum_r - lum_d)[sc.clear_rows].mean(0)
    own = mp[sc.clear_rows].mean(0)
    for name, (lo, e, hi) in sc.edges.items():
        lo, hi = max(0, lo), min(W, hi)
        if not lo < e < hi:  # outside a cropped box
            continue
        prof = change[lo:hi]
        row[f"{name}_step"] = round(float(np.abs(np.diff(prof)).max()), 2)
        row[f"{name}_ramp"] = _width(prof)
        row[f"{name}_map_ramp"] = _width(own[lo:hi])

    # the grey band's interior: change and detail
    grey = erode(((mp > 0.29) & (mp < 0.31)).astype(np.float32), ramp) > 0
    cells_grey = _down(grey.astype(np.float32), work) >= 1.0 - 1e-6
    if cells_grey.any():
        c = _proj((down_r - down_t)[cells_grey], (O - down_t)[cells_grey])
        row["grey"] = None if c is None else round(c / 0.3, 3)

    def detail(lum):
        return lum - _down(_down(lum, work), (W, H))

    row["grey_detail"] = _proj(detail(lum_r)[grey], detail(lum_d)[grey]) if grey.any() else None
    row["white_detail"] = round(float((detail(lum_r)[inner] ** 2).mean() / (detail(lum_d)[inner] ** 2).mean()), 3)
    if known:
        row["white_err"] = round(float(np.sqrt(((lum_r - lum_i)[inner] ** 2).mean())), 2)

    if known:
        from ..core.compositing import resample

        sd = sc.sdf["drawn"]
        keep = ~sc.line_rows[:, None] & np.ones((1, W), bool)
        reach = int(np.ceil(2 * s)) + 4
        bic = resample(torch.from_numpy(O).permute(2, 0, 1), (W, H), "cubic").permute(1, 2, 0).numpy()
        row["drawn_edge"] = _width(_sdf_profile(lum_r, sd, keep, reach))
        row["bicubic_edge"] = _width(_sdf_profile(_lum(np.clip(bic, 0, 255)), sd, keep, reach))
    return row


# -- the runs ----------------------------------------------------------------------------------

def stretch(out: np.ndarray, target: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The return path before ``core.compositing``: resized to the document (Lanczos) and
    written over it wherever the map is above 0."""
    from ..core.images import resize_rgba, rgb_to_rgba

    H, W = target.shape[:2]
    region = resize_rgba(rgb_to_rgba(np.asarray(out)[..., :3]), (W, H))
    res = target.copy()
    res[..., :3] = np.where((m > 0)[..., None], region[..., :3], target[..., :3])
    return res


def return_path(out: np.ndarray, target: np.ndarray, m: np.ndarray, refiner=None) -> np.ndarray:
    """The shared return path (``core.compositing``) as ``core.hires.finish`` runs it; with
    ``refiner`` (a model bundle) after the high-resolution pass at its automatic size."""
    from ..core import compositing as C

    H, W = target.shape[:2]
    work = (out.shape[1], out.shape[0])
    weight = C.change_weight(m, None, (H, W), C.ramp_radius((W, H), work))
    if refiner is not None:
        from ..core.cache import Cache
        from ..core.hires import HiresSettings, refine, refine_size
        from ..methods.base import JobContext

        s = HiresSettings(mode="on")
        size = refine_size((W, H), work, refiner.native_size, s, refiner.vae_scale_factor)
        out, _ = refine(JobContext(refiner, Cache(None), 0), out, target, weight, size, s)
    return C.bring_back(out, target, weight=weight).image


def figure(path, sc: Scene, pics: list[np.ndarray]) -> None:
    """1:1 crops side by side: the erased disc's edge, the recoloured disc's inside, the drawn
    square's edge and the map's left edges (grey into black, white into grey); the pictures left to
    right (input, ideal, stretch, return), the crops top to bottom."""
    from PIL import Image

    H, W = sc.canonical(sc.doc).shape[:2]
    cw, ch = min(300, W // 4), min(160, H // 6)
    spots = []
    for name in ("erased", "recoloured", "drawn"):
        ys, xs = np.nonzero(np.abs(sc.sdf[name]) < 1)
        i = int(np.argmax(xs))  # the object's right-most edge point
        spots.append((xs[i] - cw // 2 - (cw // 3 if name == "recoloured" else 0), ys[i] - ch // 2))
    y_clear = int(np.nonzero(sc.clear_rows)[0][0])
    spots.append((sc.edges["wg"][1] - cw // 2, y_clear))
    cols = []
    for pic in pics:
        p = sc.canonical(pic)[..., :3]
        crops = [p[int(np.clip(y, 0, H - ch)):][:ch, int(np.clip(x, 0, W - cw)):][:, :cw] for x, y in spots]
        col = np.concatenate(sum(([c, np.full((4, cw, 3), 255, np.uint8)] for c in crops), [])[:-1], 0)
        cols += [col, np.full((col.shape[0], 4, 3), 255, np.uint8)]
    Image.fromarray(np.concatenate(cols[:-1], 1)).save(path, optimize=True)


def run_standin(opts, sizes) -> list[dict[str, Any]]:
    from ..core.compositing import fit_change

    refiner = _refiner(opts) if opts.resolution_hires else None
    rows = []
    for which in SETS:
        for (w, h) in sizes:
            sc = scene(w, h, which)
            for native in (int(n) for n in opts.resolution_natives.split(",")):
                out = standin(sc, native)
                base = {"case": "standin", "set": which, "size": f"{w}x{h}", "native": native,
                        "work": f"{out.shape[1]}x{out.shape[0]}"}
                st = stretch(out, sc.doc, sc.map)
                rows.append({**base, "path": "stretch", **measure(sc, st, out)})
                t0 = time.perf_counter()
                with PeakMemory(torch.device("cpu")) as mem:
                    res = return_path(out, sc.doc, sc.map)
                secs = time.perf_counter() - t0
                rows.append({**base, "path": "return", "return_s": round(secs, 2),
                             "return_mb": round(mem.peak_mb, 1),
                             "new_share": round(fit_change(out, sc.doc).new_share(), 3),
                             **measure(sc, res, out)})
                if refiner is not None and refiner.native_size == native:
                    t0 = time.perf_counter()
                    refined = return_path(out, sc.doc, sc.map, refiner)
                    rows.append({**base, "path": "return+hires", "hires_model": opts.resolution_model,
                                 "return_s": round(time.perf_counter() - t0, 2),
                                 **measure(sc, refined, out)})
                if opts.resolution_figures and which == "bench":
                    from pathlib import Path

                    d = Path(opts.resolution_figures)
                    d.mkdir(parents=True, exist_ok=True)
                    figure(d / f"resolution-standin-{native}-{w}x{h}.png", sc, [sc.doc, sc.ideal, st, res])
                print(f"  standin {which} {w}x{h} native {native}: done", flush=True)
    return rows


def _refiner(opts):
    from ..models import LoadOptions, load_bundle

    return load_bundle(opts.resolution_model, LoadOptions(device=opts.device))


def _inputs(method_id: str, doc: np.ndarray, m: np.ndarray):
    from ..methods.base import Inputs, LayerImage

    imgs: dict[str, Any] = {}
    h, w = doc.shape[:2]
    if method_id == "pixels":
        imgs["source"] = LayerImage(doc, "doc")
    elif method_id == "appearance":
        look = np.zeros_like(doc)
        look[..., 0], look[..., 1], look[..., 2], look[..., 3] = 60, 90, 210, 255
        imgs["structure"], imgs["appearance"] = LayerImage(doc, "doc"), LayerImage(look[:256, :256].copy(), "look")
    elif method_id in ("dia", "difference"):
        a = doc[: h // 2, : w // 2].copy()
        a2 = a.copy()
        a2[..., :3] = 255 - a2[..., :3]
        imgs["a"], imgs["a_prime"], imgs["b"] = LayerImage(a, "a"), LayerImage(a2, "a2"), LayerImage(doc, "doc")
    imgs["edit_map"] = [LayerImage(map_rgba(m), "map")]
    return Inputs(imgs)


PARAMS = {
    # a repaint (new colours: the model draws) and a retouch (the picture's own words)
    "pixels": {"steps": 8, "strength": 0.75, "prompt": "a blue square and circles on a white background"},
    "pixels-retouch": {"steps": 8, "strength": 0.75, "prompt": "a red circle and a green circle on a white background"},
    "appearance": {"steps": 8, "skip_steps": 2},
    "dia": {"steps": 4, "token_iterations": 4, "views": 2, "noise_iterations": 2},
}


def run_methods(opts, sizes, cases) -> list[dict[str, Any]]:
    from ..core.cache import Cache
    from ..core.compositing import fit_change
    from ..core.hires import finish
    from ..methods import get as get_method
    from ..methods.base import JobContext
    from ..models import LoadOptions, load_bundle

    bundle = load_bundle(opts.resolution_model, LoadOptions(device=opts.device))
    rows: list[dict[str, Any]] = []
    for case in cases:
        method_id = case.split("-")[0]
        method = get_method(method_id)
        for (w, h) in sizes:
            sc = scene(w, h, "bench")
            inputs = _inputs(method_id, sc.doc, sc.map)
            params = method.Params(**PARAMS.get(case, method.demo_params))
            t0 = time.perf_counter()
            gen = method.generate(JobContext(bundle, Cache(None), 0), inputs, params)
            t_gen = time.perf_counter() - t0
            first = gen.images[0]
            out = np.asarray(first.rgba)[..., :3]
            base = {"case": case, "set": "bench", "size": f"{w}x{h}", "native": bundle.native_size,
                    "work": f"{out.shape[1]}x{out.shape[0]}", "gen_s": round(t_gen, 2)}
            if first.box is not None:  # PIXELS crops its work to the edit map's bounds
                base["box"] = list(first.box)
            fit = fit_change(out, sc.doc if first.base is None else first.base)
            for hires in ("off", "on") if opts.resolution_hires else ("off",):
                p = params.model_copy(update={"hires": hires})
                t0 = time.perf_counter()
                with PeakMemory(bundle.device) as mem:
                    res = finish(JobContext(bundle, Cache(None), 0), method, inputs, p, copy.deepcopy(gen))
                secs = time.perf_counter() - t0
                result = res.images[0].rgba
                rows.append({**base, "path": "return" + ("+hires" if hires == "on" else ""),
                             "return_s": round(secs, 2), "return_mb": round(mem.peak_mb, 1),
                             "new_share": round(fit.new_share(), 3),
                             **(measure(sc, result, out, known=False, new=fit.new.numpy())
                                if first.box is None else measure_box(sc, result, first, fit))})
            print(f"  {case} {w}x{h}: done", flush=True)
    return rows


def measure_box(sc: Scene, result: np.ndarray, first, fit) -> dict[str, Any]:
    """PIXELS crops its work to the edit map's bounds: the measures that need the whole document
    on one working grid are taken on that box."""
    x0, y0, x1, y1 = first.box
    sub = Scene(sc.doc[y0:y1, x0:x1], sc.ideal[y0:y1, x0:x1], sc.map[y0:y1, x0:x1],
                {k: v[y0:y1, x0:x1] for k, v in sc.sdf.items()}, sc.line_rows[y0:y1], sc.mid_rows[y0:y1],
                sc.clear_rows[y0:y1], {k: (lo - x0, e - x0, hi - x0) for k, (lo, e, hi) in sc.edges.items()},
                False)
    if first.base is not None:
        sub.doc = np.asarray(first.base)
    row = measure(sub, result[y0:y1, x0:x1], np.asarray(first.rgba)[..., :3], known=False,
                  new=fit.new.numpy())
    row["black"] = round(float((sc.doc[sc.map == 0] == result[sc.map == 0]).all(-1).mean()), 6)
    return row


def run(opts) -> list[dict[str, Any]]:
    sizes = SIZES
    if opts.resolution_sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in opts.resolution_sizes.split(",")]
    elif opts.quick:
        sizes = QUICK_SIZES
    cases = opts.resolution_methods.split(",")
    rows = run_standin(opts, sizes) if "standin" in cases else []
    real = [c for c in cases if c != "standin"]
    return rows + (run_methods(opts, sizes, real) if real else [])


register("resolution", run, "results back in the document at 1:1: ghosts, source lines, change "
         "carried, map edges, the grey band; a known-output stand-in and the real methods",
         _add_arguments)
