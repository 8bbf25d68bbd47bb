"""The controller (what the panel's buttons call) on the fake Krita: role defaults, settings,
refusals before sending, a backend that is down, and — with the real backend — results,
history, apply again, use as source, progressive sequences and cancel."""
from __future__ import annotations

import socket

import pytest
import schemas
from conftest import wait_until
from fake_krita import Selection

from analogon_krita.controller import SELECTION, Controller
from analogon_krita.document import document as kd
from analogon_krita.document.document import Rect


def make_doc(kapp, w=64, h=64):
    doc = kapp.createDocument(w, h, "t", "RGBA", "U8", "", 72.0)
    kapp.setActiveDocument(doc)
    return doc


def layer(doc, name, bgra=None, rect=None, above=None, parent=None):
    n = doc.createNode(name, "paintlayer")
    (parent or doc.rootNode()).addChildNode(n, above)
    if bgra is not None:
        r = rect or Rect(0, 0, doc.width(), doc.height())
        n.setPixelData(bytes(bgra) * (r.w * r.h), r.x, r.y, r.w, r.h)
    n.writes = 0
    return n


def offline_controller(kapp):
    c = Controller(app=kapp)
    c.methods = [dict(m) for m in schemas.METHODS]
    c.method_id = "pixels"
    return c


def uid(n):
    return kd.layer_id(n)


def test_role_defaults_from_active_layer_and_names(kapp):
    doc = make_doc(kapp)
    bg = layer(doc, "Background", (255, 255, 255, 255))
    photo = layer(doc, "photo", (0, 100, 0, 255), above=bg)
    ex = layer(doc, "patch", (0, 0, 255, 255), Rect(5, 5, 10, 10), above=photo)
    doc.setActiveNode(photo)
    c = offline_controller(kapp)
    emap = c.new_edit_map()  # above the target (the active layer)
    assert emap is not None
    roles = c.roles("pixels")
    assert roles["source"] == [uid(photo)]
    assert roles["edit_map"] == [uid(emap)]
    assert roles["mask"] == [SELECTION]
    assert roles["exemplar"] == []  # optional roles are not guessed
    # DIA: layers named like the roles win, the active layer is B
    a = layer(doc, "A", (1, 1, 1, 255), above=ex)
    ap = layer(doc, "A\u2032", (2, 2, 2, 255), above=a)
    dia = c.roles("dia")
    assert dia["a"] == [uid(a)] and dia["a_prime"] == [uid(ap)] and dia["b"] == [uid(photo)]


def test_role_defaults_take_nearest_layers_above_the_target(kapp):
    doc = make_doc(kapp)
    b = layer(doc, "one", (9, 9, 9, 255))
    x = layer(doc, "two", (8, 8, 8, 255), above=b)
    y = layer(doc, "three", (7, 7, 7, 255), above=x)
    doc.setActiveNode(b)
    c = offline_controller(kapp)
    dia = c.roles("dia")
    assert dia["b"] == [uid(b)] and dia["a"] == [uid(x)] and dia["a_prime"] == [uid(y)]


def test_roles_follow_the_active_document(kapp):
    d1 = make_doc(kapp)
    l1 = layer(d1, "first", (1, 1, 1, 255))
    d1.setActiveNode(l1)
    c = offline_controller(kapp)
    c.set_document(d1)
    assert c.roles()["source"] == [uid(l1)]
    d2 = make_doc(kapp)
    l2 = layer(d2, "second", (1, 1, 1, 255))
    d2.setActiveNode(l2)
    seen = []
    c.layersChanged.connect(lambda: seen.append(1))
    c.set_document(d2)
    assert seen and c.roles()["source"] == [uid(l2)]
    assert [name for _, name in c.layers()] == ["second"]
    c.set_document(d1)
    assert c.roles()["source"] == [uid(l1)]


def test_a_closed_document_is_no_document(kapp):
    """Reconnecting (e.g. after a download) once the followed document was closed: the
    active document, or none, and no exception from a closed document's missing root."""
    d1 = make_doc(kapp)
    layer(d1, "first", (1, 1, 1, 255))
    c = offline_controller(kapp)
    c.set_document(d1)
    d1.close()
    assert c.document() is None and c.roles() == {}
    c._ensure_roles()  # what a reconnection runs
    d2 = make_doc(kapp)
    l2 = layer(d2, "second", (1, 1, 1, 255))
    d2.setActiveNode(l2)
    assert c.document() is d2 and c.roles()["source"] == [uid(l2)]


def test_settings_live_in_krita_settings(kapp):
    c = offline_controller(kapp)
    c.set_model("my/model")
    c.set_seed(1234, False)
    c.set_param("steps", 12)
    c.set_method("dia")
    assert kapp.settings[("analogon", "model")] == "my/model"
    assert kapp.settings[("analogon", "seed")] == "1234"
    assert kapp.settings[("analogon", "random_seed")] == "false"
    assert kapp.settings[("analogon", "method")] == "dia"
    c2 = Controller(app=kapp)
    assert (c2.model, c2.seed, c2.random_seed, c2.method_id) == ("my/model", 1234, False, "dia")


def test_backend_suggestions_fill_only_empty_fields(kapp):
    c = offline_controller(kapp)
    seen = []
    c.paramsChanged.connect(seen.append)
    c.set_param("prompt", "typed by the user")
    filled = c.apply_suggestions({"caption": "a red circle", "prompt": "captioner text",
                                  "no_such_field": "x"}, "pixels")
    values = c.param_values("pixels")
    assert filled == ["caption"] and values["caption"] == "a red circle"
    assert values["prompt"] == "typed by the user" and "no_such_field" not in values
    assert seen == ["pixels"]
    assert c.apply_suggestions({"caption": "another"}, "pixels") == [] and seen == ["pixels"]


def test_prepare_builds_the_job_from_roles(kapp):
    doc = make_doc(kapp, 64, 48)
    photo = layer(doc, "photo", (0, 100, 0, 255))
    ex = layer(doc, "exemplar", (0, 0, 255, 255), Rect(20, 10, 8, 8), above=photo)
    doc.setActiveNode(photo)
    c = offline_controller(kapp)
    c.set_seed(77, False)
    c.set_role("exemplar", [uid(ex)])
    [p] = c.prepare()
    body = p.spec.body()
    assert body["method"] == "pixels" and body["seed"] == 77
    assert isinstance(body["images"]["source"], str)
    assert body["images"]["exemplar"] == [{"sha": p.spec.images["exemplar"][0].payload.sha,
                                           "x": 20, "y": 10, "scale": 1.0}]
    assert "mask" not in body["images"] and p.mask is None and p.roi == Rect(0, 0, 64, 48)
    assert body["params"]["steps"] == 50 and body["params"]["scheduler"] == "euler"
    src = p.spec.images["source"].payload
    assert (src.width, src.height) == (64, 48) and src.body[:4] == bytes([0, 100, 0, 255])
    # with a selection: the region shrinks and the mask is sent
    sel = Selection()
    sel.select(24, 16, 8, 8, 255)
    doc.setSelection(sel)
    c.settings.set("padding", 4)
    [p] = c.prepare()
    assert p.from_selection and p.roi.w < 64 and p.mask is not None
    m = p.spec.images["mask"].payload
    assert (m.width, m.height) == (p.roi.w, p.roi.h)
    assert p.spec.body()["images"]["exemplar"][0]["x"] == 20 - p.roi.x


@pytest.mark.parametrize("case,expected", [
    ("missing", "Pick a layer for \u201cSource\u201d"),
    ("hidden", "is hidden"),
    ("empty", "is empty"),
    ("cmyk", "CMYK"),
    ("params", "Steps"),
])
def test_refusals_before_anything_is_sent(kapp, case, expected):
    doc = make_doc(kapp, 16, 16) if case != "cmyk" else kapp.createDocument(16, 16, "c", "CMYKA", "U8", "", 72)
    kapp.setActiveDocument(doc)
    px = None if case == "empty" else ((1, 2, 3, 4, 255) if case == "cmyk" else (1, 2, 3, 255))
    photo = layer(doc, "photo", px)
    doc.setActiveNode(photo)
    c = offline_controller(kapp)
    if case == "missing":
        c.set_role("source", [])
    if case == "hidden":
        photo.setVisible(False)
    if case == "params":
        c.set_param("steps", 5000)
    sent = []
    c.client = type("NoNetwork", (), {"__getattr__": lambda s, n: sent.append(n)})()
    c.connection = "connected"
    errors, ends = [], []
    c.errorChanged.connect(errors.append)
    c.finished.connect(ends.append)
    assert c.generate() is False
    assert expected in c.error and errors[-1] == c.error and ends == ["error"]
    assert sent == [] and not c.busy
    assert [n.name() for n in doc.rootNode().childNodes()] == ["photo"]


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_backend_down_gives_a_message(kapp, tmp_path):
    doc = make_doc(kapp, 16, 16)
    photo = layer(doc, "photo", (1, 2, 3, 255))
    doc.setActiveNode(photo)
    kapp.writeSetting("analogon", "backend_url", f"http://127.0.0.1:{closed_port()}")
    kapp.writeSetting("analogon", "state_dir", str(tmp_path))
    c = offline_controller(kapp)
    ends = []
    c.finished.connect(ends.append)
    c.generate()
    assert wait_until(lambda: ends, 10)
    assert ends == ["error"] and c.connection == "unreachable"
    assert "not running" in c.error and "Start the backend at that address" in c.error  # lead.py
    assert [n.name() for n in doc.rootNode().childNodes()] == ["photo"]


def test_backend_that_cannot_start_gives_a_message(kapp, tmp_path):
    kapp.writeSetting("analogon", "backend_command", str(tmp_path / "no-such-analogon"))
    c = offline_controller(kapp)
    states = []
    c.connectionChanged.connect(lambda s, m: states.append((s, m)))
    c.start_backend()
    assert wait_until(lambda: c.connection == "unreachable", 10)
    assert "not found" in c.connection_message and "settings" in c.connection_message
    assert states[0][0] == "starting"


# -- with the real backend ---------------------------------------------------------------

@pytest.fixture
def live(kapp, backend):
    kapp.writeSetting("analogon", "state_dir", str(backend.state_dir))
    c = Controller(app=kapp)
    c.set_model("tiny-sd")  # the developer model on purpose (a painter is never offered it)
    done = []
    c.connect_backend(done.append)
    assert wait_until(lambda: done, 20) and done == [True], c.connection_message
    c.set_method("pixels")
    c.set_seed(11, False)
    c.set_param("steps", 4)
    c.set_param("strength", 0.5)
    yield c
    c.deleteLater()


def run(c, fn=None, timeout=120):
    ends = []
    c.finished.connect(ends.append)
    started = (fn or c.generate)()
    assert wait_until(lambda: ends, timeout), "the job did not finish"
    c.finished.disconnect()
    return ends[0], started


def painted_doc(kapp):
    doc = make_doc(kapp, 64, 64)
    bg = layer(doc, "Background", (255, 255, 255, 255))
    photo = layer(doc, "photo", (40, 120, 200, 255), above=bg)
    ex1 = layer(doc, "ex1", (0, 0, 255, 255), Rect(8, 8, 16, 16), above=photo)
    ex2 = layer(doc, "ex2", (0, 255, 0, 255), Rect(36, 36, 16, 16), above=ex1)
    doc.setActiveNode(photo)
    return doc, bg, photo, ex1, ex2


def test_generate_adds_result_layer_and_history(kapp, live):
    doc, bg, photo, ex1, ex2 = painted_doc(kapp)
    live.set_document(doc)
    live.set_role("exemplar", [uid(ex1)])
    emap = live.new_edit_map()
    emap.setPixelData(bytes([255, 255]) * 64, 8, 8, 8, 8)  # white square under ex1
    before = {n.name(): n.pixelData(0, 0, 64, 64) for n in (bg, photo, ex1, ex2, emap)}
    how, _ = run(live)
    assert how == "done", live.error
    names = [n.name() for n in doc.rootNode().childNodes()]
    # above every layer the pass used (source, map, exemplar), not above the unused ex2
    assert names == ["Background", "photo", "Edit map", "ex1", "pixels seed 11", "ex2"]
    assert not emap.visible() and "edit map was hidden" in live.message
    result = doc.nodeByName("pixels seed 11")
    # the result layer holds only the change: the white square of the map, nothing else
    b = result.bounds()
    assert (b.x(), b.y(), b.width(), b.height()) == (8, 8, 8, 8)
    for n in (bg, photo, ex1, ex2, emap):
        assert n.pixelData(0, 0, 64, 64) == before[n.name()]
    assert len(live.history) == 1
    entry = live.history[0]
    assert entry.seed == 11 and entry.params["steps"] == 4 and entry.layer_name == "pixels seed 11"
    assert entry.thumbnail is not None and not entry.thumbnail.isNull()
    # apply again: same seed, same layers -> identical pixels in a second layer
    how, _ = run(live, lambda: live.apply_again(0))
    assert how == "done"
    names = [n.name() for n in doc.rootNode().childNodes()]
    assert names == ["Background", "photo", "Edit map", "ex1", "pixels seed 11", "pixels seed 11 #2", "ex2"]
    results = [doc.nodeByName("pixels seed 11"), doc.nodeByName("pixels seed 11 #2")]
    assert results[0].pixelData(0, 0, 64, 64) == results[1].pixelData(0, 0, 64, 64)
    # use as next source
    assert live.use_as_source(0)
    assert live.roles()["source"] == [live.history[0].layer_id]


def test_the_hidden_map_is_redrawn_and_comes_back_when_the_pass_is_undone(kapp, live):
    """Hiding the map redraws the canvas; Krita's Undo of the pass (its result layer leaves
    the document) shows the map again at the next layer poll, Redo hides it again, and a map
    the painter shows by hand is theirs."""
    doc, bg, photo, ex1, ex2 = painted_doc(kapp)
    live.set_document(doc)
    live.set_role("exemplar", [uid(ex1)])
    emap = live.new_edit_map()
    emap.setPixelData(bytes([255, 255]) * 64, 8, 8, 8, 8)
    refreshes = []
    set_visible = emap.setVisible

    def spy(v):  # note the refresh count when the map's visibility changes
        set_visible(v)
        refreshes.append(doc.refreshes)

    emap.setVisible = spy
    how, _ = run(live)
    assert how == "done", live.error
    assert not emap.visible() and doc.refreshes > refreshes[-1]  # redrawn after hiding
    result = doc.nodeByName("pixels seed 11")
    parent = result.parentNode()
    result.remove()  # what Krita's Undo of the pass does
    before = doc.refreshes
    live.refresh_layers()
    assert emap.visible() and doc.refreshes > before
    parent.addChildNode(result, ex1)  # Redo
    live.refresh_layers()
    assert not emap.visible()
    live.refresh_layers()
    assert not emap.visible()
    # the painter shows the map by hand to paint on it: it stays shown while the result is there
    emap.setVisible(True)
    live.refresh_layers()
    assert emap.visible()


def test_selection_limits_the_result(kapp, live):
    doc, bg, photo, ex1, ex2 = painted_doc(kapp)
    live.set_document(doc)
    live.settings.set("padding", 4)
    sel = Selection()
    sel.select(16, 16, 24, 24, 255)
    doc.setSelection(sel)
    how, _ = run(live)
    assert how == "done", live.error
    result = doc.nodeByName("pixels seed 11")
    b = result.bounds()
    assert b.x() >= 16 and b.y() >= 16 and b.right() <= 39 and b.bottom() <= 39
    assert live.history[0].from_selection and live.history[0].roi[2] < 64


def test_progressive_sequence_one_pass_per_exemplar(kapp, live):
    doc, bg, photo, ex1, ex2 = painted_doc(kapp)
    live.set_document(doc)
    live.set_role("exemplar", [uid(ex1), uid(ex2)])
    live.set_progressive(True)
    stages = []
    live.progressChanged.connect(lambda s, a, b: stages.append(s))
    how, _ = run(live, timeout=180)
    assert how == "done", live.error
    names = [n.name() for n in doc.rootNode().childNodes()]
    assert names == ["Background", "photo", "ex1", "ex2", "pixels seed 11 (pass 1/2)", "pixels seed 11 (pass 2/2)"]
    assert [h.sequence for h in live.history] == [(1, 2), (0, 2)]
    assert any(s.startswith("pass 2/2") for s in stages)


def test_cancel_adds_no_layer(kapp, live):
    doc, *_ = painted_doc(kapp)
    live.set_document(doc)
    live.set_param("steps", 200)
    live.set_param("strength", 1.0)
    live.progressChanged.connect(lambda s, a, b: a > 0 and live.cancel())
    how, _ = run(live)
    assert how == "cancelled" and "No layer was added" in live.message
    assert [n.name() for n in doc.rootNode().childNodes()] == ["Background", "photo", "ex1", "ex2"]
    assert live.history == [] and not live.busy
