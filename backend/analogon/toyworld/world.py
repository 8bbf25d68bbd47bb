"""The toy worlds: scenes of flat objects on a background, with captions and a known truth.

Two worlds share one scene format, one renderer and one caption grammar:

- ``toy64`` (the first world, ``toy-sd-64``): one object (optionally a second one) on a plain
  background, rendered at 64x64; textures (diagonal stripes, dots) on a grid whose period is
  1/8 of the side, i.e. one latent cell.
- ``toy128`` (the measuring world, ``toy-sd``): one to three objects that may overlap, each
  with a 2-px dark outline, on a plain, graded or patterned background, rendered at 128x128;
  textures with a 12-px period (diagonal stripes, dots, 6-px checks, 3-px hatching, 3-px grains
  from a fixed tile); a patterned background has 2-px lines every 12 px.
  No period divides the 8-px latent cell of a factor-8 autoencoder: a pattern that repeats
  within one cell looks the same from every cell, a convolutional encoder gives all its cells
  one latent and the decoder can only paint it flat. These repeat every 24 px, three cells,
  so neighbouring cells differ and the pattern can be drawn back. Objects in one scene have distinct
  colours and each keeps at least 60 % of its area and 24 latent cells' worth of pixels
  visible, so every attribute of every object can be read back.

A scene is a plain dict (JSON-friendly) ::

    {"shape": "circle", "colour": "red", "size": "large", "texture": "striped",
     "x": 0.5, "y": 0.5, "background": "grey",
     "second": None | {"shape", "colour", "size", "texture", "x", "y"},
     # toy128 only:
     "world": "toy128", "backdrop": "plain" | "graded" | "patterned",
     "third": None | {...}}

``x``/``y`` are the object's centre as a fraction of the image side, so one scene renders at
any size; a scene without ``"world"`` belongs to ``toy64``. Rendering is deterministic (PIL,
4x supersampled, box-filtered down). Later objects are drawn in front of earlier ones.

The texture's dark ink (and the outline) is the object's own colour at 55 % brightness;
colours and backgrounds are far apart in RGB, so that a reader without learning can tell
them apart.
"""
from __future__ import annotations

import copy
import functools
import math
import random
from dataclasses import dataclass, field
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
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (235, 235, 235),
    "black": (10, 10, 10),
    "beige": (225, 205, 160),
}
SHADE = 0.55  # brightness of the texture ink and the outline relative to the object's colour
SUPERSAMPLE = 4
OBJECT_SLOTS = ("second", "third")  # the keys of the objects after the first


@dataclass(frozen=True)
class World:
    """What differs between the worlds; see the module's docstring."""

    name: str
    size: int  # native side in pixels (the model's image size)
    textures: tuple[str, ...]
    backdrops: tuple[str, ...]
    radius: dict[str, float] = field(hash=False)  # half-extent as a fraction of the side
    max_objects: int
    outline: float  # outline width in native pixels (0: none)
    # Texture periods in native pixels (see _texture_ink_uncached).
    periods: dict[str, float] = field(hash=False)
    # The side of a square that every texture repeats within, in native pixels.
    repeat: int = 8
    margin: float = 0.04  # the least gap between an object's box and the image border
    backdrop_period: int = 8  # patterned: a 1-px line every this many native pixels

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        out = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES,
               "texture": self.textures, "background": tuple(BACKGROUNDS)}
        if len(self.backdrops) > 1:
            out["backdrop"] = self.backdrops
        return out

    @property
    def object_attributes(self) -> dict[str, tuple[str, ...]]:
        return {k: v for k, v in self.attributes.items() if k in ("shape", "colour", "size",
                                                                   "texture")}


WORLD64 = World(
    name="toy64", size=64, textures=("plain", "striped", "dotted"), backdrops=("plain",),
    radius={"small": 0.17, "large": 0.29}, max_objects=2, outline=0.0,
    periods={"striped": 8.0, "dotted": 8.0},
)
WORLD128 = World(
    name="toy128", size=128,
    textures=("plain", "striped", "dotted", "checked", "hatched", "grainy"),
    backdrops=("plain", "graded", "patterned"),
    # A small star of radius 0.25 covers 26 cells of the 16x16 latent (24 is the least).
    radius={"small": 0.25, "large": 0.34}, max_objects=3, outline=2.0,
    # No period divides the 8-px latent cell: a pattern that repeats within one cell is the
    # same in every cell, so a convolutional encoder gives every cell of it the same latent
    # and the decoder can only paint it flat. 12 px (elements of 3-6 px) rather than 3-6 px:
    # the VAE learns these within the budget and did not learn the finer ones (see
    # docs/toyworld.md). Every texture repeats in 24 px, three cells, and neighbouring cells
    # differ.
    periods={"striped": 12.0, "dotted": 12.0, "checked": 12.0, "hatched": 12.0, "grainy": 12.0},
    repeat=12, backdrop_period=12,
)
WORLDS: dict[str, World] = {w.name: w for w in (WORLD64, WORLD128)}

# The first world's constants, as the rest of the code has always named them.
TEXTURES = WORLD64.textures
RADIUS = WORLD64.radius
TEXTURE_CELLS = 8  # toy64's texture period = side / TEXTURE_CELLS (one latent cell)
ALL_TEXTURES = WORLD128.textures

# The categorical attributes of an object and of a scene (toy64), with their values.
OBJECT_ATTRIBUTES: dict[str, tuple[str, ...]] = WORLD64.object_attributes
ATTRIBUTES: dict[str, tuple[str, ...]] = WORLD64.attributes

# Shape/colour pairs that no training image shows: the generalisation test of the models.
# One colour per shape, each colour at most once, so every word is still seen in training.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "blue"),
    ("star", "green"),
    ("diamond", "red"),
)


def world_of(scene_or_name: dict[str, Any] | str | World | None) -> World:
    """The world of a scene (or a world's name); a scene without ``"world"`` is toy64's."""
    if isinstance(scene_or_name, World):
        return scene_or_name
    if scene_or_name is None:
        return WORLD64
    name = scene_or_name if isinstance(scene_or_name, str) else scene_or_name.get("world",
                                                                                    "toy64")
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}; got {name!r}") from None


def objects(scene: dict[str, Any]) -> list[dict[str, Any]]:
    """The scene's objects, back to front (the first object is the scene dict itself)."""
    return [scene] + [scene[k] for k in OBJECT_SLOTS if scene.get(k)]


def is_held_out(scene: dict[str, Any]) -> bool:
    return any((o["shape"], o["colour"]) in HELD_OUT_PAIRS for o in objects(scene))


# -- scenes -----------------------------------------------------------------------------

def _fit_range(size: str, world: World = WORLD64) -> tuple[float, float]:
    r = world.radius[size]
    return r + world.margin, 1.0 - r - world.margin


def make_scene(shape: str = "circle", colour: str = "red", size: str = "large",
               texture: str = "plain", background: str = "grey", x: float = 0.5, y: float = 0.5,
               second: dict[str, Any] | None = None, *, world: str = "toy64",
               backdrop: str = "plain", third: dict[str, Any] | None = None) -> dict[str, Any]:
    scene = {"shape": shape, "colour": colour, "size": size, "texture": texture,
             "x": float(x), "y": float(y), "background": background,
             "second": copy.deepcopy(second)}
    if world != "toy64":
        scene.update(world=world, backdrop=backdrop, third=copy.deepcopy(third))
    validate(scene)
    return scene


def validate(scene: dict[str, Any]) -> None:
    w = world_of(scene)
    objs = objects(scene)
    if len(objs) > w.max_objects:
        raise ValueError(f"the {w.name} world has at most {w.max_objects} objects")
    for o in objs:
        for name, values in w.object_attributes.items():
            if o.get(name) not in values:
                raise ValueError(f"{name} must be one of {', '.join(values)}; got {o.get(name)!r}")
    if scene.get("background") not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}; "
                         f"got {scene.get('background')!r}")
    if scene.get("backdrop", "plain") not in w.backdrops:
        raise ValueError(f"backdrop must be one of {', '.join(w.backdrops)}; "
                         f"got {scene.get('backdrop')!r}")


def _random_object(rng: random.Random, world: World, colours: tuple[str, ...]) -> dict[str, Any]:
    return {"shape": rng.choice(SHAPES), "colour": rng.choice(colours),
            "size": rng.choice(SIZES), "texture": rng.choice(world.textures)}


def random_scene(rng: random.Random, *, split: str = "train", two: float = 0.0,
                 centred: bool = False, world: str | World = "toy64",
                 count: int | None = None) -> dict[str, Any]:
    """A random scene. ``split``: 'train' never shows a held-out pair, 'heldout' always
    shows one (for the first object), 'any' does not care. ``two``: chance of more than one
    object (toy64: a second one in the other half of the image; toy128: two or three that
    may overlap). ``count`` fixes the number of objects (toy128)."""
    w = world_of(world)
    if w is not WORLD64:
        return _random_scene_layered(rng, w, split=split, two=two, centred=centred, count=count)
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


MIN_VISIBLE_SHARE = 0.6  # toy128: the least share of an object's area left uncovered
MIN_VISIBLE_CELLS = 24  # toy128: the least visible area, in 8x8-pixel latent cells


def _full_masks(scene: dict[str, Any], side: int) -> list[np.ndarray]:
    """Per object (back to front), its whole shape: bool (side, side)."""
    w = world_of(scene)
    return [np.asarray(_shape_mask(o["shape"], o["x"] * side, o["y"] * side,
                                   w.radius[o["size"]] * side, side)) > 127
            for o in objects(scene)]


def _visible(full: list[np.ndarray]) -> list[np.ndarray]:
    """Each mask less the masks in front of it."""
    out = []
    for i, m in enumerate(full):
        v = m.copy()
        for front in full[i + 1:]:
            v &= ~front
        out.append(v)
    return out


def visible_masks(scene: dict[str, Any], size: int | None = None) -> list[np.ndarray]:
    """Per object (back to front), where it is visible: bool (size, size)."""
    return _visible(_full_masks(scene, size or world_of(scene).size))


def layout_ok(scene: dict[str, Any]) -> bool:
    """toy128's layout rule: every object keeps >= 60 % of its area and >= 24 latent cells'
    worth of pixels visible."""
    side = world_of(scene).size
    cell = (side / 16) ** 2
    full = _full_masks(scene, side)
    for m, v in zip(full, _visible(full)):
        if v.sum() < MIN_VISIBLE_SHARE * m.sum() or v.sum() < MIN_VISIBLE_CELLS * cell:
            return False
    return True


def _random_scene_layered(rng: random.Random, w: World, *, split: str, two: float,
                          centred: bool, count: int | None) -> dict[str, Any]:
    while True:
        if count is not None:
            n = count
        elif rng.random() < two:
            n = rng.choice((2, 3))
        else:
            n = 1
        colours = list(COLOURS)
        objs = []
        for i in range(n):
            o = _random_object(rng, w, tuple(colours))
            if i == 0 and split == "heldout":
                o["shape"], o["colour"] = rng.choice(HELD_OUT_PAIRS)
            colours.remove(o["colour"])
            objs.append(o)
        scene = {**objs[0], "background": rng.choice(tuple(BACKGROUNDS)), "second": None,
                 "world": w.name, "backdrop": rng.choice(w.backdrops), "third": None}
        for key, o in zip(OBJECT_SLOTS, objs[1:]):
            scene[key] = o
        if split == "train" and is_held_out(scene):
            continue
        for _ in range(50):
            for o in objects(scene):
                lo, hi = _fit_range(o["size"], w)
                if centred and n == 1:
                    o["x"] = o["y"] = 0.5
                else:
                    o["x"], o["y"] = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if layout_ok(scene):
                return scene


def change(scene: dict[str, Any], attribute: str, value: Any) -> dict[str, Any]:
    """The same scene with one attribute changed (the ground truth of an analogy).

    ``attribute`` is a scene attribute (shape, colour, size, texture, background, backdrop,
    x, y) or ``second.<name>`` / ``third.<name>`` for a later object. A size change keeps the
    object inside the image.
    """
    out = copy.deepcopy(scene)
    target = out
    name = attribute
    slot, _, rest = attribute.partition(".")
    if rest:
        if slot not in OBJECT_SLOTS or not out.get(slot):
            raise ValueError(f"this scene has no {slot} object")
        target, name = out[slot], rest
    if name in ("x", "y"):
        target[name] = float(value)
    else:
        target[name] = value
    if name == "size":
        lo, hi = _fit_range(value, world_of(out))
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
    Later objects follow with 'and a ...'; a graded or patterned backdrop is named before
    the background's colour ('on a graded grey background'), a plain one is not.
    ``omit`` leaves attributes out (training uses short captions too, so that short
    prompts work)."""
    omit = frozenset(omit)
    text = " and ".join("a " + _object_phrase(o, omit) for o in objects(scene))
    if "background" not in omit:
        backdrop = scene.get("backdrop", "plain")
        if backdrop != "plain" and "backdrop" not in omit:
            text += f" on a {backdrop} {scene['background']} background"
        else:
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


@functools.lru_cache(maxsize=64)
def _texture_ink(texture: str, side: int, world: str = "toy64",
                 scale: float | None = None) -> np.ndarray:
    """Boolean (side, side): where the texture's dark ink is, on the global grid (read-only).
    ``side`` is the side being drawn (supersampled or not) of an image of the world's scale;
    ``scale``: drawn pixels per native texture pixel instead (None: side / the world's size)."""
    ink = _texture_ink_uncached(texture, side, WORLDS[world], scale)
    ink.setflags(write=False)
    return ink


# grain: a fixed irregular tile of square grains (5 of 16 inked), tiled
GRAIN_TILE = np.array([[1, 0, 0, 0],
                       [0, 0, 1, 1],
                       [0, 0, 0, 0],
                       [0, 1, 0, 1]], bool)
GRAIN_TILE.setflags(write=False)


def _texture_ink_uncached(texture: str, side: int, world: World = WORLD64,
                          scale: float | None = None) -> np.ndarray:
    if texture == "plain":
        return np.zeros((side, side), bool)
    if texture not in world.periods:
        raise ValueError(texture)
    if scale is None:
        scale = side / world.size  # drawn pixels per native pixel
    period = world.periods[texture] * scale
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    if texture == "striped":
        # Diagonal stripes, half ink: period `period` along x and along y.
        return ((xx + yy) / period) % 1.0 < 0.5
    if texture == "dotted":
        fx = (xx / period) % 1.0 - 0.5
        fy = (yy / period) % 1.0 - 0.5
        return fx * fx + fy * fy < 0.30 ** 2
    if texture == "checked":
        # Squares of half a period: a checkerboard.
        return (np.floor(xx / (period / 2)) + np.floor(yy / (period / 2))) % 2 == 1
    if texture == "hatched":
        # Horizontal lines a quarter of a period thick.
        return (yy / period) % 1.0 < 0.25
    if texture == "grainy":
        # GRAIN_TILE's grains, each a quarter period square.
        tile = GRAIN_TILE
        n = tile.shape[0]
        iy = np.floor(yy / (period / n)).astype(int) % n
        ix = np.floor(xx / (period / n)).astype(int) % n
        return tile[iy, ix]
    raise ValueError(texture)


def _erode_by(mask: np.ndarray, n: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(n):
        e = m.copy()
        e[1:, :] &= m[:-1, :]
        e[:-1, :] &= m[1:, :]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        e[0, :] = e[-1, :] = e[:, 0] = e[:, -1] = False
        m = e
    return m


def grow_by(mask: np.ndarray, n: int) -> np.ndarray:
    """``mask`` dilated by ``n`` pixels, 4-connected (the counterpart of ``_erode_by``)."""
    m = mask.copy()
    for _ in range(n):
        g = m.copy()
        g[1:] |= m[:-1]
        g[:-1] |= m[1:]
        g[:, 1:] |= m[:, :-1]
        g[:, :-1] |= m[:, 1:]
        m = g
    return m


def _paint_object(canvas: np.ndarray, o: dict[str, Any], side: int, world: World,
                  texture_scale: float | None = None) -> None:
    r = world.radius[o["size"]] * side
    mask = np.asarray(_shape_mask(o["shape"], o["x"] * side, o["y"] * side, r, side)) > 127
    base = np.array(COLOURS[o["colour"]], np.float64)
    if texture_scale is None:
        ink = _texture_ink(o["texture"], side, world.name).copy()
    else:  # drawn pixels per native texture pixel: the supersampling times the scale asked
        ink = _texture_ink(o["texture"], side, world.name,
                           float(texture_scale) * SUPERSAMPLE).copy()
    if world.outline:
        # The outline: the shape's border, `outline` native pixels wide, in the ink colour.
        width = int(round(world.outline * side / world.size))
        ink |= mask & ~_erode_by(mask, width)
    ink = ink[mask]
    canvas[mask] = np.where(ink[:, None], base * SHADE, base)


BACKDROP_GRADE = 22.0  # graded: from +22 levels at the top to -22 at the bottom
BACKDROP_LINE = 24.0  # patterned: 2-px lines this much darker (lighter on black)
BACKDROP_LINE_WIDTH = 2


def _paint_background(canvas: np.ndarray, scene: dict[str, Any], side: int,
                      world: World) -> None:
    rgb = np.array(BACKGROUNDS[scene["background"]], np.float64)
    canvas[:] = rgb
    backdrop = scene.get("backdrop", "plain")
    if backdrop == "graded":
        t = (np.arange(side, dtype=np.float64) + 0.5) / side
        canvas += (BACKDROP_GRADE * (1.0 - 2.0 * t))[:, None, None]
    elif backdrop == "patterned":
        scale = side / world.size
        i = np.floor((np.arange(side) + 0.5) / scale).astype(int) % world.backdrop_period < BACKDROP_LINE_WIDTH
        line = i[:, None] | i[None, :]
        sign = 1.0 if rgb.mean() < 64 else -1.0
        canvas[line] += sign * BACKDROP_LINE


def background_image(scene: dict[str, Any], size: int | None = None) -> np.ndarray:
    """The scene's background alone as an RGB uint8 array."""
    w = world_of(scene)
    size = size or w.size
    return render({**scene, "second": None, "third": None}, size, objects_drawn=False)


def render(scene: dict[str, Any], size: int | None = None, *,
           objects_drawn: bool = True, texture_scale: float | None = None) -> np.ndarray:
    """The scene as an RGB uint8 array (size, size, 3), at the world's native size unless
    told. Deterministic.

    Everything scales with ``size`` (shapes, outlines, backdrop lines, textures) unless
    ``texture_scale`` is given: then the objects' textures are drawn at that many image pixels
    per native pixel whatever the size. ``texture_scale=1`` on a document k × the world's size
    gives k × larger objects whose textures keep the period the model draws at its own size
    (12 px on toy128): the model's own fine texture at 1:1, which the high-resolution pass is
    measured on (``bench hires-texture``)."""
    validate(scene)
    w = world_of(scene)
    size = size or w.size
    if texture_scale is not None and not texture_scale > 0:
        raise ValueError(f"texture_scale must be above 0; got {texture_scale!r}")
    side = size * SUPERSAMPLE
    canvas = np.empty((side, side, 3), np.float64)
    _paint_background(canvas, scene, side, w)
    if objects_drawn:
        for o in objects(scene):
            _paint_object(canvas, o, side, w, texture_scale)
    # Box-filter down: anti-aliased edges, exact flat colours inside.
    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_pil(scene: dict[str, Any], size: int | None = None) -> Image.Image:
    return Image.fromarray(render(scene, size))
