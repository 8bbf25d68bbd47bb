"""The "Analogon" docker: widgets bound to the :class:`Controller` (which does the work)."""
from __future__ import annotations

from . import models_ui
from .controller import SELECTION, Controller
from .forms import fields_from_schema
from .qt import QPixmap, Qt, QTimer, QtGui, QtWidgets, QIcon
from .widgets import LayerPicker, ParamForm, VariantStrip

QWidget = QtWidgets.QWidget


def plugin_icon(name: str) -> QIcon:
    """An SVG icon shipped in the package (icons/), or the repository's icons/ folder."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for folder in (here / "icons", here.parent.parent / "icons"):
        path = folder / f"{name}.svg"
        if path.exists():
            return QIcon(str(path))
    return QIcon()

_STATE_COLOURS = {"connected": "#3a9a3a", "starting": "#c08a00", "connecting": "#c08a00",
                  "unreachable": "#c0392b", "disconnected": "#808080"}


class AnalogonPanel(QWidget):
    """The docker's contents. Everything it shows comes from the controller's state."""

    def __init__(self, controller: Controller, parent: QWidget | None = None):
        super().__init__(parent)
        self.c = controller
        self._building = False
        self.pickers: dict[str, LayerPicker] = {}
        self._shown_variants: list = []

        outer = QtWidgets.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        lay = QtWidgets.QVBoxLayout(body)
        lay.setContentsMargins(4, 4, 4, 4)

        # connection
        row = QtWidgets.QHBoxLayout()
        self.status_dot = QtWidgets.QLabel("\u25cf")
        self.status_label = QtWidgets.QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setObjectName("connection_status")
        self.start_button = QtWidgets.QPushButton("Start backend")
        self.start_button.setToolTip("Start a local Analogon backend; it stops when Krita quits.")
        self.connect_button = QtWidgets.QToolButton()
        self.connect_button.setText("\u21bb")
        self.connect_button.setToolTip("Connect again")
        self.settings_button = QtWidgets.QToolButton()
        self.settings_button.setText("\u2699")
        self.settings_button.setToolTip("Backend settings")
        row.addWidget(self.status_dot, 0, Qt.AlignmentFlag.AlignTop)
        row.addWidget(self.status_label, 1)
        lay.addLayout(row)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.start_button, 1)
        row.addWidget(self.connect_button)
        row.addWidget(self.settings_button)
        lay.addLayout(row)

        form = QtWidgets.QFormLayout()
        self.model_combo = QtWidgets.QComboBox()
        self.model_combo.setEditable(True)
        self.model_combo.setToolTip("A model from the backend, a Hugging Face id, a diffusers folder "
                                    "or a .safetensors file. Empty: the backend's default.")
        self.model_combo.lineEdit().setPlaceholderText("(backend default)")
        form.addRow("Model", self.model_combo)
        self.model_hint = QtWidgets.QLabel()  # what to do when there is no checkpoint
        self.model_hint.setObjectName("model_hint")
        self.model_hint.setWordWrap(True)
        self.model_hint.hide()
        form.addRow(self.model_hint)
        self.method_combo = QtWidgets.QComboBox()
        self.method_combo.setObjectName("method")
        form.addRow("Method", self.method_combo)
        lay.addLayout(form)
        self.method_help = QtWidgets.QLabel()
        self.method_help.setWordWrap(True)
        font = self.method_help.font()
        font.setItalic(True)
        self.method_help.setFont(font)
        lay.addWidget(self.method_help)

        # roles
        self.roles_box = QtWidgets.QGroupBox("Layers")
        self.roles_form = QtWidgets.QFormLayout(self.roles_box)
        lay.addWidget(self.roles_box)
        row = QtWidgets.QHBoxLayout()
        self.edit_map_button = QtWidgets.QPushButton(plugin_icon("edit_map"), "New edit map")
        self.edit_map_button.setToolTip("Add a black grey-scale layer above the target. Paint white "
                                        "where the image may change; black keeps it.")
        self.progressive_check = QtWidgets.QCheckBox("One pass per exemplar")
        self.progressive_check.setToolTip("Run one pass per exemplar, each result feeding the next.")
        row.addWidget(self.edit_map_button)
        row.addWidget(self.progressive_check)
        row.addStretch(1)
        lay.addLayout(row)

        # parameters
        self.params_box = QtWidgets.QGroupBox("Parameters")
        pl = QtWidgets.QVBoxLayout(self.params_box)
        self.form = ParamForm()
        pl.addWidget(self.form)
        self.reset_button = QtWidgets.QPushButton("Defaults")
        pl.addWidget(self.reset_button, 0, Qt.AlignmentFlag.AlignRight)
        lay.addWidget(self.params_box)

        # seed + run
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("Seed"))
        self.seed_spin = QtWidgets.QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.random_check = QtWidgets.QCheckBox("Random")
        row.addWidget(self.seed_spin, 1)
        row.addWidget(self.random_check)
        lay.addLayout(row)
        row = QtWidgets.QHBoxLayout()
        self.generate_button = QtWidgets.QPushButton(plugin_icon("generate"), "Generate")
        self.generate_button.setObjectName("generate")
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.generate_button, 1)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("")
        lay.addWidget(self.progress)
        self.preview = QtWidgets.QLabel()
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setMinimumHeight(0)
        lay.addWidget(self.preview)
        self.error_label = QtWidgets.QLabel()
        self.error_label.setObjectName("error")
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #c0392b;")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.hide()
        lay.addWidget(self.error_label)
        self.message_label = QtWidgets.QLabel()
        self.message_label.setWordWrap(True)
        lay.addWidget(self.message_label)

        # variants of the latest result (a sweep): shown only when it has several
        self.variants_box = QtWidgets.QGroupBox("Variants")
        vl = QtWidgets.QVBoxLayout(self.variants_box)
        self.variant_strip = VariantStrip()
        vl.addWidget(self.variant_strip)
        self.variants_box.hide()
        lay.addWidget(self.variants_box)

        # history
        self.history_box = QtWidgets.QGroupBox("History")
        hl = QtWidgets.QVBoxLayout(self.history_box)
        self.history_list = QtWidgets.QListWidget()
        self.history_list.setIconSize(QtGui.QPixmap(48, 48).size())
        self.history_list.setMaximumHeight(160)
        hl.addWidget(self.history_list)
        row = QtWidgets.QHBoxLayout()
        self.again_button = QtWidgets.QPushButton("Apply again")
        self.source_button = QtWidgets.QPushButton("Use as next source")
        row.addWidget(self.again_button)
        row.addWidget(self.source_button)
        hl.addLayout(row)
        lay.addWidget(self.history_box)
        lay.addStretch(1)

        # bindings: widgets -> controller
        self.start_button.clicked.connect(self._on_start)
        self.connect_button.clicked.connect(lambda: self.c.connect_backend())
        self.settings_button.clicked.connect(self.open_settings)
        self.model_combo.currentTextChanged.connect(self._on_model)
        self.method_combo.currentIndexChanged.connect(self._on_method)
        self.edit_map_button.clicked.connect(lambda: self.c.new_edit_map())
        self.progressive_check.toggled.connect(self.c.set_progressive)
        self.form.changed.connect(lambda n, v: self.c.set_param(n, v))
        self.reset_button.clicked.connect(self._on_reset)
        self.seed_spin.valueChanged.connect(lambda v: self.c.set_seed(v))
        self.random_check.toggled.connect(self._on_random)
        self.generate_button.clicked.connect(lambda: self.c.generate())
        self.cancel_button.clicked.connect(self.c.cancel)
        self.again_button.clicked.connect(lambda: self.c.apply_again(self.history_list.currentRow()))
        self.source_button.clicked.connect(lambda: self.c.use_as_source(self.history_list.currentRow()))
        self.variant_strip.picked.connect(self._on_variant)
        self.variant_strip.keep.connect(lambda i: self.c.add_variant_as_layer(i))

        # bindings: controller -> widgets
        c = self.c
        c.connectionChanged.connect(self._show_connection)
        c.methodsChanged.connect(self._show_methods)
        c.modelsChanged.connect(self._show_models)
        c.methodChanged.connect(lambda _: self._show_models())  # what the method can use
        c.methodChanged.connect(lambda _: self._show_method())
        c.paramsChanged.connect(lambda mid: self._show_method() if mid == self.c.method_id else None)
        c.rolesChanged.connect(self._show_roles)
        c.layersChanged.connect(self._show_roles)
        c.busyChanged.connect(self._show_busy)
        c.progressChanged.connect(self._show_progress)
        c.previewChanged.connect(self._show_preview)
        c.errorChanged.connect(self._show_error)
        c.messageChanged.connect(self.message_label.setText)
        c.historyChanged.connect(self._show_history)
        c.variantsChanged.connect(self._show_variants)

        self._layer_timer = QTimer(self)
        self._layer_timer.setInterval(1500)
        self._layer_timer.timeout.connect(lambda: self.c.refresh_layers())
        self._layer_timer.start()

        self.seed_spin.setValue(c.seed)
        self.random_check.setChecked(c.random_seed)
        self.seed_spin.setEnabled(not c.random_seed)
        self.progressive_check.setChecked(c.progressive)
        self._show_connection(c.connection, c.connection_message)
        self._show_methods()
        self._show_models()
        self._show_history()
        self._show_variants()
        self._show_busy(c.busy)

    # -- controller -> widgets ------------------------------------------------------------
    def _show_connection(self, state: str, message: str):
        self.status_dot.setStyleSheet(f"color: {_STATE_COLOURS.get(state, '#808080')};")
        self.status_label.setText(message)
        self.status_label.setToolTip(message)
        running = self.c.process.running
        self.start_button.setText("Stop backend" if running else "Start backend")
        self.start_button.setToolTip("Stop the backend this panel started." if running else
                                     "Start a local Analogon backend; it stops when Krita quits.")
        self.start_button.setEnabled(running or state != "starting")

    def _show_methods(self):
        self._building = True
        self.method_combo.clear()
        for m in self.c.methods:
            self.method_combo.addItem(m.get("title") or m["id"], m["id"])
            self.method_combo.setItemData(self.method_combo.count() - 1, m.get("description", ""),
                                          Qt.ItemDataRole.ToolTipRole)
        idx = self.method_combo.findData(self.c.method_id)
        self.method_combo.setCurrentIndex(max(0, idx))
        self._building = False
        self._show_method()

    def _show_models(self):
        self._building = True
        models_ui.fill_combo(self.model_combo, self.c.models, self.c.method_id, self.c.model,
                             self.c.settings.get_bool("show_developer_models"))
        if self.c.default_model:
            self.model_combo.lineEdit().setPlaceholderText(f"(backend default: {self.c.default_model})")
        hint = models_ui.help_text(self.c.models, self.c.models_info) if self.c.models else ""
        self.model_hint.setText(hint)
        self.model_hint.setVisible(bool(hint))
        self._building = False

    def _show_method(self):
        desc = self.c.method()
        idx = self.method_combo.findData(self.c.method_id)
        if idx >= 0 and idx != self.method_combo.currentIndex():
            self._building = True
            self.method_combo.setCurrentIndex(idx)
            self._building = False
        if desc is None:
            self.method_help.setText("Connect to the backend to see its methods.")
            self.form.build([], {})
            self._rebuild_pickers()
            return
        self.method_help.setText(desc.get("description", ""))
        self.method_help.setToolTip(desc.get("help", ""))
        self.form.build(fields_from_schema(desc.get("params")), self.c.param_values())
        self.progressive_check.setVisible(self.c.multiple_image_role(desc) is not None)
        self._rebuild_pickers()

    def _rebuild_pickers(self):
        while self.roles_form.rowCount():
            self.roles_form.removeRow(0)
        self.pickers = {}
        desc = self.c.method()
        if desc is None:
            return
        target = self.c.target_role(desc)
        for role in desc.get("roles", []):
            picker = LayerPicker(role)
            picker.picked.connect(lambda name, ids: self.c.set_role(name, ids))
            title = role.get("title") or role["name"]
            if role["name"] == target:
                title += " (edited)"
            label = QtWidgets.QLabel(title + ("" if role.get("required") else " \u2014 optional"))
            label.setToolTip(role.get("help", ""))
            self.roles_form.addRow(label, picker)
            self.pickers[role["name"]] = picker
        self._show_roles()

    def _show_roles(self):
        if not self.pickers:
            return
        layers = self.c.layers()
        roles = self.c.roles() if self.c.method() else {}
        for name, picker in self.pickers.items():
            picker.set_layers(layers, roles.get(name, []), SELECTION)

    def _show_busy(self, busy: bool):
        self.generate_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy:
            self.progress.setRange(0, 0)
            self.progress.setFormat("starting\u2026")

    def _show_progress(self, stage: str, step: int, total: int):
        if not self.c.busy:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("")
            return
        if total and total > 0 and step >= 0:
            self.progress.setRange(0, total)
            self.progress.setValue(min(step, total))
            self.progress.setFormat(f"{stage} {step}/{total}")
        else:
            self.progress.setRange(0, 0)
            self.progress.setFormat(stage)

    def _show_preview(self, image):
        if image is None:
            self.preview.clear()
            return
        pix = QPixmap.fromImage(image).scaled(192, 192, Qt.AspectRatioMode.KeepAspectRatio,
                                              Qt.TransformationMode.SmoothTransformation)
        self.preview.setPixmap(pix)

    def _show_error(self, text: str):
        self.error_label.setText(text)
        self.error_label.setVisible(bool(text))

    def _show_history(self):
        self.history_list.clear()
        for entry in self.c.history:
            item = QtWidgets.QListWidgetItem(entry.summary())
            item.setToolTip("\n".join(f"{k}: {v}" for k, v in sorted(entry.params.items())))
            if entry.thumbnail is not None:
                item.setIcon(QIcon(QPixmap.fromImage(entry.thumbnail)))
            self.history_list.addItem(item)
        if self.c.history:
            self.history_list.setCurrentRow(0)
        self.history_box.setVisible(bool(self.c.history))

    def _show_variants(self):
        variants = list(self.c.variants)
        same = len(variants) == len(self._shown_variants) and all(
            a is b for a, b in zip(variants, self._shown_variants))
        if same:  # only the pick changed: keep the strip (and where it is scrolled to)
            self.variant_strip.set_picked(self.c.picked)
        else:
            self.variant_strip.set_variants([(v.label, v.thumbnail) for v in variants], self.c.picked)
            self._shown_variants = variants
        self.variants_box.setTitle(f"Variants ({len(variants)})")
        self.variants_box.setVisible(len(variants) > 1)

    # -- widgets -> controller ------------------------------------------------------------
    def _on_variant(self, index: int):
        self.c.pick_variant(index)
        self.variant_strip.set_picked(self.c.picked)  # back to the shown one if it failed

    def _on_start(self):
        if self.c.process.running:
            self.c.stop_backend()
        else:
            self.c.start_backend()

    def _on_model(self, text: str):
        if self._building:
            return
        idx = self.model_combo.findText(text)
        model = self.model_combo.itemData(idx) if idx >= 0 else text
        self.c.set_model(model or "")

    def _on_method(self, idx: int):
        if self._building or idx < 0:
            return
        self.c.set_method(self.method_combo.itemData(idx))

    def _on_reset(self):
        self.c.reset_params()
        self._show_method()

    def _on_random(self, on: bool):
        self.seed_spin.setEnabled(not on)
        self.c.set_seed(self.seed_spin.value(), on)

    def open_settings(self):
        dlg = SettingsDialog(self.c, self)
        if dlg.exec_() if hasattr(dlg, "exec_") else dlg.exec():
            dlg.save()
            self.c.connect_backend()


class SettingsDialog(QtWidgets.QDialog):
    KEYS = (("backend_command", "Backend command", "Command that starts the backend, e.g. "
             "/home/me/analogon/.venv/bin/analogon (empty: analogon on PATH)"),
            ("backend_url", "Backend address", "e.g. http://127.0.0.1:7871 (empty: read from server.json)"),
            ("state_dir", "Backend state folder", "Where a backend you started yourself writes "
             "server.json with its token (empty: the default)"),
            ("padding", "Selection padding (px)", "Context around the selection sent to the backend"),
            ("feather", "Feather (px)", "Softness of the selection edge when the result is placed"))

    def __init__(self, controller: Controller, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Analogon settings")
        self.c = controller
        lay = QtWidgets.QFormLayout(self)
        self.edits = {}
        for key, label, tip in self.KEYS:
            e = QtWidgets.QLineEdit(self.c.settings.get(key))
            e.setToolTip(tip)
            e.setPlaceholderText(tip.split(" (")[0] if key != "backend_command" else "analogon")
            lay.addRow(label, e)
            self.edits[key] = e
        self.autostart = QtWidgets.QCheckBox("Start the backend with Krita")
        self.autostart.setChecked(self.c.settings.get_bool("autostart"))
        lay.addRow("", self.autostart)
        self.format = QtWidgets.QComboBox()
        self.format.addItem("Raw RGBA (fast)", "rgba")
        self.format.addItem("PNG (smaller)", "png")
        self.format.setCurrentIndex(max(0, self.format.findData(self.c.settings.get("image_format"))))
        lay.addRow("Upload format", self.format)
        from .backend_setup import BackendSetup

        self.setup = BackendSetup(self.c, parent=self)  # install, memory, models
        lay.addRow(self.setup)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Ok
                                             | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay.addRow(buttons)

    def save(self):
        for key, e in self.edits.items():
            self.c.settings.set(key, e.text().strip())
        self.c.settings.set("autostart", self.autostart.isChecked())
        self.c.settings.set("image_format", self.format.currentData())
        self.setup.save()


def make_docker_class():
    """The DockWidget subclass (needs the ``krita`` module, so it is made on demand)."""
    from krita import DockWidget, Krita

    class AnalogonDocker(DockWidget):
        def __init__(self):
            super().__init__()
            self.setWindowTitle("Analogon")
            self.setWindowIcon(plugin_icon("analogon"))
            self.controller = Controller.instance()
            self.panel = AnalogonPanel(self.controller, self)
            self.setWidget(self.panel)
            QTimer.singleShot(0, self.controller.start_monitoring)

        def canvasChanged(self, canvas):
            doc = None
            try:
                if canvas is not None and canvas.view() is not None:
                    doc = canvas.view().document()
            except Exception:
                doc = None
            if doc is None:
                doc = Krita.instance().activeDocument()
            self.controller.set_document(doc)

    return AnalogonDocker
