"""The running job's preview on the canvas: a locked layer where the result goes, replaced
as previews arrive, turned into the result at the end (one undo step for the whole pass),
removed on cancel and on failure; the docker's thumbnail is cleared when a job starts. The
backend is replaced by a runner that sends the previews and the result a test gives it."""
from __future__ import annotations

import copy

import pytest
import schemas
from conftest import wait_until
from PyQt6.QtCore import QObject, QTimer, pyqtSignal
from PyQt6.QtGui import QImage

import analogon_krita.controller as controller_mod
from analogon_krita.controller import Controller
from analogon_krita.document import document as kd
from analogon_krita.link.client import JobResult

W, H = 32, 24


def image(rgba):
    img = QImage(W // 2, H // 2, QImage.Format.Format_RGBA8888)  # previews are small
    r, g, b, a = rgba
    img.fill(QImage(1, 1, QImage.Format.Format_RGBA8888).pixelColor(0, 0).fromRgb(r, g, b, a))
    return img


class PreviewRunner(QObject):
    stage = pyqtSignal(str)
    progress = pyqtSignal(str, int, int)
    uploading = pyqtSignal(str, int, int)
    preview = pyqtSignal(object)
    done = pyqtSignal(object)
    failed = pyqtSignal(str)
    cancelled = pyqtSignal()

    previews: list = []  # colours of the previews sent, in order
    results: list = [(200, 0, 0, 255)]  # one colour per result image
    end = "done"  # done | hold (until cancelled) | fail
    seen: list = []  # what the test looks at after each preview

    def __init__(self, client, spec, parent=None):
        super().__init__(parent)
        self.spec = spec

    def start(self):
        def step(k=0):
            if k < len(PreviewRunner.previews):
                self.preview.emit(image(PreviewRunner.previews[k]))
                PreviewRunner.seen.append(k)
                QTimer.singleShot(5, lambda: step(k + 1))
            elif PreviewRunner.end == "done":
                imgs = [(bytes(c) * (W * H), W, H, f"#{i + 1}", f"sha{i}{c}")
                        for i, c in enumerate(PreviewRunner.results)]
                self.done.emit(JobResult(imgs, self.spec.seed, dict(self.spec.params), {}, "job"))
            elif PreviewRunner.end == "fail":
                self.failed.emit("The backend ran out of memory.")
        QTimer.singleShot(0, step)

    def cancel(self):
        QTimer.singleShot(0, self.cancelled.emit)


@pytest.fixture
def runner(monkeypatch):
    PreviewRunner.previews, PreviewRunner.results = [], [(200, 0, 0, 255)]
    PreviewRunner.end, PreviewRunner.seen = "done", []
    monkeypatch.setattr(controller_mod, "JobRunner", PreviewRunner)
    return PreviewRunner


def setup(kapp, method="pixels"):
    doc = kapp.createDocument(W, H, "t", "RGBA", "U8", "", 72)
    kapp.setActiveDocument(doc)
    photo = doc.createNode("photo", "paintlayer")
    doc.rootNode().addChildNode(photo, None)
    photo.setPixelData(bytes((10, 20, 30, 255)) * (W * H), 0, 0, W, H)
    a = doc.createNode("A", "paintlayer")
    doc.rootNode().addChildNode(a, photo)
    a.setPixelData(bytes((1, 2, 3, 255)) * (W * H), 0, 0, W, H)
    ap = doc.createNode("A\u2032", "paintlayer")
    doc.rootNode().addChildNode(ap, a)
    ap.setPixelData(bytes((4, 5, 6, 255)) * (W * H), 0, 0, W, H)
    doc.setActiveNode(photo)
    c = Controller(app=kapp)
    c.methods = [dict(m) for m in schemas.METHODS]
    c.link.set_state("connected", "Connected to http://127.0.0.1:1")
    c.client = object()
    c.set_method(method)
    c.set_document(doc)
    c.set_seed(5, False)
    if method == "dia":
        c.set_role("b", [kd.layer_id(photo)])
    doc.undo_log.clear()
    return c, doc, photo


def run(c):
    ends = []
    c.finished.connect(ends.append)
    assert c.generate(), c.error
    assert wait_until(lambda: ends, 10)
    c.finished.disconnect()
    return ends[0]


def names(doc):
    return [str(n.name()) for n in doc.rootNode().childNodes()]


def colour_at(node, x=0, y=0):
    b, g, r, a = bytes(node.pixelData(x, y, 1, 1))
    return (r, g, b, a)


def test_the_preview_layer_becomes_the_result_in_one_undo_step(kapp, runner):
    c, doc, photo = setup(kapp)
    runner.previews = [(0, 0, 255, 255), (0, 255, 0, 255)]
    shown = []

    def look(_img):
        node = doc.nodeByName(kd.PREVIEW_NAME)
        shown.append(None if node is None else (kd.layer_id(node), node.locked(), colour_at(node)))
    c.previewChanged.connect(look)
    assert run(c) == "done", c.error
    previews = [s for s in shown if s is not None]
    assert len(previews) == 2
    assert previews[0][1] and previews[0][2] == (0, 0, 255, 255)  # locked, the first preview
    assert previews[1][0] == previews[0][0] and previews[1][2] == (0, 255, 0, 255)  # replaced in place
    result = doc.nodeByName("pixels seed 5")
    assert result is not None and kd.layer_id(result) == previews[0][0]
    assert not result.locked() and colour_at(result) == (200, 0, 0, 255)
    assert kd.PREVIEW_NAME not in names(doc)
    # the whole pass: one layer added, nothing removed: one Undo removes the result
    assert doc.undo_log == [("add", kd.PREVIEW_NAME)]
    assert c.history[0].layer_id == kd.layer_id(result)


def test_a_job_without_previews_adds_its_result_as_before(kapp, runner):
    c, doc, photo = setup(kapp)
    assert run(c) == "done"
    assert doc.undo_log == [("add", "pixels seed 5")] and kd.PREVIEW_NAME not in names(doc)


@pytest.mark.parametrize("end", ["hold", "fail"])
@pytest.mark.parametrize("dropped", [0, 2])
def test_cancel_or_failure_takes_the_preview_back_with_krita_s_undo(kapp, runner, end, dropped):
    """The preview's own "Add Layer" is the newest step: Krita's Undo takes it back, pressed
    again when Krita drops a press; the undo stack is as before the pass."""
    c, doc, photo = setup(kapp)
    runner.previews = [(0, 0, 255, 255)]
    runner.end = end
    doc.drop_presses = dropped
    before = names(doc)
    if end == "hold":
        c.previewChanged.connect(lambda img: img is not None and QTimer.singleShot(0, c.cancel))
    how = run(c)
    assert how == ("cancelled" if end == "hold" else "error")
    assert wait_until(lambda: names(doc) == before, 5)
    assert c.history == [] and doc.undo_log == []


def test_cancel_after_the_painter_acted_removes_the_preview_as_a_step_of_its_own(kapp, runner):
    """A step the painter took during the job is never undone: the preview is removed."""
    c, doc, photo = setup(kapp)
    runner.previews = [(0, 0, 255, 255)]
    runner.end = "hold"

    def painter_then_cancel(img):
        if img is None:
            return
        extra = doc.createNode("painted meanwhile", "paintlayer")
        doc.rootNode().addChildNode(extra, photo)
        QTimer.singleShot(0, c.cancel)
    c.previewChanged.connect(painter_then_cancel)
    assert run(c) == "cancelled"
    assert wait_until(lambda: kd.PREVIEW_NAME not in names(doc), 5)
    assert "painted meanwhile" in names(doc)
    assert doc.undo_log == [("add", kd.PREVIEW_NAME), ("add", "painted meanwhile"),
                            ("remove", kd.PREVIEW_NAME)]


def test_the_docker_thumbnail_is_cleared_when_a_job_starts(kapp, runner):
    c, doc, photo = setup(kapp)
    runner.previews = [(0, 0, 255, 255)]
    assert run(c) == "done" and c.preview is not None
    seen = []
    c.previewChanged.connect(seen.append)
    runner.previews = []
    assert run(c) == "done"
    assert seen and seen[0] is None and c.preview is None


def test_a_sweep_preview_is_a_group_that_becomes_the_result_group(kapp, runner):
    c, doc, photo = setup(kapp, "dia")
    dia = copy.deepcopy(c.method("dia"))  # the backend's DIA has a sweep switch
    dia["params"]["properties"]["sweep"] = {"type": "boolean", "default": False, "title": "Sweep"}
    c.methods[1] = dia
    c.params.pop("dia", None)
    c.set_param("sweep", True)
    runner.previews = [(0, 0, 255, 255)]
    runner.results = [(200, 0, 0, 255), (0, 200, 0, 255)]
    assert run(c) == "done", c.error
    group = doc.nodeByName(c.history[0].layer_name)
    assert group.type() == "grouplayer" and len(group.childNodes()) == 1
    assert colour_at(group.childNodes()[0]) == (200, 0, 0, 255)
    assert doc.undo_log == [("add", kd.PREVIEW_NAME)]
    assert c.pick_variant(1)
    assert len(group.childNodes()) == 2
