"""The running job's preview on the canvas, as a layer where its result will go.

Krita records adding and removing a layer as undo steps, and a Python plugin cannot draw on
the canvas without a layer (Krita 5's API gives no view transform for an overlay), so the
preview is a locked layer placed exactly where the result goes, and it *becomes* the result
when the job is done: its pixels are replaced by the result over the whole region, it is
renamed and unlocked. A pass is then one undo step ("Add Layer", taken when the first
preview arrived), and one Undo after a pass removes the result; no preview comes back.

The preview shows the result-to-be: the backend composes each preview through the job's
change map (transparent where the map keeps), so the canvas never moves where nothing may
change.

A job that ends without a result (cancelled, failed) takes its preview back with Krita's own
Undo when the preview's "Add Layer" is provably the newest step (the document is the active
one, the Undo action still names the step it named right after the preview was added, and
the document's layers are the same apart from the preview): the undo stack is then exactly
as before the pass. Otherwise (the painter did something since, or there is no Undo action,
as in a batch run) the layer is removed, which Krita records as a step of its own.

A job whose result will have variants (a sweep) gets the preview as a group holding the
layer, the shape its result takes. Should the result differ in shape from what was
guessed, or the painter have deleted the preview layer, the preview is removed and the
result added as usual.
"""
from __future__ import annotations

from typing import Any

from ..qt import QTimer, image_rgba_bytes
from . import document as kdoc
from .document import Rect

UNDO_TRIES = 5  # Krita drops an Undo press that comes while the image is busy: press again
UNDO_WAIT_MS = 400  # between checks that the press landed


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
        self.undo_state: tuple | None = None  # kdoc.undo_state right after the layer was added

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
            self.undo_state = kdoc.undo_state(self.doc)
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
        """Take the preview away (a job that ended without a result): by Krita's Undo of its
        own step where that is provably the newest one, else by removing the layer."""
        node, self.node = self.node, None
        if node is None or not self.shown_node(node):
            return False
        if self.undo_state is not None and kdoc.undo_state(self.doc) == self.undo_state:
            _UndoPress(self.doc, node, self.undo_state).press()
            return True
        return kdoc.remove_preview_layer(self.doc, node)

    def shown_node(self, node) -> bool:
        return kdoc.find_layer(self.doc, kdoc.layer_id(node)) is not None


class _UndoPress:
    """Presses Krita's Undo for the preview's own step and checks that it landed: the preview
    is gone. A press Krita dropped (the image was busy) is repeated; should the state move
    otherwise (the painter acted meanwhile), or the tries run out, the layer is removed."""

    live: set = set()  # the presses under way (kept alive until they finish)

    def __init__(self, doc, node, state: tuple):
        self.doc, self.node, self.state = doc, node, state
        self.tries = 0

    def press(self) -> None:
        _UndoPress.live.add(self)
        self._next()

    def _gone(self) -> bool:
        return kdoc.find_layer(self.doc, kdoc.layer_id(self.node)) is None

    def _next(self) -> None:
        try:
            if self._gone():
                return self._finish()
            if kdoc.undo_state(self.doc) != self.state or self.tries >= UNDO_TRIES:
                kdoc.remove_preview_layer(self.doc, self.node)  # the plain way after all
                return self._finish()
            self.tries += 1
            kdoc.press_undo(self.doc)
        except Exception:  # a closed document
            return self._finish()
        QTimer.singleShot(UNDO_WAIT_MS, self._next)

    def _finish(self) -> None:
        _UndoPress.live.discard(self)
