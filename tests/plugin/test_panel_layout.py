"""The docker at Krita's default docker size: the real backend's method schemas, laid out at
262 × 228 px (what Krita 5 gives a docked docker in its default layout) and at a floating
300 × 700 px. Generate / Cancel, the progress and the latest message or error are pinned
(never scrolled away), every label shows its whole text, the form, the variants and the
history each show on their own page without scrolling, the parameters a painter touches
come first and the rest sits under Advanced, titles are human and tooltips readable."""
from __future__ import annotations

import pytest
from conftest import process_events, wait_until
from PyQt6 import QtWidgets
from PyQt6.QtCore import QPoint, QRect

from analogon_krita.controller import Controller
from analogon_krita.ui.forms import TOOLTIP_WIDTH, wrap_tooltip
from analogon_krita.ui.panel import AnalogonPanel

DOCKED = (262, 228)  # the measure of a docked docker
DOCKED_SMALL = (262, 140)  # its contents in Krita 5.1 under Xvfb, a 1066 × 693 window
FLOATING = (300, 700)
ERROR = ("Cannot generate: The Analogon backend is not running at http://127.0.0.1:7871 "
         "(connection refused). Press \u201cStart backend\u201d, or check the backend address "
         "in the settings.")


@pytest.fixture(scope="module")
def methods(backend):
    """The real backend's GET /v1/methods."""
    import json
    import urllib.request

    req = urllib.request.Request(backend.url + "/v1/methods",
                                 headers={"Authorization": f"Bearer {backend.token}"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())["methods"]


def panel_for(kapp, methods, method_id, size):
    doc = kapp.createDocument(64, 64, "t", "RGBA", "U8", "", 72)
    kapp.setActiveDocument(doc)
    for name in ("photo", "exemplar with a rather long layer name", "Edit map"):
        n = doc.createNode(name, "paintlayer")
        doc.rootNode().addChildNode(n, None)
    doc.setActiveNode(doc.rootNode().childNodes()[0])
    c = Controller(app=kapp)
    c.methods = [dict(m) for m in methods]
    c.method_id = method_id
    c.link.set_state("connected", "Connected to http://127.0.0.1:43215 (v0.1.0, cuda)")
    panel = AnalogonPanel(c)
    c.methodsChanged.emit()
    c.set_message("Added the layer \u201cpixels seed 1234 #2\u201d.")
    c.set_error(ERROR)
    panel.resize(*size)
    panel.show()
    process_events(50)
    return c, panel


def inside(panel, widget) -> bool:
    """``widget`` is shown and wholly inside the panel's visible rectangle."""
    if not widget.isVisibleTo(panel):
        return False
    top_left = widget.mapTo(panel, QPoint(0, 0))
    return panel.rect().contains(QRect(top_left, widget.size()))


def clipped_labels(panel) -> list[str]:
    """Labels whose text does not fit the space they got (cut off at the side or bottom)."""
    out = []
    viewport = panel.scroll.viewport()
    for label in panel.findChildren(QtWidgets.QLabel):
        if not label.isVisibleTo(panel) or not label.text() or label.pixmap() is not None and not label.pixmap().isNull():
            continue
        if label.wordWrap():
            fits = label.heightForWidth(label.width()) <= label.height()
        else:
            fits = label.sizeHint().width() <= label.width()
        # and not cut by the right edge of what shows it
        host = viewport if viewport.isAncestorOf(label) else panel
        right = label.mapTo(host, QPoint(label.width(), 0)).x()
        if not fits or right > host.width():
            out.append(f"{label.text()!r} ({label.width()}x{label.height()})")
    return out


@pytest.mark.parametrize("size", [DOCKED, DOCKED_SMALL, FLOATING], ids=["docked", "small", "floating"])
@pytest.mark.parametrize("method_id", ["pixels", "appearance", "dia", "difference"])
def test_panel_fits_the_docker(kapp, methods, method_id, size):
    if method_id not in {m["id"] for m in methods}:
        pytest.skip(f"the backend has no {method_id}")
    c, panel = panel_for(kapp, methods, method_id, size)
    try:
        for w in (panel.generate_button, panel.cancel_button, panel.status_dot, panel.settings_button,
                  panel.error_label):
            assert not panel.tabs.isAncestorOf(w), f"{w.objectName()} scrolls away"
            assert inside(panel, w), f"{w.objectName() or w.text()} is not inside the visible panel"
        assert panel.height() == size[1], "the docker asks Krita for more room than it has"
        assert panel.progress.isHidden()  # only while a job runs
        c._set_busy(True)
        process_events(20)
        assert inside(panel, panel.progress) and not panel.tabs.isAncestorOf(panel.progress)
        c._set_busy(False)
        process_events(20)
        # connected: the connection is the dot (its tooltip has the real address); the dot
        # opens the lead at the top of the Edit page
        assert "127.0.0.1:43215" in panel.status_dot.toolTip() and not panel.lead_box.isVisibleTo(panel)
        assert panel.tabs.currentWidget() is panel.scroll and panel.scroll.verticalScrollBar().value() == 0
        panel.status_dot.click()
        process_events(20)
        top = panel.status_label.mapTo(panel.scroll.viewport(), QPoint(0, 0))
        assert top.y() >= 0 and top.y() + min(panel.status_label.height(), 16) <= panel.scroll.viewport().height()
        assert panel.status_label.text().startswith("Connected to http://127.0.0.1:43215")
        panel.status_dot.click()
        process_events(20)
        assert not panel.lead_box.isVisibleTo(panel)
        # the tabs fit the width, nothing needs a horizontal scroll bar
        assert panel.tabs.tabBar().sizeHint().width() <= panel.tabs.width()
        body = panel.scroll.widget()
        assert body.minimumSizeHint().width() <= panel.scroll.viewport().width()
        assert clipped_labels(panel) == []
        panel.form.show_advanced(True)
        process_events(30)
        assert clipped_labels(panel) == []
        # scrolled to the end, Generate and the messages stay where they were
        where = panel.generate_button.mapTo(panel, QPoint(0, 0))
        bar = panel.scroll.verticalScrollBar()
        bar.setValue(bar.maximum())
        process_events(30)
        assert panel.generate_button.mapTo(panel, QPoint(0, 0)) == where
        assert inside(panel, panel.error_label)
        c.set_error("")
        process_events(30)
        assert inside(panel, panel.message_label) and clipped_labels(panel) == []
        assert panel.scroll.height() >= 24, "a one-line message leaves room for the rest"
        if size == DOCKED:  # the Edit page is most of the docker
            assert panel.scroll.height() >= 0.6 * size[1], "the pinned part leaves no room for the form"
    finally:
        panel.close()
        panel.deleteLater()
        c.deleteLater()


def test_parameters_split_into_basic_and_advanced_from_the_schema(kapp, methods):
    for m in methods:
        props = m["params"]["properties"]
        basic = [k for k, p in props.items() if not p.get("advanced")]
        assert 1 <= len(basic) <= 6, (m["id"], basic)
        for name, p in props.items():
            title = p.get("title", "")
            assert title and "_" not in title, (m["id"], name, title)
    c, panel = panel_for(kapp, methods, "pixels", FLOATING)
    try:
        form = panel.form
        props = next(m for m in methods if m["id"] == "pixels")["params"]["properties"]
        advanced = {k for k, p in props.items() if p.get("advanced")}
        assert advanced and {"hires", "hires_strength", "guidance"} <= advanced
        assert not form.advanced.isVisibleTo(panel)
        for name, editor in form.editors.items():
            assert editor.isVisibleTo(panel) == (name not in advanced), name
            assert form.labels[name].text().startswith(props[name]["title"])
        assert form.advanced_button.text() == f"Advanced ({len(advanced)})"
        form.advanced_button.click()
        assert form.advanced.isVisibleTo(panel)
        assert all(e.isVisibleTo(panel) for e in form.editors.values())
        # units from the schema follow the title
        assert form.labels["hires_max_pixels"].text() == "Maximum pixels (px)"
        # an edit under Advanced reaches the controller like any other
        form.editors["guidance"].setValue(3.0)
        assert c.param_values()["guidance"] == 3.0
    finally:
        panel.close()
        panel.deleteLater()
        c.deleteLater()


def test_tooltips_are_wrapped_to_a_readable_width(kapp, methods):
    c, panel = panel_for(kapp, methods, "appearance", FLOATING)
    try:
        tips = [w.toolTip() for w in panel.findChildren(QtWidgets.QWidget) if w.toolTip()]
        assert len(tips) > 20
        for tip in tips:
            for line in tip.splitlines():
                assert len(line) <= TOOLTIP_WIDTH or " " not in line, line
        long = next(t for t in tips if len(t) > 3 * TOOLTIP_WIDTH)
        assert long.count("\n") >= 3
    finally:
        panel.close()
        panel.deleteLater()
        c.deleteLater()
    assert wrap_tooltip("a " * 100).count("\n") >= 2
    assert wrap_tooltip("one\n\ntwo") == "one\n\ntwo"


def test_message_and_preview_in_the_pinned_part(kapp, methods):
    from PyQt6.QtGui import QImage

    c, panel = panel_for(kapp, methods, "pixels", DOCKED)
    try:
        assert inside(panel, panel.error_label) and panel.message_label.isHidden()  # the error first
        c.set_error("")
        process_events(20)
        assert panel.error_label.isHidden() and inside(panel, panel.message_label)
        assert "pixels seed 1234 #2" in panel.message_label.text()
        c.set_message("")
        assert panel.message_label.isHidden()
        assert panel.preview.isHidden()
        img = QImage(64, 32, QImage.Format.Format_RGBA8888)
        img.fill(0xFF336699)
        c._on_preview(img)
        assert panel.preview.isHidden()  # no job runs: the canvas has the result
        c._set_busy(True)
        c._on_preview(img)
        process_events(20)
        assert inside(panel, panel.preview) and not panel.preview.pixmap().isNull()
        assert panel.preview.pixmap().width() == panel.PREVIEW_SIZE
        c._set_busy(False)  # the job ended: the thumbnail goes, its room goes back to the pages
        assert panel.preview.isHidden()
        c._set_busy(True)
        c._on_preview(None)
        assert panel.preview.isHidden()
    finally:
        panel.close()
        panel.deleteLater()
        c.deleteLater()


def wholly_above_footer(panel, widget) -> bool:
    """``widget`` is shown on the current page, inside the panel and above the pinned part."""
    if not widget.isVisibleTo(panel):
        return False
    top = widget.mapTo(panel, QPoint(0, 0)).y()
    return top >= 0 and top + widget.height() <= panel.footer.mapTo(panel, QPoint(0, 0)).y()


@pytest.mark.parametrize("size", [DOCKED], ids=["docked"])
def test_form_variants_and_history_show_without_scrolling(kapp, methods, size):
    """At the default docked size each page shows what it is for without scrolling: Edit the
    model, method and the edited layer's picker; Variants (taking the front when a result
    brings several) the whole strip and its button; History its newest passes and buttons."""
    from PyQt6.QtGui import QImage

    from analogon_krita.controller import Pass
    from analogon_krita.document.variants import Variant

    c, panel = panel_for(kapp, methods, "pixels", size)
    try:
        c.set_error("")
        process_events(20)
        assert panel.tabs.currentWidget() is panel.scroll
        viewport = panel.scroll.viewport()
        for w in (panel.model_combo, panel.method_combo, panel.pickers[c.target_role()]):
            top = w.mapTo(viewport, QPoint(0, 0)).y()
            assert top >= 0 and top + w.height() <= viewport.height(), w.objectName()
            assert wholly_above_footer(panel, w)
        # folding the layers brings the parameters up; the fold is remembered
        panel.roles_box.button.click()
        process_events(20)
        basic = [f.name for f in panel.form.fields if not f.advanced][:1]
        for name in basic:
            w = panel.form.editors[name]
            top = w.mapTo(viewport, QPoint(0, 0)).y()
            assert top >= 0 and top + w.height() <= viewport.height(), name
        assert c.settings.get_json("folded") == ["layers"]
        assert AnalogonPanel(c).roles_box.is_open() is False  # a new docker (window) keeps it
        panel.roles_box.button.click()
        assert c.settings.get_json("folded") == [] and panel.roles_box.body.isVisibleTo(panel)
        # the method's description on request
        assert not panel.method_help.isVisibleTo(panel) and panel.method_help.text()
        panel.help_button.click()
        process_events(20)
        assert panel.method_help.isVisibleTo(panel) and c.settings.get_bool("method_help")
        assert clipped_labels(panel) == []
        panel.help_button.click()
        thumb = QImage(32, 32, QImage.Format.Format_RGBA8888)
        thumb.fill(0xFF336699)
        c.variants = [Variant(f"\u03bb={k}, cfg=7.5", thumb, f"s{k}", f"dia seed 5 \u03bb={k}") for k in range(4)]
        c.picked = 0
        c.variantsChanged.emit()
        process_events(20)
        assert panel.tabs.currentWidget() is panel.variants_page
        assert panel.tabs.tabText(panel.tabs.currentIndex()) == "Variants (4)"
        strip = panel.variant_strip
        assert wholly_above_footer(panel, strip.list) and wholly_above_footer(panel, strip.keep_button)
        assert clipped_labels(panel) == []
        for k in range(3):
            c.history.insert(0, Pass("pixels", "PIXELS", {"steps": 4}, k, "tiny-sd", {}, f"id{k}",
                                     f"pixels seed {k}", [0, 0, 8, 8], False, thumb))
        c.historyChanged.emit()
        panel.tabs.setCurrentWidget(panel.history_page)
        process_events(20)
        assert panel.tabs.tabText(panel.tabs.currentIndex()) == "History (3)"
        listed = panel.history_list
        assert wholly_above_footer(panel, panel.again_button) and wholly_above_footer(panel, panel.source_button)
        first = listed.visualItemRect(listed.item(0))
        assert listed.viewport().rect().contains(first), "the newest pass is not shown whole"
        assert listed.mapTo(panel, QPoint(0, 0)).y() >= 0
        # the next job takes the variants away, and their page with them
        c.variants = []
        c.variantsChanged.emit()
        assert not panel.tabs.isTabVisible(panel.tabs.indexOf(panel.variants_page))
    finally:
        panel.close()
        panel.deleteLater()
        c.deleteLater()
