"""Multi-image results (a DIA λ sweep): one result group showing one variant, the others to
pick from (each pick one more layer in the group, so that one undo goes back), in the
controller and in the panel's strip. The backend is replaced by a runner that answers
each pass with the images a test gives it."""
from __future__ import annotations

import hashlib

import pytest
import schemas
from conftest import wait_until
from fake_krita import Selection
from PyQt6.QtCore import QObject, QTimer, pyqtSignal

import analogon_krita.controller as controller_mod
from analogon_krita.controller import Controller
from analogon_krita.document import document as kd
from analogon_krita.document.document import Rect
from analogon_krita.link.client import JobResult
from analogon_krita.ui.panel import AnalogonPanel

LABELS = ["\u03bb=0, cfg=7.5", "\u03bb=0.5, cfg=7.5", "\u03bb=1, cfg=7.5", "\u03bb=1.5, cfg=7.5"]
COLOURS = [(200, 0, 0, 255), (0, 200, 0, 255), (0, 0, 200, 255), (90, 90, 10, 255)]


class ScriptedRunner(QObject):
    """Stands in for client.JobRunner: each pass answers with the next entry of ``script``
    (a list of (label, RGBA colour)), as images of ``size``."""

    stage = pyqtSignal(str)
    progress = pyqtSignal(str, int, int)
    uploading = pyqtSignal(str, int, int)
    preview = pyqtSignal(object)
    done = pyqtSignal(object)
    failed = pyqtSignal(str)
    cancelled = pyqtSignal()

    script: list = []
    specs: list = []
    size = (0, 0)
    info: dict = {}

    def __init__(self, client, spec, parent=None):
        super().__init__(parent)
        self.spec = spec

    def start(self):
        ScriptedRunner.specs.append(self.spec)
        w, h = ScriptedRunner.size
        images = [(bytes(colour) * (w * h), w, h, label, sha_of(label, colour))
                  for label, colour in ScriptedRunner.script.pop(0)]
        result = JobResult(images, self.spec.seed, dict(self.spec.params), {}, "job",
                           info=dict(ScriptedRunner.info))
        QTimer.singleShot(0, lambda: self.done.emit(result))

    def cancel(self):
        self.cancelled.emit()


def sha_of(label, colour) -> str:
    return hashlib.sha256(f"{label}{colour}".encode()).hexdigest()


@pytest.fixture
def runner(monkeypatch):
    ScriptedRunner.script, ScriptedRunner.specs, ScriptedRunner.info = [], [], {}
    monkeypatch.setattr(controller_mod, "JobRunner", ScriptedRunner)
    return ScriptedRunner


def sweep(n=4):
    return list(zip(LABELS, COLOURS))[:n]


def bgra(colour, count):
    r, g, b, a = colour
    return bytes((b, g, r, a)) * count


def layer(doc, name, colour):
    n = doc.createNode(name, "paintlayer")
    doc.rootNode().addChildNode(n, (doc.rootNode().childNodes() or [None])[-1])
    n.setPixelData(bgra(colour, doc.width() * doc.height()), 0, 0, doc.width(), doc.height())
    n.writes = 0
    return n


def new_document(kapp, runner, w=16, h=16):
    doc = kapp.createDocument(w, h, "t", "RGBA", "U8", "", 72.0)
    kapp.setActiveDocument(doc)
    runner.size = (w, h)
    return doc


def connected(kapp, method, seed, roles):
    """A controller as if connected to a backend, with ``roles``: role -> layers."""
    c = Controller(app=kapp)
    c.methods = [dict(m) for m in schemas.METHODS]
    c.method_id = method
    c.connection = "connected"
    c.set_seed(seed, False)
    for role, nodes in roles.items():
        c.set_role(role, [kd.layer_id(n) for n in nodes])
    return c


def dia_setup(kapp, runner, w=16, h=16):
    doc = new_document(kapp, runner, w, h)
    a, ap = layer(doc, "A", (10, 10, 10, 255)), layer(doc, "A'", (20, 20, 20, 255))
    b = layer(doc, "B", (30, 30, 30, 255))
    return doc, connected(kapp, "dia", 5, {"a": [a], "a_prime": [ap], "b": [b]}), (a, ap, b)


def run(c, script):
    ScriptedRunner.script.extend(script)
    ends = []
    c.finished.connect(ends.append)
    assert c.generate(), c.error
    assert wait_until(lambda: ends, 10), "the job did not finish"
    c.finished.disconnect()
    assert ends == ["done"], c.error
    return ends[0]


def names(doc):
    return [n.name() for n in doc.rootNode().childNodes()]


def snapshot(nodes):
    return {n.name(): (n.pixelData(0, 0, n._doc._w, n._doc._h), n.writes) for n in nodes}


def test_a_sweep_adds_one_layer_and_lists_its_variants(kapp, runner):
    doc, c, inputs = dia_setup(kapp, runner)
    seen = []
    c.variantsChanged.connect(lambda: seen.append(len(c.variants)))
    run(c, [sweep()])
    assert names(doc) == ["A", "A'", "B", "dia seed 5 \u03bb=0, cfg=7.5"]
    assert [v.label for v in c.variants] == LABELS and c.picked == 0
    assert [v.sha for v in c.variants] == [sha_of(lb, col) for lb, col in sweep()]
    assert all(v.thumbnail is not None and not v.thumbnail.isNull() for v in c.variants)
    assert seen[-1] == 4
    [entry] = c.history
    assert entry.layer_name == "dia seed 5 \u03bb=0, cfg=7.5" and entry.result_sha == c.variants[0].sha
    node = doc.nodeByName(entry.layer_name)
    assert node.type() == "grouplayer" and [n.name() for n in node.childNodes()] == [entry.layer_name]
    assert node.projectionPixelData(0, 0, 16, 16) == bgra(COLOURS[0], 256)


def test_picking_a_variant_adds_one_layer_into_the_result_group(kapp, runner):
    doc, c, inputs = dia_setup(kapp, runner)
    run(c, [sweep()])
    node = doc.nodeByName(c.history[0].layer_name)
    first = node.childNodes()[0]
    first.writes = 0
    before = snapshot(inputs)
    history_changes = []
    c.historyChanged.connect(lambda: history_changes.append(1))
    assert c.pick_variant(2)
    assert node.projectionPixelData(0, 0, 16, 16) == bgra(COLOURS[2], 256)
    assert node.name() == "dia seed 5 \u03bb=1, cfg=7.5" and c.picked == 2
    assert names(doc) == ["A", "A'", "B", "dia seed 5 \u03bb=1, cfg=7.5"]  # no layer added at the top
    # the variant is a new layer on top of the group ("copy": it alone shows); removing it
    # (what one undo does) shows the previous variant again; nothing was rewritten
    top = node.childNodes()[-1]
    assert len(node.childNodes()) == 2 and top.blendingMode() == "copy" and first.writes == 0
    top.remove()
    assert node.projectionPixelData(0, 0, 16, 16) == bgra(COLOURS[0], 256)
    entry = c.history[0]
    assert entry.layer_id == kd.layer_id(node) and entry.layer_name == node.name()
    assert entry.result_sha == c.variants[2].sha and entry.thumbnail is c.variants[2].thumbnail
    assert history_changes and snapshot(inputs) == before
    assert not c.pick_variant(4) and not c.pick_variant(-1)


def test_picking_follows_the_selection_like_the_first_result(kapp, runner):
    doc, c, inputs = dia_setup(kapp, runner, 32, 32)
    c.settings.set("padding", 4)
    c.settings.set("feather", 2)
    sel = Selection()
    sel.select(12, 12, 8, 8, 255)
    doc.setSelection(sel)
    roi, _ = kd.region_of_interest(doc, 4)
    runner.size = (roi.w, roi.h)
    run(c, [sweep()])
    node = doc.nodeByName(c.history[0].layer_name)
    assert c.pick_variant(3)
    mask = kd.feathered_mask(doc, roi, 2)
    expected = kd.insert_result(doc, None, bytes(COLOURS[3]) * (roi.w * roi.h), roi.w, roi.h, roi,
                                "expected", mask)
    assert node.projectionPixelData(0, 0, 32, 32) == expected.pixelData(0, 0, 32, 32)
    assert Rect.of(node.bounds()).intersect(roi) == Rect.of(node.bounds())  # nothing outside
    assert node.projectionPixelData(0, 0, 1, 1)[3] == 0


def test_picking_after_the_layer_was_removed_adds_a_new_one(kapp, runner):
    doc, c, inputs = dia_setup(kapp, runner)
    run(c, [sweep()])
    doc.nodeByName(c.history[0].layer_name).remove()
    other = layer(doc, "painted later", (1, 2, 3, 255))
    before = snapshot(inputs + (other,))
    assert c.pick_variant(1)
    assert names(doc) == ["A", "A'", "B", "dia seed 5 \u03bb=0.5, cfg=7.5", "painted later"]
    new = doc.nodeByName("dia seed 5 \u03bb=0.5, cfg=7.5")
    assert new.projectionPixelData(0, 0, 16, 16) == bgra(COLOURS[1], 256)
    assert c.history[0].layer_id == kd.layer_id(new) and snapshot(inputs + (other,)) == before
    assert c.pick_variant(3)  # the new layer is now the one that shows the picks
    assert names(doc) == ["A", "A'", "B", "dia seed 5 \u03bb=1.5, cfg=7.5", "painted later"]
    assert new.projectionPixelData(0, 0, 16, 16) == bgra(COLOURS[3], 256)



def test_the_panel_follows_krita_undoing_and_redoing_a_pick(kapp, runner):
    """Krita's Undo of a pick removes the pick's layer from the group, and its Redo puts it
    back, without a word to the panel: the layer poll follows (the strip's highlight, the
    history entry, the group's name), and keeps a name the painter gave the group."""
    doc, c, inputs = dia_setup(kapp, runner)
    run(c, [sweep()])
    group = doc.nodeByName(c.history[0].layer_name)
    first_name = group.name()
    assert c.pick_variant(2) and c.pick_variant(3)
    seen = []
    c.variantsChanged.connect(lambda: seen.append(c.picked))
    top = group.childNodes()[-1]
    top.remove()  # Krita's Undo
    assert not seen and c.picked == 3  # until the layer poll looks
    c.refresh_layers()
    entry = c.history[0]
    assert seen == [2] and group.name() == entry.layer_name == "dia seed 5 \u03bb=1, cfg=7.5"
    assert entry.result_sha == c.variants[2].sha and entry.thumbnail is c.variants[2].thumbnail
    group.childNodes()[-1].remove()
    c.refresh_layers()
    assert seen == [2, 0] and group.name() == entry.layer_name == first_name
    assert entry.result_sha == c.variants[0].sha
    group.setName("my sky")  # the painter's name stays
    group.addChildNode(top, group.childNodes()[-1])  # Krita's Redo (of the second pick, here)
    c.refresh_layers()
    assert seen == [2, 0, 3] and group.name() == entry.layer_name == "my sky"
    assert group.projectionPixelData(0, 0, 16, 16) == bgra(COLOURS[3], 256)
    c.refresh_layers()
    assert seen == [2, 0, 3]  # nothing changed since: nothing to follow
    mine = doc.createNode("painted on top", "paintlayer")
    group.addChildNode(mine, top)  # a layer the plugin did not add: the panel keeps its word
    c.refresh_layers()
    assert seen == [2, 0, 3] and c.picked == 3
    doc.close()  # the poll goes on: it must not raise
    assert c._follow_variants() is False
    c.refresh_layers()

def test_a_variant_can_be_kept_as_another_layer(kapp, runner):
    doc, c, inputs = dia_setup(kapp, runner)
    run(c, [sweep()])
    result = doc.nodeByName(c.history[0].layer_name)
    result.writes = 0
    assert c.add_variant_as_layer(3)
    assert names(doc) == ["A", "A'", "B", "dia seed 5 \u03bb=0, cfg=7.5", "dia seed 5 \u03bb=1.5, cfg=7.5"]
    assert doc.nodeByName("dia seed 5 \u03bb=1.5, cfg=7.5").pixelData(0, 0, 16, 16) == bgra(COLOURS[3], 256)
    assert result.writes == 0 and c.picked == 0 and len(c.history) == 1
    assert c.add_variant_as_layer(1)  # stacked above the one kept before
    assert names(doc)[-1] == "dia seed 5 \u03bb=0.5, cfg=7.5"
    assert c.pick_variant(2)  # the result group still takes the picks
    assert names(doc)[3] == "dia seed 5 \u03bb=1, cfg=7.5" and len(doc.rootNode().childNodes()) == 6


def test_chained_passes_put_only_the_last_pass_variants_in_the_strip(kapp, runner):
    doc = new_document(kapp, runner)
    photo = layer(doc, "photo", (30, 30, 30, 255))
    ex1, ex2 = layer(doc, "ex1", (0, 0, 255, 255)), layer(doc, "ex2", (0, 255, 0, 255))
    c = connected(kapp, "pixels", 3, {"source": [photo], "exemplar": [ex1, ex2]})
    c.set_progressive(True)
    first = [("one", COLOURS[0]), ("two", COLOURS[1]), ("three", COLOURS[2])]
    run(c, [first, sweep()])
    assert names(doc) == ["photo", "ex1", "ex2", "pixels seed 3 (pass 1/2) one",
                          "pixels seed 3 (pass 2/2) \u03bb=0, cfg=7.5"]
    # pass 2 starts from the picture of pass 1: the source with pass 1's layer over it
    src = runner.specs[1].images["source"].payload
    assert src.body == bytes(COLOURS[0]) * 256
    assert [v.label for v in c.variants] == LABELS
    assert c.pick_variant(1)
    assert c.history[0].layer_name == "pixels seed 3 (pass 2/2) \u03bb=0.5, cfg=7.5"
    assert c.history[1].layer_name == "pixels seed 3 (pass 1/2) one"
    assert doc.nodeByName("pixels seed 3 (pass 1/2) one").pixelData(0, 0, 16, 16) == bgra(COLOURS[0], 256)
    assert doc.nodeByName("pixels seed 3 (pass 2/2) \u03bb=0.5, cfg=7.5").type() == "grouplayer"


def test_a_new_job_clears_the_variants(kapp, runner):
    doc, c, inputs = dia_setup(kapp, runner)
    run(c, [sweep()])
    assert len(c.variants) == 4
    ScriptedRunner.script.append([("", COLOURS[2])])
    ends = []
    c.finished.connect(ends.append)
    assert c.generate()
    assert c.busy and c.variants == [] and c.picked == -1  # cleared as the job starts
    assert not c.pick_variant(0) and not c.add_variant_as_layer(0)
    assert wait_until(lambda: ends, 10) and ends == ["done"]
    assert c.variants == [] and names(doc)[4] == "dia seed 5"  # one image: named as before
    assert names(doc)[3] == "dia seed 5 \u03bb=0, cfg=7.5"  # the new result goes above the earlier one


def test_panel_strip_shows_variants_and_picks(kapp, runner):
    doc, c, inputs = dia_setup(kapp, runner)
    panel = AnalogonPanel(c)
    strip = panel.variant_strip
    assert not panel.variants_box.isVisibleTo(panel)
    run(c, [sweep()])
    assert panel.variants_box.isVisibleTo(panel) and panel.tabs.tabText(panel.tabs.currentIndex()) == "Variants (4)"
    assert strip.list.count() == 4 and strip.labels() == LABELS
    assert all(not strip.list.item(i).icon().isNull() for i in range(4))
    assert strip.current() == 0 and strip.list.item(0).font().bold()
    strip.list.setCurrentRow(2)  # a click
    assert c.picked == 2 and strip.list.item(2).font().bold() and not strip.list.item(0).font().bold()
    assert names(doc)[-1] == "dia seed 5 \u03bb=1, cfg=7.5"
    assert "\u03bb=1, cfg=7.5" in panel.history_list.item(0).text()
    group = doc.nodeByName(names(doc)[-1])
    top = group.childNodes()[-1]
    top.remove()  # Krita's Undo of the pick: the panel's layer poll follows it
    assert wait_until(lambda: strip.current() == 0, 5) and strip.list.item(0).font().bold()
    assert "\u03bb=0, cfg=7.5" in panel.history_list.item(0).text()
    group.addChildNode(top, group.childNodes()[-1])  # and its Redo
    assert wait_until(lambda: strip.current() == 2, 5) and names(doc)[-1] == "dia seed 5 \u03bb=1, cfg=7.5"
    strip.menu_for(3).actions()[1].trigger()  # context menu: add as a new layer
    assert names(doc)[-1] == "dia seed 5 \u03bb=1.5, cfg=7.5"
    strip.keep_button.click()  # keeps the picked one (its name is taken by the group: #2)
    assert names(doc)[-1] == "dia seed 5 \u03bb=1, cfg=7.5 #2" and len(names(doc)) == 6
    strip.menu_for(0).actions()[0].trigger()  # context menu: show in the result layer
    assert c.picked == 0 and strip.current() == 0
    # a single-image result: the strip goes away when the job starts and stays away
    ScriptedRunner.script.append([("", COLOURS[2])])
    ends = []
    c.finished.connect(ends.append)
    assert c.generate()
    assert not panel.variants_box.isVisibleTo(panel)
    assert wait_until(lambda: ends, 10) and ends == ["done"]
    assert not panel.variants_box.isVisibleTo(panel) and strip.list.count() == 0
    # another sweep shows it again, with the new images
    run(c, [sweep(3)])
    assert panel.variants_box.isVisibleTo(panel) and strip.labels() == LABELS[:3]


def test_what_the_backend_notes_about_a_result_is_in_the_message(kapp, runner):
    doc, c, _ = dia_setup(kapp, runner)
    note = "No object found in the structure image for the colour matching; used the whole image."
    runner.info = {"notes": [note]}
    run(c, [sweep(1)])
    assert c.message.startswith("Added the layer") and c.message.endswith(" " + note)
    runner.info = {}
    run(c, [sweep(1)])
    assert "No object found" not in c.message
