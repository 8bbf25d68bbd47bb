"""The toy world: scenes of one or two flat objects on a plain background, with captions.

A scene is a plain dict (JSON-friendly) ::

    {"shape": "circle", "colour": "red", "size": "large", "texture": "striped",
     "x": 0.5, "y": 0.5, "background": "grey",
     "second": None | {"shape", "colour", "size", "texture", "x", "y"}}

``x``/``y`` are the object's centre as a fraction of the image side, so one scene renders at
any size. Rendering is deterministic (PIL, 4x supersampled, box-filtered down).

Design choices that make the world learnable by an SD-shaped model with a factor-8 VAE:
textures (diagonal stripes, dots) sit on a global grid whose period is 1/8 of the image
side, i.e. exactly one latent cell, so texture is a local property of the latent; the
texture's dark ink is the object's own colour at 55 % brightness; colours and backgrounds
are far apart in RGB so that a reader without learning can tell them apart.
"""
from __future__ import annotations

import copy
import functools
import math
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (10, 10, 10),
    "beige": (225, 205, 160),
}
# Half-extent of an object as a fraction of the image side.
RADIUS = {"small": 0.17, "large": 0.29}
SHADE = 0.55  # brightness of the texture ink relative to the object's colour
TEXTURE_CELLS = 8  # texture period = side / TEXTURE_CELLS (one latent cell at VAE factor 8)
SUPERSAMPLE = 4

# The categorical attributes of an object and of a scene, with their values.
OBJECT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "texture": TEXTURES,
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {**OBJECT_ATTRIBUTES, "background": tuple(BACKGROUNDS)}

# Shape/colour pairs that no training image shows: the generalisation test of toy-sd.
# One colour per shape, each colour at most once, so every word is still seen in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "blue"),
    ("star", "green"),
    ("diamond", "red"),
)


def is_held_out(scene: dict[str, Any]) -> bool:
    objs = [scene] + ([scene["second"]] if scene.get("second") else [])
    return any((o["shape"], o["colour"]) in HELD_OUT_PAIRS for o in objs)


# -- scenes -----------------------------------------------------------------------------

def _fit_range(size: str, margin: float = 0.04) -> tuple[float, float]:
    r = RADIUS[size]
    return r + margin, 1.0 - r - margin


def make_scene(shape: str = "circle", colour: str = "red", size: str = "large",
               texture: str = "plain", background: str = "grey", x: float = 0.5, y: float = 0.5,
               second: dict[str, Any] | None = None) -> dict[str, Any]:
    scene = {"shape": shape, "colour": colour, "size": size, "texture": texture,
             "x": float(x), "y": float(y), "background": background,
             "second": copy.deepcopy(second)}
    validate(scene)
    return scene


def validate(scene: dict[str, Any]) -> None:
    objs = [scene] + ([scene["second"]] if scene.get("second") else [])
    for o in objs:
        for name, values in OBJECT_ATTRIBUTES.items():
            if o.get(name) not in values:
                raise ValueError(f"{name} must be one of {', '.join(values)}; got {o.get(name)!r}")
    if scene.get("background") not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}; "
                         f"got {scene.get('background')!r}")


def random_scene(rng: random.Random, *, split: str = "train", two: float = 0.0,
                 centred: bool = False) -> dict[str, Any]:
    """A random scene. ``split``: 'train' never shows a held-out pair, 'heldout' always
    shows one (for the first object), 'any' does not care. ``two``: chance of a second
    object (placed in the other half of the image)."""
    while True:
        if split == "heldout":
            shape, colour = rng.choice(HELD_OUT_PAIRS)
        else:
            shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
        size = rng.choice(SIZES)
        scene = {"shape": shape, "colour": colour, "size": size,
                 "texture": rng.choice(TEXTURES), "background": rng.choice(tuple(BACKGROUNDS)),
                 "second": None}
        if rng.random() < two:
            # Two objects side by side: both small, one per half.
            scene["size"] = "small"
            lo, hi = _fit_range("small")
            gap = RADIUS["small"] + 0.02
            scene["x"], scene["y"] = rng.uniform(lo, 0.5 - gap), rng.uniform(lo, hi)
            s2 = {"shape": rng.choice(SHAPES), "colour": rng.choice(tuple(COLOURS)),
                  "size": "small", "texture": rng.choice(TEXTURES)}
            s2["x"], s2["y"] = rng.uniform(0.5 + gap, hi), rng.uniform(lo, hi)
            scene["second"] = s2
        else:
            lo, hi = _fit_range(size)
            if centred:
                scene["x"] = scene["y"] = 0.5
            else:
                scene["x"], scene["y"] = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if split == "train" and is_held_out(scene):
            continue
        return scene


def change(scene: dict[str, Any], attribute: str, value: Any) -> dict[str, Any]:
    """The same scene with one attribute changed (the ground truth of an analogy).

    ``attribute`` is a scene attribute (shape, colour, size, texture, background, x, y) or
    ``second.<name>`` for the second object. A size change keeps the object inside the image.
    """
    out = copy.deepcopy(scene)
    target = out
    name = attribute
    if attribute.startswith("second."):
        if not out.get("second"):
            raise ValueError("this scene has no second object")
        target, name = out["second"], attribute.split(".", 1)[1]
    if name in ("x", "y"):
        target[name] = float(value)
    else:
        target[name] = value
    if name == "size":
        lo, hi = _fit_range(value)
        target["x"] = min(max(target["x"], lo), hi)
        target["y"] = min(max(target["y"], lo), hi)
    validate(out)
    return out


# -- captions ---------------------------------------------------------------------------

def _object_phrase(o: dict[str, Any], omit: frozenset[str] = frozenset()) -> str:
    words = []
    if "size" not in omit:
        words.append(o["size"])
    if "colour" not in omit:
        words.append(o["colour"])
    if "texture" not in omit:
        words.append(o["texture"])
    words.append(o["shape"] if "shape" not in omit else "shape")
    return " ".join(words)


def caption(scene: dict[str, Any], omit: frozenset[str] | set[str] = frozenset()) -> str:
    """'a large red striped circle on a grey background'. The texture is always named
    ('a small blue plain square ...'), so a prompt that leaves a word out means "any".
    ``omit`` leaves attributes out (training uses short captions too, so that short
    prompts work)."""
    omit = frozenset(omit)
    text = "a " + _object_phrase(scene, omit)
    if scene.get("second"):
        text += " and a " + _object_phrase(scene["second"], omit)
    if "background" not in omit:
        text += f" on a {scene['background']} background"
    return text


# -- rendering --------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = 0.86 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Upright, apex at the top; centred on its bounding box.
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "star":
        pts = []
        inner = 0.45 * r
        # A five-pointed star, one point up, shifted so that its bounding box is centred.
        raw = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else inner
            raw.append((rad * math.cos(a), rad * math.sin(a)))
        ys = [p[1] for p in raw]
        dy = -(min(ys) + max(ys)) / 2
        scale = 2 * r / (max(ys) - min(ys))
        for px, py in raw:
            pts.append((cx + px * scale, cy + (py + dy) * scale))
        return pts
    return None


def _shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> Image.Image:
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=255)
    return m


@functools.lru_cache(maxsize=32)
def _texture_ink(texture: str, side: int) -> np.ndarray:
    """Boolean (side, side): where the texture's dark ink is, on the global grid (read-only)."""
    ink = _texture_ink_uncached(texture, side)
    ink.setflags(write=False)
    return ink


def _texture_ink_uncached(texture: str, side: int) -> np.ndarray:
    if texture == "plain":
        return np.zeros((side, side), bool)
    period = side / TEXTURE_CELLS
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    if texture == "striped":
        # Diagonal stripes, half ink: period `period` along x and along y.
        return ((xx + yy) / period) % 1.0 < 0.5
    if texture == "dotted":
        fx = (xx / period) % 1.0 - 0.5
        fy = (yy / period) % 1.0 - 0.5
        return fx * fx + fy * fy < 0.30 ** 2
    raise ValueError(texture)


def _paint_object(canvas: np.ndarray, o: dict[str, Any], side: int) -> None:
    r = RADIUS[o["size"]] * side
    mask = np.asarray(_shape_mask(o["shape"], o["x"] * side, o["y"] * side, r, side)) > 127
    base = np.array(COLOURS[o["colour"]], np.float64)
    ink = _texture_ink(o["texture"], side)[mask]
    canvas[mask] = np.where(ink[:, None], base * SHADE, base)


def render(scene: dict[str, Any], size: int = 64) -> np.ndarray:
    """The scene as an RGB uint8 array (size, size, 3). Deterministic."""
    validate(scene)
    side = size * SUPERSAMPLE
    canvas = np.empty((side, side, 3), np.float64)
    canvas[:] = BACKGROUNDS[scene["background"]]
    _paint_object(canvas, scene, side)
    if scene.get("second"):
        _paint_object(canvas, scene["second"], side)
    # Box-filter down: anti-aliased edges, exact flat colours inside.
    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_pil(scene: dict[str, Any], size: int = 64) -> Image.Image:
    return Image.fromarray(render(scene, size))
