"""A small stand-in for Krita's Python API (the parts the plugin uses), on PyQt6.

It keeps pixels the way Krita does: 8-bit RGBA layers as BGRA bytes, 16-bit as BGRA
little-endian uint16, grey layers as (grey, alpha). ``install()`` puts it in sys.modules as
``krita`` and returns the application object.
"""
from __future__ import annotations

import enum
import itertools
import sys
import types
import uuid
from array import array

from PyQt6.QtCore import QObject, QRect, pyqtSignal
from PyQt6.QtGui import QImage, QPainter
from PyQt6.QtWidgets import QDockWidget

_CHANNELS = {"RGBA": 4, "GRAYA": 2, "CMYKA": 5, "LABA": 4}
_DEPTH = {"U8": 1, "U16": 2, "F16": 2, "F32": 4}


def pixel_size(model: str, depth: str) -> int:
    return _CHANNELS[model] * _DEPTH[depth]


class Selection:
    """A per-pixel selection over the whole canvas (one byte per pixel)."""

    def __init__(self, width: int = 0, height: int = 0, data: bytearray | None = None):
        self._w, self._h = width, height
        self._data = data if data is not None else bytearray(width * height)

    def _ensure(self, w, h):
        if self._w == 0:
            self._w, self._h = w, h
            self._data = bytearray(w * h)

    def select(self, x, y, w, h, value):
        self._ensure(max(self._w, x + w), max(self._h, y + h))
        for yy in range(max(0, y), min(self._h, y + h)):
            start = yy * self._w
            x0, x1 = max(0, x), min(self._w, x + w)
            self._data[start + x0:start + x1] = bytes([value]) * (x1 - x0)

    def _bbox(self):
        xs, ys = [], []
        for yy in range(self._h):
            row = self._data[yy * self._w:(yy + 1) * self._w]
            if any(row):
                ys.append(yy)
                nz = [i for i, v in enumerate(row) if v]
                xs += [nz[0], nz[-1]]
        if not ys:
            return 0, 0, 0, 0
        return min(xs), ys[0], max(xs) - min(xs) + 1, ys[-1] - ys[0] + 1

    def x(self):
        return self._bbox()[0]

    def y(self):
        return self._bbox()[1]

    def width(self):
        return self._bbox()[2]

    def height(self):
        return self._bbox()[3]

    def value(self, x, y):
        return self._data[y * self._w + x]

    def pixelData(self, x, y, w, h):
        out = bytearray(w * h)
        for yy in range(h):
            for xx in range(w):
                sx, sy = x + xx, y + yy
                if 0 <= sx < self._w and 0 <= sy < self._h:
                    out[yy * w + xx] = self._data[sy * self._w + sx]
        return bytes(out)

    def duplicate(self):
        return Selection(self._w, self._h, bytearray(self._data))

    def feather(self, r):
        """Box blur of radius r (Krita uses a Gaussian; the shape matters less than that
        it is soft and symmetric)."""
        w, h, src = self._w, self._h, self._data
        tmp = bytearray(w * h)
        for yy in range(h):
            for xx in range(w):
                lo, hi = max(0, xx - r), min(w - 1, xx + r)
                tmp[yy * w + xx] = sum(src[yy * w + lo:yy * w + hi + 1]) // (2 * r + 1)
        out = bytearray(w * h)
        for yy in range(h):
            for xx in range(w):
                lo, hi = max(0, yy - r), min(h - 1, yy + r)
                out[yy * w + xx] = sum(tmp[k * w + xx] for k in range(lo, hi + 1)) // (2 * r + 1)
        self._data = out


class Node(QObject):
    _ids = itertools.count(1)

    def __init__(self, doc: "Document", name: str, kind: str = "paintlayer"):
        super().__init__()
        self._doc = doc
        self._name = name
        self._type = kind
        self._model, self._depth = doc._model, doc._depth
        self._uuid = uuid.UUID(int=next(Node._ids))
        self._children: list[Node] = []
        self._parent: Node | None = None
        self._visible = True
        self._opacity = 255
        self._blending = "normal"
        self._locked = False
        self._pixels = bytearray(doc._w * doc._h * pixel_size(self._model, self._depth))
        self.writes = 0  # how many times setPixelData was called

    # identity
    def name(self):
        return self._name

    def setName(self, n):
        self._name = n

    def type(self):
        return self._type

    def uniqueId(self):
        return self._uuid  # real Krita: QUuid

    def colorModel(self):
        return self._model

    def colorDepth(self):
        return self._depth

    def setColorSpace(self, model, depth, profile):
        if model not in ("RGBA", "GRAYA") or not profile:  # Krita refuses an empty profile
            return False
        self._model, self._depth = model, depth
        self._pixels = bytearray(self._doc._w * self._doc._h * pixel_size(model, depth))
        return True

    def visible(self):
        return self._visible

    def setVisible(self, v):
        self._visible = bool(v)

    def opacity(self):
        return self._opacity

    def setOpacity(self, v):
        self._opacity = int(v)

    def blendingMode(self):
        return self._blending

    def setBlendingMode(self, mode):
        self._blending = str(mode)
        self._doc.undo_log.append(("blending", self._name))  # Krita: a step of its own

    def duplicate(self):
        """A copy outside the tree (pixels, blending, opacity, visibility, lock; a new id),
        as Krita's: no undo step."""
        n = Node(self._doc, self._name, self._type)
        n._model, n._depth = self._model, self._depth
        n._visible, n._opacity, n._blending, n._locked = (self._visible, self._opacity,
                                                           self._blending, self._locked)
        n._pixels = bytearray(self._pixels)
        return n

    def locked(self):
        return self._locked

    def setLocked(self, v):
        self._locked = bool(v)

    # tree
    def parentNode(self):
        return self._parent

    def childNodes(self):
        return list(self._children)

    def addChildNode(self, child, above):
        child._parent = self
        if above is None:
            self._children.insert(0, child)
        else:
            idx = next(i for i, c in enumerate(self._children) if c is above)
            self._children.insert(idx + 1, child)
        self._doc.undo_log.append(("add", child._name))  # Krita: one undo step "Add Layer"
        self._doc.undo_nodes.append((child, self))
        return True

    def remove(self):
        if self._parent is not None:
            self._parent._children.remove(self)
            self._doc.undo_nodes.append((self, self._parent))
            self._parent = None
            self._doc.undo_log.append(("remove", self._name))  # one undo step "Remove Layer"
        return True

    def setChildNodes(self, nodes):
        """As Krita 5's: no undo step; it removes the first child only (it walks the
        siblings of a node it has just detached), then adds each node that has no parent on
        top."""
        if self._children:
            self._children.pop(0)._parent = None
        for n in nodes:
            if n._parent is None:
                n._parent = self
                self._children.append(n)

    # pixels
    def _ps(self):
        return pixel_size(self._model, self._depth)

    def pixelData(self, x, y, w, h):
        ps, W, H = self._ps(), self._doc._w, self._doc._h
        out = bytearray(w * h * ps)
        for yy in range(h):
            sy = y + yy
            if not 0 <= sy < H:
                continue
            x0, x1 = max(0, x), min(W, x + w)
            if x1 <= x0:
                continue
            src = self._pixels[(sy * W + x0) * ps:(sy * W + x1) * ps]
            out[(yy * w + x0 - x) * ps:(yy * w + x1 - x) * ps] = src
        return bytes(out)

    def projectionPixelData(self, x, y, w, h):
        """Paint layers: their pixels; groups: their children composited (normal or copy
        blending, opacity, visibility), in the document's colour space, as Krita does."""
        if self._type != "grouplayer":
            return self.pixelData(x, y, w, h)
        return _composite_children(self, x, y, w, h)

    def setPixelData(self, data, x, y, w, h):
        ps, W, H = self._ps(), self._doc._w, self._doc._h
        data = bytes(data)
        assert len(data) == w * h * ps, (len(data), w, h, ps)
        for yy in range(h):
            sy = y + yy
            if not 0 <= sy < H:
                continue
            x0, x1 = max(0, x), min(W, x + w)
            self._pixels[(sy * W + x0) * ps:(sy * W + x1) * ps] = \
                data[(yy * w + x0 - x) * ps:(yy * w + x1 - x) * ps]
        self.writes += 1
        return True

    def _alpha_at(self, i):
        ps = self._ps()
        a = self._pixels[i * ps + ps - _DEPTH[self._depth]:i * ps + ps]
        return any(a)

    def bounds(self):
        W, H = self._doc._w, self._doc._h
        if self._type == "grouplayer":
            data, ps, d = self.projectionPixelData(0, 0, W, H), pixel_size(self._doc._model, self._doc._depth), _DEPTH[self._doc._depth]
            alpha_at = lambda i: any(data[i * ps + ps - d:i * ps + ps])  # noqa: E731
        else:
            alpha_at = self._alpha_at
        xs, ys = [], []
        for yy in range(H):
            for xx in range(W):
                if alpha_at(yy * W + xx):
                    xs.append(xx)
                    ys.append(yy)
        if not xs:
            return QRect()
        return QRect(min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)

    def thumbnail(self, w, h):
        return QImage(w, h, QImage.Format.Format_ARGB32)


def _qimage(node, x, y, w, h):
    """A node's pixels (projection for groups) as a QImage in Krita's byte order: 8-bit BGRA
    is ARGB32, 16-bit BGRA is RGBA64 with red and blue swapped (the same for compositing)."""
    doc = node._doc
    data = node.projectionPixelData(x, y, w, h)
    if node._model == "GRAYA":  # grey + alpha -> RGBA in the document's depth
        n = w * h
        if node._depth == "U8":
            out = bytearray(n * 4)
            g = data[0::2]
            out[0::4], out[1::4], out[2::4], out[3::4] = g, g, g, data[1::2]
            data, fmt, bpp = bytes(out), QImage.Format.Format_ARGB32, 4
        else:
            src = array("H")
            src.frombytes(data)
            out = array("H", bytes(n * 8))
            g = src[0::2]
            out[0::4], out[1::4], out[2::4], out[3::4] = g, g, g, src[1::2]
            data, fmt, bpp = out.tobytes(), QImage.Format.Format_RGBA64, 8
    elif node._depth == "U8":
        fmt, bpp = QImage.Format.Format_ARGB32, 4
    else:
        fmt, bpp = QImage.Format.Format_RGBA64, 8
    img = QImage(bytes(data), w, h, w * bpp, fmt).copy()
    if doc._depth == "U16" and bpp == 4:
        img = img.convertToFormat(QImage.Format.Format_RGBA64)
    return img


def _composite_children(group, x, y, w, h):
    doc = group._doc
    out = QImage(w, h, QImage.Format.Format_RGBA64_Premultiplied)
    out.fill(0)
    p = QPainter(out)
    for child in group._children:  # bottom first, as Krita lists them
        if not child._visible:
            continue
        p.setCompositionMode(QPainter.CompositionMode.CompositionMode_Source if child._blending == "copy"
                             else QPainter.CompositionMode.CompositionMode_SourceOver)
        p.setOpacity(child._opacity / 255.0)
        p.drawImage(0, 0, _qimage(child, x, y, w, h))
    p.end()
    if doc._depth == "U8":
        img, bpp = out.convertToFormat(QImage.Format.Format_ARGB32), 4
    else:
        img, bpp = out.convertToFormat(QImage.Format.Format_RGBA64), 8
    ptr = img.constBits()
    ptr.setsize(img.bytesPerLine() * h)
    raw = bytes(ptr.asstring(img.bytesPerLine() * h))
    row = w * bpp
    return b"".join(raw[r * img.bytesPerLine():r * img.bytesPerLine() + row] for r in range(h))


class Document(QObject):
    def __init__(self, w, h, name="doc", model="RGBA", depth="U8"):
        super().__init__()
        self.undo_log: list[tuple[str, str]] = []  # steps Krita records: adds, removes, blending
        self.undo_nodes: list = []  # (node, parent) of each add and remove, for UndoAction
        self.drop_presses = 0  # Undo presses to drop (Krita drops those of a busy image)
        self._w, self._h, self._name = w, h, name
        self._model, self._depth = model, depth
        self._root = Node(self, "root", "grouplayer")
        self._active = None
        self._selection: Selection | None = None
        self.refreshes = 0
        self._annotations: dict[str, tuple[str, bytes]] = {}

    def width(self):
        return self._w

    def height(self):
        return self._h

    def name(self):
        return self._name

    def colorModel(self):
        return self._model

    def colorDepth(self):
        return self._depth

    def rootNode(self):
        return self._root  # None once closed, as in Krita

    def close(self):
        self._root = None
        app = Krita.instance()
        if self in app._docs:
            app._docs.remove(self)
        if app._active is self:
            app._active = None
        return True

    def activeNode(self):
        return self._active

    def setActiveNode(self, n):
        self._active = n

    def createNode(self, name, kind):
        return Node(self, name, kind)

    def nodeByName(self, name):
        def walk(n):
            for c in n.childNodes():
                if c.name() == name:
                    return c
                found = walk(c)
                if found:
                    return found
        return walk(self._root)

    def selection(self):
        if self._selection is None or self._selection.width() == 0:
            return None
        return self._selection.duplicate()

    def setSelection(self, sel):
        if sel is not None:
            sel._ensure(self._w, self._h)
        self._selection = sel

    def pixelData(self, x, y, w, h):
        """The composite of the whole image (Krita: the document's projection)."""
        return self._root.projectionPixelData(x, y, w, h)

    def annotationTypes(self):
        return list(self._annotations)

    def annotation(self, kind):
        from PyQt6.QtCore import QByteArray

        return QByteArray(self._annotations.get(kind, ("", b""))[1])

    def annotationDescription(self, kind):
        return self._annotations.get(kind, ("", b""))[0]

    def setAnnotation(self, kind, description, data):
        self._annotations[kind] = (description, bytes(data.data()) if hasattr(data, "data") else bytes(data))

    def removeAnnotation(self, kind):
        self._annotations.pop(kind, None)

    def refreshProjection(self):
        self.refreshes += 1

    def waitForDone(self):
        pass


class Notifier(QObject):
    applicationClosing = pyqtSignal()


class Application(QObject):
    def __init__(self):
        super().__init__()
        self.settings: dict[tuple[str, str], str] = {}
        self.docker_factories = []
        self.extensions = []
        self._docs: list[Document] = []
        self._active: Document | None = None
        self._notifier = Notifier()

    def version(self):
        return "5.1.5"

    def profiles(self, model, depth):
        return {"GRAYA": ["Gray-D50-elle-V2-g10.icc", "Gray-D50-elle-V2-srgbtrc.icc"],
                "RGBA": ["sRGB-elle-V2-srgbtrc.icc"]}.get(model, [])

    def readSetting(self, group, name, default):
        return self.settings.get((group, name), default)

    def writeSetting(self, group, name, value):
        self.settings[(group, name)] = str(value)

    def createDocument(self, w, h, name, model, depth, profile, res):
        doc = Document(w, h, name, model, depth)
        self._docs.append(doc)
        return doc

    def activeDocument(self):
        return self._active

    def setActiveDocument(self, doc):
        self._active = doc

    def documents(self):
        return list(self._docs)

    def addDockWidgetFactory(self, factory):
        self.docker_factories.append(factory)

    def addExtension(self, ext):
        self.extensions.append(ext)

    def notifier(self):
        return self._notifier

    def action(self, name):
        if name in ("edit_undo", "edit_redo"):
            return UndoAction(self, name == "edit_undo")
        return None


_STEP_TEXT = {"add": "Add Layer", "remove": "Remove Layer", "blending": "Change Blending Mode"}


class UndoAction:
    """Krita's Undo (or Redo) action on the active document: its text names the step it
    would take; Undo takes back the newest add or remove (Redo is not simulated: its text is
    what Krita shows with nothing to redo)."""

    def __init__(self, app, undo: bool):
        self.app, self.undo = app, undo

    def text(self):
        doc = self.app.activeDocument()
        if not self.undo or doc is None or not doc.undo_log:
            return "Undo" if self.undo else "Redo"
        return "Undo " + _STEP_TEXT[doc.undo_log[-1][0]]

    def trigger(self):
        doc = self.app.activeDocument()
        if not self.undo or doc is None or not doc.undo_log:
            return
        if doc.drop_presses:
            doc.drop_presses -= 1
            return
        kind, _ = doc.undo_log.pop()
        if kind in ("add", "remove"):
            node, parent = doc.undo_nodes.pop()
            if kind == "add":
                parent._children.remove(node)
                node._parent = None
            else:
                parent._children.append(node)
                node._parent = parent


class Krita:
    _app: Application | None = None

    @classmethod
    def instance(cls):
        if cls._app is None:
            cls._app = Application()
        return cls._app


class DockWidget(QDockWidget):
    def canvasChanged(self, canvas):  # overridden by the plugin
        pass


class DockWidgetFactoryBase:
    class DockPosition(enum.Enum):  # scoped only, as in Krita 6's bindings (PyQt6)
        DockTornOff, DockTop, DockBottom, DockRight, DockLeft, DockMinimized = range(6)


class DockWidgetFactory:
    def __init__(self, id_, pos, cls):
        self.id, self.pos, self.cls = id_, pos, cls


class Extension(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)


def install() -> Application:
    mod = types.ModuleType("krita")
    for name, obj in dict(Krita=Krita, Selection=Selection, DockWidget=DockWidget,
                          DockWidgetFactory=DockWidgetFactory, DockWidgetFactoryBase=DockWidgetFactoryBase,
                          Extension=Extension, Document=Document, Node=Node).items():
        setattr(mod, name, obj)
    sys.modules["krita"] = mod
    return Krita.instance()
