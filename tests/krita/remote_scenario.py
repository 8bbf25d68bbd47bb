"""Runs inside real Krita: ``kritarunner -s remote_scenario -f main`` (issue 31).

The profile's kritarc was written by the test (test_remote_krita.py) before Krita started: a
backend on another machine (``connection=remote``), its https address, a painter's token and
the fingerprint of its self-signed certificate, pinned as the docker keeps it; autostart is on
too, and must not start anything. The plugin's own controller connects, runs one PIXELS pass
on a document with known pixels, and the result layer must appear. The report goes to
$ANALOGON_KRITA_REPORT for the pytest side to check.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


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


def _layer(doc, name, bgra, x, y, w, h, above=None):
    n = doc.createNode(name, "paintlayer")
    doc.rootNode().addChildNode(n, above)
    n.setPixelData(bytes(bgra) * (w * h), x, y, w, h)
    return n


def _alpha(node, x, y, w, h):
    alpha = bytes(node.pixelData(x, y, w, h))[3::4]
    return {"opaque": alpha.count(255), "transparent": alpha.count(0), "n": len(alpha)}


def _run(report):
    from krita import Krita

    from analogon_krita import qt
    from analogon_krita.controller import Controller
    from analogon_krita.document import document as kd
    from analogon_krita.link import remote
    from analogon_krita.ui import lead

    app = Krita.instance()
    report["krita_version"] = str(app.version())
    report["binding"] = qt.BINDING
    report["python"] = sys.version.split()[0]
    c = Controller(app=app)
    s = c.settings
    report["settings"] = {"connection": s.get("connection"), "remote_url": s.get("remote_url"),
                          "pins": remote.pins(s), "autostart": s.get_bool("autostart")}
    asked = []
    prompt = remote.TrustPrompt(c.link)  # as the docker has one: it must not be needed
    prompt.ask = lambda title, text: asked.append(text) or False
    page = remote.RemotePage(c)  # the Connection tab, as the settings dialog shows it
    report["page"] = {"remote": page.remote(), "url": page.url.text(), "certificate": page.certificate.text(),
                      "forget_enabled": page.forget_button.isEnabled()}
    page.deleteLater()
    t0 = time.monotonic()
    c.start_monitoring()  # autostart is on: for a remote backend it connects, never starts
    _wait(lambda: c.connection in ("connected", "unreachable") and not c.link.connecting, 90)
    report["connect"] = {"state": c.connection, "message": c.connection_message,
                         "seconds": round(time.monotonic() - t0, 2),
                         "painter": (c.health.get("painter") or {}).get("name") if c.health else None,
                         "tls": c.health.get("tls") if c.health else None,
                         "reason": c.link.reason,
                         "lead": lead.decide(lead.facts(c.link)).text}
    if c.connection != "connected":
        return
    c.set_model("tiny-sd")
    c.set_method("pixels")
    c.set_seed(5, False)
    for k, v in {"steps": 3, "strength": 0.75}.items():
        if k in c.param_values():
            c.set_param(k, v)
    doc = app.createDocument(64, 48, "analogon-remote", "RGBA", "U8", "", 72.0)
    bg = doc.rootNode().childNodes()[0] if doc.rootNode().childNodes() else None
    photo = _layer(doc, "photo", (40, 120, 200, 255), 0, 0, 64, 48, above=bg)
    ex = _layer(doc, "exemplar", (0, 0, 255, 255), 8, 8, 16, 16, above=photo)
    doc.setActiveNode(photo)
    c.set_document(doc)
    c.set_role(c.target_role(), [kd.layer_id(photo)])
    if "exemplar" in c.roles():
        c.set_role("exemplar", [kd.layer_id(ex)])
    emap = c.new_edit_map()
    white = b"\xff" * (2 if emap.colorModel() == "GRAYA" else 4)
    emap.setPixelData(white * (24 * 24), 4, 4, 24, 24)
    c.set_role("edit_map", [kd.layer_id(emap)])
    doc.refreshProjection()
    formats = [p.format for p in c.prepare()[0].spec.payloads()]
    ends, uploads = [], []
    c.finished.connect(ends.append)
    c.progressChanged.connect(lambda st, a, b: st.startswith("uploading image ") and uploads.append(st))
    before = bytes(photo.pixelData(0, 0, 64, 48))
    t0 = time.monotonic()
    c.generate()
    _wait(lambda: ends, 300)
    name = kd.result_layer_name("pixels", 5)
    node = doc.nodeByName(name)
    b = node.bounds() if node else None
    report["pass"] = {"how": ends[0] if ends else "timeout", "error": c.error, "message": c.message,
                      "seconds": round(time.monotonic() - t0, 2), "formats": formats, "uploads": uploads[-3:],
                      "names": [str(n.name()) for n in doc.rootNode().childNodes()], "layer": name,
                      "bounds": [b.x(), b.y(), b.width(), b.height()] if b else None,
                      "alpha_inside": _alpha(node, 8, 8, 16, 16) if node else None,
                      "alpha_outside": _alpha(node, 36, 0, 28, 48) if node else None,
                      "differs": bool(node) and bytes(node.pixelData(0, 0, 64, 48)) != before,
                      "history": len(c.history)}
    report["asked"] = list(asked)
    report["process"] = {"state": c.process.state, "pid": c.process.pid}
    # the certificate changes (here: the pin does): refused in this Qt too, naming both
    url, real = remote.remote_url(s), report["settings"]["pins"] and list(report["settings"]["pins"].values())[0]
    remote.pin(s, url, "AB:" * 31 + "AB")
    c.link._drop_client()  # a new handshake
    done = []
    c.connect_backend(done.append)
    _wait(lambda: done, 30)
    report["changed"] = {"ok": done, "reason": c.link.reason, "message": c.connection_message,
                         "lead": lead.decide(lead.facts(c.link)).button}
    # Forget: the docker asks about the certificate it is shown (the painter says no here)
    prompt.forget()
    _wait(lambda: asked and not c.link.connecting, 30)
    report["forgot"] = {"asked": asked[len(report["asked"]):], "reason": c.link.reason,
                        "pins": remote.pins(s), "real": real}
    c.shutdown()
    doc.close()


def main(*args):
    out = os.environ.get("ANALOGON_KRITA_REPORT", "krita_remote_report.json")
    report: dict = {}
    try:
        _run(report)
    except Exception:
        report["traceback"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print("analogon remote report written to", out)
