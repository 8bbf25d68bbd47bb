"""The edit maps a pass hides, shown again when Krita's own Undo takes the pass back.

After a pass its edit maps are hidden (they are controls, not part of the picture). Krita
records adding the result layer as the pass's one undo step, but a plugin's visibility change
is no undo step at all, so Undo alone would leave the map hidden. Each pass's hidden maps are
remembered here with its result layer; the panel's layer poll calls :meth:`MapHider.follow`,
which shows the maps again when the result layer has gone from the document (the pass was
undone, or the painter deleted the layer) and hides them again when it comes back (Redo).
A map the painter showed or hid in between is theirs: it is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import document as kdoc


@dataclass
class HiddenMaps:
    doc: Any
    result_id: str
    map_ids: list[str]
    undone: bool = False  # the result layer has gone and the maps were shown again
    shown: list[str] = field(default_factory=list)  # the maps this record showed again


class MapHider:
    KEEP = 20  # the latest passes whose maps are followed

    def __init__(self):
        self.records: list[HiddenMaps] = []

    def hide(self, doc, result, maps: list) -> list[str]:
        """Hide a pass's ``maps`` (redrawn at once) and remember them with its ``result``
        layer; the names of the maps hidden."""
        hidden = [n for n in maps if n is not None and n.visible()]
        names = kdoc.set_visible(doc, hidden, False)
        if hidden:
            self.records.append(HiddenMaps(doc, kdoc.layer_id(result),
                                           [kdoc.layer_id(n) for n in hidden]))
            del self.records[:-self.KEEP]
        return names

    def follow(self) -> bool:
        """Follow Krita's Undo and Redo of the passes (see the module's doc); whether any map
        changed. Never raises (a closed document is forgotten)."""
        changed = False
        for rec in list(self.records):
            try:
                changed |= self._follow(rec)
            except Exception:  # a closed document, an odd host error
                self.records.remove(rec)
        return changed

    @staticmethod
    def _follow(rec: HiddenMaps) -> bool:
        present = kdoc.find_layer(rec.doc, rec.result_id) is not None
        maps = [kdoc.find_layer(rec.doc, i) for i in rec.map_ids]
        if not present and not rec.undone:
            again = [n for n in maps if n is not None and not n.visible()]
            kdoc.set_visible(rec.doc, again, True)
            rec.undone, rec.shown = True, [kdoc.layer_id(n) for n in again]
            return bool(again)
        if present and rec.undone:
            back = [n for n in maps if n is not None and kdoc.layer_id(n) in rec.shown
                    and n.visible()]
            kdoc.set_visible(rec.doc, back, False)
            rec.undone, rec.shown = False, []
            return bool(back)
        return False
