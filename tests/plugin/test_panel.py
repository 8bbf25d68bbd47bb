"""Forms from JSON schemas and the docker's widgets bound to the controller (offscreen)."""
from __future__ import annotations

import pytest
import schemas
from PyQt6 import QtWidgets

from analogon_krita.controller import Controller, Pass
from analogon_krita.ui.forms import FormError, coerce, coerce_all, fields_from_schema
from analogon_krita.ui.panel import AnalogonPanel, make_docker_class
from analogon_krita.ui.widgets import ParamForm


def by_name(fields):
    return {f.name: f for f in fields}


def test_fields_from_pydantic_schema():
    f = by_name(fields_from_schema(schemas.PixelsParams.model_json_schema()))
    assert list(f) == ["prompt", "steps", "strength", "scheduler", "crop_to_edit", "eta", "caption",
                       "aesthetic_score"]
    assert f["aesthetic_score"].only_for == ["sdxl-refiner"] and f["steps"].only_for == []
    assert (f["steps"].kind, f["steps"].minimum, f["steps"].maximum, f["steps"].default) == ("int", 1, 200, 50)
    assert f["strength"].kind == "float" and f["strength"].spin_range() == (0.0, 1.0)
    assert f["scheduler"].kind == "enum" and f["scheduler"].choices == ["ddim", "euler", "dpmpp_2m"]
    assert f["crop_to_edit"].kind == "bool" and f["crop_to_edit"].default is True
    assert f["eta"].exclusive_min and f["eta"].exclusive_max and 0 < f["eta"].spin_range()[0] < 0.01
    assert f["caption"].kind == "str" and f["caption"].nullable
    assert f["prompt"].multiline
    assert "Denoising steps." in f["steps"].tooltip and "1 \u2026 200" in f["steps"].tooltip
    dia = by_name(fields_from_schema(schemas.DiaParams.model_json_schema()))
    assert dia["lam"].title == "Lambda"


def test_enum_through_ref_and_coercion():
    schema = {"$defs": {"Mode": {"enum": ["a", "b"], "type": "string", "title": "Mode"}},
              "properties": {"mode": {"$ref": "#/$defs/Mode", "default": "a", "description": "d"},
                             "n": {"type": "integer", "exclusiveMinimum": 0, "default": 1},
                             "xs": {"type": "array", "items": {"type": "number"}, "default": [1, 2]}}}
    f = by_name(fields_from_schema(schema))
    assert f["mode"].kind == "enum" and f["mode"].choices == ["a", "b"] and f["mode"].description == "d"
    assert f["xs"].kind == "json"
    assert coerce(f["xs"], "[3, 4]") == [3, 4]
    with pytest.raises(FormError, match="below the allowed range"):
        coerce(f["n"], 0)
    with pytest.raises(FormError, match="choose one of a, b"):
        coerce(f["mode"], "c")
    with pytest.raises(FormError, match="not a number"):
        coerce(f["n"], "many")
    assert coerce_all(list(f.values()), {"n": "3", "stale_key": 1}) == {"mode": "a", "n": 3, "xs": [1, 2]}


def test_param_form_widgets_follow_the_schema():
    form = ParamForm()
    fields = fields_from_schema(schemas.PixelsParams.model_json_schema())
    form.build(fields, {"steps": 12})
    steps = form.editors["steps"]
    assert isinstance(steps, QtWidgets.QSpinBox) and (steps.minimum(), steps.maximum(), steps.value()) == (1, 200, 12)
    assert "Denoising steps." in steps.toolTip()
    sched = form.editors["scheduler"]
    assert isinstance(sched, QtWidgets.QComboBox) and sched.count() == 3 and sched.currentText() == "euler"
    assert isinstance(form.editors["crop_to_edit"], QtWidgets.QCheckBox)
    assert isinstance(form.editors["strength"], QtWidgets.QDoubleSpinBox)
    changes = []
    form.changed.connect(lambda n, v: changes.append((n, v)))
    sched.setCurrentIndex(2)
    steps.setValue(30)
    form.editors["caption"].setText("")
    assert ("scheduler", "dpmpp_2m") in changes and ("steps", 30) in changes
    assert form.values()["caption"] is None


def offline(kapp):
    c = Controller(app=kapp)
    c.methods = [dict(m) for m in schemas.METHODS]
    c.method_id = "pixels"
    return c


def test_panel_builds_method_form_and_role_pickers(kapp):
    doc = kapp.createDocument(16, 16, "t", "RGBA", "U8", "", 72)
    kapp.setActiveDocument(doc)
    n = doc.createNode("photo", "paintlayer")
    doc.rootNode().addChildNode(n, None)
    doc.setActiveNode(n)
    c = offline(kapp)
    panel = AnalogonPanel(c)
    c.methodsChanged.emit()
    assert panel.method_combo.count() == 2 and panel.method_combo.currentData() == "pixels"
    assert set(panel.pickers) == {"source", "exemplar", "edit_map", "mask"}
    assert panel.pickers["source"].chosen() == [str(n.uniqueId())]
    assert panel.pickers["mask"].combo.currentText() == "(current selection)"
    assert panel.pickers["exemplar"].list is not None  # several layers: a checkable list
    assert "steps" in panel.form.editors and panel.progressive_check.isVisibleTo(panel)
    panel.form.editors["steps"].setValue(9)
    assert c.param_values()["steps"] == 9
    panel.method_combo.setCurrentIndex(1)
    assert c.method_id == "dia" and set(panel.pickers) == {"a", "a_prime", "b", "edit_map", "mask"}
    assert "lam" in panel.form.editors and not panel.progressive_check.isVisibleTo(panel)


def test_fields_for_one_model_variant_show_only_with_that_model(kapp):
    """The refiner's aesthetic score is in the form when the chosen model is a refiner, not
    for other models; with a model the backend did not list, every field is there."""
    c = offline(kapp)
    c.models = [{"id": "base.safetensors", "variant": "sdxl"},
                {"id": "refiner.safetensors", "variant": "sdxl-refiner"}]
    panel = AnalogonPanel(c)
    c.methodsChanged.emit()
    c.set_model("base.safetensors")
    assert "aesthetic_score" not in panel.form.editors and "steps" in panel.form.editors
    c.set_model("refiner.safetensors")
    assert "aesthetic_score" in panel.form.editors
    c.set_model("/somewhere/else.safetensors")
    assert "aesthetic_score" in panel.form.editors


def test_panel_shows_errors_connection_and_history(kapp):
    from PyQt6.QtGui import QImage

    c = offline(kapp)
    panel = AnalogonPanel(c)
    assert panel.error_label.isHidden()
    c.set_error("The layer \u201cx\u201d chosen for Source is hidden. Show it, or pick another layer.")
    assert not panel.error_label.isHidden() and "is hidden" in panel.error_label.text()
    c.settings.set("backend_url", "http://127.0.0.1:9")  # a backend the painter runs there
    c.link.set_state("unreachable", "The Analogon backend is not running at http://127.0.0.1:9 (connection refused).")
    assert panel.status_label.text().startswith("The Analogon backend is not running at http://127.0.0.1:9")
    c._set_busy(True)
    assert not panel.generate_button.isEnabled() and panel.cancel_button.isEnabled()
    c.progressChanged.emit("denoise", 3, 10)
    assert panel.progress.maximum() == 10 and panel.progress.value() == 3 and "denoise 3/10" in panel.progress.format()
    c._set_busy(False)
    img = QImage(8, 8, QImage.Format.Format_RGBA8888)
    c.history.insert(0, Pass("pixels", "PIXELS", {"steps": 4}, 5, "tiny-sd", {}, "id", "pixels seed 5",
                             [0, 0, 8, 8], False, img))
    c.historyChanged.emit()
    assert panel.history_list.count() == 1 and "pixels seed 5" in panel.history_list.item(0).text()
    assert not panel.history_list.item(0).icon().isNull()


def test_docker_registration_and_canvas_following(kapp):
    import krita

    import analogon_krita.extension as ext

    kapp.docker_factories.clear()
    ext.register()
    assert kapp.docker_factories and kapp.docker_factories[0].id == "analogon_docker"
    assert kapp.docker_factories[0].pos is krita.DockWidgetFactoryBase.DockPosition.DockRight
    Docker = make_docker_class()
    Controller._instance = None
    dock = Docker()
    assert dock.windowTitle() == "Analogon" and isinstance(dock.panel, AnalogonPanel)
    doc = kapp.createDocument(8, 8, "t", "RGBA", "U8", "", 72)
    kapp.setActiveDocument(doc)
    dock.canvasChanged(None)
    assert dock.controller.document() is doc
    Controller._instance = None


# -- the first screen (lead.py shown by the panel) -----------------------------------------------

@pytest.fixture
def bare(monkeypatch, tmp_path):
    """A fresh profile on a computer with no backend anywhere the docker looks, and a plugin
    that carries the backend wheel (the release zip)."""
    from analogon_krita.install.installer import Installer

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANALOGON_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    wheel = tmp_path / "analogon-0.4.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    return Installer(wheel=wheel, log_path=tmp_path / "install.log")


def shown_panel(c, installer, size=(262, 228)):
    from conftest import process_events

    panel = AnalogonPanel(c, installer=installer)
    panel.resize(*size)
    panel.show()
    process_events(30)
    return panel


def inside(panel, widget) -> bool:
    from PyQt6.QtCore import QPoint, QRect

    return widget.isVisibleTo(panel) and panel.rect().contains(
        QRect(widget.mapTo(panel, QPoint(0, 0)), widget.size()))


def test_a_fresh_profile_is_led_to_install_the_backend(kapp, bare):
    c = offline(kapp)
    c.link.reason = "unreachable"
    c.link.set_state("unreachable", "The Analogon backend is not running at http://127.0.0.1:7871 "
                                    "(connection refused).")
    panel = shown_panel(c, bare)
    try:
        text = panel.status_label.text()
        assert text.startswith("The Analogon backend is not installed yet. Install backend sets it up")
        assert "command" not in text and "refused" not in text
        assert panel.start_button.text() == "Install backend" and inside(panel, panel.start_button)
        assert "#808080" in panel.status_dot.styleSheet()  # not red: nothing is broken
        panel.start_button.click()
        dlg = panel._install_dialog
        assert dlg is not None and dlg.isVisible() and dlg.pane.install_button.isEnabled()
        assert "0.4.0" in dlg.pane.install_status.text()
        assert panel.open_install() is dlg  # one window per docker
        dlg.close()
    finally:
        panel.deleteLater()


def test_a_good_install_starts_the_backend_and_the_red_text_goes(kapp, bare):
    c = offline(kapp)
    c.link.set_state("unreachable", "The Analogon backend is not running at http://127.0.0.1:7871 "
                                    "(connection refused).")
    panel = shown_panel(c, bare)
    started = []
    c.start_backend = lambda: started.append(True)
    try:
        c.set_error("Cannot generate: the Analogon backend is not installed yet. Press \u201cInstall backend\u201d above.")
        exe = bare.venv / "bin" / "analogon"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        bare.finished.emit(True, "Installed the Analogon backend 0.4.0.")
        assert started == [True] and c.error == "" and panel.error_label.isHidden()
        assert panel.status_label.text().startswith("The Analogon backend is installed but not running")
        assert panel.start_button.text() == "Start backend"
        # a failed install says why, where the painter looks
        bare.finished.emit(False, "Installing PyTorch (cpu) failed (exit code 1). See the log: /x/install.log")
        assert started == [True] and c.error.startswith("Installing PyTorch (cpu) failed")
    finally:
        panel.deleteLater()


def test_an_install_in_progress_shows_in_the_docker(kapp, bare):
    c = offline(kapp)
    panel = shown_panel(c, bare)
    try:
        bare.running = True
        bare.progress.emit(42, "Installing PyTorch (cpu): 812 / 2300 MB, 14.2 MB/s")
        assert panel.status_label.text() == "Installing the backend: Installing PyTorch (cpu): 812 / 2300 MB, 14.2 MB/s"
        assert panel.install_bar.isVisibleTo(panel) and panel.install_bar.value() == 42
        assert panel.start_button.text() == "Show progress"
        bare.running = False
    finally:
        panel.deleteLater()


def test_settings_keep_the_developer_fields_under_advanced(kapp, bare):
    from analogon_krita.ui.backend_setup import ADVANCED, SettingsDialog

    c = offline(kapp)
    dlg = SettingsDialog(c, installer=bare)
    tabs = dlg.setup
    assert [tabs.tabText(i) for i in range(tabs.count())] == ["Backend", "Connection", "Memory", "Models",
                                                              "Advanced"]
    assert tabs.currentIndex() == 0 and not tabs.widget(0).findChildren(QtWidgets.QLineEdit)
    advanced = tabs.widget(4)
    assert set(tabs.edits) == {k for k, *_ in ADVANCED} == {"backend_command", "backend_url", "state_dir",
                                                             "padding", "feather"}
    assert all(advanced.isAncestorOf(e) for e in tabs.edits.values()) and advanced.isAncestorOf(tabs.format)
    tabs.edits["backend_url"].setText(" http://127.0.0.1:7871 ")
    tabs.format.setCurrentIndex(tabs.format.findData("png"))
    tabs.autostart.setChecked(True)
    dlg.save()
    assert c.settings.get("backend_url") == "http://127.0.0.1:7871" and c.settings.get("upload_format") == "png"
    assert c.settings.get_bool("autostart")
