"""The one place that imports Qt.

Krita 5 embeds PyQt5, Krita 6 embeds PyQt6, and each refuses plugins that import the other
binding. We ask the host which binding it has already loaded (Krita imports its own before
any plugin), fall back to the Krita version, and only then try the bindings in order.

Everything else in the plugin imports Qt names from here and writes enums fully scoped
(``Qt.AlignmentFlag.AlignLeft``), which both PyQt5 5.15 and PyQt6 accept.
"""
from __future__ import annotations

import importlib
import os
import sys


def _host_binding() -> str | None:
    forced = os.environ.get("ANALOGON_QT_API", "").strip().lower()
    if forced in ("pyqt5", "pyqt6"):
        return "PyQt6" if forced == "pyqt6" else "PyQt5"
    for name in ("PyQt6", "PyQt5"):
        if f"{name}.QtCore" in sys.modules:
            return name
    krita = sys.modules.get("krita")
    if krita is not None:
        try:
            version = str(krita.Krita.instance().version())
            return "PyQt6" if version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 6 else "PyQt5"
        except Exception:  # an unusual host: try the bindings below
            pass
    return None


def _import(binding: str):
    mods = {}
    for part in ("QtCore", "QtGui", "QtWidgets", "QtNetwork"):
        mods[part] = importlib.import_module(f"{binding}.{part}")
    return mods


_binding = _host_binding()
_errors: list[str] = []
_mods = None
for _candidate in ([_binding] if _binding else ["PyQt6", "PyQt5"]):
    try:
        _mods = _import(_candidate)
        _binding = _candidate
        break
    except ImportError as e:  # pragma: no cover - depends on the host
        _errors.append(f"{_candidate}: {e}")
if _mods is None:  # pragma: no cover
    raise ImportError("Analogon needs PyQt5 or PyQt6 (" + "; ".join(_errors) + ")")

BINDING: str = _binding
QT6: bool = BINDING == "PyQt6"

QtCore = _mods["QtCore"]
QtGui = _mods["QtGui"]
QtWidgets = _mods["QtWidgets"]
QtNetwork = _mods["QtNetwork"]

Qt = QtCore.Qt
QObject = QtCore.QObject
QTimer = QtCore.QTimer
QEventLoop = QtCore.QEventLoop
QUrl = QtCore.QUrl
QByteArray = QtCore.QByteArray
QBuffer = QtCore.QBuffer
QIODevice = QtCore.QIODevice
QProcess = QtCore.QProcess
QProcessEnvironment = QtCore.QProcessEnvironment
QRect = QtCore.QRect
QSize = QtCore.QSize
QCoreApplication = QtCore.QCoreApplication
QElapsedTimer = QtCore.QElapsedTimer
pyqtSignal = QtCore.pyqtSignal
pyqtSlot = QtCore.pyqtSlot
QCryptographicHash = QtCore.QCryptographicHash
qCompress = QtCore.qCompress

QImage = QtGui.QImage
QPixmap = QtGui.QPixmap
QIcon = QtGui.QIcon
QPainter = QtGui.QPainter
QColor = QtGui.QColor
# QAction moved from QtWidgets (Qt 5) to QtGui (Qt 6).
QAction = getattr(QtGui, "QAction", None) or getattr(QtWidgets, "QAction")

QNetworkAccessManager = QtNetwork.QNetworkAccessManager
QNetworkRequest = QtNetwork.QNetworkRequest
QNetworkReply = QtNetwork.QNetworkReply
QSslCertificate = QtNetwork.QSslCertificate


def scoped_enum(owner, scope: str, name: str):
    """An enum member of a non-Qt sip class, e.g. ``krita.DockWidgetFactoryBase``: Krita 6's
    PyQt6-style bindings only have the scoped ``owner.scope.name``
    (``DockWidgetFactoryBase.DockPosition.DockRight``), Krita 5's PyQt5-style ones the flat
    ``owner.name``."""
    enum = getattr(owner, scope, None)
    if enum is not None and hasattr(enum, name):
        return getattr(enum, name)
    return getattr(owner, name)


def exec_loop(obj) -> int:
    """Run a modal loop / event loop in both bindings (``exec`` vs ``exec_``)."""
    fn = getattr(obj, "exec", None) or getattr(obj, "exec_")
    return fn()


def to_bytes(data) -> bytes:
    """QByteArray (or bytes-like) -> bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return bytes(data.data()) if hasattr(data, "data") else bytes(data)


def image_to_bytes(image, fmt: str = "PNG", quality: int = -1) -> bytes:
    """Encode a QImage (PNG by default; ``quality`` 0..100, for PNG the speed: -1 Qt's default)."""
    ba = QByteArray()
    buf = QBuffer(ba)
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buf, fmt, quality)
    buf.close()
    return to_bytes(ba)


def rgba_image(data: bytes, width: int, height: int):
    """A QImage owning a copy of raw RGBA8 bytes."""
    img = QImage(data, width, height, width * 4, QImage.Format.Format_RGBA8888)
    return img.copy()


def image_rgba_bytes(image) -> tuple[bytes, int, int]:
    """QImage -> (RGBA8 bytes, width, height), rows packed."""
    img = image.convertToFormat(QImage.Format.Format_RGBA8888)
    w, h = img.width(), img.height()
    bpl = img.bytesPerLine()
    ptr = img.constBits()
    size = bpl * h
    if hasattr(ptr, "setsize"):  # PyQt5 sip.voidptr
        ptr.setsize(size)
    raw = bytes(ptr.asstring(size)) if hasattr(ptr, "asstring") else bytes(ptr)[:size]
    if bpl == w * 4:
        return raw, w, h
    return b"".join(raw[y * bpl:y * bpl + w * 4] for y in range(h)), w, h
