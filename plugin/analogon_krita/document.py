"""The Krita adapter: layers and selection -> RGBA8 images, results -> new layers.

Only this module touches Krita's Document/Node/Selection API. Krita's 8-bit RGBA pixel bytes
are in BGRA order (16-bit: BGRA of little-endian uint16); everything that leaves this module
is RGBA8, row-major, top row first. Nothing here modifies an existing layer, except
``replace_result``, which rewrites a result layer the plugin itself added (picking another
variant of a multi-image result).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

EDIT_MAP_NAME = "Edit map"
EDIT_MAP_OPACITY = 128  # 0..255: the user sees the image through the map while painting
DEFAULT_PADDING = 32
DEFAULT_FEATHER = 8
ALIGN = 8  # regions are grown to multiples of the VAE factor where the canvas allows

_MODEL_NAMES = {"RGBA": "RGB", "CMYKA": "CMYK", "LABA": "L*a*b*", "GRAYA": "grey-scale",
                "XYZA": "XYZ", "YCbCrA": "YCbCr"}
_CONVERT_HINT = ("Convert it with Image \u25b8 Convert Image Color Space\u2026 to "
                 "RGB/Alpha, 8-bit or 16-bit integer.")


class AdapterError(Exception):
    """A problem with the document or the chosen layers, worded for the painter."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @classmethod
    def of(cls, qrect) -> "Rect":
        return cls(int(qrect.x()), int(qrect.y()), int(qrect.width()), int(qrect.height()))

    @property
    def empty(self) -> bool:
        return self.w <= 0 or self.h <= 0

    def intersect(self, o: "Rect") -> "Rect":
        x0, y0 = max(self.x, o.x), max(self.y, o.y)
        x1, y1 = min(self.x + self.w, o.x + o.w), min(self.y + self.h, o.y + o.h)
        return Rect(x0, y0, max(0, x1 - x0), max(0, y1 - y0))

    def padded(self, pad: int) -> "Rect":
        return Rect(self.x - pad, self.y - pad, self.w + 2 * pad, self.h + 2 * pad)

    def aligned(self, step: int, bounds: "Rect") -> "Rect":
        """Grow w and h to multiples of ``step``, staying inside ``bounds`` (shifting left or
        up at the canvas edge); where the canvas is too small it stays clipped."""
        r = self.intersect(bounds)
        w = min(bounds.w, -(-r.w // step) * step)
        h = min(bounds.h, -(-r.h // step) * step)
        x = min(r.x, bounds.x + bounds.w - w)
        y = min(r.y, bounds.y + bounds.h - h)
        return Rect(max(bounds.x, x), max(bounds.y, y), w, h)

    def to_list(self) -> list[int]:
        return [self.x, self.y, self.w, self.h]


def _bytes(data) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return bytes(data.data())  # QByteArray


# -- pixels --------------------------------------------------------------------------------

def bgra_to_rgba(data: bytes) -> bytes:
    out = bytearray(data)
    out[0::4] = data[2::4]
    out[2::4] = data[0::4]
    return bytes(out)


rgba_to_bgra = bgra_to_rgba  # the same swap


def u16_to_u8(data: bytes) -> bytes:
    """Little-endian uint16 channels -> uint8 (the high byte: v8 = v16 >> 8, which maps
    every 8-bit value promoted as v*257 back to itself)."""
    return bytes(data[1::2])


def u8_to_u16(data: bytes) -> bytes:
    """uint8 -> little-endian uint16 (v*257: both bytes equal v)."""
    out = bytearray(len(data) * 2)
    out[0::2] = data
    out[1::2] = data
    return bytes(out)


def grey_alpha_to_rgba(data: bytes) -> bytes:
    """(grey, alpha) pairs -> RGBA with R=G=B=grey."""
    out = bytearray(len(data) * 2)
    g, a = data[0::2], data[1::2]
    out[0::4], out[1::4], out[2::4], out[3::4] = g, g, g, a
    return bytes(out)


def mask_to_rgba(mask: bytes) -> bytes:
    """A 1-byte-per-pixel mask -> opaque grey RGBA (brighter = selected)."""
    return grey_alpha_to_rgba(_interleave(mask, b"\xff" * len(mask)))


def _interleave(a: bytes, b: bytes) -> bytes:
    out = bytearray(len(a) * 2)
    out[0::2], out[1::2] = a, b
    return bytes(out)


def is_transparent(rgba: bytes) -> bool:
    alpha = rgba[3::4]
    return alpha.count(0) == len(alpha)


def multiply_alpha(rgba: bytes, mask: bytes) -> bytes:
    """Scale the alpha of RGBA8 pixels by a 0..255 mask (one byte per pixel)."""
    alpha = rgba[3::4]
    if alpha.count(255) == len(alpha):
        new_alpha = bytes(mask)
    else:
        new_alpha = bytes(map(lambda a, m: (a * m + 127) // 255, alpha, mask))
    out = bytearray(rgba)
    out[3::4] = new_alpha
    return bytes(out)


def _pixel_size(model: str, depth: str) -> int:
    channels = {"RGBA": 4, "GRAYA": 2}[model]
    return channels * {"U8": 1, "U16": 2}[depth]


# -- checks --------------------------------------------------------------------------------

def check_color_space(model: str, depth: str, what: str = "This document") -> None:
    if model != "RGBA":
        name = _MODEL_NAMES.get(model, model)
        raise AdapterError(f"{what} is in {name} colour. Analogon works on RGB images: {_CONVERT_HINT}")
    if depth.startswith("F"):
        raise AdapterError(f"{what} uses {depth[1:]}-bit floating-point colour, which Analogon "
                           f"does not convert. {_CONVERT_HINT}")
    if depth not in ("U8", "U16"):
        raise AdapterError(f"{what} uses an unsupported colour depth ({depth}). {_CONVERT_HINT}")


def check_document(doc) -> None:
    if doc is None:
        raise AdapterError("Open or create a document first.")
    check_color_space(doc.colorModel(), doc.colorDepth())


def document_rect(doc) -> Rect:
    return Rect(0, 0, int(doc.width()), int(doc.height()))


# -- layers --------------------------------------------------------------------------------

def iter_layers(doc) -> Iterable[Any]:
    """All layers, top of the stack first (groups before their children)."""
    def walk(node):
        for child in reversed(list(node.childNodes())):
            yield child
            if child.type() == "grouplayer":
                yield from walk(child)
    if doc is not None:
        yield from walk(doc.rootNode())


def pickable_layers(doc) -> list:
    """Layers a role may use: pixel layers, groups, clones, file/fill layers (not masks)."""
    kinds = {"paintlayer", "grouplayer", "clonelayer", "filelayer", "filllayer", "vectorlayer"}
    return [n for n in iter_layers(doc) if n.type() in kinds]


def find_layer(doc, unique_id) -> Any | None:
    if not unique_id:
        return None
    for n in iter_layers(doc):
        if _uid(n) == str(unique_id):
            return n
    return None


def _uid(node) -> str:
    uid = node.uniqueId()
    return str(uid.toString()) if hasattr(uid, "toString") else str(uid)


def layer_id(node) -> str:
    return _uid(node)


def is_edit_map(node) -> bool:
    return str(node.name()).startswith(EDIT_MAP_NAME)


def read_layer(node, rect: Rect, role_title: str = "") -> bytes:
    """A layer's pixels over ``rect`` as RGBA8 (grey layers become grey RGBA)."""
    model, depth = node.colorModel(), node.colorDepth()
    label = f"The layer \u201c{node.name()}\u201d" + (f" ({role_title})" if role_title else "")
    if model == "GRAYA" and depth in ("U8", "U16"):
        pass
    else:
        check_color_space(model, depth, label)
    if node.type() == "paintlayer":
        raw = node.pixelData(rect.x, rect.y, rect.w, rect.h)
    else:
        raw = node.projectionPixelData(rect.x, rect.y, rect.w, rect.h)
    raw = _bytes(raw)
    expected = rect.w * rect.h * _pixel_size(model, depth)
    if len(raw) != expected:
        raise AdapterError(f"Krita returned {len(raw)} bytes for {label}, expected {expected}.")
    if depth == "U16":
        raw = u16_to_u8(raw)
    if model == "GRAYA":
        return grey_alpha_to_rgba(raw)
    return bgra_to_rgba(raw)


@dataclass
class RoleImage:
    rgba: bytes
    width: int
    height: int
    x: int | None = None  # placement on the target canvas (None: not placed)
    y: int | None = None
    layer_name: str = ""


def region_of_interest(doc, padding: int = DEFAULT_PADDING, align: int = ALIGN) -> tuple[Rect, bool]:
    """(rect, from_selection): selection bounds + padding, else the whole canvas."""
    full = document_rect(doc)
    sel = doc.selection()
    if sel is not None and sel.width() > 0 and sel.height() > 0:
        r = Rect(int(sel.x()), int(sel.y()), int(sel.width()), int(sel.height()))
        r = r.padded(padding).intersect(full)
        if not r.empty:
            return r.aligned(align, full) if align > 1 else r, True
    return full, False


def selection_mask(doc, rect: Rect) -> bytes | None:
    """The selection over ``rect``, one byte per pixel, or None without a selection."""
    sel = doc.selection()
    if sel is None or sel.width() <= 0 or sel.height() <= 0:
        return None
    return _bytes(sel.pixelData(rect.x, rect.y, rect.w, rect.h))


def feathered_mask(doc, rect: Rect, radius: int = DEFAULT_FEATHER) -> bytes | None:
    """The selection over ``rect``, softened inward by ``radius`` pixels: feathered with
    Krita's own feather, then limited to the selection, so that nothing outside changes."""
    raw = selection_mask(doc, rect)
    if raw is None or radius <= 0:
        return raw
    soft = doc.selection().duplicate()
    soft.feather(int(radius))
    fea = _bytes(soft.pixelData(rect.x, rect.y, rect.w, rect.h))
    return bytes(map(min, raw, fea))


def is_placed(role: dict) -> bool:
    """Whether a (non-target) role's layer is sent where it lies on the canvas: roles with a
    canvas, maps and masks, and roles taking several images (exemplars placed on the
    canvas). Other roles (A, A′, an appearance reference) are whole images."""
    return bool(role.get("canvas")) or role.get("kind") in ("map", "mask") or bool(role.get("multiple"))


def role_image(doc, node, role: dict, roi: Rect, is_target: bool) -> RoleImage:
    """Read the layer chosen for ``role``: the target over the region of interest, placed
    roles only where the layer has content inside that region (with its offset), the others
    over their own bounds."""
    title = role.get("title") or role.get("name", "")
    name = str(node.name())
    if not node.visible():
        raise AdapterError(f"The layer \u201c{name}\u201d chosen for {title} is hidden. "
                           "Show it, or pick another layer.")
    full = document_rect(doc)
    placed = not is_target and is_placed(role)
    if is_target:
        rect = roi
    else:
        bounds = Rect.of(node.bounds()).intersect(full)
        rect = bounds.intersect(roi) if placed else bounds
    where = " inside the selected region" if (placed or is_target) and roi != full else ""
    if rect.empty:
        raise AdapterError(f"The layer \u201c{name}\u201d chosen for {title} is empty{where}. "
                           "Paint on it, or pick another layer.")
    rgba = read_layer(node, rect, title)
    if is_transparent(rgba):
        raise AdapterError(f"The layer \u201c{name}\u201d chosen for {title} is empty{where}. "
                           "Paint on it, or pick another layer.")
    if placed:
        return RoleImage(rgba, rect.w, rect.h, rect.x - roi.x, rect.y - roi.y, name)
    return RoleImage(rgba, rect.w, rect.h, None, None, name)


# -- results -------------------------------------------------------------------------------

def result_layer_name(method: str, seed: Any, suffix: str = "") -> str:
    name = f"{method} seed {seed}"
    return f"{name} {suffix}".rstrip() if suffix else name


def insert_result(doc, target, rgba: bytes, width: int, height: int, roi: Rect, name: str,
                  mask: bytes | None = None):
    """Add a new paint layer above ``target`` holding the result at the region's offset,
    its alpha multiplied by ``mask`` (a feathered selection). Returns the new node."""
    check_document(doc)
    pixels = _result_pixels(rgba, width, height, roi, mask, doc.colorDepth())
    node = doc.createNode(name, "paintlayer")
    parent = target.parentNode() if target is not None else None
    if parent is None:
        parent = doc.rootNode()
    parent.addChildNode(node, target)
    node.setPixelData(pixels, roi.x, roi.y, roi.w, roi.h)
    _refresh(doc)
    return node


def replace_result(doc, node, rgba: bytes, width: int, height: int, roi: Rect,
                   mask: bytes | None = None, name: str | None = None):
    """Put another result into a result layer that :func:`insert_result` added: the same
    region, scaling and selection mask, over the region only (the whole region is written,
    so nothing of the previous result stays). Renames the layer when ``name`` is given."""
    check_document(doc)
    if node.type() != "paintlayer":
        raise AdapterError(f"The layer \u201c{node.name()}\u201d is no longer a paint layer.")
    check_color_space(node.colorModel(), node.colorDepth(), f"The layer \u201c{node.name()}\u201d")
    pixels = _result_pixels(rgba, width, height, roi, mask, node.colorDepth())
    node.setPixelData(pixels, roi.x, roi.y, roi.w, roi.h)
    if name is not None:
        node.setName(name)
    _refresh(doc)
    return node


def _result_pixels(rgba: bytes, width: int, height: int, roi: Rect, mask: bytes | None,
                   depth: str) -> bytes:
    """A result as Krita pixels for the region: scaled to it, alpha times the mask, BGRA."""
    if (width, height) != (roi.w, roi.h):
        rgba, width, height = _scaled(rgba, width, height, roi.w, roi.h)
    if mask is not None:
        rgba = multiply_alpha(rgba, mask)
    bgra = rgba_to_bgra(rgba)
    return u8_to_u16(bgra) if depth == "U16" else bgra


def _scaled(rgba: bytes, w: int, h: int, tw: int, th: int):
    from .qt import Qt, image_rgba_bytes, rgba_image

    img = rgba_image(rgba, w, h).scaled(tw, th, Qt.AspectRatioMode.IgnoreAspectRatio,
                                        Qt.TransformationMode.SmoothTransformation)
    return image_rgba_bytes(img)


def create_edit_map(doc, target):
    """A grey-scale paint layer filled black above ``target``, half transparent so that the
    painter sees the image through it. Black = keep, brighter = more change."""
    check_document(doc)
    full = document_rect(doc)
    node = doc.createNode(EDIT_MAP_NAME, "paintlayer")
    parent = target.parentNode() if target is not None else None
    if parent is None:
        parent = doc.rootNode()
    parent.addChildNode(node, target)
    depth = doc.colorDepth()
    try:
        node.setColorSpace("GRAYA", depth, _grey_profile(depth))
    except Exception:  # keep an RGBA layer where the host cannot convert
        pass
    n = full.w * full.h
    if node.colorModel() == "GRAYA":
        px = b"\x00\xff" if node.colorDepth() == "U8" else b"\x00\x00\xff\xff"
    else:
        px = b"\x00\x00\x00\xff" if node.colorDepth() == "U8" else b"\x00" * 6 + b"\xff\xff"
    node.setPixelData(px * n, 0, 0, full.w, full.h)
    node.setOpacity(EDIT_MAP_OPACITY)
    _refresh(doc)
    return node


def _grey_profile(depth: str) -> str:
    """A grey profile Krita knows (it refuses the conversion without one); sRGB-like tone
    curve preferred so that painted greys mean what they look like."""
    try:
        from krita import Krita

        profiles = [str(p) for p in Krita.instance().profiles("GRAYA", depth)]
    except Exception:
        return ""
    for p in profiles:
        if "srgbtrc" in p.lower():
            return p
    return profiles[0] if profiles else ""


def _refresh(doc):
    try:
        doc.refreshProjection()
    except Exception:
        pass


def layer_thumbnail(node, size: int = 48):
    try:
        return node.thumbnail(size, size)
    except Exception:
        return None
