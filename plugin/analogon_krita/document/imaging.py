"""Pixel conversions with Qt's image operations (QImage conversions, QPainter composition),
never a Python loop over pixels: Krita's UI thread runs these on 4000×3000 selections.

Byte layouts: Krita keeps 8-bit RGBA as BGRA, which is Qt's ``Format_ARGB32`` on a
little-endian machine (every machine Krita ships for); 16-bit RGBA as BGRA of little-endian
uint16, which is Qt's ``Format_RGBA64`` with red and blue swapped. Everything this module
hands back to the plugin is RGBA8 (``Format_RGBA8888``), rows packed, top row first. Masks
are one byte per pixel (``Format_Alpha8``/``Format_Grayscale8``).
"""
from __future__ import annotations

from array import array

from ..qt import QImage, QPainter, Qt

F = QImage.Format


def image_bytes(img, bytes_per_pixel: int) -> bytes:
    """A QImage's pixels, rows packed (Qt pads rows to 4 bytes)."""
    w, h = img.width(), img.height()
    bpl = img.bytesPerLine()
    size = bpl * h
    ptr = img.constBits()
    if hasattr(ptr, "setsize"):  # PyQt5 sip.voidptr
        ptr.setsize(size)
    raw = bytes(ptr.asstring(size)) if hasattr(ptr, "asstring") else bytes(ptr)[:size]
    row = w * bytes_per_pixel
    if bpl == row:
        return raw
    return b"".join(raw[y * bpl:y * bpl + row] for y in range(h))


def wrap(data: bytes, w: int, h: int, fmt, bytes_per_pixel: int):
    """A QImage owning a copy of ``data`` (packed rows)."""
    return QImage(bytes(data), w, h, w * bytes_per_pixel, fmt).copy()


def rgba_image(rgba: bytes, w: int, h: int):
    return wrap(rgba, w, h, F.Format_RGBA8888, 4)


def rgba_bytes(img) -> bytes:
    return image_bytes(img.convertToFormat(F.Format_RGBA8888), 4)


# -- Krita <-> RGBA8 -----------------------------------------------------------------------

def krita_to_rgba8(raw: bytes, w: int, h: int, depth: str) -> bytes:
    """Krita RGBA pixels (BGRA; 8 or 16 bit) -> RGBA8. 16-bit values are rounded
    (v16 / 257 to the nearest), not truncated."""
    if depth == "U8":
        return rgba_bytes(wrap(raw, w, h, F.Format_ARGB32, 4))
    if depth == "U16":
        img = wrap(raw, w, h, F.Format_RGBA64, 8).convertToFormat(F.Format_RGBA8888)
        return image_bytes(img.rgbSwapped(), 4)
    raise ValueError(f"unsupported depth {depth}")


def rgba8_to_krita(rgba: bytes, w: int, h: int, depth: str, mask: bytes | None = None) -> bytes:
    """RGBA8 -> Krita RGBA pixels (BGRA; 16-bit as v * 257, exact), its alpha multiplied by
    ``mask`` when given (as :func:`multiply_alpha`, straight into Krita's layout: one
    conversion less on a large layer)."""
    img = rgba_image(rgba, w, h) if mask is None else _masked(rgba, mask, w, h)
    if depth == "U8":
        return image_bytes(img.convertToFormat(F.Format_ARGB32), 4)
    if depth == "U16":
        return image_bytes(img.convertToFormat(F.Format_RGBA64).rgbSwapped(), 8)
    raise ValueError(f"unsupported depth {depth}")


def krita_grey_to_rgba8(raw: bytes, w: int, h: int, depth: str) -> bytes:
    """Krita grey + alpha pixels (8 or 16 bit) -> RGBA8 with R = G = B = grey (16-bit
    rounded). The channels are spread with C-level slice copies, converted by Qt."""
    n = w * h
    if depth == "U8":
        out = bytearray(n * 4)
        g = raw[0::2]
        out[0::4], out[1::4], out[2::4], out[3::4] = g, g, g, raw[1::2]
        return bytes(out)
    src = array("H")
    src.frombytes(bytes(raw))
    wide = array("H", bytes(n * 8))
    g = src[0::2]
    wide[0::4], wide[1::4], wide[2::4], wide[3::4] = g, g, g, src[1::2]
    img = wrap(wide.tobytes(), w, h, F.Format_RGBA64, 8)
    return rgba_bytes(img)


# -- masks ---------------------------------------------------------------------------------

def mask_image(mask: bytes, w: int, h: int):
    """A one-byte-per-pixel mask as an ``Alpha8`` QImage."""
    return wrap(mask, w, h, F.Format_Alpha8, 1)


def feather(mask: bytes, w: int, h: int, radius: int) -> bytes:
    """A mask softened over about ``radius`` pixels on each side of its edges: an area-average
    down to 1/radius of the size and a bilinear scale back up (Qt's smooth scaling)."""
    if radius <= 1:
        return bytes(mask)
    img = wrap(mask, w, h, F.Format_Grayscale8, 1)
    small = img.scaled(max(1, w // radius), max(1, h // radius), Qt.AspectRatioMode.IgnoreAspectRatio,
                       Qt.TransformationMode.SmoothTransformation)
    back = small.scaled(w, h, Qt.AspectRatioMode.IgnoreAspectRatio,
                        Qt.TransformationMode.SmoothTransformation)
    return image_bytes(back.convertToFormat(F.Format_Grayscale8), 1)


def mask_to_rgba(mask: bytes, w: int, h: int) -> bytes:
    """A mask -> opaque grey RGBA8 (brighter = selected)."""
    return rgba_bytes(wrap(mask, w, h, F.Format_Grayscale8, 1))


def multiply_masks(a: bytes, b: bytes, w: int, h: int) -> bytes:
    """Pixel-wise a × b / 255 of two masks (0 wherever either is 0)."""
    img = mask_image(a, w, h).convertToFormat(F.Format_ARGB32_Premultiplied)
    p = QPainter(img)
    p.setCompositionMode(QPainter.CompositionMode.CompositionMode_DestinationIn)
    p.drawImage(0, 0, mask_image(b, w, h))
    p.end()
    return image_bytes(img.convertToFormat(F.Format_Alpha8), 1)


def _masked(rgba: bytes, mask: bytes, w: int, h: int):
    """A QImage of RGBA8 with its alpha multiplied by a mask (alpha 0 stays 0), composited at
    16 bits per channel, so that the colour of faint pixels survives."""
    img = rgba_image(rgba, w, h).convertToFormat(F.Format_RGBA64_Premultiplied)
    p = QPainter(img)
    p.setCompositionMode(QPainter.CompositionMode.CompositionMode_DestinationIn)
    p.drawImage(0, 0, mask_image(mask, w, h))
    p.end()
    return img


def multiply_alpha(rgba: bytes, mask: bytes, w: int, h: int) -> bytes:
    """RGBA8 with its alpha multiplied by a mask (alpha 0 stays 0)."""
    return rgba_bytes(_masked(rgba, mask, w, h))


def with_opacity(rgba: bytes, w: int, h: int, opacity: float) -> bytes:
    """RGBA8 with its alpha scaled by ``opacity`` (0..1), as a layer's opacity shows it."""
    out = QImage(w, h, F.Format_RGBA64_Premultiplied)
    out.fill(0)
    p = QPainter(out)
    p.setOpacity(max(0.0, min(1.0, float(opacity))))
    p.drawImage(0, 0, rgba_image(rgba, w, h))
    p.end()
    return rgba_bytes(out)


def has_content(rgba: bytes) -> bool:
    """Whether any pixel has alpha > 0."""
    alpha = rgba[3::4]
    return alpha.count(0) != len(alpha)


# -- compositing ---------------------------------------------------------------------------

def composite(base: bytes, w: int, h: int, overlays: list[tuple[bytes, float]]) -> bytes:
    """``base`` with each (RGBA8, opacity 0..1) drawn over it in order ("normal" blending),
    at 16 bits per channel so that the base's own pixels come back byte-identical where the
    overlays are transparent (for every base alpha from 2/255 up; at 1/255 a colour may move
    by one level, which nobody can see)."""
    img = rgba_image(base, w, h).convertToFormat(F.Format_RGBA64_Premultiplied)
    p = QPainter(img)
    p.setCompositionMode(QPainter.CompositionMode.CompositionMode_SourceOver)
    for rgba, opacity in overlays:
        p.setOpacity(max(0.0, min(1.0, float(opacity))))
        p.drawImage(0, 0, rgba_image(rgba, w, h))
    p.end()
    return rgba_bytes(img)


def scaled(rgba: bytes, w: int, h: int, tw: int, th: int) -> bytes:
    img = rgba_image(rgba, w, h).scaled(tw, th, Qt.AspectRatioMode.IgnoreAspectRatio,
                                        Qt.TransformationMode.SmoothTransformation)
    return rgba_bytes(img)


def thumbnail(rgba: bytes, w: int, h: int, size: int = 96):
    return rgba_image(rgba, w, h).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                         Qt.TransformationMode.SmoothTransformation)
