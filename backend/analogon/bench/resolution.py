"""Section `resolution`: what a result looks like back in a painter's document at 1:1.

Documents of 512², 2048², 3000×2000 and 4096² pixels (``--quick``: 512² and 3000×2000) made here
with fine detail: film grain (σ 9 levels), a red disc whose edge is a 2.5 px ramp, 1-px dark lines
every 23 px and a 3-px one. The edit map is a white spot over the disc's edge, a grey (0.3) ring
around it and black elsewhere. Cases: PIXELS edits with that map and a prompt that repaints
(``pixels``: a blue circle) or retouches (``pixels-retouch``: the picture's own words), appearance
and DIA with that map and without one, each brought back by

- ``stretch``: the return path before this section existed, for comparison: the working-size
  output resized to the region (Lanczos) and written over the target wherever the map is above 0;
- ``return``: the shared return path (``core.compositing``): the change carried up by guided
  upsampling, composited by the map's value with an inward feather;
- ``return+hires``: the same after the tiled high-resolution pass (``core.hires``; with
  ``--resolution-max-pixels`` its cap, default: the method's automatic one).

Per region (black / grey / changed: the white spot; without a map the whole image is
"changed"): the fraction of byte-identical pixels (black), PSNR and SSIM (8×8 windows, on
luminance) against the input, the Laplacian-variance ratio to the input, the detail energy above
the working grid (the energy of ``x − up(down(x))`` at the method's working size) as a ratio to the
input's, the width of the disc's edge where it crosses the changed region (10–90 % rise, median
over rows; 2.5 px in the input), the step across the map's outer boundary (the mean absolute
luminance change of the last non-black pixels: their black neighbours cannot change, so this is
the step beyond the input's own), the working size, seconds and peak memory.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import register
from ._memory import PeakMemory

SIZES = [(512, 512), (2048, 2048), (3000, 2000), (4096, 4096)]
QUICK_SIZES = [(512, 512), (3000, 2000)]


def _add_arguments(p) -> None:
    p.add_argument("--resolution-model", default="toy-sd",
                   help="model spec for the resolution section (default toy-sd)")
    p.add_argument("--resolution-sizes", default=None,
                   help="document sizes, e.g. 512x512,3000x2000 (default: all four; --quick: two)")
    p.add_argument("--resolution-methods", default="pixels,pixels-retouch,appearance,dia",
                   help="cases to run (default pixels,pixels-retouch,appearance,dia)")
    p.add_argument("--resolution-max-pixels", type=int, default=0,
                   help="the high-resolution pass's pixel cap (0: the automatic one)")
    p.add_argument("--resolution-figures", metavar="DIR", default=None,
                   help="write 1:1 crops (input | stretch | return | return+hires) per case here")


def figure(path, doc: np.ndarray, outs: list[np.ndarray], m: np.ndarray | None, geo: dict) -> None:
    """Two 1:1 crops side by side for each picture: the spot's edge (the change) and the ring's
    outer boundary (grey into black); the pictures left to right, the crops top and bottom."""
    from PIL import Image

    h, w = doc.shape[:2]
    s = min(w, h)
    cw, ch = min(360, w // 2), min(240, h // 2)
    sx, sy = int(geo["cx"] + geo["r"]), int(geo["cy"])
    spots = [(sx - int(0.12 * s) - cw // 3, sy - ch // 2), (sx + int(0.2 * s) - cw // 2, sy - ch // 2)]
    cols = []
    for pic in [doc, *outs]:
        crops = []
        for x0, y0 in spots:
            x0, y0 = int(np.clip(x0, 0, w - cw)), int(np.clip(y0, 0, h - ch))
            crops.append(pic[y0:y0 + ch, x0:x0 + cw, :3])
        cols.append(np.concatenate([crops[0], np.full((4, cw, 3), 255, np.uint8), crops[1]], 0))
        cols.append(np.full((cols[-1].shape[0], 4, 3), 255, np.uint8))
    Image.fromarray(np.concatenate(cols[:-1], 1)).save(path)


# -- the documents -----------------------------------------------------------------------------

def document(w: int, h: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """An RGBA8 picture with grain, a disc with a 2.5 px edge and thin lines; and its geometry."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cx, cy, r = w * 0.45, h * 0.5, min(w, h) * 0.25
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - r  # signed distance to the disc's edge
    inside = np.clip(0.5 - d / 2.5, 0.0, 1.0)  # a 2.5 px ramp
    bg = np.array([235.0, 235.0, 235.0])  # the toy world's white background, a little grey
    fg = np.array([200.0, 50.0, 45.0])
    img = bg * (1 - inside[..., None]) + fg * inside[..., None]
    lines = (np.arange(h) % 23 == 0)[:, None] & np.ones((1, w), bool)
    img[lines] = img[lines] * 0.35
    img[int(h * 0.8):int(h * 0.8) + 3] *= 0.35
    img += rng.normal(0.0, 9.0, img.shape)
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], -1)
    return rgba, {"cx": cx, "cy": cy, "r": r}


def edit_map(w: int, h: int, geo: dict) -> np.ndarray:
    """A white spot centred on the disc's right edge, a grey 0.3 ring around it, black elsewhere."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    sx, sy = geo["cx"] + geo["r"], geo["cy"]
    dist = np.sqrt((xx - sx) ** 2 + (yy - sy) ** 2)
    s = min(w, h)
    m = np.where(dist < 0.12 * s, 1.0, np.where(dist < 0.2 * s, 0.3, 0.0)).astype(np.float32)
    return m


def map_rgba(m: np.ndarray) -> np.ndarray:
    g = np.clip(np.round(m * 255), 0, 255).astype(np.uint8)
    return np.stack([g, g, g, np.full_like(g, 255)], -1)


# -- the measures ------------------------------------------------------------------------------

def _lum(x: np.ndarray) -> np.ndarray:
    return x[..., :3].astype(np.float32) @ np.array([0.2126, 0.7152, 0.0722], np.float32)


def _lap(lum: np.ndarray) -> np.ndarray:
    out = np.zeros_like(lum)
    out[1:-1, 1:-1] = 4 * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1] - lum[1:-1, :-2] - lum[1:-1, 2:]
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else round(10 * np.log10(255.0 ** 2 / mse), 2)


def _ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of two luminance images over non-overlapping 8×8 windows (one value per window)."""
    h, w = (a.shape[0] // 8) * 8, (a.shape[1] // 8) * 8
    A = a[:h, :w].reshape(h // 8, 8, w // 8, 8).astype(np.float64)
    B = b[:h, :w].reshape(h // 8, 8, w // 8, 8).astype(np.float64)
    ma, mb = A.mean((1, 3)), B.mean((1, 3))
    va, vb = A.var((1, 3)), B.var((1, 3))
    cov = (A * B).mean((1, 3)) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))


def _detail(lum: np.ndarray, work: tuple[int, int]) -> np.ndarray:
    """x − up(down(x)) at the working size: the detail the working grid cannot hold."""
    import torch

    from ..core.compositing import resample

    t = torch.from_numpy(lum)
    low = resample(resample(t, work), (lum.shape[1], lum.shape[0])).numpy()
    return lum - low


def _edge_width(lum: np.ndarray, region: np.ndarray, geo: dict) -> float | None:
    """The 10–90 % width of the disc's right edge along rows that cross it inside ``region``."""
    cx, cy, r = geo["cx"], geo["cy"], geo["r"]
    h, w = lum.shape
    span = max(6, int(r * 0.06))
    widths = []
    for y in range(int(cy - r * 0.3), int(cy + r * 0.3) + 1, max(1, int(r * 0.02))):
        if not (0 <= y < h):
            continue
        dx = np.sqrt(max(r * r - (y - cy) ** 2, 0.0))
        x_e = int(round(cx + dx))
        x0, x1 = max(0, x_e - 4 * span), min(w, x_e + 4 * span)
        if x1 - x0 < 8 or not region[y, max(0, x_e - 1):x_e + 2].all():
            continue
        rows = lum[max(0, y - 2):y + 3, x0:x1].mean(0)  # 5 rows: grain down, edge kept
        lo, hi = np.percentile(rows[: span], 50), np.percentile(rows[-span:], 50)
        amp = hi - lo
        if abs(amp) < 15:
            continue
        p = (rows - lo) / amp
        above10 = np.nonzero(p >= 0.1)[0]
        above90 = np.nonzero(p >= 0.9)[0]
        if len(above10) == 0 or len(above90) == 0:
            continue
        widths.append(max(1, above90[0] - above10[0] + 1))
    return round(float(np.median(widths)), 1) if widths else None


def measure(inp: np.ndarray, out: np.ndarray, m: np.ndarray | None, geo: dict,
            work: tuple[int, int]) -> dict[str, Any]:
    li, lo = _lum(inp), _lum(out)
    regions = {"black": m == 0, "grey": (m > 0) & (m < 1), "changed": m >= 1} if m is not None \
        else {"changed": np.ones(li.shape, bool)}
    lap_i, lap_o = _lap(li), _lap(lo)
    det_i, det_o = _detail(li, work), _detail(lo, work)
    ssim = _ssim_map(li, lo)
    row: dict[str, Any] = {}
    for name, reg in regions.items():
        if not reg.any():
            continue
        if name == "black":
            row["black_identical"] = round(float((inp[reg] == out[reg]).all(-1).mean()), 6)
            continue
        small = reg[: ssim.shape[0] * 8: 8, : ssim.shape[1] * 8: 8] if ssim.size else reg[:0]
        row[f"{name}_psnr"] = _psnr(inp[reg][:, :3], out[reg][:, :3])
        row[f"{name}_ssim"] = round(float(ssim[small].mean()), 3) if small.any() else None
        row[f"{name}_lapvar"] = round(float(lap_o[reg].var() / max(lap_i[reg].var(), 1e-9)), 3)
        row[f"{name}_detail"] = round(float((det_o[reg] ** 2).mean() / max((det_i[reg] ** 2).mean(), 1e-9)), 4)
    row["edge_px"] = _edge_width(lo, regions["changed"], geo)
    if m is not None:
        black = m == 0
        inner = ~black & (np.roll(black, 1, 0) | np.roll(black, -1, 0) | np.roll(black, 1, 1)
                          | np.roll(black, -1, 1))
        row["seam"] = round(float(np.abs(lo[inner] - li[inner]).mean()), 2) if inner.any() else None
    return row


# -- the runs ----------------------------------------------------------------------------------

def _stretch(result, target: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """The return path before ``core.compositing``: resize to the box, overwrite where map > 0."""
    from ..core.images import resize_rgba, rgb_to_rgba

    x0, y0, x1, y1 = result.box or (0, 0, target.shape[1], target.shape[0])
    region = resize_rgba(rgb_to_rgba(np.asarray(result.rgba)[..., :3]), (x1 - x0, y1 - y0))
    out = target.copy()
    sub = out[y0:y1, x0:x1]
    keep = np.zeros(sub.shape[:2], bool) if m is None else m[y0:y1, x0:x1] <= 0
    sub[..., :3] = np.where(keep[..., None], sub[..., :3], region[..., :3])
    return out


def _inputs(method_id: str, doc: np.ndarray, m: np.ndarray | None):
    from ..methods.base import Inputs, LayerImage

    imgs: dict[str, Any] = {}
    h, w = doc.shape[:2]
    if method_id == "pixels":
        imgs["source"] = LayerImage(doc, "doc")
    elif method_id == "appearance":
        look = np.zeros_like(doc)
        look[..., 0], look[..., 1], look[..., 2], look[..., 3] = 60, 90, 210, 255
        imgs["structure"], imgs["appearance"] = LayerImage(doc, "doc"), LayerImage(look[:256, :256].copy(), "look")
    elif method_id == "dia":
        a = doc[: h // 2, : w // 2].copy()
        a2 = a.copy()
        a2[..., :3] = 255 - a2[..., :3]
        imgs["a"], imgs["a_prime"], imgs["b"] = LayerImage(a, "a"), LayerImage(a2, "a2"), LayerImage(doc, "doc")
    if m is not None:
        imgs["edit_map"] = [LayerImage(map_rgba(m), "map")]
    return Inputs(imgs)


PARAMS = {
    # a repaint (a new colour: the disc's edge is the model's) and a retouch (the picture's own
    # words: the model keeps the disc, so its edge measures how the return path keeps detail)
    "pixels": {"steps": 8, "strength": 0.75, "prompt": "a blue circle on a white background"},
    "pixels-retouch": {"steps": 8, "strength": 0.75, "prompt": "a red circle on a white background"},
    "appearance": {"steps": 8, "skip_steps": 2},
    "dia": {"steps": 4, "token_iterations": 4, "views": 2, "noise_iterations": 2},
}


def run(opts) -> list[dict[str, Any]]:
    from ..core.cache import Cache
    from ..core.hires import finish
    from ..methods import get as get_method
    from ..methods.base import JobContext
    from ..models import LoadOptions, load_bundle

    bundle = load_bundle(opts.resolution_model, LoadOptions(device=opts.device))
    sizes = SIZES
    if opts.resolution_sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in opts.resolution_sizes.split(",")]
    elif opts.quick:
        sizes = QUICK_SIZES
    rows: list[dict[str, Any]] = []
    for case in opts.resolution_methods.split(","):
        method_id = case.split("-")[0]
        method = get_method(method_id)
        for (w, h) in sizes:
            doc, geo = document(w, h)
            for with_map in ((True,) if method_id == "pixels" else (False, True)):
                m = edit_map(w, h, geo) if with_map else None
                inputs = _inputs(method_id, doc, m)
                params = method.Params(**PARAMS.get(case, {}))
                ctx = JobContext(bundle, Cache(None), 0)
                t0 = time.perf_counter()
                with PeakMemory(bundle.device) as mem_gen:
                    gen = method.generate(ctx, inputs, params)
                t_gen = time.perf_counter() - t0
                first = gen.images[0]
                work = (first.rgba.shape[1], first.rgba.shape[0])
                base = {"case": case, "size": f"{w}x{h}", "map": with_map,
                        "work": f"{work[0]}x{work[1]}", "gen_s": round(t_gen, 2),
                        "gen_mb": round(mem_gen.peak_mb, 1)}
                stretched = _stretch(first, doc, m)
                rows.append({**base, "path": "stretch", **measure(doc, stretched, m, geo, work)})
                outs = [stretched]
                for hires in ("off", "on"):
                    import copy

                    res = copy.deepcopy(gen)
                    p = params.model_copy(update={"hires": hires,
                                                  "hires_max_pixels": opts.resolution_max_pixels})
                    t0 = time.perf_counter()
                    with PeakMemory(bundle.device) as mem:
                        res = finish(JobContext(bundle, Cache(None), 0), method, inputs, p, res)
                    secs = time.perf_counter() - t0
                    info = res.info["return"]
                    hi = info.get("hires") if isinstance(info, dict) else None
                    rows.append({**base, "path": "return" + ("+hires" if hires == "on" else ""),
                                 "return_s": round(secs, 2), "return_mb": round(mem.peak_mb, 1),
                                 "hires": f"{hi['size'][0]}x{hi['size'][1]}/{hi['tiles']}t" if hi else None,
                                 **measure(doc, res.images[0].rgba, m, geo, work)})
                    outs.append(res.images[0].rgba)
                if opts.resolution_figures:
                    from pathlib import Path

                    d = Path(opts.resolution_figures)
                    d.mkdir(parents=True, exist_ok=True)
                    figure(d / f"resolution-{case}-{w}x{h}{'-map' if with_map else ''}.png",
                           doc, outs, m, geo)
                print(f"  {case} {w}x{h} map={with_map}: done", flush=True)
    return rows


register("resolution", run, "results back in the document at 1:1: stretch vs the return path, "
         "with and without the high-resolution pass", _add_arguments)
