"""The running job's preview on the canvas, as a layer where its result will go.

Krita records adding and removing a layer as undo steps, and a Python plugin cannot draw on
the canvas without a layer (Krita 5's API gives no view transform for an overlay), so the
preview is a locked layer placed exactly where the result goes, and it *becomes* the result
when the job is done: its pixels are replaced by the result over the whole region, it is
renamed and unlocked. A pass is then one undo step ("Add Layer", taken when the first
preview arrived), and one Undo after a pass removes the result; no preview comes back.
A job that ends without a result (cancelled, failed) removes the layer: that is a second
undo step, so an Undo right after a cancel shows the last preview again, locked, and the
next Undo removes it.

A job whose result will have variants (a sweep) gets the preview as a group holding the
layer, the shape its result takes. Should the result differ in shape from what was
guessed, or the painter have deleted the preview layer, the preview is removed and the
result added as usual.
"""
from __future__ import annotations

from typing import Any

from . import document as kdoc
from .document import Rect
from .qt import image_rgba_bytes


class CanvasPreview:
    """The preview of one pass: made on the first preview image, updated in place."""

    def __init__(self, doc, target, roi: Rect, mask: bytes | None, used: list, group: bool):
        self.doc = doc
        self.target = target
        self.roi = roi
        self.mask = mask
        self.used = list(used)
        self.group = group
        self.node: Any = None
        self.updates = 0

    @property
    def shown(self) -> bool:
        return self.node is not None and kdoc.find_layer(self.doc, kdoc.layer_id(self.node)) is not None

    def show(self, image) -> bool:
        """Show a preview (a QImage of the job's target, any size: scaled to the region)."""
        if image is None or image.isNull():
            return False
        rgba, w, h = image_rgba_bytes(image)
        if self.node is None:
            self.node = kdoc.add_preview_layer(self.doc, self.target, rgba, w, h, self.roi,
                                               self.mask, self.used, self.group)
        elif self.shown:
            kdoc.update_preview_layer(self.doc, self.node, rgba, w, h, self.roi, self.mask)
        else:
            return False  # the painter deleted it: no new one for this pass
        self.updates += 1
        return True

    def take_result(self, rgba: bytes, width: int, height: int, name: str, opacity: int,
                    variants: bool):
        """The preview layer turned into the result layer; None when there is none to turn
        (the caller adds the result as a new layer then)."""
        if self.node is None:
            return None
        if not self.shown or variants != self.group:
            self.discard()
            return None
        node = kdoc.preview_to_result(self.doc, self.node, rgba, width, height, self.roi, name,
                                      self.mask, opacity)
        self.node = None
        return node

    def discard(self) -> bool:
        node, self.node = self.node, None
        return kdoc.remove_preview_layer(self.doc, node) if node is not None else False
