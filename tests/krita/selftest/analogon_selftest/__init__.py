"""Test-only Krita plugin (installed only into the private test profile): once the main
window is up, it opens a document, looks for the Analogon docker in the widget tree, waits
for the docker to connect to the backend it started, and then, as a painter would:
runs a DIA sweep from the docker's controller (a preview layer shows on the canvas while it
runs), presses Krita's own Undo and Redo (the pass; a pick, which the panel follows; two
picks in a row), measures and grabs the docker where Krita docks it and floating; then a
PIXELS pass through an edit map, reading the canvas's own pixels (the preview leaves the
"keep" area as it was, the map disappears from the canvas after the pass and comes back with
Undo) and a cancelled pass (the undo stack as before); writes a JSON report to
$ANALOGON_SELFTEST_REPORT, and quits Krita when the test asks (a flag file)."""
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
    yield from _map_pass_and_cancel(app, win, doc, c, w, h, rep, undo, redo)


def _canvas(win):
    """Krita's canvas widget (OpenGL or QPainter), else the whole window."""
    qwin = win.qwindow()
    for wdg in qwin.findChildren(QWidget):
        if wdg.metaObject().className() in ("KisOpenGLCanvas2", "KisQPainterCanvas") \
                and wdg.isVisible():
            return wdg
    return qwin


def _count_colour(win, rgb, tol=6):
    """How many pixels of the canvas as shown (a grab of the widget) are within ``tol`` of
    ``rgb``, counting every second pixel of every second row."""
    img = _canvas(win).grab().toImage()
    data, iw, ih = qt.image_rgba_bytes(img)
    r0, g0, b0 = rgb
    n = 0
    for y in range(0, ih, 2):
        row = data[y * iw * 4:(y + 1) * iw * 4]
        for x in range(0, iw * 4, 8):
            if abs(row[x] - r0) <= tol and abs(row[x + 1] - g0) <= tol and abs(row[x + 2] - b0) <= tol:
                n += 1
    return n


def _map_pass_and_cancel(app, win, doc, c, w, h, rep, undo, redo):
    """A PIXELS pass through a new edit map (white square, the rest black at the map's
    opacity), then a cancelled one; the canvas read at each moment."""
    from analogon_krita.document import document as kd

    m = rep["map"] = {}
    photo = doc.nodeByName("photo")
    a = doc.nodeByName("A")
    a.setVisible(False)  # the photo alone under the map
    doc.nodeByName("A\u2032").setVisible(False)
    for n in doc.rootNode().childNodes():  # the sweep's result group too
        if str(n.name()).startswith("dia seed"):
            n.setVisible(False)
    doc.setActiveNode(photo)
    doc.refreshProjection()
    doc.waitForDone()
    c.set_method("pixels")
    c.set_document(doc)
    c.set_role(c.target_role(), [kd.layer_id(photo)])
    c.set_role("exemplar", [])
    for k, v in dict(steps=6, strength=1.0).items():
        c.set_param(k, v)
    emap = c.new_edit_map()
    c.set_role("edit_map", [kd.layer_id(emap)])
    white = b"\xff" * (2 if emap.colorModel() == "GRAYA" else 4)
    sq = (w // 4, h // 4, w // 2, h // 2)
    emap.setPixelData(white * (sq[2] * sq[3]), *sq)
    doc.refreshProjection()
    doc.waitForDone()
    yield 1.0
    op = emap.opacity() / 255.0
    dark = tuple(round(v * (1 - op)) for v in COLOURS["photo"])  # the photo under the black map
    m["dark"] = list(dark)
    m["dark_before"] = _count_colour(win, dark)
    before = bytes(doc.pixelData(0, 0, w, h))
    keep = [(x, y) for y in range(0, h, 4) for x in range(0, w, 4)
            if not (sq[0] - 4 <= x < sq[0] + sq[2] + 4 and sq[1] - 4 <= y < sq[1] + sq[3] + 4)]

    def moved(now):  # "keep" pixels of the projection that differ from before the pass
        return sum(now[(y * w + x) * 4:(y * w + x) * 4 + 4] != before[(y * w + x) * 4:(y * w + x) * 4 + 4]
                   for x, y in keep)

    seen = m["previews"] = []

    def on_preview(img):
        if img is None:
            return
        doc.waitForDone()
        seen.append({"layer": doc.nodeByName("Analogon preview") is not None,
                     "keep_moved": moved(bytes(doc.pixelData(0, 0, w, h))),
                     "dark_on_canvas": _count_colour(win, dark)})
    c.previewChanged.connect(on_preview)
    ends = []
    c.finished.connect(ends.append)
    c.generate()
    yield from _until(lambda: ends, 300)
    c.finished.disconnect(ends.append)
    c.previewChanged.disconnect(on_preview)
    m["how"], m["error"] = (ends[0] if ends else "timeout"), c.error
    yield 1.0
    doc.waitForDone()
    after = bytes(doc.pixelData(0, 0, w, h))
    m["after"] = {"map_visible": bool(emap.visible()), "dark_on_canvas": _count_colour(win, dark),
                  "keep_equals_photo": all(after[(y * w + x) * 4:(y * w + x) * 4 + 3]
                                           == bytes(reversed(COLOURS["photo"]))
                                           for x, y in keep)}

    def texts():
        return str(undo.text()), str(redo.text())

    yield from _press(doc, undo, texts, m, "map_pass_undo")
    yield from _until(lambda: emap.visible(), 10)  # the panel's layer poll shows the map
    yield 1.0
    m["after_undo"] = {"map_visible": bool(emap.visible()), "dark_on_canvas": _count_colour(win, dark)}
    yield from _press(doc, redo, texts, m, "map_pass_redo")
    yield from _until(lambda: not emap.visible(), 10)
    yield 1.0
    m["after_redo"] = {"map_visible": bool(emap.visible()), "dark_on_canvas": _count_colour(win, dark)}
    # -- a cancelled pass leaves the undo stack as it was ---------------------------------------
    emap.setVisible(True)
    doc.refreshProjection()
    c.set_param("steps", 200)
    yield 0.5
    doc.waitForDone()
    cancel = rep["cancel"] = {"texts_before": list(texts()),
                              "names_before": [str(n.name()) for n in doc.rootNode().childNodes()]}
    c.previewChanged.connect(lambda img: img is not None and c.cancel())
    ends = []
    c.finished.connect(ends.append)
    c.generate()
    yield from _until(lambda: ends, 300)
    c.finished.disconnect(ends.append)
    c.previewChanged.disconnect()
    yield from _until(lambda: doc.nodeByName("Analogon preview") is None, 10)
    doc.waitForDone()
    yield 1.0
    cancel.update(how=ends[0] if ends else "timeout", texts_after=list(texts()),
                  names_after=[str(n.name()) for n in doc.rootNode().childNodes()])


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
