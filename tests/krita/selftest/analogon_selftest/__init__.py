"""Test-only Krita plugin (installed only into the private test profile): once the main
window is up, it opens a document, looks for the Analogon docker in the widget tree, waits
for the docker to connect to the backend it started, and then, as a painter would:
runs a DIA sweep from the docker's controller (a preview layer shows on the canvas while it
runs), presses Krita's own Undo and Redo (the pass; a pick, which the panel follows; two
picks in a row), measures and grabs the docker where Krita docks it and floating, writes a
JSON report to $ANALOGON_SELFTEST_REPORT, and quits Krita when the test asks (a flag
file)."""
import json
import os
import time
import traceback

from krita import Krita
from analogon_krita import qt
from analogon_krita.qt import QRect, QTimer, QtCore, QtWidgets

QPoint = QtCore.QPoint
QAbstractButton, QComboBox, QDockWidget, QLabel, QScrollArea, QWidget = (
    QtWidgets.QAbstractButton, QtWidgets.QComboBox, QtWidgets.QDockWidget, QtWidgets.QLabel,
    QtWidgets.QScrollArea, QtWidgets.QWidget)

REPORT = os.environ.get("ANALOGON_SELFTEST_REPORT")
OUT = os.path.dirname(REPORT) if REPORT else ""
STATE = {"t0": time.monotonic(), "doc": None, "report": {}}
COLOURS = {"A": (200, 60, 60), "A\u2032": (60, 200, 60), "photo": (200, 140, 60)}


def _dock():
    win = Krita.instance().activeWindow()
    if win is None:
        return None, None
    qwin = win.qwindow()
    return win, qwin.findChild(QDockWidget, "analogon_docker")


def _layer(doc, name, w, h, above=None):
    r, g, b = COLOURS[name]
    node = doc.createNode(name, "paintlayer")
    doc.rootNode().addChildNode(node, above)
    node.setPixelData(bytes((b, g, r, 255)) * (w * h), 0, 0, w, h)
    return node


def _inside(host, widget):
    if widget is None or not widget.isVisibleTo(host):
        return False
    return host.rect().contains(QRect(widget.mapTo(host, QPoint(0, 0)), widget.size()))


def _clipped(panel):
    """Labels whose text does not fit the room they got."""
    out = []
    scroll = panel.findChild(QScrollArea, "panel_scroll")
    viewport = scroll.viewport() if scroll is not None else panel
    for label in panel.findChildren(QLabel):
        if not label.isVisibleTo(panel) or not label.text():
            continue
        if label.wordWrap():
            fits = label.heightForWidth(label.width()) <= label.height()
        else:
            fits = label.sizeHint().width() <= label.width()
        host = viewport if viewport.isAncestorOf(label) else panel
        if not fits or label.mapTo(host, QPoint(label.width(), 0)).x() > host.width():
            out.append(label.text()[:60])
    return out


def _measure(dock):
    panel = dock.widget()
    gen = panel.findChild(QAbstractButton, "generate")
    msg = [w for w in (panel.findChild(QLabel, "message"), panel.findChild(QLabel, "error"))
           if w is not None and w.isVisibleTo(panel)]
    return {"size": [dock.width(), dock.height()], "floating": dock.isFloating(),
            "generate_inside": _inside(dock, gen) and not gen.visibleRegion().isEmpty(),
            "message_inside": bool(msg) and all(_inside(dock, w) for w in msg),
            "message": msg[0].text() if msg else "",
            "clipped": _clipped(panel)}


def _until(predicate, timeout):
    """Wait (yielding to Krita) until ``predicate()`` or ``timeout`` seconds."""
    t0 = time.monotonic()
    while not predicate() and time.monotonic() - t0 < timeout:
        yield 0.1


def _press(doc, action, texts, und, what):
    """Press Krita's Undo or Redo once, as a painter would. Krita drops a press that comes
    while the image is busy (its undo stack takes the image's barrier lock, and gives up when
    a stroke or an idle task holds it), so press again while ``texts()`` (the Undo and Redo
    actions' texts, which name the neighbouring steps and change as a press lands) says it
    did not; the number of presses is reported under ``presses``."""
    before = texts()

    def landed():
        return texts() != before

    for n in range(1, 6):
        doc.waitForDone()
        action.trigger()
        yield from _until(landed, 2)
        if landed():
            break
    und.setdefault("presses", {})[what] = n if landed() else 0


def _steps():
    """The test, as a generator: each ``yield`` waits that many seconds."""
    app = Krita.instance()
    rep = STATE["report"]
    win, dock = _dock()
    while win is None or dock is None:
        if time.monotonic() - STATE["t0"] > 90:
            rep.update(found=False, window=win is not None)
            return
        yield 0.5
        win, dock = _dock()
    w, h = 160, 96
    doc = app.createDocument(w, h, "selftest", "RGBA", "U8", "", 72.0)
    photo = _layer(doc, "photo", w, h)
    a = _layer(doc, "A", w, h, photo)
    _layer(doc, "A\u2032", w, h, a)
    doc.setActiveNode(photo)
    win.addView(doc)
    doc.refreshProjection()
    doc.setModified(False)
    STATE["doc"] = doc
    rep["initially_visible"] = dock.isVisible()
    if not dock.isVisible():
        dock.show()
    dock.raise_()
    status = dock.findChild(QLabel, "connection_status")
    while not (status is not None and status.text().startswith("Connected")) and time.monotonic() - STATE["t0"] < 100:
        yield 0.5
    text = status.text() if status is not None else ""
    method = dock.findChild(QComboBox, "method")
    c = dock.controller
    rep.update(
        found=True, title=dock.windowTitle(), visible=dock.isVisible(),
        geometry=[dock.x(), dock.y(), dock.width(), dock.height()],
        status=text,
        buttons=sorted({b.text() for b in dock.findChildren(QAbstractButton) if b.text()}),
        methods=[method.itemText(i) for i in range(method.count())] if method else [],
        params=sorted(x.objectName()[6:] for x in dock.findChildren(QWidget) if x.objectName().startswith("param_")),
        backend_pid=c.process.pid, seconds=round(time.monotonic() - STATE["t0"], 1),
        krita_version=str(Krita.instance().version()), binding=qt.BINDING,
    )
    # -- a DIA sweep, from the controller behind the Generate button ------------------------
    run = rep["sweep"] = {}
    c.set_document(doc)
    c.set_method("dia")
    for k, v in dict(steps=2, token_iterations=1, views=1, noise_iterations=0, sweep=True,
                     sweep_strengths=[0.0, 1.0], sweep_batch=2).items():
        c.set_param(k, v)
    c.set_seed(3, False)
    previews = run["previews"] = []

    def on_preview(img):
        if img is None:  # the docker's thumbnail cleared as the job starts
            return
        node = doc.nodeByName("Analogon preview")
        previews.append({"layer": node is not None, "locked": bool(node and node.locked()),
                         "id": node.uniqueId().toString() if node is not None else ""})
    c.previewChanged.connect(on_preview)
    ends = []
    c.finished.connect(ends.append)
    c.generate()
    t0 = time.monotonic()
    while not ends and time.monotonic() - t0 < 400:
        yield 0.2
    c.finished.disconnect(ends.append)
    c.previewChanged.disconnect(on_preview)
    run.update(how=ends[0] if ends else "timeout", error=c.error, message=c.message,
               seconds=round(time.monotonic() - t0, 1), variants=len(c.variants))
    if not ends or ends[0] != "done":
        return
    entry = c.history[0]
    doc.waitForDone()
    group = doc.nodeByName(entry.layer_name)
    run["result"] = {"type": group.type() if group else None,
                     "id": group.uniqueId().toString() if group else "",
                     "children": len(group.childNodes()) if group else 0,
                     "names": [str(n.name()) for n in doc.rootNode().childNodes()],
                     "pixel": list(bytes(group.projectionPixelData(w // 2, h // 2, 1, 1))) if group else []}
    # -- Krita's Undo: the pass (preview and result) is one step ------------------------------
    yield 0.5
    und = rep["undo"] = {}
    undo, redo = app.action("edit_undo"), app.action("edit_redo")
    und["action"] = undo is not None and redo is not None

    def texts():
        return str(undo.text()), str(redo.text())

    gid = run["result"]["id"]

    def present():
        return any(n.uniqueId().toString() == gid for n in doc.rootNode().childNodes())

    yield from _press(doc, undo, texts, und, "pass_undo")
    yield from _until(lambda: not present(), 10)
    und["after_pass_undo"] = [str(n.name()) for n in doc.rootNode().childNodes()]
    yield from _press(doc, redo, texts, und, "pass_redo")
    yield from _until(present, 10)
    group = next((n for n in doc.rootNode().childNodes() if n.uniqueId().toString() == gid), None)
    und["after_redo"] = {"back": group is not None,
                         "children": len(group.childNodes()) if group is not None else 0}
    if group is None:
        return
    # -- pick the second variant; one Undo brings the first back --------------------------------
    und["first_name"] = str(group.name())
    und["picked"] = c.pick_variant(1)
    doc.waitForDone()
    yield 0.3
    und["after_pick"] = {"children": len(group.childNodes()), "name": str(group.name()),
                         "pixel": list(bytes(group.projectionPixelData(w // 2, h // 2, 1, 1)))}
    und["before_pick_pixel"] = run["result"].get("pixel")
    yield from _press(doc, undo, texts, und, "pick_undo")
    yield from _until(lambda: len(group.childNodes()) == 1, 10)
    doc.waitForDone()
    yield 0.3
    und["after_undo"] = {"children": len(group.childNodes()),
                         "pixel": list(bytes(group.projectionPixelData(w // 2, h // 2, 1, 1)))}
    yield from _until(lambda: c.picked == 0, 10)  # the panel's layer poll follows Krita's Undo
    und["followed_undo"] = {"picked": c.picked, "name": str(group.name()),
                            "entry": c.history[0].layer_name}
    yield from _press(doc, redo, texts, und, "pick_redo")  # for the pictures
    yield from _until(lambda: len(group.childNodes()) == 2, 10)
    und["after_pick_redo"] = len(group.childNodes())
    yield from _until(lambda: c.picked == 1, 10)  # and its Redo
    und["followed_redo"] = {"picked": c.picked, "name": str(group.name()),
                            "entry": c.history[0].layer_name}
    # -- pick the first variant again: each pick is one step (no empty step between them) ----
    und["picked_again"] = c.pick_variant(0)
    doc.waitForDone()
    yield 0.3
    und["after_pick_again"] = len(group.childNodes())
    und["again_pixel"] = list(bytes(group.projectionPixelData(w // 2, h // 2, 1, 1)))
    counts = und["undone_picks"] = []  # children after each of two Undos
    for what in ("again_undo", "again_undo_2"):
        yield from _press(doc, undo, texts, und, what)
        yield from _until(lambda: len(group.childNodes()) == 2 - len(counts), 3)
        doc.waitForDone()
        counts.append(len(group.childNodes()))
    und["undone_pixel"] = list(bytes(group.projectionPixelData(w // 2, h // 2, 1, 1)))
    for what in ("again_redo", "again_redo_2"):  # both picks back, for the pictures
        yield from _press(doc, redo, texts, und, what)
    yield from _until(lambda: len(group.childNodes()) == 3, 10)
    und["after_again_redo"] = len(group.childNodes())
    yield 1.0  # the docker as a painter sees it now: variants, the latest message
    # -- the docker where Krita docks it, then floating -----------------------------------
    rep["docked"] = _measure(dock)
    dock.grab().save(os.path.join(OUT, "docker-docked.png"))
    win.qwindow().grab().save(os.path.join(OUT, "window-docked.png"))
    dock.setFloating(True)
    dock.resize(300, 700)
    dock.move(1250, 60)
    yield 1.5
    rep["floating"] = _measure(dock)
    dock.grab().save(os.path.join(OUT, "docker-floating.png"))


def _pump():
    gen = STATE.setdefault("gen", _steps())
    try:
        delay = next(gen)
    except StopIteration:
        return _finish()
    except Exception:
        STATE["report"]["traceback"] = traceback.format_exc()
        return _finish()
    QTimer.singleShot(int(delay * 1000), _pump)


def _finish():
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
    QTimer.singleShot(1000, _pump)
