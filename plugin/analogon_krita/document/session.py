"""What the plugin knows about one document: the layers picked per method and the history of
passes, kept in the document itself (a Krita annotation, saved in the .kra) so that it
survives closing and reopening. The controller holds one session per open document.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from ..qt import QByteArray, QImage, image_to_bytes

ANNOTATION = "analogon/history"
ANNOTATION_TITLE = "Analogon history (passes, parameters, layer ids)"
FORMAT = 1
MAX_ENTRIES = 50
MAX_BYTES = 512 * 1024  # the whole annotation; the oldest entries go first
THUMB_SIZE = 64


@dataclass
class Pass:
    """One finished pass, as the history shows it."""

    method: str
    title: str
    params: dict[str, Any]
    seed: int | None
    model: str
    roles: dict[str, list[str]]
    layer_id: str
    layer_name: str
    roi: list[int]
    from_selection: bool
    thumbnail: Any = None  # QImage
    result_sha: str = ""
    sequence: tuple[int, int] | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    source_ids: list[str] = field(default_factory=list)  # the source's layers, bottom first
    map_ids: list[str] = field(default_factory=list)  # edit maps the pass used

    def summary(self) -> str:
        bits = [f"{k}={v}" for k, v in sorted(self.params.items()) if not isinstance(v, (list, dict))]
        return f"{self.layer_name} \u2014 " + ", ".join(bits[:6])

    def to_json(self, thumbnails: bool = True) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("method", "title", "params", "seed", "model", "roles",
                                              "layer_id", "layer_name", "roi", "from_selection",
                                              "result_sha", "source_ids", "map_ids")}
        out["sequence"] = list(self.sequence) if self.sequence else None
        if thumbnails and self.thumbnail is not None and not self.thumbnail.isNull():
            small = self.thumbnail
            if max(small.width(), small.height()) > THUMB_SIZE:
                from ..qt import Qt

                small = small.scaled(THUMB_SIZE, THUMB_SIZE, Qt.AspectRatioMode.KeepAspectRatio,
                                     Qt.TransformationMode.SmoothTransformation)
            out["thumbnail_png"] = base64.b64encode(image_to_bytes(small, "PNG")).decode("ascii")
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Pass":
        thumb = None
        if d.get("thumbnail_png"):
            thumb = QImage.fromData(QByteArray(base64.b64decode(d["thumbnail_png"])), "PNG")
        seq = d.get("sequence")
        return cls(str(d.get("method", "")), str(d.get("title", "")), dict(d.get("params") or {}),
                   d.get("seed"), str(d.get("model") or ""),
                   {str(k): [str(x) for x in v] for k, v in (d.get("roles") or {}).items()},
                   str(d.get("layer_id", "")), str(d.get("layer_name", "")),
                   [int(x) for x in d.get("roi") or []], bool(d.get("from_selection")), thumb,
                   str(d.get("result_sha") or ""), tuple(seq) if seq else None, {},
                   [str(x) for x in d.get("source_ids") or []],
                   [str(x) for x in d.get("map_ids") or []])


class Session:
    """One document's roles and history."""

    def __init__(self, key: str):
        self.key = key
        self.roles: dict[str, dict[str, list[str]]] = {}
        self.history: list[Pass] = []
        self.loaded = False

    def entry_for_layer(self, layer_id: str) -> Pass | None:
        """The pass whose result is the layer ``layer_id``."""
        return next((e for e in self.history if e.layer_id == layer_id), None)

    def result_ids(self) -> set[str]:
        return {e.layer_id for e in self.history}

    # -- persistence in the document ------------------------------------------------------
    def encode(self) -> bytes:
        """The history as the annotation's bytes: JSON, newest first, capped in entries and
        size (thumbnails are dropped from the oldest entries first, then entries)."""
        entries = [e.to_json() for e in self.history[:MAX_ENTRIES]]
        data = {"format": FORMAT, "history": entries}
        raw = json.dumps(data, sort_keys=True).encode("utf-8")
        k = len(entries)
        while len(raw) > MAX_BYTES and k > 0:
            k -= 1
            entries[k].pop("thumbnail_png", None)
            raw = json.dumps(data, sort_keys=True).encode("utf-8")
        while len(raw) > MAX_BYTES and entries:
            entries.pop()
            raw = json.dumps(data, sort_keys=True).encode("utf-8")
        return raw

    def decode(self, raw: bytes) -> None:
        try:
            data = json.loads(bytes(raw).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(data, dict) or not isinstance(data.get("history"), list):
            return
        out = []
        for d in data["history"]:
            if isinstance(d, dict):
                try:
                    out.append(Pass.from_json(d))
                except (TypeError, ValueError):
                    continue
        self.history = out

    def save(self, doc) -> bool:
        """Write the history into ``doc`` (saved with the .kra)."""
        if doc is None or not hasattr(doc, "setAnnotation"):
            return False
        try:
            doc.setAnnotation(ANNOTATION, ANNOTATION_TITLE, QByteArray(self.encode()))
            return True
        except Exception:  # a host without annotations: the history stays in memory
            return False

    def load(self, doc) -> None:
        """Read the history ``doc`` carries (once per session)."""
        self.loaded = True
        if doc is None or not hasattr(doc, "annotation"):
            return
        try:
            types = [str(t) for t in doc.annotationTypes()]
            if ANNOTATION not in types:
                return
            raw = doc.annotation(ANNOTATION)
        except Exception:
            return
        data = bytes(raw.data()) if hasattr(raw, "data") else bytes(raw or b"")
        if data:
            self.decode(data)
