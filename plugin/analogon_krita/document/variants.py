"""The variants of the latest result (e.g. the λ of a DIA sweep): the images, where they go,
and which one the result group shows.

A pick adds one layer on top of the result group (:func:`document.show_variant`), so Krita's
own Undo and Redo change which variant the group shows without telling the panel. Each layer
a variant was shown with is remembered here by its id, so that the panel can read the group's
top layer and follow (:func:`shown`), and rename the group after it while the name is still
the one the plugin gave it (:func:`follow_name`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import document as kdoc
from .document import Rect
from .session import Pass


@dataclass
class Variant:
    """One image of a multi-image result, as the strip shows it."""

    label: str
    thumbnail: Any  # QImage
    sha: str
    layer_name: str
    rgba: bytes = field(repr=False, default=b"")
    width: int = 0
    height: int = 0


@dataclass
class VariantResult:
    """Where the variants of the latest result go: the pass's document, region and mask, and
    its history entry (whose layer is the result group); which layer in the group shows which
    variant, and the names the plugin gave the group."""

    doc: Any
    target: Any
    roi: Rect
    mask: bytes | None
    entry: Pass
    above_id: str = ""  # the layer the result layer was put above
    added_id: str = ""  # the layer add_variant_as_layer added last (the next one goes above)
    layers: dict[str, int] = field(default_factory=dict)  # layer id -> the variant it shows
    names: dict[int, str] = field(default_factory=dict)  # variant -> the group's name for it
    group_name: str = ""  # the name the plugin gave the group last

    def group(self):
        """The result group, or None when it is gone (deleted, or its pass undone)."""
        node = kdoc.find_layer(self.doc, self.entry.layer_id)
        return node if node is not None and node.type() == "grouplayer" else None

    def showing(self, group, index: int, layer) -> None:
        """Note that ``layer``, now on top of ``group``, shows variant ``index``."""
        self.layers[kdoc.layer_id(layer)] = index
        self.group_name = self.names[index] = str(group.name())


def shown(where: VariantResult) -> int | None:
    """The variant the result group shows now: the one its top layer was added for; None
    when the group is gone, empty, or topped by a layer the plugin did not add."""
    group = where.group()
    children = list(group.childNodes()) if group is not None else []
    return where.layers.get(kdoc.layer_id(children[-1])) if children else None


def follow_name(where: VariantResult, index: int) -> str:
    """Name the result group after variant ``index`` (the name it had when it last showed
    it), unless the painter renamed it; the group's name."""
    group = where.group()
    if group is None:
        return ""
    name = where.names.get(index)
    if name and str(group.name()) == where.group_name and name != where.group_name:
        group.setName(name)
        where.group_name = name
    return str(group.name())
