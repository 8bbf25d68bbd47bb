"""Pixels in and out: RGBA8 arrays, placement on a canvas, maps, native-scale sizes, tensors.

Conventions: images are numpy ``(H, W, 4)`` uint8 RGBA; sizes are ``(width, height)``;
tensors are ``(1, 3, H, W)`` in [-1, 1]; maps are ``(H, W)`` float32 in [0, 1] where brighter
means more change.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import InputError

Size = tuple[int, int]


def as_rgba(img: np.ndarray) -> np.ndarray:
    """Accept (H,W), (H,W,3) or (H,W,4) uint8 and return (H,W,4) uint8."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise InputError("bad_image", f"Expected 8-bit pixels, got {a.dtype}.")
    if a.ndim == 2:
        a = np.stack([a, a, a, np.full_like(a, 255)], axis=-1)
    elif a.ndim == 3 and a.shape[2] == 3:
        a = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    elif not (a.ndim == 3 and a.shape[2] == 4):
        raise InputError("bad_image", f"Expected an RGB or RGBA image, got shape {a.shape}.")
    return np.ascontiguousarray(a)


def raw_image_id(pixels: bytes, width: int, height: int) -> str:
    """The id of a raw RGBA8 image: SHA-256 of ``"{width}x{height}:"`` followed by the pixel
    bytes, so that equal bytes at different sizes (a black 100×50 and 50×100 map) differ."""
    import hashlib

    h = hashlib.sha256(f"{width}x{height}:".encode())
    h.update(pixels)
    return h.hexdigest()


def size_of(rgba: np.ndarray) -> Size:
    return int(rgba.shape[1]), int(rgba.shape[0])


def resize_rgba(rgba: np.ndarray, size: Size, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    if size_of(rgba) == tuple(size):
        return rgba
    return np.asarray(Image.fromarray(rgba, "RGBA").resize(tuple(size), resample))


def place(rgba: np.ndarray, canvas: Size, x: int = 0, y: int = 0, scale: float = 1.0) -> np.ndarray:
    """Put ``rgba`` (scaled by ``scale``) with its top-left corner at (x, y) on a transparent
    canvas; what falls off the canvas is dropped."""
    if not (0 < scale <= 64):
        raise InputError("bad_placement", f"Scale {scale} is out of range (0, 64].")
    rgba = as_rgba(rgba)
    if scale != 1.0:
        w, h = size_of(rgba)
        rgba = resize_rgba(rgba, (max(1, round(w * scale)), max(1, round(h * scale))))
    cw, ch = canvas
    out = np.zeros((ch, cw, 4), np.uint8)
    h, w = rgba.shape[:2]
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(cw, x + w), min(ch, y + h)
    if x1 > x0 and y1 > y0:
        out[y0:y1, x0:x1] = rgba[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


def luminance(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.float32) / 255.0
    return rgb @ np.array([0.2126, 0.7152, 0.0722], np.float32)


def map_from_rgba(rgba: np.ndarray) -> np.ndarray:
    """An edit map or mask layer to (H, W) float32 in [0, 1]: grey value times alpha.
    Brighter = more change; black or transparent = keep."""
    rgba = as_rgba(rgba)
    return np.clip(luminance(rgba) * (rgba[..., 3].astype(np.float32) / 255.0), 0.0, 1.0)


def alpha_of(rgba: np.ndarray) -> np.ndarray:
    return rgba[..., 3].astype(np.float32) / 255.0


def over(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """RGBA ``top`` composited over RGBA ``bottom`` (same size) by its straight alpha; the
    bottom's alpha is kept. An opaque ``top`` is returned as it is."""
    a = top[..., 3:4].astype(np.float32) / 255.0
    if (a >= 1.0).all():
        return top
    rgb = top[..., :3].astype(np.float32) * a + bottom[..., :3].astype(np.float32) * (1.0 - a)
    out = bottom.copy()
    out[..., :3] = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return out


def native_size(size: Size, native: int, multiple: int = 8) -> Size:
    """The working size for a region: long side ~``native``, aspect kept, each side a multiple
    of ``multiple`` (the latent factor), at least one multiple."""
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError("empty_image", "The image has no pixels.")
    s = native / max(w, h)
    nw = max(multiple, int(round(w * s / multiple)) * multiple)
    nh = max(multiple, int(round(h * s / multiple)) * multiple)
    return nw, nh


def to_tensor(rgba: np.ndarray, size: Size | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """RGB of an RGBA image as (1, 3, H, W) in [-1, 1], resized to ``size`` if given."""
    if size is not None:
        rgba = resize_rgba(as_rgba(rgba), size)
    x = torch.from_numpy(np.ascontiguousarray(rgba[..., :3])).permute(2, 0, 1)[None].float()
    x = x / 127.5 - 1.0
    return x.to(device=device, dtype=dtype)


def from_tensor(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] to (H, W, 3) uint8."""
    x = ((x[0].detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def rgb_to_rgba(rgb: np.ndarray, alpha: np.ndarray | None = None) -> np.ndarray:
    a = np.full(rgb.shape[:2] + (1,), 255, np.uint8) if alpha is None else alpha[..., None]
    return np.concatenate([rgb, a], axis=-1)


def check_not_empty(rgba: np.ndarray, role: str) -> None:
    """Refuse a fully transparent image with a message naming the role."""
    if not (as_rgba(rgba)[..., 3] > 0).any():
        raise InputError("empty_image", f"The {role} image is empty (fully transparent).",
                         {"role": role})


def check_same_size(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise InputError(
            "size_mismatch",
            f"The {what} must have the same size: {size_of(a)} vs {size_of(b)}.",
            {"sizes": [size_of(a), size_of(b)]},
        )


def small_preview(rgb: np.ndarray, long_side: int = 256) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(1.0, long_side / max(h, w))
    if s >= 1.0:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((max(1, math.floor(w * s)), max(1, math.floor(h * s)))))
