"""The attribute reader: recovers a toy-world scene from pixels by plain image analysis.

No learning. ``read(img, world="toy64")`` reads an image of either world.

toy64 (one or two separate objects on a plain background):
1. background: the median colour of the image's outer ring, nearest background colour;
2. objects: pixels far from that background colour, split into 4-connected components,
   holes filled, tiny specks dropped; largest first;
3. shape and size: every shape is drawn into the component's bounding box (a template) and
   the one with the highest intersection-over-union wins; the template's radius gives the
   size (small/large, the midpoint between the two radii is the boundary);
4. colour: interior pixels vote for the nearest palette colour or its dark texture ink;
5. texture: which pixels are ink, compared with the world's stripe and dot grids (any
   phase), or with none (plain).

toy128 (one to three objects that may overlap, on a plain, graded or patterned background):
1. background: estimated under every pixel from the image's 2-px border, where no object
   reaches: the border's median colour (the nearest background colour names it), plus per
   row and per column how far the border departs from it; a period-8 line in those
   profiles is "patterned", a top brighter than the bottom "graded", else "plain";
2. pixels: each one is the background, one of the six colours (anything between the
   colour's ink, colour * SHADE, and the colour itself), or unknown (anti-aliased seams);
   one mask per colour (a scene's colours are distinct), opened with a 3x3 square to drop
   the seams that land on a third colour; a colour covering under 2 % of the image is no
   object;
3. shape, size and centre: every (shape, size) template, drawn as the world draws it, at
   every placement (FFT correlation), scored by intersection over union on the readable
   pixels: pixels of other objects and seams may or may not belong to the object (it can
   be occluded), at a small cost (of two explanations, the one that hides less wins);
4. texture: the mask's interior (3 px in from every edge: no outline, no seam) split into
   ink and flat colour and compared with each texture's ink as rendered (any phase);
   plain: no ink.

``read`` returns ``{"background", "objects": [...], **first object}`` (toy128 adds
``"backdrop"``): objects are listed largest first (toy128: by visible area; the depth order
is not read), each with ``shape``, ``colour``, ``size``, ``texture``, ``x``, ``y`` and
diagnostic scores; the first object's attributes are repeated at the top level for
convenience and are ``None`` when no object is found. :func:`match_objects` pairs read
objects with a scene's, :func:`agreement_all` says which attributes agree.

:func:`read_fine_texture` reads the texture of one area of a document larger than the world
whose textures keep the world's own period (``render(..., texture_scale=1)``): at 1:1, window
by window.
"""
from __future__ import annotations

import functools
import math
from collections import Counter, deque
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .world import (BACKGROUNDS, COLOURS, RADIUS, SHADE, SHAPES,
                    SIZES, SUPERSAMPLE, TEXTURE_CELLS, WORLD64, World, _erode_by, _polygon,
                    _shape_mask, _texture_ink, objects as scene_objects, world_of)

MASK_DISTANCE = 48.0  # RGB distance from the background colour that counts as "object"
MIN_AREA_FRACTION = 0.004  # components smaller than this share of the image are noise

_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], np.float64)
_COL_NAMES = tuple(COLOURS)
_COL_RGB = np.array([COLOURS[n] for n in _COL_NAMES], np.float64)
# Palette for colour votes: base colours, then their texture ink.
_VOTE_RGB = np.concatenate([_COL_RGB, _COL_RGB * SHADE])


def _as_rgb(img: Any) -> np.ndarray:
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    a = np.asarray(img)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks, largest first."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    comps: list[list[tuple[int, int]]] = []
    flat = mask.tolist()
    lab = labels.tolist()
    for y0 in range(h):
        row = flat[y0]
        for x0 in range(w):
            if not row[x0] or lab[y0][x0]:
                continue
            n = len(comps) + 1
            pix = []
            q = deque([(y0, x0)])
            lab[y0][x0] = n
            while q:
                y, x = q.popleft()
                pix.append((y, x))
                for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= yy < h and 0 <= xx < w and flat[yy][xx] and not lab[yy][xx]:
                        lab[yy][xx] = n
                        q.append((yy, xx))
            comps.append(pix)
    out = []
    for pix in sorted(comps, key=len, reverse=True):
        m = np.zeros((h, w), bool)
        ys, xs = zip(*pix)
        m[list(ys), list(xs)] = True
        out.append(m)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Pixels not reachable from the border through non-mask pixels belong to the object."""
    free = ~mask
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = (
        free[0, :], free[-1, :], free[:, 0], free[:, -1])
    while True:
        grown = outside.copy()
        grown[1:, :] |= outside[:-1, :]
        grown[:-1, :] |= outside[1:, :]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if (grown == outside).all():
            return ~outside
        outside = grown


def _erode(mask: np.ndarray) -> np.ndarray:
    m = mask.copy()
    m[1:, :] &= mask[:-1, :]
    m[:-1, :] &= mask[1:, :]
    m[:, 1:] &= mask[:, :-1]
    m[:, :-1] &= mask[:, 1:]
    return m


_UNIT_BOX: dict[str, tuple[float, float]] = {}


def _unit_box(shape: str) -> tuple[float, float]:
    """(width, height) of a shape of radius 1."""
    if shape not in _UNIT_BOX:
        if shape == "circle":
            _UNIT_BOX[shape] = (2.0, 2.0)
        else:
            pts = np.array(_polygon(shape, 0.0, 0.0, 1.0))
            _UNIT_BOX[shape] = (float(np.ptp(pts[:, 0])), float(np.ptp(pts[:, 1])))
    return _UNIT_BOX[shape]


def _template(shape: str, cx: float, cy: float, r: float, side: int, ss: int = 4) -> np.ndarray:
    m = Image.new("L", (side * ss, side * ss), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([(cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss], fill=255)
    else:
        d.polygon(_polygon(shape, cx * ss, cy * ss, r * ss), fill=255)
    a = np.asarray(m, np.float64).reshape(side, ss, side, ss).mean(axis=(1, 3)) / 255.0
    return a > 0.5


def _read_shape(mask: np.ndarray) -> tuple[str, float, float, float, dict[str, float]]:
    side = mask.shape[0]
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = float(x1 - x0), float(y1 - y0)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    scores = {}
    radii = {}
    for s in SHAPES:
        uw, uh = _unit_box(s)
        r = (w / uw + h / uh) / 2.0
        t = _template(s, cx, cy, r, side)
        inter = np.logical_and(t, mask).sum()
        union = np.logical_or(t, mask).sum()
        scores[s] = float(inter / max(union, 1))
        radii[s] = r
    best = max(scores, key=scores.get)
    return best, radii[best] / side, cx / side, cy / side, scores


def _phase_match(ink: np.ndarray, ys: np.ndarray, xs: np.ndarray, tile: np.ndarray) -> float:
    """The best share of pixels (ys, xs) whose ``ink`` agrees with a periodic ``tile``, over
    every phase of the tile."""
    period = tile.shape[0]
    # Every phase at once: (period, period, N) indices into the tile.
    shifts = np.arange(period)
    yy = (ys[None, None, :] + shifts[:, None, None]) % period
    xx = (xs[None, None, :] + shifts[None, :, None]) % period
    return float((tile[yy, xx] == ink[None, None, :]).mean(-1).max())


def _read_colour_texture(img: np.ndarray, mask: np.ndarray) -> tuple[str, str, dict[str, float]]:
    inner = _erode(mask)
    if inner.sum() < 8:
        inner = mask
    px = img[inner].astype(np.float64)
    d = ((px[:, None, :] - _VOTE_RGB[None]) ** 2).sum(-1)
    nearest = d.argmin(1)
    n = len(_COL_NAMES)
    votes = np.bincount(nearest % n, minlength=n)
    ci = int(votes.argmax())
    colour = _COL_NAMES[ci]
    # Texture: which interior pixels are ink (closer to the dark ink than to the colour)?
    base, ink_rgb = _COL_RGB[ci], _COL_RGB[ci] * SHADE
    ink = ((px - ink_rgb) ** 2).sum(-1) < ((px - base) ** 2).sum(-1)
    ink_map = np.zeros(mask.shape, bool)
    ink_map[inner] = ink
    side = mask.shape[0]
    tex_scores = {"plain": float((~ink).mean())}
    period = max(1, int(round(side / TEXTURE_CELLS)))
    ys, xs = np.nonzero(inner)
    for tex in ("striped", "dotted"):
        tex_scores[tex] = _phase_match(ink, ys, xs, _texture_ink(tex, side)[:period, :period])
    texture = max(tex_scores, key=tex_scores.get)
    info = {"colour_share": float(votes[ci] / max(votes.sum(), 1)),
            "ink_share": float(ink.mean()), **{f"tex_{k}": v for k, v in tex_scores.items()}}
    return colour, texture, info


def read(img: Any, world: str | World = "toy64") -> dict[str, Any]:
    """Read an image of ``world`` (a name or a World; RGB array or PIL image) into its
    attributes; see the module's docstring."""
    a = _as_rgb(img)
    if a.shape[0] != a.shape[1]:
        raise ValueError("the reader expects a square image")
    w = world_of(world)
    out = _read_separate(a) if w is WORLD64 else _read_layered(a, w)
    first = out["objects"][0] if out["objects"] else {}
    for k in ("shape", "colour", "size", "texture", "x", "y"):
        out[k] = first.get(k)
    return out


def _read_separate(a: np.ndarray) -> dict[str, Any]:
    """toy64: up to two objects that do not touch, on a plain background."""
    side = a.shape[0]
    f = a.astype(np.float64)
    ring = np.concatenate([f[:2].reshape(-1, 3), f[-2:].reshape(-1, 3),
                           f[:, :2].reshape(-1, 3), f[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(ring, axis=0)
    background = _BG_NAMES[int(((_BG_RGB - bg_rgb) ** 2).sum(-1).argmin())]
    dist = np.sqrt(((f - bg_rgb) ** 2).sum(-1))
    mask = dist > MASK_DISTANCE
    objects = []
    min_area = MIN_AREA_FRACTION * side * side
    for comp in _components(mask):
        if comp.sum() < min_area:
            break
        comp = _fill_holes(comp)
        shape, r, x, y, shape_scores = _read_shape(comp)
        colour, texture, info = _read_colour_texture(a, comp)
        size = "large" if r > (RADIUS["small"] + RADIUS["large"]) / 2 else "small"
        objects.append({"shape": shape, "colour": colour, "size": size, "texture": texture,
                        "x": x, "y": y, "radius": r, "area": float(comp.sum()) / side ** 2,
                        "shape_iou": shape_scores[shape], **info})
        if len(objects) == 2:
            break
    return {"background": background, "objects": objects}


def agreement(read_result: dict[str, Any], scene: dict[str, Any],
              attributes: tuple[str, ...] = ("shape", "colour", "size", "texture",
                                             "background")) -> dict[str, bool]:
    """Which attributes of ``scene`` the reading confirms (first object only; for scenes of
    several objects see :func:`agreement_all`)."""
    return {k: read_result.get(k) == scene.get(k) for k in attributes}


# -- layered worlds (toy128) --------------------------------------------------------------

BORDER = 2  # native pixels at each image edge that no object reaches (the layout's margin)
PATTERN_LEVELS = 10.0  # a periodic line this many levels off the background: "patterned"
GRADE_LEVELS = 10.0  # top quarter this many levels above the bottom quarter: "graded"
PIXEL_DISTANCE = 48.0  # farther than this from the background and every colour: unknown
MIN_OBJECT_SHARE = 0.02  # a colour covering less of the image (after cleaning) is no object
HIDDEN_WEIGHT = 0.1  # how much a template's part hidden under other objects costs
TEXTURE_EROSION = 3  # native pixels dropped at the edges before the texture is read


def _square_pass(mask: np.ndarray, combine: Any, start: bool) -> np.ndarray:
    """Every pixel's 3x3 neighbourhood combined (np.logical_and: erosion, np.logical_or:
    dilation); outside the image counts as False."""
    h, w = mask.shape
    p = np.pad(mask, 1)
    out = np.full_like(mask, start)
    for dy in range(3):
        for dx in range(3):
            combine(out, p[dy:dy + h, dx:dx + w], out=out)
    return out


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square: drops anything thinner than 3 pixels (the
    anti-aliased seams between two colours that land on a third)."""
    return _square_pass(_square_pass(mask, np.logical_and, True), np.logical_or, False)


def _background(f: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The background under every pixel, estimated from the image's border (where no object
    reaches): its base colour, and per row and per column how far the border departs from
    it (a gradient; patterned lines). Returns (base rgb, row deviation (H, 3), column
    deviation (W, 3)); the background at (y, x) is the base plus the larger deviation."""
    b = border
    ring = np.concatenate([f[:b].reshape(-1, 3), f[-b:].reshape(-1, 3),
                           f[:, :b].reshape(-1, 3), f[:, -b:].reshape(-1, 3)])
    base = np.median(ring, axis=0)
    rows = np.median(np.concatenate([f[:, :b], f[:, -b:]], axis=1), axis=1) - base
    edge = np.concatenate([f[:b] - rows[:b, None], f[-b:] - rows[-b:, None]], axis=0)
    cols = np.median(edge, axis=0) - base
    return base, rows, cols


def _background_image(base: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    r, c = rows[:, None, :], cols[None, :, :]
    larger = np.abs(r).sum(-1, keepdims=True) >= np.abs(c).sum(-1, keepdims=True)
    return base + np.where(larger, r, c)


def _comb(profile: np.ndarray, period: int) -> float:
    """How far one phase of a 1-D profile (levels) stands out from the others: a line
    every ``period`` pixels."""
    n = len(profile) // period * period
    p = profile[:n].reshape(-1, period).mean(0)
    return float(np.abs(p - (p.sum() - p) / (period - 1)).max())


def _read_backdrop(rows: np.ndarray, cols: np.ndarray, scale: float, world: World) -> str:
    period = int(round(world.backdrop_period * scale))
    if period >= 2 and max(_comb(rows.mean(-1), period),
                           _comb(cols.mean(-1), period)) > PATTERN_LEVELS:
        return "patterned"
    q = max(1, len(rows) // 4)
    if rows[:q].mean() - rows[-q:].mean() > GRADE_LEVELS:
        return "graded"
    return "plain"


def _classify(f: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per pixel: 0 background, 1 + i the i-th colour (its flat colour, its ink or anything
    between: the segment from colour * SHADE to colour), -1 none of these."""
    dots = f @ _COL_RGB.T / (_COL_RGB ** 2).sum(-1)  # brightness along each colour
    t = np.clip(dots, SHADE, 1.0)
    d_col = np.sqrt(((f[..., None, :] - t[..., None] * _COL_RGB) ** 2).sum(-1))
    d_bg = np.sqrt(((f - bg) ** 2).sum(-1))
    d = np.concatenate([d_bg[..., None], d_col], axis=-1)
    label = d.argmin(-1)
    label[d.min(-1) > PIXEL_DISTANCE] = -1
    return label


@functools.lru_cache(maxsize=32)
def _shape_templates(world: World, side: int) -> tuple[tuple[str, str], np.ndarray, int]:
    """Every (shape, size) drawn as it is rendered, soft coverage on a K x K canvas with the
    centre at (K/2, K/2): (keys, (n, K, K) coverages, K)."""
    reach = max(world.radius.values()) * side * 1.1  # the star is 1.05 radii wide
    k = 2 * int(math.ceil(reach)) + 2
    keys, masks = [], []
    for shape in SHAPES:
        for size in SIZES:
            big = _shape_mask(shape, k * SUPERSAMPLE / 2, k * SUPERSAMPLE / 2,
                              world.radius[size] * side * SUPERSAMPLE, k * SUPERSAMPLE)
            cover = np.asarray(big, np.float64).reshape(k, SUPERSAMPLE, k, SUPERSAMPLE)
            keys.append((shape, size))
            masks.append(cover.mean(axis=(1, 3)) / 255.0)
    return tuple(keys), np.stack(masks), k


@functools.lru_cache(maxsize=32)
def _template_spectra(world: World, side: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The templates' conjugate spectra for correlation on an n x n canvas, and their mass."""
    _, masks, k = _shape_templates(world, side)
    n = 1 << int(math.ceil(math.log2(side + k)))
    spectra = np.conj(np.fft.rfft2(masks.astype(np.float32), s=(n, n)))  # float32: 2x faster
    return spectra, masks.sum(axis=(1, 2)), n


def _fit_shape(visible: np.ndarray, hidden: np.ndarray, world: World
               ) -> tuple[str, str, float, float, dict[str, float]]:
    """The (shape, size) and centre whose template best covers ``visible``, where pixels in
    ``hidden`` (other objects, unreadable seams) may or may not be the object's.

    Score (per template and placement) = |T & V| / (|T outside H| + |V| - |T & V|
    + HIDDEN_WEIGHT |T & H|): intersection over union on the readable pixels, with a small
    cost for what the template hides (of two explanations, the one that hides less wins).
    Every placement at once by FFT correlation. Returns (shape, size, cx, cy in pixels,
    {"shape_<shape>" / "size_<size>": the best score with that shape / size})."""
    side = visible.shape[0]
    keys, _, k = _shape_templates(world, side)
    spectra, mass, n = _template_spectra(world, side)
    both = np.fft.rfft2(np.stack([visible, hidden]).astype(np.float32), s=(n, n))
    corr = np.fft.irfft2(both[:, None] * spectra[None], s=(n, n))  # (2, templates, n, n)
    # corr[..., oy, ox] (mod n): the template's top-left corner at (oy, ox); keep the
    # placements that put the template's centre inside the image.
    idx = np.arange(-(k // 2), side - k // 2 + 1) % n
    inter, under = corr[0][:, idx][:, :, idx], corr[1][:, idx][:, :, idx]
    union = mass[:, None, None] - under + visible.sum() - inter + HIDDEN_WEIGHT * under
    score = inter / np.maximum(union, 1e-9)
    best = np.unravel_index(int(score.argmax()), score.shape)
    ti, oy, ox = best
    scores: dict[str, float] = {}
    for (shape, size), s in zip(keys, score.reshape(len(keys), -1).max(1)):
        for name in (f"shape_{shape}", f"size_{size}"):
            scores[name] = max(scores.get(name, 0.0), float(s))
    plane = score[ti]
    cy = oy + (_peak_offset(*plane[oy - 1:oy + 2, ox]) if 0 < oy < plane.shape[0] - 1 else 0.0)
    cx = ox + (_peak_offset(*plane[oy, ox - 1:ox + 2]) if 0 < ox < plane.shape[1] - 1 else 0.0)
    shape, size = keys[ti]
    return shape, size, float(cx), float(cy), scores


def _peak_offset(left: float, mid: float, right: float) -> float:
    """Sub-pixel offset of a peak from three samples around it (a parabola through them)."""
    den = left - 2 * mid + right
    return float(np.clip(0.5 * (left - right) / den, -0.5, 0.5)) if den < 0 else 0.0


@functools.lru_cache(maxsize=32)
def _texture_tiles(world: World, side: int) -> dict[str, np.ndarray]:
    """Each texture's ink as it shows at ``side`` (more than half a pixel inked), one tile
    of its repeat."""
    period = int(round(world.repeat * side / world.size))  # every texture repeats within it
    tiles = {}
    for tex in world.textures:
        if tex == "plain":
            continue
        ink = _texture_ink(tex, side * SUPERSAMPLE, world.name)
        cover = ink.reshape(side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(1, 3))
        tiles[tex] = cover[:period, :period] > 0.5
    return tiles


def _read_texture(f: np.ndarray, visible: np.ndarray, colour: int, world: World
                  ) -> tuple[str, dict[str, float]]:
    """The texture of an object of colour ``colour`` from its visible interior (outline and
    seams eroded away): ink pixels (darker than halfway to the ink) matched against each
    texture at every phase; plain: no ink."""
    scale = visible.shape[0] / world.size
    inner = _erode_by(visible, max(1, int(round(TEXTURE_EROSION * scale))))
    if inner.sum() < 16:
        inner = visible
    ys, xs = np.nonzero(inner)
    c = _COL_RGB[colour]
    ink = f[ys, xs] @ c / (c @ c) < (1.0 + SHADE) / 2
    scores = {"plain": float((~ink).mean())}
    for tex, tile in _texture_tiles(world, visible.shape[0]).items():
        scores[tex] = _phase_match(ink, ys, xs, tile)
    return max(scores, key=scores.get), scores


def _read_layered(a: np.ndarray, world: World) -> dict[str, Any]:
    """toy128: up to six objects of distinct colours that may overlap, on any backdrop."""
    side = a.shape[0]
    scale = side / world.size
    f = a.astype(np.float64)
    base, rows, cols = _background(f, max(1, int(round(BORDER * scale))))
    background = _BG_NAMES[int(((_BG_RGB - base) ** 2).sum(-1).argmin())]
    backdrop = _read_backdrop(rows, cols, scale, world)
    label = _classify(f, _background_image(base, rows, cols))
    masks = {i: _open(label == i + 1) for i in range(len(_COL_NAMES))}
    masks = {i: m for i, m in masks.items() if m.sum() >= MIN_OBJECT_SHARE * side * side}
    clear = label == 0
    objects = []
    for i, visible in masks.items():
        hidden = ~(visible | clear)  # other objects, seams, specks
        shape, size, cx, cy, fit_scores = _fit_shape(visible, hidden, world)
        texture, tex_scores = _read_texture(f, visible, i, world)
        objects.append({"shape": shape, "colour": _COL_NAMES[i], "size": size,
                        "texture": texture, "x": cx / side, "y": cy / side,
                        "radius": world.radius[size], "area": float(visible.sum()) / side ** 2,
                        "shape_iou": fit_scores[f"shape_{shape}"], **fit_scores,
                        **{f"tex_{k}": v for k, v in tex_scores.items()}})
    objects.sort(key=lambda o: -o["area"])
    return {"background": background, "backdrop": backdrop, "objects": objects}


# -- texture at 1:1 (a document larger than the world) ------------------------------------

FINE_WINDOW = 32  # px: the side of one window of a 1:1 texture read (2.7 periods of 12 px)
FINE_MATCH = 0.75  # a window's best texture must agree on this share of its pixels


def read_fine_texture(img: Any, region: np.ndarray, colour: str, world: str | World = "toy128",
                      window: int = FINE_WINDOW, min_match: float = FINE_MATCH
                      ) -> tuple[str | None, list[str | None]]:
    """The texture of an area of ``colour`` at 1:1: its periods in the image's own pixels are
    the world's native ones (``render(..., texture_scale=1)``), whatever the image's size.

    The area ``region`` (bool, the image's shape; the caller keeps it off outlines and seams)
    is cut into ``window`` px squares on a grid; each square wholly inside it is read on its
    own (ink: darker than halfway from the colour to its ink; matched against every texture's
    ink at every phase, as :func:`read` does at the world's size; plain: no ink), so textures
    drawn tile by tile with different phases still read. A square whose best match is below
    ``min_match`` reads None: a pattern of another period (the model's texture drawn at the
    working scale, 4-8x too coarse) agrees with the right one on only 50-60 % of its pixels.
    Returns (the texture most squares read, None where none or where None wins; each
    square's reading)."""
    a = _as_rgb(img).astype(np.float64)
    w = world_of(world)
    c = _COL_RGB[_COL_NAMES.index(colour)]
    tiles = _texture_tiles(w, w.size)  # the world's own scale: 1:1
    reads: list[str | None] = []
    h, wd = region.shape
    for y in range(0, h - window + 1, window):
        for x in range(0, wd - window + 1, window):
            if not region[y:y + window, x:x + window].all():
                continue
            ys, xs = np.mgrid[y:y + window, x:x + window].reshape(2, -1)
            ink = a[ys, xs] @ c / (c @ c) < (1.0 + SHADE) / 2
            scores = {"plain": float((~ink).mean())}
            for tex, tile in tiles.items():
                scores[tex] = _phase_match(ink, ys, xs, tile)
            best = max(scores, key=scores.get)
            reads.append(best if scores[best] >= min_match else None)
    if not reads:
        return None, reads
    return Counter(reads).most_common(1)[0][0], reads


# -- comparing a reading with its scene ---------------------------------------------------

def match_objects(read_result: dict[str, Any], scene: dict[str, Any]
                  ) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each of the scene's objects (back to front, as ``world.objects`` lists them) paired
    with a read object, or None where none is left: first by colour (the nearest of that
    colour; colours are distinct within a toy128 scene), then what remains by the nearest
    centre (so that an object read in the wrong colour is still compared)."""
    wanted = scene_objects(scene)
    free = list(read_result["objects"])
    pairs: list[dict[str, Any] | None] = [None] * len(wanted)
    for same_colour in (True, False):
        for i, o in enumerate(wanted):
            found = [r for r in free if pairs[i] is None
                     and (not same_colour or r["colour"] == o["colour"])]
            if found:
                pairs[i] = min(found, key=lambda r: (r["x"] - o["x"]) ** 2
                               + (r["y"] - o["y"]) ** 2)
                free.remove(pairs[i])
    return list(zip(wanted, pairs))


def agreement_all(read_result: dict[str, Any], scene: dict[str, Any],
                  attributes: tuple[str, ...] = ("shape", "colour", "size", "texture")
                  ) -> dict[str, Any]:
    """Which attributes the reading confirms, per object and per scene:
    ``{"objects": [{attribute: bool} per scene object, back to front], "background": bool,
    "backdrop": bool, "count": bool}`` (objects paired by :func:`match_objects`; a scene
    object without a read one agrees on nothing; ``count``: as many objects read as
    drawn)."""
    per_object = [{k: r is not None and r[k] == o[k] for k in attributes}
                  for o, r in match_objects(read_result, scene)]
    return {"objects": per_object,
            "background": read_result.get("background") == scene.get("background"),
            "backdrop": read_result.get("backdrop", "plain") == scene.get("backdrop", "plain"),
            "count": len(read_result["objects"]) == len(per_object)}
