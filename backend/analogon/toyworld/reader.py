"""The attribute reader: recovers a toy-world scene from pixels by plain image analysis.

No learning. Steps:
1. background: the median colour of the image's outer ring, nearest background colour;
2. objects: pixels far from that background colour, split into 4-connected components,
   holes filled, tiny specks dropped; largest first;
3. shape and size: every shape is drawn into the component's bounding box (a template) and
   the one with the highest intersection-over-union wins; the template's radius gives the
   size (small/large, the midpoint between the two radii is the boundary);
4. colour: interior pixels vote for the nearest palette colour or its dark texture ink;
5. texture: which pixels are ink, compared with the world's stripe and dot grids (any
   phase), or with none (plain).

``read(img)`` returns ``{"background", "objects": [...], **first object}`` where the first
(largest) object's ``shape``, ``colour``, ``size``, ``texture``, ``x``, ``y`` are repeated at
the top level for convenience; they are ``None`` when no object is found.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .world import (BACKGROUNDS, COLOURS, RADIUS, SHADE, SHAPES, TEXTURE_CELLS, _polygon,
                    _texture_ink)

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
    # Every phase of the grid at once: (period*period, N) indices into one tile.
    shifts = np.arange(period)
    yy = (ys[None, None, :] + shifts[:, None, None]) % period
    xx = (xs[None, None, :] + shifts[None, :, None]) % period
    for tex in ("striped", "dotted"):
        tile = _texture_ink(tex, side)[:period, :period]
        match = (tile[yy, xx] == ink[None, None, :]).mean(-1)
        tex_scores[tex] = float(match.max())
    texture = max(tex_scores, key=tex_scores.get)
    info = {"colour_share": float(votes[ci] / max(votes.sum(), 1)),
            "ink_share": float(ink.mean()), **{f"tex_{k}": v for k, v in tex_scores.items()}}
    return colour, texture, info


def read(img: Any) -> dict[str, Any]:
    """Read a toy-world image (RGB array or PIL image) into its attributes."""
    a = _as_rgb(img)
    if a.shape[0] != a.shape[1]:
        raise ValueError("the reader expects a square image")
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
    out: dict[str, Any] = {"background": background, "objects": objects}
    first = objects[0] if objects else {}
    for k in ("shape", "colour", "size", "texture", "x", "y"):
        out[k] = first.get(k)
    return out


def agreement(read_result: dict[str, Any], scene: dict[str, Any],
              attributes: tuple[str, ...] = ("shape", "colour", "size", "texture",
                                             "background")) -> dict[str, bool]:
    """Which attributes of ``scene`` the reading confirms (first object only)."""
    return {k: read_result.get(k) == scene.get(k) for k in attributes}
