"""Test-only Krita plugin (installed only into the private test profile): once the main
window is up, it opens a document, looks for the Analogon docker in the widget tree, waits
for the docker to connect to the backend it started, saves a grab of the docker, writes a
JSON report to $ANALOGON_SELFTEST_REPORT, and quits Krita when the test asks (a flag file)."""
import json
import os
import time

from analogon_krita import qt
from analogon_krita.qt import QTimer, QtWidgets
from krita import Krita

QAbstractButton, QComboBox, QDockWidget, QLabel, QWidget_ = (
    QtWidgets.QAbstractButton, QtWidgets.QComboBox, QtWidgets.QDockWidget, QtWidgets.QLabel,
    QtWidgets.QWidget)

REPORT = os.environ.get("ANALOGON_SELFTEST_REPORT")
STATE = {"t0": time.monotonic(), "doc": None, "report": {}}


def _dock():
    win = Krita.instance().activeWindow()
    if win is None:
        return None, None
    qwin = win.qwindow()
    return win, qwin.findChild(QDockWidget, "analogon_docker")


def _tick():
    app = Krita.instance()
    elapsed = time.monotonic() - STATE["t0"]
    win, dock = _dock()
    rep = STATE["report"]
    if win is None or dock is None:
        if elapsed > 90:
            rep.update(found=False, window=win is not None)
            return _write()
        return QTimer.singleShot(500, _tick)
    if STATE["doc"] is None:
        doc = app.createDocument(640, 400, "selftest", "RGBA", "U8", "", 72.0)
        node = doc.createNode("photo", "paintlayer")
        doc.rootNode().addChildNode(node, None)
        node.setPixelData(bytes((200, 140, 60, 255)) * (640 * 400), 0, 0, 640, 400)
        doc.setActiveNode(node)
        win.addView(doc)
        doc.refreshProjection()
        doc.setModified(False)
        STATE["doc"] = doc
        rep["initially_visible"] = dock.isVisible()
        if not dock.isVisible():
            dock.show()
        dock.raise_()
    status = dock.findChild(QLabel, "connection_status")
    text = status.text() if status is not None else ""
    if not text.startswith("Connected") and elapsed < 100:
        return QTimer.singleShot(500, _tick)
    method = dock.findChild(QComboBox, "method")
    rep.update(
        found=True, title=dock.windowTitle(), visible=dock.isVisible(),
        geometry=[dock.x(), dock.y(), dock.width(), dock.height()],
        status=text,
        buttons=sorted({b.text() for b in dock.findChildren(QAbstractButton) if b.text()}),
        methods=[method.itemText(i) for i in range(method.count())] if method else [],
        params=sorted(w.objectName()[6:] for w in dock.findChildren(QWidget_) if w.objectName().startswith("param_")),
        backend_pid=getattr(getattr(dock, "controller", None), "process", None) and dock.controller.process.pid,
        seconds=round(elapsed, 1), krita_version=str(app.version()), binding=qt.BINDING,
    )
    # Float the docker at a comfortable size so that the screenshot shows the whole panel.
    dock.setFloating(True)
    dock.resize(420, 900)
    dock.move(1150, 40)
    QTimer.singleShot(1500, lambda: _grab(dock))


def _grab(dock):
    dock.grab().save(os.path.join(os.path.dirname(REPORT), "docker.png"))
    _write()
    QTimer.singleShot(300, _wait_for_quit)


def _write():
    with open(REPORT + ".tmp", "w") as f:
        json.dump(STATE["report"], f, indent=1)
    os.replace(REPORT + ".tmp", REPORT)


def _wait_for_quit():
    if os.path.exists(REPORT + ".quit"):
        for doc in Krita.instance().documents():
            doc.setModified(False)
        Krita.instance().action("file_quit").trigger()
        return
    QTimer.singleShot(300, _wait_for_quit)


if REPORT:
    QTimer.singleShot(1000, _tick)
