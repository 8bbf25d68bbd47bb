"""Sample images made in code (deterministic): for `analogon demo`, the benchmarks and tests.

A small "analogy" set: ``a`` (shapes on a sky-to-ground gradient), ``a_prime`` (the same
scene edited: warm colours and stripes on the shapes), ``b`` (another scene of the same kind),
an exemplar patch, an appearance texture, an edit map (radial: brighter = more change) and a
mask (a soft disc).
"""
from __future__ import annotations

import numpy as np


def _grid(w: int, h: int):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return x / max(1, w - 1), y / max(1, h - 1)


def _rgba(rgb: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    rgb = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    a = np.full(rgb.shape[:2], 255, np.uint8) if alpha is None else np.clip(
        np.round(alpha * 255), 0, 255).astype(np.uint8)
    return np.concatenate([rgb, a[..., None]], axis=-1)


def scene(w: int = 64, h: int = 64, variant: int = 0) -> np.ndarray:
    """Shapes on a gradient: a disc and a box whose places and colours depend on ``variant``."""
    x, y = _grid(w, h)
    rng = np.random.default_rng(1000 + variant)
    sky = np.array([0.45, 0.65, 0.95]) * (1 - y[..., None]) + np.array([0.9, 0.95, 1.0]) * y[..., None]
    ground = np.array([0.35, 0.55, 0.25])
    horizon = 0.6 + 0.1 * np.sin(x * np.pi * (1 + variant))
    img = np.where((y > horizon)[..., None], ground * (0.8 + 0.2 * y[..., None]), sky)
    cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.6), rng.uniform(0.12, 0.2)
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
    img[disc] = rng.uniform(0.1, 0.9, 3)
    bx, by = rng.uniform(0.1, 0.5), rng.uniform(0.5, 0.7)
    box = (x > bx) & (x < bx + 0.3) & (y > by) & (y < by + 0.25)
    img[box] = rng.uniform(0.1, 0.9, 3)
    return _rgba(img)


def edited(rgba: np.ndarray) -> np.ndarray:
    """The "after" of an analogy: warmer colours and diagonal stripes where the scene is bright."""
    img = rgba[..., :3].astype(np.float32) / 255
    h, w = img.shape[:2]
    x, y = _grid(w, h)
    warm = img * np.array([1.15, 0.95, 0.7])
    stripes = (np.sin((x + y) * 12 * np.pi) > 0.3)[..., None]
    out = np.where(stripes, warm * 0.75, warm)
    return _rgba(out)


def exemplar_patch(w: int = 24, h: int = 24) -> np.ndarray:
    """A small opaque checker-and-ring patch with a transparent surround."""
    x, y = _grid(w, h)
    d = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
    checker = ((np.floor(x * 4) + np.floor(y * 4)) % 2)[..., None]
    rgb = checker * np.array([0.95, 0.8, 0.1]) + (1 - checker) * np.array([0.8, 0.1, 0.3])
    return _rgba(rgb, alpha=(d < 0.48).astype(np.float32))


def texture(w: int = 64, h: int = 64) -> np.ndarray:
    """An appearance reference: a wavy wood-like texture."""
    x, y = _grid(w, h)
    rings = 0.5 + 0.5 * np.sin(20 * np.sqrt((x - 0.3) ** 2 + (y + 0.2) ** 2) + 3 * np.sin(5 * x))
    rgb = rings[..., None] * np.array([0.65, 0.4, 0.2]) + (1 - rings[..., None]) * np.array([0.35, 0.2, 0.1])
    return _rgba(rgb)


def radial_map(w: int = 64, h: int = 64) -> np.ndarray:
    """Edit map: white in the middle (change), fading to black at the edges (keep)."""
    x, y = _grid(w, h)
    d = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.5
    v = np.clip(1.2 - d, 0, 1)
    return _rgba(np.repeat(v[..., None], 3, axis=-1))


def disc_mask(w: int = 64, h: int = 64) -> np.ndarray:
    x, y = _grid(w, h)
    d = np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2)
    v = np.clip((0.4 - d) / 0.05, 0, 1)
    return _rgba(np.ones((h, w, 3)), alpha=v)


def analogy_set(size: int = 64) -> dict[str, np.ndarray]:
    a = scene(size, size, 0)
    return {
        "a": a,
        "a_prime": edited(a),
        "b": scene(size, size, 1),
        "exemplar": exemplar_patch(max(8, size * 3 // 8), max(8, size * 3 // 8)),
        "texture": texture(size, size),
        "edit_map": radial_map(size, size),
        "mask": disc_mask(size, size),
    }


def image_for_role(role_name: str, kind: str, samples: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    """A sample for a method's role, guessed from its name: (image, placed_as_patch)."""
    n = role_name.lower()
    if kind == "map" or "map" in n:
        return samples["edit_map"], False
    if kind == "mask":
        return samples["mask"], False
    if "prime" in n or n.endswith("_p") or "after" in n or n in ("a2", "a'"):
        return samples["a_prime"], False
    if n in ("a", "before", "a_before") or n.startswith("a_") or n == "example":
        return samples["a"], False
    if "exemplar" in n or "patch" in n:
        return samples["exemplar"], True
    if "appearance" in n or "style" in n or "reference" in n or "texture" in n:
        return samples["texture"], False
    return samples["b"], False  # source, target, b, structure, ...


def halo_map(alpha: np.ndarray, radius: int = 6) -> np.ndarray:
    """Edit map for placed exemplars: white under them, fading to black over ``radius`` pixels."""
    from PIL import Image, ImageFilter

    a = Image.fromarray(alpha.astype(np.uint8), "L")
    grown = a.filter(ImageFilter.MaxFilter(2 * (radius // 2) + 1)).filter(ImageFilter.GaussianBlur(radius / 2))
    v = np.maximum(np.asarray(grown, np.float32), alpha.astype(np.float32)) / 255
    return _rgba(np.repeat(v[..., None], 3, axis=-1))
