"""The Krita adapter: layers and selection -> RGBA8 images, results -> new layers.

Only this module touches Krita's Document/Node/Selection API. Krita's 8-bit RGBA pixel bytes
are in BGRA order (16-bit: BGRA of little-endian uint16); everything that leaves this module
is RGBA8, row-major, top row first; pixel conversions are Qt image operations
(``imaging``). Nothing here modifies the pixels of an existing layer: results are new layers
(filled before they are added, so that one undo removes them), another variant of a result
is one more layer in the result's group, and the only other changes are hiding the edit
maps a pass used and renaming a result group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from . import imaging

EDIT_MAP_NAME = "Edit map"
EDIT_MAP_OPACITY = 128  # 0..255: the user sees the image through the map while painting
DEFAULT_PADDING = 32
DEFAULT_FEATHER = 8
ALIGN = 8  # regions are grown to multiples of the VAE factor where the canvas allows

_MODEL_NAMES = {"RGBA": "RGB", "CMYKA": "CMYK", "LABA": "L*a*b*", "GRAYA": "grey-scale",
                "XYZA": "XYZ", "YCbCrA": "YCbCr"}
_CONVERT_TO = " to RGB/Alpha, 8-bit or 16-bit integer."
_CONVERT_HINT = "Convert it with Image \u25b8 Convert Image Color Space\u2026" + _CONVERT_TO
# a layer whose colour space differs from its document's is converted on its own
_CONVERT_LAYER_HINT = ("Convert the layer with Layer \u25b8 Convert \u25b8 Convert Layer Color "
                       "Space\u2026" + _CONVERT_TO)


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
# Conversions are Qt image operations (imaging.py); these names stay for callers and tests.

def is_transparent(rgba: bytes) -> bool:
    return not imaging.has_content(rgba)


def _pixel_size(model: str, depth: str) -> int:
    channels = {"RGBA": 4, "GRAYA": 2}[model]
    return channels * {"U8": 1, "U16": 2}[depth]


# -- checks --------------------------------------------------------------------------------

def check_color_space(model: str, depth: str, what: str = "This document",
                      layer: bool = False) -> None:
    """Refuse what Analogon does not read, saying how to convert it: the document with
    Image ▸ Convert Image Color Space, a ``layer`` with Layer ▸ Convert."""
    hint = _CONVERT_LAYER_HINT if layer else _CONVERT_HINT
    if model != "RGBA":
        name = _MODEL_NAMES.get(model, model)
        raise AdapterError(f"{what} is in {name} colour. Analogon works on RGB images: {hint}")
    if depth.startswith("F"):
        raise AdapterError(f"{what} uses {depth[1:]}-bit floating-point colour, which Analogon "
                           f"does not convert. {hint}")
    if depth not in ("U8", "U16"):
        raise AdapterError(f"{what} uses an unsupported colour depth ({depth}). {hint}")


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
    """A layer's pixels over ``rect`` as RGBA8 (grey layers become grey RGBA; 16-bit values
    are rounded to the nearest 8-bit value)."""
    model, depth = node.colorModel(), node.colorDepth()
    label = f"The layer \u201c{node.name()}\u201d" + (f" ({role_title})" if role_title else "")
    if model == "GRAYA" and depth in ("U8", "U16"):
        pass
    else:
        check_color_space(model, depth, label, layer=True)
    if node.type() == "paintlayer":
        raw = node.pixelData(rect.x, rect.y, rect.w, rect.h)
    else:
        raw = node.projectionPixelData(rect.x, rect.y, rect.w, rect.h)
    raw = _bytes(raw)
    expected = rect.w * rect.h * _pixel_size(model, depth)
    if len(raw) != expected:
        raise AdapterError(f"Krita returned {len(raw)} bytes for {label}, expected {expected}.")
    if model == "GRAYA":
        return imaging.krita_grey_to_rgba8(raw, rect.w, rect.h, depth)
    return imaging.krita_to_rgba8(raw, rect.w, rect.h, depth)


def read_stack(nodes: list, rect: Rect, role_title: str = "") -> bytes:
    """The picture of ``nodes`` (bottom first) over ``rect``: the first layer's pixels with
    the others composited over it ("normal" blending, each at its opacity relative to the
    first layer's), as RGBA8. Used for a source that earlier results were put above."""
    base = read_layer(nodes[0], rect, role_title)
    if len(nodes) == 1:
        return base
    base_opacity = max(1, int(nodes[0].opacity()))
    overlays = []
    for n in nodes[1:]:
        if not n.visible():
            continue
        rgba = read_layer(n, rect, role_title)
        if imaging.has_content(rgba):
            overlays.append((rgba, min(1.0, int(n.opacity()) / base_opacity)))
    return imaging.composite(base, rect.w, rect.h, overlays) if overlays else base


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
    """The selection over ``rect``, softened inward by about ``radius`` pixels: feathered with
    Qt's smooth scaling (Krita's own feather takes seconds on a 4000×3000 selection), then
    multiplied by the selection itself, so that nothing outside it changes."""
    raw = selection_mask(doc, rect)
    if raw is None or radius <= 0:
        return raw
    fea = imaging.feather(raw, rect.w, rect.h, int(radius))
    return imaging.multiply_masks(raw, fea, rect.w, rect.h)


def mask_to_rgba(mask: bytes, w: int, h: int) -> bytes:
    return imaging.mask_to_rgba(mask, w, h)


def is_placed(role: dict) -> bool:
    """Whether a (non-target) role's layer is sent where it lies on the canvas: roles with a
    canvas, maps and masks, and roles taking several images (exemplars placed on the
    canvas). Other roles (A, A′, an appearance reference) are whole images."""
    return bool(role.get("canvas")) or role.get("kind") in ("map", "mask") or bool(role.get("multiple"))


CONTROL_KINDS = ("map", "mask")  # layers that steer a pass; painters keep them hidden


def role_image(doc, node, role: dict, roi: Rect, is_target: bool, stack: list | None = None) -> RoleImage:
    """Read the layer chosen for ``role``: the target over the region of interest (composited
    with ``stack``, the results above it, when given), placed roles only where the layer has
    content inside that region (with its offset), the others over their own bounds. Hidden
    maps and masks are read (they are controls); hidden images are refused. Exemplars (roles
    taking several placed layers) are read at their layer's opacity."""
    title = role.get("title") or role.get("name", "")
    name = str(node.name())
    if not node.visible() and role.get("kind") not in CONTROL_KINDS and not is_target:
        raise AdapterError(f"The layer \u201c{name}\u201d chosen for {title} is hidden. "
                           "Show it, or pick another layer.")
    if is_target and not node.visible():
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
    if is_target and stack:
        rgba = read_stack([node] + list(stack), rect, title)
    else:
        rgba = read_layer(node, rect, title)
    if role.get("multiple") and role.get("kind") == "image" and int(node.opacity()) < 255:
        rgba = imaging.with_opacity(rgba, rect.w, rect.h, int(node.opacity()) / 255.0)
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


def unique_name(doc, name: str) -> str:
    """``name``, or ``name #2``, ``#3``… when a layer of the document has it already."""
    taken = {str(n.name()) for n in iter_layers(doc)}
    if name not in taken:
        return name
    k = 2
    while f"{name} #{k}" in taken:
        k += 1
    return f"{name} #{k}"


def placement(doc, target, used: Iterable[Any] = ()) -> tuple[Any, Any]:
    """(parent, above): where a result of ``target`` goes so that the painter sees it: in
    the target's group, above the target and above every other layer of the pass that lies
    in that group (directly or inside a sub-group)."""
    parent = target.parentNode() if target is not None else None
    if parent is None:
        parent = doc.rootNode()
    children = list(parent.childNodes())
    ids = [layer_id(c) for c in children]
    best = ids.index(layer_id(target)) if target is not None and layer_id(target) in ids else len(ids) - 1
    pid = layer_id(parent)
    for node in used:
        n = node
        while n is not None:
            up = n.parentNode()
            if up is not None and layer_id(up) == pid:
                if layer_id(n) in ids:
                    best = max(best, ids.index(layer_id(n)))
                break
            n = up
    return parent, (children[best] if children and best >= 0 else None)


def result_pixels(rgba: bytes, width: int, height: int, roi: Rect, mask: bytes | None,
                  depth: str) -> bytes:
    """A result layer image as Krita pixels for the region: scaled to it when the backend
    sent another size, alpha times the (feathered) selection, in the document's depth."""
    if (width, height) != (roi.w, roi.h):
        rgba = imaging.scaled(rgba, width, height, roi.w, roi.h)
    return imaging.rgba8_to_krita(rgba, roi.w, roi.h, depth, mask)


def _paint_node(doc, name: str, pixels: bytes, roi: Rect, opacity: int = 255,
                blending: str = ""):
    """A new paint layer holding ``pixels`` before it is added (so that adding it is the
    one undo step)."""
    node = doc.createNode(name, "paintlayer")
    node.setPixelData(pixels, roi.x, roi.y, roi.w, roi.h)
    if opacity != 255:
        node.setOpacity(int(opacity))
    if blending:
        # Krita records this as an undo step of its own, applied asynchronously: wait for it,
        # so that it sits below the step that adds the node, and one undo removes the node.
        node.setBlendingMode(blending)
        doc.waitForDone()
    return node


def insert_result(doc, target, rgba: bytes, width: int, height: int, roi: Rect, name: str,
                  mask: bytes | None = None, used: Iterable[Any] = (), opacity: int | None = None,
                  variants: bool = False):
    """Add the result of a pass: a paint layer holding ``rgba`` (the backend's result layer:
    transparent where nothing changes) at the region's offset, its alpha times ``mask``, at
    the target's opacity, placed by :func:`placement`. With ``variants`` it is a group
    holding that layer, so that another variant can be shown by adding one layer into it
    (:func:`show_variant`). One undo step removes it. Returns the new node."""
    check_document(doc)
    pixels = result_pixels(rgba, width, height, roi, mask, doc.colorDepth())
    if opacity is None:
        opacity = int(target.opacity()) if target is not None else 255
    parent, above = placement(doc, target, used)
    name = unique_name(doc, name)
    if variants:
        node = _filled_group(doc, name, _paint_node(doc, name, pixels, roi))
        node.setOpacity(int(opacity))
        parent.addChildNode(node, above)
    else:
        node = _paint_node(doc, name, pixels, roi, opacity)
        parent.addChildNode(node, above)
    _refresh(doc)
    return node


def _filled_group(doc, name: str, child):
    """A new group holding ``child``, filled before the group is added: ``setChildNodes``
    on a group that is not in the image records no undo step (``addChildNode`` would), so
    that adding the group is the one step."""
    group = doc.createNode(name, "grouplayer")
    group.setChildNodes([child])
    return group


# -- the running job's preview ---------------------------------------------------------------

PREVIEW_NAME = "Analogon preview"


def add_preview_layer(doc, target, rgba: bytes, width: int, height: int, roi: Rect,
                      mask: bytes | None = None, used: Iterable[Any] = (), group: bool = False):
    """A locked layer showing a job's preview where its result will go (placed as
    :func:`insert_result` places it; a group holding the layer when the result will have
    variants). Adding it is one undo step; :func:`preview_to_result` turns it into the
    result without another one."""
    check_document(doc)
    pixels = result_pixels(rgba, width, height, roi, mask, doc.colorDepth())
    parent, above = placement(doc, target, used)
    layer = _paint_node(doc, PREVIEW_NAME, pixels, roi)
    node = _filled_group(doc, PREVIEW_NAME, layer) if group else layer
    node.setLocked(True)
    parent.addChildNode(node, above)
    _refresh(doc)
    return node


def _content_layer(node):
    if node.type() == "grouplayer":
        children = list(node.childNodes())
        return children[0] if children else None
    return node


def update_preview_layer(doc, node, rgba: bytes, width: int, height: int, roi: Rect,
                         mask: bytes | None = None) -> bool:
    """Show a newer preview in the preview layer (pixels written in place: no undo step)."""
    layer = _content_layer(node)
    if layer is None:
        return False
    layer.setPixelData(result_pixels(rgba, width, height, roi, mask, doc.colorDepth()),
                       roi.x, roi.y, roi.w, roi.h)
    _refresh(doc)
    return True


def preview_to_result(doc, node, rgba: bytes, width: int, height: int, roi: Rect, name: str,
                      mask: bytes | None = None, opacity: int = 255):
    """Turn the preview layer into the result layer: its pixels replaced by the result over
    the whole region (nothing of the preview is left), named, unlocked, at the result's
    opacity. The pass stays one undo step (the preview's "Add Layer"), and one undo removes
    the result. Returns the node, or None when the preview layer is gone."""
    layer = _content_layer(node)
    if layer is None or find_layer(doc, layer_id(node)) is None:
        return None
    check_document(doc)
    layer.setPixelData(result_pixels(rgba, width, height, roi, mask, doc.colorDepth()),
                       roi.x, roi.y, roi.w, roi.h)
    name = unique_name(doc, name)
    for n in {layer_id(node): node, layer_id(layer): layer}.values():
        n.setName(name)
        n.setLocked(False)
    node.setOpacity(int(opacity))
    _refresh(doc)
    return node


def remove_preview_layer(doc, node) -> bool:
    """Remove a preview layer (a cancelled or failed job): Krita records it as one undo step,
    so that an undo after a cancel shows the preview again (it adds nothing else)."""
    if node is None or find_layer(doc, layer_id(node)) is None:
        return False
    node.setLocked(False)
    node.remove()
    _refresh(doc)
    return True


def _undo_action(doc):
    """Krita's Undo action when it acts on ``doc`` (the active document), else None."""
    try:
        from krita import Krita

        app = Krita.instance()
        active = app.activeDocument()
        if active is None or layer_id(active.rootNode()) != layer_id(doc.rootNode()):
            return None
        return app.action("edit_undo"), app.action("edit_redo")
    except Exception:  # no Krita (tests), no window (a batch run)
        return None


def undo_state(doc) -> tuple | None:
    """What tells whether the newest undo step is still the same one: the Undo and Redo
    actions' texts (they name the neighbouring steps) and the document's layers. None when
    Undo cannot be pressed for ``doc``."""
    actions = _undo_action(doc)
    if actions is None or None in actions:
        return None
    undo, redo = actions
    return (str(undo.text()), str(redo.text()),
            tuple(sorted(layer_id(n) for n in iter_layers(doc))))


def press_undo(doc) -> None:
    """Press Krita's Undo for ``doc`` once (after the image is idle, so that Krita does not
    drop the press)."""
    actions = _undo_action(doc)
    if actions is None or actions[0] is None:
        return
    doc.waitForDone()
    actions[0].trigger()


def show_variant(doc, group, rgba: bytes, width: int, height: int, roi: Rect, name: str,
                 mask: bytes | None = None):
    """Show another variant in a result group that :func:`insert_result` added: one new
    layer on top of the group in "copy" blending, so that the group shows exactly it (the
    whole region is written: nothing of the previous variant shows through), and one undo
    brings the previous one back. Renames the group.

    Krita records setting a layer's blending mode as an undo step of its own (empty once the
    layer is undone), so the first variant shown this way pays it; later ones are copies of
    that layer, which keep its blending without a step (one undo step per pick)."""
    check_document(doc)
    if group.type() != "grouplayer":
        raise AdapterError(f"The layer \u201c{group.name()}\u201d is not an Analogon result group.")
    pixels = result_pixels(rgba, width, height, roi, mask, doc.colorDepth())
    children = list(group.childNodes())
    node = _copy_layer_like(doc, children, name, pixels, roi)
    if node is None:
        node = _paint_node(doc, name, pixels, roi, 255, "copy" if children else "")
    group.addChildNode(node, children[-1] if children else None)
    group.setName(name)
    _refresh(doc)
    return node


def _copy_layer_like(doc, children, name: str, pixels: bytes, roi: Rect):
    """A new layer in "copy" blending holding ``pixels``, made as a copy of the topmost such
    paint layer among ``children`` (so that Krita records no blending step); None when there
    is none, or when it differs from a fresh layer in a way a copy would carry over (colour
    space, a layer style, animation, alpha lock or inherit alpha, masks on it)."""
    template = next((n for n in reversed(children) if n.type() == "paintlayer"
                     and n.blendingMode() == "copy"), None)
    if template is None:
        return None
    try:
        space = ("colorModel", "colorDepth", "colorProfile")
        if any(getattr(template, k)() != getattr(doc, k)() for k in space if hasattr(doc, k)):
            return None
        carried = (("layerStyleToAsl", ""), ("animated", False), ("alphaLocked", False),
                   ("inheritAlpha", False), ("childNodes", []))
        if any(hasattr(template, k) and getattr(template, k)() != fresh for k, fresh in carried):
            return None
        node = template.duplicate()
    except Exception:  # an odd host: make the layer the plain way
        return None
    if node is None:
        return None
    old = Rect.of(node.bounds())
    if not old.empty and old.intersect(roi) != old:
        # the painter drew outside the region on the copied layer: clear that first
        size = _pixel_size(doc.colorModel(), doc.colorDepth())
        node.setPixelData(bytes(old.w * old.h * size), old.x, old.y, old.w, old.h)
    node.setPixelData(pixels, roi.x, roi.y, roi.w, roi.h)
    node.setName(name)
    node.setOpacity(255)
    node.setVisible(True)
    node.setLocked(False)
    return node


def set_visible(doc, nodes: Iterable[Any], visible: bool) -> list[str]:
    """Show or hide ``nodes`` and have Krita redraw what they covered: ``Node.setVisible``
    changes the flag only, and the canvas and the document's projection keep the old
    picture until something else refreshes them. The names of the nodes changed."""
    changed = []
    for n in nodes:
        if n is not None and bool(n.visible()) != visible:
            n.setVisible(visible)
            changed.append(str(n.name()))
    if changed:
        _refresh(doc)
    return changed


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
