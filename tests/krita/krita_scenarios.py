"""Runs inside real Krita: ``kritarunner -s krita_scenarios -f main``.

Creates documents with known pixels, drives the plugin's own controller (the code behind
the Generate button) against a real backend subprocess it starts itself, and writes a JSON
report to $ANALOGON_KRITA_REPORT for the pytest side to check. Every scenario catches its
own exceptions into the report, so one failure does not hide the others.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback

REPORT: dict = {"scenarios": {}}


def _wait(predicate, timeout):
    from analogon_krita.qt import QEventLoop, QTimer, exec_loop

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        loop = QEventLoop()
        QTimer.singleShot(20, loop.quit)
        exec_loop(loop)
    return bool(predicate())


def _scenario(name):
    def deco(fn):
        def run(*args):
            t0 = time.monotonic()
            entry = REPORT["scenarios"].setdefault(name, {})
            try:
                fn(entry, *args)
                entry.setdefault("ok", True)
            except Exception:
                entry["ok"] = False
                entry["traceback"] = traceback.format_exc()
            entry["seconds"] = round(time.monotonic() - t0, 2)
        return run
    return deco


def _names(doc):
    return [str(n.name()) for n in doc.rootNode().childNodes()]


def _snapshot(doc):
    out = {}
    for n in doc.rootNode().childNodes():
        out[str(n.name())] = bytes(n.pixelData(0, 0, doc.width(), doc.height()))
    return out


def _doc(app, w, h, depth="U8", model="RGBA"):
    doc = app.createDocument(w, h, "analogon-test", model, depth, "", 72.0)
    return doc


def _layer(doc, name, bgra, x, y, w, h, above=None):
    n = doc.createNode(name, "paintlayer")
    doc.rootNode().addChildNode(n, above)
    n.setPixelData(bytes(bgra) * (w * h), x, y, w, h)
    return n


def _bounds(node):
    b = node.bounds()
    return [b.x(), b.y(), b.width(), b.height()]


def _alpha_stats(node, rect):
    x, y, w, h = rect
    data = bytes(node.pixelData(x, y, w, h))
    alpha = data[3::4]
    return {"opaque": alpha.count(255), "transparent": alpha.count(0), "n": len(alpha)}


@_scenario("adapter")
def adapter(entry, app):
    from analogon_krita.document import document as kd
    from analogon_krita.document.document import Rect

    doc = _doc(app, 32, 16)
    node = _layer(doc, "L", (10, 20, 30, 255), 0, 0, 32, 16)
    entry["raw_first_pixel"] = list(bytes(node.pixelData(0, 0, 1, 1)))
    entry["rgba_first_pixel"] = list(kd.read_layer(node, Rect(0, 0, 1, 1)))
    doc16 = _doc(app, 8, 8, "U16")
    px = b"".join((v * 257).to_bytes(2, "little") for v in (10, 20, 30, 255))
    n16 = _layer(doc16, "L16", px, 0, 0, 8, 8)
    entry["u16_rgba"] = list(kd.read_layer(n16, Rect(0, 0, 1, 1)))
    res = kd.insert_result(doc16, n16, bytes([1, 2, 3, 255]) * 64, 8, 8, Rect(0, 0, 8, 8), "r16")
    raw = bytes(res.pixelData(0, 0, 1, 1))
    entry["u16_written"] = [int.from_bytes(raw[i:i + 2], "little") for i in range(0, 8, 2)]
    emap = kd.create_edit_map(doc, node)
    entry["edit_map"] = {"model": emap.colorModel(), "opacity": emap.opacity(), "names": _names(doc),
                         "rgba": list(kd.read_layer(emap, Rect(0, 0, 1, 1)))}
    refusals = {}
    for model, depth in (("CMYKA", "U8"), ("LABA", "U16"), ("GRAYA", "U8"), ("RGBA", "F32")):
        d = _doc(app, 4, 4, depth, model)
        try:
            kd.check_document(d)
            refusals[f"{model}/{depth}"] = None
        except kd.AdapterError as e:
            refusals[f"{model}/{depth}"] = e.message
        d.close()
    entry["refusals"] = refusals
    from krita import Selection

    sel = Selection()
    sel.select(8, 4, 16, 8, 255)
    doc.setSelection(sel)
    roi, from_sel = kd.region_of_interest(doc, padding=2, align=1)
    entry["roi"] = roi.to_list()
    mask = kd.feathered_mask(doc, roi, 2)
    entry["mask"] = {"len": len(mask), "max": max(mask), "min": min(mask),
                     "soft": sum(1 for v in mask if 0 < v < 255)}
    doc.close()
    doc16.close()


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@_scenario("backend_down")
def backend_down(entry, app, controller_cls):
    from analogon_krita.settings import Settings

    settings = Settings(app)
    settings.set("backend_url", f"http://127.0.0.1:{_free_port()}")
    settings.set("state_dir", os.path.join(os.environ["ANALOGON_TEST_TMP"], "nowhere"))
    c = controller_cls(app=app)
    doc = _doc(app, 64, 64)
    _layer(doc, "photo", (40, 120, 200, 255), 0, 0, 64, 64)
    c.set_document(doc)
    ends = []
    c.finished.connect(ends.append)
    hook_errors = []
    old_hook = sys.excepthook
    sys.excepthook = lambda *a: hook_errors.append("".join(traceback.format_exception(*a)))
    try:
        c.generate()
        _wait(lambda: ends, 15)
    finally:
        sys.excepthook = old_hook
    entry.update(ends=ends, error=c.error, connection=c.connection, layers=_names(doc),
                 uncaught=hook_errors)
    settings.set("backend_url", "")
    settings.set("state_dir", "")
    doc.close()


@_scenario("live")
def live(entry, app, controller_cls):
    from krita import Selection

    from analogon_krita.document import document as kd

    c = controller_cls(app=app)
    c.settings.set("backend_command", os.environ["ANALOGON_BACKEND_COMMAND"])
    c.settings.set("padding", "8")
    c.settings.set("feather", "4")
    c.set_model("tiny-sd")
    t0 = time.monotonic()
    c.start_backend()
    _wait(lambda: c.connection in ("connected", "unreachable") and not c.link.connecting, 120)
    entry["connect"] = {"state": c.connection, "message": c.connection_message,
                        "seconds": round(time.monotonic() - t0, 2), "pid": c.process.pid,
                        "methods": [m["id"] for m in c.methods]}
    if c.connection != "connected":
        entry["ok"] = False
        return
    method = "pixels" if any(m["id"] == "pixels" for m in c.methods) else c.methods[0]["id"]
    entry["method"] = method
    c.set_method(method)
    c.set_seed(21, False)
    for k, v in {"steps": 4, "strength": 0.75}.items():
        if k in c.param_values():
            c.set_param(k, v)

    doc = _doc(app, 96, 64)
    bg = doc.rootNode().childNodes()[0] if doc.rootNode().childNodes() else None
    photo = _layer(doc, "photo", (40, 120, 200, 255), 0, 0, 96, 64, above=bg)
    ex = _layer(doc, "exemplar", (0, 0, 255, 255), 16, 16, 16, 16, above=photo)
    doc.setActiveNode(photo)
    c.set_document(doc)
    roles = c.roles()
    target_role = c.target_role()
    roles[target_role] = [kd.layer_id(photo)]
    if "exemplar" in roles:
        roles["exemplar"] = [kd.layer_id(ex)]
    emap = c.new_edit_map()
    white = b"\xff" * (2 if emap.colorModel() == "GRAYA" else 4)
    emap.setPixelData(white * (32 * 32), 8, 8, 32, 32)  # white: may change here
    emap2 = c.new_edit_map()  # a second map, for the selection case: white around the selection
    emap2.setPixelData(white * (40 * 40), 36, 12, 40, 40)
    emap2.setVisible(False)
    c.set_role("edit_map", [kd.layer_id(emap)])
    doc.refreshProjection()
    entry["roles"] = {k: len(v) for k, v in c.roles().items()}

    def run(fn, timeout=300, ctl=None):
        ctl = ctl or c
        ends = []
        ctl.finished.connect(ends.append)
        fn()
        _wait(lambda: ends, timeout)
        ctl.finished.disconnect()
        return ends[0] if ends else "timeout"

    # 1. the whole canvas
    before = _snapshot(doc)
    how = run(c.generate)
    after = _snapshot(doc)
    name = kd.result_layer_name(method, 21)
    node = doc.nodeByName(name)
    entry["full"] = {"how": how, "error": c.error, "names": _names(doc), "expected_name": name,
                     "bounds": _bounds(node) if node else None,
                     "alpha": _alpha_stats(node, [0, 0, 96, 64]) if node else None,
                     "alpha_outside_map": _alpha_stats(node, [48, 0, 48, 64]) if node else None,
                     "alpha_inside_map": _alpha_stats(node, [12, 12, 24, 24]) if node else None,
                     "unchanged": [k for k in before if before[k] == after.get(k)],
                     "changed": [k for k in before if before[k] != after.get(k)],
                     "result_differs_from_photo": bool(node) and bytes(node.pixelData(0, 0, 96, 64)) != before["photo"],
                     "history": len(c.history)}
    if node is not None:
        node.remove()
        doc.refreshProjection()
        entry["full"]["restored"] = _snapshot(doc) == before

    # 2. cancel: no layer
    if "steps" in c.param_values():
        c.set_param("steps", 200)
    if "strength" in c.param_values():
        c.set_param("strength", 1.0)
    names_before = _names(doc)
    c.progressChanged.connect(lambda s, a, b: a > 0 and c.cancel())
    how = run(c.generate, 120)
    entry["cancel"] = {"how": how, "message": c.message, "names_before": names_before,
                       "names_after": _names(doc)}
    c.progressChanged.disconnect()
    entry["cancel"]["history"] = len(c.history)

    # 3. a selection limits the region
    # a second exemplar inside the selection, and the second map
    ex2 = _layer(doc, "exemplar 2", (0, 255, 0, 255), 48, 20, 16, 16, above=ex)
    ex = ex2
    emap.setVisible(False)
    emap2.setVisible(True)
    c.set_role("edit_map", [kd.layer_id(emap2)])
    if "exemplar" in c.roles():
        c.set_role("exemplar", [kd.layer_id(ex)])
    c.set_param("steps", 4) if "steps" in c.param_values() else None
    c.set_param("strength", 0.75) if "strength" in c.param_values() else None
    before = _snapshot(doc)
    sel = Selection()
    sel.select(40, 16, 32, 24, 255)
    doc.setSelection(sel)
    how = run(c.generate)
    node = doc.nodeByName(name)
    entry["selection"] = {"how": how, "error": c.error, "names": _names(doc),
                          "bounds": _bounds(node) if node else None,
                          "roi": c.history[0].roi if c.history else None,
                          "alpha_inside": _alpha_stats(node, [48, 24, 16, 8]) if node else None,
                          "alpha_outside_left": _alpha_stats(node, [0, 0, 36, 64]) if node else None,
                          "unchanged": [k for k in before if before[k] == _snapshot(doc).get(k)]}
    if node is not None:
        node.remove()

    # 4. what the painter sees: the composite, for sources Krita composites in other ways
    for case in ("semi_transparent", "half_opacity", "sixteen_bit"):
        entry.setdefault("exact", {})[case] = _guard(_exact_case, app, c, method, case, run)
    # 5. appearance with an elliptical selection and the default roles
    entry["appearance_selection"] = _guard(_appearance_with_selection, app, c, run)
    # 5b. appearance between two objects, each on a layer of its own
    entry["appearance_objects"] = _guard(_appearance_object_layers, app, c, run)
    # 6. history saved in the .kra, restored on open, usable after reopening
    entry["reopen"] = _guard(_history_survives_reopen, app, c, method, run, controller_cls)

    # 7. Krita closing stops the backend we started
    pid = c.process.pid
    c.shutdown()
    gone = _wait(lambda: not _alive(pid), 15)
    entry["shutdown"] = {"pid": pid, "gone": gone}
    doc.close()


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception:
        return {"traceback": traceback.format_exc()}


def _px(depth):
    return 4 if depth == "U8" else 8


def _colour(rgba, depth):
    """An RGBA colour (0..255) as one Krita pixel (BGRA; 16-bit: not a multiple of 257)."""
    r, g, b, a = rgba
    if depth == "U8":
        return bytes((b, g, r, a))
    return b"".join((v * 257 + (37 if 0 < v < 255 else 0)).to_bytes(2, "little") for v in (b, g, r, a))


def _pass_on(c, doc, method, photo, rect):
    """Set up a pass of ``method`` on ``photo`` (no exemplars) with a new edit map painted
    white over ``rect`` = (x, y, w, h); returns the map."""
    from analogon_krita.document import document as kd

    doc.setActiveNode(photo)
    c.set_document(doc)
    c.set_method(method)
    c.set_role(c.target_role(), [kd.layer_id(photo)])
    if "exemplar" in c.roles():
        c.set_role("exemplar", [])
    emap = c.new_edit_map()
    white = b"\xff" * kd._pixel_size(emap.colorModel(), emap.colorDepth())
    emap.setPixelData(white * (rect[2] * rect[3]), *rect)
    return emap


def _exact_case(app, c, method, case, run):
    """A pass whose edit map is white in a square and black elsewhere: the composite
    (what the painter sees) is byte-identical outside the square, and changes inside."""
    from analogon_krita.document import document as kd

    depth = "U16" if case == "sixteen_bit" else "U8"
    w, h = 64, 48
    doc = _doc(app, w, h, depth)
    root = doc.rootNode()
    bg = root.childNodes()[0] if root.childNodes() else None
    if bg is not None:
        bg.setPixelData(_colour((230, 220, 40, 255), depth) * (w * h), 0, 0, w, h)
    photo = doc.createNode("photo", "paintlayer")
    # a gradient-free but varied source: two colours in halves, alpha 128 for the first case
    alpha = 128 if case == "semi_transparent" else 255
    half = _colour((40, 120, 200, alpha), depth) * (w * h // 2) + _colour((180, 60, 90, alpha), depth) * (w * h // 2)
    photo.setPixelData(half, 0, 0, w, h)
    root.addChildNode(photo, bg)
    if case == "half_opacity":
        photo.setOpacity(128)
    sq = (16, 12, 24, 20)
    emap = _pass_on(c, doc, method, photo, sq)
    emap.setVisible(False)  # maps are controls: a hidden one is used, and is not in the picture
    doc.refreshProjection()
    doc.waitForDone()
    before = bytes(root.projectionPixelData(0, 0, w, h))
    how = run(c.generate)
    doc.refreshProjection()
    doc.waitForDone()
    after = bytes(root.projectionPixelData(0, 0, w, h))
    ps = _px(depth)
    outside_changed = inside_changed = 0
    for y in range(h):
        for x in range(w):
            i = (y * w + x) * ps
            same = before[i:i + ps] == after[i:i + ps]
            if sq[0] <= x < sq[0] + sq[2] and sq[1] <= y < sq[1] + sq[3]:
                inside_changed += not same
            else:
                outside_changed += not same
    result = c.history[0] if c.history else None
    node = kd.find_layer(doc, result.layer_id) if result else None
    out = {"how": how, "error": c.error, "outside_changed": outside_changed,
           "inside_changed": inside_changed, "inside_n": sq[2] * sq[3],
           "has_layer": bool(getattr(c, "last_result_had_layer", False)),
           "result_opacity": node.opacity() if node else None, "source_opacity": photo.opacity(),
           "map_used": bool(result) and kd.layer_id(emap) in result.map_ids,
           "names": _names(doc)}
    doc.setModified(False)
    doc.close()
    return out


def _appearance_doc(app, c, w, h):
    """(a w×h document, its background layer) for an appearance pass; None where the backend
    has no appearance method."""
    if not any(m["id"] == "appearance" for m in c.methods):
        return None
    doc = _doc(app, w, h)
    children = doc.rootNode().childNodes()
    return doc, (children[0] if children else None)


def _quick_appearance(c):
    """Choose the appearance method, with few steps."""
    c.set_method("appearance")
    for k, v in {"steps": 4, "skip_steps": 1}.items():
        if k in c.param_values():
            c.set_param(k, v)


def _appearance_with_selection(app, c, run):
    from krita import Selection

    w, h = 96, 64
    made = _appearance_doc(app, c, w, h)
    if made is None:
        return {"skipped": "no appearance method"}
    doc, bg = made
    structure = _layer(doc, "photo", (40, 120, 200, 255), 0, 0, w, h, above=bg)
    look = _layer(doc, "look", (20, 200, 60, 255), 0, 0, 48, 32, above=structure)
    doc.setActiveNode(structure)
    sel = Selection()
    ell = bytearray(w * h)
    cx, cy, rx, ry = 48, 32, 30, 18
    for y in range(h):
        for x in range(w):
            if ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1:
                ell[y * w + x] = 255
    sel.setPixelData(bytes(ell), 0, 0, w, h)
    doc.setSelection(sel)
    c.set_document(doc)
    _quick_appearance(c)
    roles = {k: list(v) for k, v in c.roles().items()}
    how = run(c.generate, 120)
    out = {"how": how, "error": c.error, "roles": {k: len(v) for k, v in roles.items()},
           "masks": {k: v for k, v in roles.items() if k.endswith("mask")}, "names": _names(doc)}
    doc.setModified(False)
    doc.close()
    return out


def _disk(w, h, cx, cy, r, bgra):
    """BGRA8 pixels of a w×h layer: a disk of ``bgra``, transparent around it."""
    px = bytearray(w * h * 4)
    for y in range(h):
        for x in range(w):
            if (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= r * r:
                px[(y * w + x) * 4:(y * w + x) * 4 + 4] = bytes(bgra)
    return bytes(px)


def _appearance_object_layers(app, c, run):
    """Appearance from an object on its own layer to another object on its own layer, over an
    opaque background: the result is an object too (transparent around it), so the composite
    changes only where the structure's object is."""
    from analogon_krita.document import document as kd

    w, h = 96, 64
    made = _appearance_doc(app, c, w, h)
    if made is None:
        return {"skipped": "no appearance method"}
    doc, bg = made
    root = doc.rootNode()
    if bg is not None:
        bg.setPixelData(bytes((180, 200, 210, 255)) * (w * h), 0, 0, w, h)
    structure = doc.createNode("object", "paintlayer")
    structure.setPixelData(_disk(w, h, 60, 32, 18, (200, 120, 40, 255)), 0, 0, w, h)
    root.addChildNode(structure, bg)
    look = doc.createNode("look object", "paintlayer")
    look.setPixelData(_disk(w, h, 20, 20, 12, (30, 190, 240, 255)), 0, 0, w, h)
    root.addChildNode(look, structure)
    doc.setActiveNode(structure)
    doc.refreshProjection()
    doc.waitForDone()
    before = bytes(root.projectionPixelData(0, 0, w, h))
    c.set_document(doc)
    _quick_appearance(c)
    c.set_role("structure", [kd.layer_id(structure)])
    c.set_role("appearance", [kd.layer_id(look)])
    how = run(c.generate, 120)
    doc.refreshProjection()
    doc.waitForDone()
    after = bytes(root.projectionPixelData(0, 0, w, h))
    outside_changed = inside_changed = inside_n = 0
    for y in range(h):
        for x in range(w):
            d2 = (x + 0.5 - 60) ** 2 + (y + 0.5 - 32) ** 2
            same = before[(y * w + x) * 4:(y * w + x) * 4 + 4] == after[(y * w + x) * 4:(y * w + x) * 4 + 4]
            if d2 > 19 ** 2:  # off the object (a pixel of the disk's antialiased edge aside)
                outside_changed += not same
            elif d2 < 16 ** 2:
                inside_n += 1
                inside_changed += not same
    node = kd.find_layer(doc, c.history[0].layer_id) if c.history else None
    out = {"how": how, "error": c.error, "message": c.message,
           "outside_changed": outside_changed, "inside_changed": inside_changed,
           "inside_n": inside_n, "bounds": _bounds(node) if node else None,
           "names": _names(doc)}
    doc.setModified(False)
    doc.close()
    return out


def _history_survives_reopen(app, c, method, run, controller_cls):
    w, h = 64, 48
    doc = _doc(app, w, h)
    bg = doc.rootNode().childNodes()[0] if doc.rootNode().childNodes() else None
    photo = _layer(doc, "photo", (40, 120, 200, 255), 0, 0, w, h, above=bg)
    _pass_on(c, doc, method, photo, (8, 8, 16, 16))
    how = run(c.generate)
    first = {"how": how, "error": c.error, "history": len(c.history)}
    path = os.path.join(os.environ["ANALOGON_TEST_TMP"], "history.kra")
    saved = doc.saveAs(path)
    doc.waitForDone()
    doc.close()
    other = _doc(app, 32, 32)  # another document never shows this history
    c.set_document(other)
    other_history = len(c.history)
    reopened = app.openDocument(path)
    fresh = controller_cls(app=app)  # as after a restart of Krita
    fresh.client, fresh.server, fresh.methods = c.client, c.server, c.methods
    fresh.connection = "connected"
    fresh.set_document(reopened)
    entries = [(e.method, e.seed, e.layer_name) for e in fresh.history]
    has_thumb = bool(fresh.history) and fresh.history[0].thumbnail is not None \
        and not fresh.history[0].thumbnail.isNull()
    used = fresh.use_as_source(0) if fresh.history else False
    again = run(lambda: fresh.apply_again(0), 90, fresh) if fresh.history else "no history"
    out = {"first": first, "saved": bool(saved), "other_history": other_history,
           "entries": entries, "thumbnail": has_thumb, "use_as_source": used,
           "apply_again": again, "apply_again_error": fresh.error,
           "history_after": len(fresh.history), "names": _names(reopened)}
    reopened.setModified(False)
    reopened.close()
    other.close()
    return out


def _alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (already exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def main(*args):
    out = os.environ.get("ANALOGON_KRITA_REPORT", "krita_report.json")
    try:
        from krita import Krita

        from analogon_krita import qt
        from analogon_krita.controller import Controller

        app = Krita.instance()
        REPORT["krita_version"] = str(app.version())
        REPORT["binding"] = qt.BINDING
        REPORT["python"] = sys.version.split()[0]
        adapter(app)
        backend_down(app, Controller)
        live(app, Controller)
    except Exception:
        REPORT["fatal"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(REPORT, f, indent=1)
    print("analogon krita report written to", out)


def orphan(*args):
    """``kritarunner -f orphan``: start a backend through the plugin, write where it is to
    $ANALOGON_KRITA_REPORT, then wait to be killed (the test sends SIGKILL to Krita)."""
    out = os.environ["ANALOGON_KRITA_REPORT"]
    rep = {}
    try:
        from krita import Krita

        from analogon_krita.controller import Controller

        c = Controller(app=Krita.instance())
        c.settings.set("backend_command", os.environ["ANALOGON_BACKEND_COMMAND"])
        c.set_model("tiny-sd")
        c.start_backend()
        _wait(lambda: c.connection in ("connected", "unreachable") and not c.link.connecting, 120)
        rep = {"krita_pid": os.getpid(), "backend_pid": c.process.pid, "state": c.connection,
               "message": c.connection_message, "url": c.process.url,
               "state_dir": str(c.process.state_dir), "log": str(c.log_path())}
    except Exception:
        rep["traceback"] = traceback.format_exc()
    with open(out + ".tmp", "w") as f:
        json.dump(rep, f)
    os.replace(out + ".tmp", out)
    _wait(lambda: False, 120)  # killed long before


def sweep(*args):
    """``kritarunner -f sweep``: Krita starts again; the plugin's backend machinery is made
    (as the docker does) and the report says which private folders are left."""
    import tempfile

    from analogon_krita.link import backend_process as bp

    bp.BackendProcess()
    left = sorted(str(p) for p in __import__("pathlib").Path(tempfile.gettempdir()).glob(bp.STATE_PREFIX + "*"))
    with open(os.environ["ANALOGON_KRITA_REPORT"], "w") as f:
        json.dump({"left": left, "tmp": tempfile.gettempdir()}, f)


# == from a fresh Krita to a model: install, start, models, download, presets (issue 13) ======
#
# ``kritarunner -f setup``: the settings dialog's backend tabs (``backend_setup.BackendSetup``,
# built as the dialog builds them) and the docker's controller, as a painter uses them. The
# test side (test_in_krita.py) sets, through the environment:
#   ANALOGON_TEST_INSTALL_PYTHON  the Python uv is asked for (install runs when set),
#   ANALOGON_TEST_UV              the uv binary to install with (instead of PyPI's pinned wheel),
#   ANALOGON_TEST_SITE_PACKAGES   the test environment's site-packages (os.pathsep-separated),
#                                 seen by the new environment (installer's test-only option),
#   ANALOGON_TEST_INDEX           PyPI's and the PyTorch index's stand-in (a closed port: offline),
#   ANALOGON_TEST_COMFY           the checkpoint put into the fake ComfyUI's models/checkpoints,
#   ANALOGON_TEST_HUB             the fake hub (HF_ENDPOINT); it holds the download half-way
#                                 until GET /_test/resume,
#   ANALOGON_BACKEND_COMMAND      without an install (Krita 6): the backend command to start.

MEMORY = {"preset": "custom", "device": "cpu", "dtype": "float32", "cpu_offload": False,
          "vae_tiling": True, "max_pixels": 512 * 512}


def _combo(combo, data):
    i = combo.findData(data)
    assert i >= 0, f"{data!r} is not offered"
    combo.setCurrentIndex(i)


def _memory(setup):
    """The Memory tab, as a painter sets it, saved as the dialog's OK saves it."""
    _combo(setup.preset, MEMORY["preset"])
    _combo(setup.device, MEMORY["device"])
    _combo(setup.dtype, MEMORY["dtype"])
    setup.offload.setChecked(MEMORY["cpu_offload"])
    setup.tiling.setChecked(MEMORY["vae_tiling"])
    setup.max_pixels.setValue(MEMORY["max_pixels"])
    setup.save()


@_scenario("install")
def _install(entry, c, setup):
    """Through the docker: its lead offers Install backend, which opens the install window;
    Install there; a good install starts the backend."""
    from analogon_krita.install import installer as inst
    from analogon_krita.link import backend_process
    from analogon_krita.ui.panel import AnalogonPanel

    panel = AnalogonPanel(c, installer=setup.installer)
    entry["lead_before"] = panel.status_label.text()
    entry["lead_button"] = panel.start_button.text()
    entry["bundled"] = inst.wheel_version(setup.installer.wheel) if setup.installer.wheel else ""
    panel.start_button.click()  # Install backend (the docker's lead)
    pane = panel._install_dialog.pane
    entry["status_before"] = pane.install_status.text()
    entry["install_enabled"] = pane.install_button.isEnabled()
    progress, ends = [], []
    setup.installer.progress.connect(lambda p, t: progress.append([p, t]))
    setup.installer.finished.connect(lambda ok, msg: ends.append([ok, msg]))
    _combo(pane.variant, "cpu")
    t0 = time.monotonic()
    pane.install_button.click()  # Install backend (the install window)
    _wait(lambda: ends, float(os.environ.get("ANALOGON_TEST_INSTALL_WAIT", "600")))
    entry.update(seconds_install=round(time.monotonic() - t0, 1), ends=ends, progress=progress,
                 status_after=pane.install_status.text(), venv=str(setup.installer.venv),
                 installed=setup.installer.installed(), version=setup.installer.installed_version(),
                 default_command=backend_process.default_command(),
                 update_enabled=pane.update_button.isEnabled(),
                 uninstall_enabled=pane.uninstall_button.isEnabled(),
                 lead_after=panel.status_label.text(), started_after=c.process.state,
                 error_after=c.error, record=inst.read_record(setup.installer.venv))
    log = setup.installer.log_path
    entry["log_tail"] = log.read_text(encoding="utf-8")[-3000:] if log.exists() else ""
    panel._install_dialog.close()


def _get_json(c, path, timeout=30):
    got = []
    call = c.client.send("GET", path, callback=got.append)
    _wait(lambda: got, timeout)
    del call
    return got[0].json() if got and got[0].ok else {"error": got[0].error.message if got and got[0].error else "no answer"}


@_scenario("start")
def _start(entry, c, setup):
    _memory(setup)
    c.settings.set("backend_command", os.environ.get("ANALOGON_BACKEND_COMMAND", ""))
    t0 = time.monotonic()
    c.start_backend()  # Start backend
    _wait(lambda: c.connection in ("connected", "unreachable") and not c.link.connecting, 180)
    pid = c.process.pid
    entry.update(state=c.connection, message=c.connection_message, pid=pid,
                 seconds=round(time.monotonic() - t0, 1), memory=MEMORY)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            entry["cmdline"] = [a.decode() for a in f.read().split(b"\0") if a]
    except (OSError, TypeError) as e:
        entry["cmdline"] = [f"unreadable: {e}"]
    if c.connection == "connected":
        entry["health"] = c.health
        entry["system"] = _get_json(c, "/v1/system")


@_scenario("models")
def _models(entry, app, c):
    from analogon_krita.document import document as kd

    comfy = os.environ["ANALOGON_TEST_COMFY"]
    entry["chosen"] = c.model  # what the docker picked for PIXELS with no choice remembered
    entry["method"] = c.method_id
    entry["listed"] = [{k: m.get(k) for k in ("id", "family", "variant", "label", "location", "methods",
                                                "developer")} for m in c.models]
    entry["searched"] = c.models_info.get("searched")
    c.set_method("pixels")
    c.set_model(comfy)
    c.set_seed(5, False)
    for k, v in {"steps": 3, "strength": 0.75}.items():
        if k in c.param_values():
            c.set_param(k, v)
    w, h = 64, 48
    doc = _doc(app, w, h)
    bg = doc.rootNode().childNodes()[0] if doc.rootNode().childNodes() else None
    photo = _layer(doc, "photo", (40, 120, 200, 255), 0, 0, w, h, above=bg)
    sq = [16, 12, 24, 20]
    _pass_on(c, doc, "pixels", photo, sq)
    ends = []
    c.finished.connect(ends.append)
    t0 = time.monotonic()
    c.generate()
    _wait(lambda: ends, 300)
    c.finished.disconnect()
    name = kd.result_layer_name("pixels", 5)
    node = doc.nodeByName(name)
    entry["pass"] = {"how": ends[0] if ends else "timeout", "error": c.error, "names": _names(doc),
                     "seconds": round(time.monotonic() - t0, 1), "square": sq, "doc": [w, h],
                     "layer": name, "bounds": _bounds(node) if node else None,
                     "alpha_inside": _alpha_stats(node, [20, 16, 16, 12]) if node else None,
                     "alpha_outside": _alpha_stats(node, [44, 0, 20, 48]) if node else None,
                     "history_model": c.history[0].model if c.history else None,
                     "differs": bool(node) and bytes(node.pixelData(sq[0], sq[1], sq[2], sq[3]))
                     != bytes(photo.pixelData(sq[0], sq[1], sq[2], sq[3]))}
    doc.setModified(False)
    doc.close()


@_scenario("download")
def _download(entry, c, setup):
    import urllib.request

    setup.refresh_catalog()  # the Models tab asks once the backend is there
    _wait(lambda: setup.catalog.count() > 0, 30)
    ids = [setup.catalog.item(i).data(256) for i in range(setup.catalog.count())]
    entry["catalog"] = ids
    entry["into"] = setup.catalog_dir.text()
    setup.catalog.setCurrentRow(ids.index("sd15"))
    seen = []
    setup.download_progress.valueChanged.connect(
        lambda v: seen.append([v, setup.download_progress.format()]))
    setup.download_button.click()  # Download
    # the hub holds the transfer after the first 10 MB: the docker shows it part-way
    _wait(lambda: 0 < setup.download_progress.value(), 60)
    entry["midway"] = {"value": setup.download_progress.value(), "format": setup.download_progress.format(),
                       "cancel_enabled": setup.cancel_download_button.isEnabled(),
                       "download_enabled": setup.download_button.isEnabled()}
    urllib.request.urlopen(os.environ["ANALOGON_TEST_HUB"] + "/_test/resume", timeout=10).read()
    _wait(lambda: setup.download_status.text().startswith(("Downloaded", "Cancelled")) or
          (not setup._download_id and setup.download_status.text()), 120)
    entry["status"] = setup.download_status.text()
    entry["progress"] = seen
    path = setup.download_status.text().partition("Downloaded: ")[2].strip()
    entry["path"] = path
    entry["exists"] = bool(path) and os.path.exists(path)
    # the docker reconnects after a finished download: the model list has it
    _wait(lambda: any(m.get("id") == path for m in c.models) and not c.link.connecting, 60)
    listed = [m for m in c.models if m.get("id") == path]
    entry["listed"] = {k: listed[0].get(k) for k in ("family", "label", "location", "methods")} if listed else None
    _wait(lambda: any("downloaded" in setup.catalog.item(i).text() for i in range(setup.catalog.count())), 30)
    entry["catalog_after"] = [setup.catalog.item(i).text() for i in range(setup.catalog.count())]


def setup(*args):
    """``kritarunner -f setup``: install (where the test asks), start, list, run, download."""
    out = os.environ["ANALOGON_KRITA_REPORT"]
    try:
        from krita import Krita

        from analogon_krita import qt
        from analogon_krita.controller import Controller
        from analogon_krita.install import installer as installer_mod
        from analogon_krita.install.installer import Installer
        from analogon_krita.ui.backend_setup import BackendSetup

        app = Krita.instance()
        REPORT["krita_version"] = str(app.version())
        REPORT["binding"] = qt.BINDING
        # an exception in a slot would open Krita's exception dialog and wait for a click
        REPORT["uncaught"] = []
        sys.excepthook = lambda *a: REPORT["uncaught"].append("".join(traceback.format_exception(*a)))
        c = Controller(app=app)
        python = os.environ.get("ANALOGON_TEST_INSTALL_PYTHON")
        if python:  # offline: uv and the packages of the test environment, or an index on 127.0.0.1
            site = [p for p in os.environ.get("ANALOGON_TEST_SITE_PACKAGES", "").split(os.pathsep) if p]
            index = os.environ.get("ANALOGON_TEST_INDEX") or None
            installer = Installer(uv=os.environ["ANALOGON_TEST_UV"], python=python, test_site_packages=site,
                                  index_url=index, pytorch_index=index or installer_mod.PYTORCH_INDEX)
        else:
            installer = Installer()  # the docker's own
        setup_tabs = BackendSetup(c, installer)
        if python or os.environ.get("ANALOGON_TEST_INSTALL_EXPECT_FAIL"):
            _memory(setup_tabs)  # before the install: a good install starts the backend with them
            _install(c, setup_tabs)
        _start(c, setup_tabs)
        if c.connection == "connected":
            _models(app, c)
            _download(c, setup_tabs)
        pid = c.process.pid
        c.shutdown()
        REPORT["backend_gone"] = _wait(lambda: not _alive(pid), 15)
    except Exception:
        REPORT["fatal"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(REPORT, f, indent=1)
    print("analogon krita report written to", out)
