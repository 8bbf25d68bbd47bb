"""The "Analogon" docker: widgets bound to the :class:`Controller` (which does the work)."""
from __future__ import annotations

from ..controller import Controller
from ..document.roles import SELECTION
from ..install import installer as inst
from ..link import remote
from ..qt import QIcon, QPixmap, Qt, QTimer, QtGui, QtWidgets, QUrl
from . import lead as lead_mod
from . import models_ui
from .forms import fields_from_schema, for_model, wrap_tooltip
from .widgets import (LayerPicker, ParamForm, Section, VariantStrip, form_layout, narrow_combo,
                      scroll_area, set_tip, wrapped_label)

QWidget = QtWidgets.QWidget


def plugin_icon(name: str) -> QIcon:
    """An SVG icon shipped in the package (icons/), or the repository's icons/ folder."""
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent  # the package folder (analogon_krita/)
    for folder in (here / "icons", here.parent.parent / "icons"):
        path = folder / f"{name}.svg"
        if path.exists():
            return QIcon(str(path))
    return QIcon()

_STATE_COLOURS = {"connected": "#3a9a3a", "starting": "#c08a00", "connecting": "#c08a00",
                  "unreachable": "#c0392b", "disconnected": "#808080"}


class AnalogonPanel(QWidget):
    """The docker's contents. Everything it shows comes from the controller's state."""

    PREVIEW_SIZE = 40  # the docker's thumbnail of the running job (the canvas shows it large)

    def __init__(self, controller: Controller, parent: QWidget | None = None,
                 installer: "inst.Installer | None" = None):
        super().__init__(parent)
        self.c = controller
        self.installer = installer if installer is not None else inst.shared()
        self._install_dialog = None
        self.trust = remote.TrustPrompt(controller.link, self)  # a remote backend's certificate
        self._lead_asked = False  # the painter opened the lead with the dot (it folds when connected)
        self._building = False
        self.pickers: dict[str, LayerPicker] = {}
        self._shown_variants: list = []

        # Krita's default docker is about 260 px wide and 160 to 230 px high. Pinned at the
        # bottom: Generate / Cancel, the connection's dot and the settings, the progress while a
        # job runs, the latest message or error. Above them one page at a time: Edit (the
        # lead when there is no backend, then model, method, layers, parameters; it scrolls),
        # Variants (of the latest result, when it has several) and History.
        outer = QtWidgets.QVBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        outer.setSpacing(4)
        self.tabs = QtWidgets.QTabWidget()
        self.tabs.setObjectName("panel_tabs")
        self.tabs.setDocumentMode(True)  # no frame around the pages: the room is theirs
        self.tabs.setUsesScrollButtons(False)
        self.tabs.setElideMode(Qt.TextElideMode.ElideRight)
        outer.addWidget(self.tabs, 1)

        # -- Edit -----------------------------------------------------------------------------
        self.scroll = scroll_area("panel_scroll")
        self.tabs.addTab(self.scroll, "Edit")
        body = QWidget()
        body.setObjectName("panel_body")
        self.scroll.setWidget(body)
        lay = QtWidgets.QVBoxLayout(body)
        lay.setContentsMargins(0, 2, 0, 0)
        lay.setSpacing(4)

        # the lead: the connection's state, its cause and the next step (lead.py), first thing
        # in the scrolled part
        self.lead_box = QWidget()
        self.lead_box.setObjectName("lead")
        ll = QtWidgets.QVBoxLayout(self.lead_box)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.setSpacing(2)
        self.status_label = wrapped_label()
        self.status_label.setObjectName("connection_status")
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        ll.addWidget(self.status_label)
        self.install_bar = QtWidgets.QProgressBar()  # an install the docker started
        self.install_bar.setObjectName("install_progress")
        self.install_bar.setRange(0, 100)
        self.install_bar.setTextVisible(False)
        self.install_bar.setMaximumHeight(8)
        self.install_bar.hide()
        ll.addWidget(self.install_bar)
        row = QtWidgets.QHBoxLayout()
        row.setSpacing(2)
        self.start_button = QtWidgets.QPushButton("Start backend")  # the lead's action
        self.start_button.setObjectName("lead_action")
        self.connect_button = QtWidgets.QToolButton()
        self.connect_button.setText("\u21bb")
        set_tip(self.connect_button, "Connect again")
        self.log_button = QtWidgets.QToolButton()
        self.log_button.setObjectName("open_log")
        self.log_button.setText("Log")
        row.addWidget(self.start_button, 1)
        row.addStretch(0)
        row.addWidget(self.connect_button)
        row.addWidget(self.log_button)
        ll.addLayout(row)
        lay.addWidget(self.lead_box)

        form = form_layout()
        self.model_combo = narrow_combo(QtWidgets.QComboBox())
        self.model_combo.setEditable(True)
        set_tip(self.model_combo, (
            "A model from the backend, a Hugging Face id, a diffusers folder or a .safetensors "
            "file. Empty: the backend's default."))
        self.model_combo.lineEdit().setPlaceholderText("(backend default)")
        form.addRow("Model", self.model_combo)
        self.model_hint = QtWidgets.QLabel()  # what to do when there is no checkpoint
        self.model_hint.setObjectName("model_hint")
        self.model_hint.setWordWrap(True)
        self.model_hint.hide()
        form.addRow(self.model_hint)
        self.method_combo = narrow_combo(QtWidgets.QComboBox())
        self.method_combo.setObjectName("method")
        self.help_button = QtWidgets.QToolButton()  # the method's description, on request
        self.help_button.setObjectName("method_help_toggle")
        self.help_button.setText("?")
        self.help_button.setCheckable(True)
        set_tip(self.help_button, "What this method does and which layers it uses.")
        row = QtWidgets.QHBoxLayout()
        row.setSpacing(2)
        row.addWidget(self.method_combo, 1)
        row.addWidget(self.help_button)
        form.addRow("Method", row)
        lay.addLayout(form)
        self.method_help = wrapped_label()
        self.method_help.setObjectName("method_help")
        font = self.method_help.font()
        font.setItalic(True)
        self.method_help.setFont(font)
        lay.addWidget(self.method_help)

        # the layers of each role; folds away once they are right
        self.roles_box = Section("Layers", "layers", bold=True)
        self.roles_form = form_layout()
        self.roles_box.body_layout.addLayout(self.roles_form)
        self.edit_map_button = QtWidgets.QPushButton(plugin_icon("edit_map"), "New edit map")
        set_tip(self.edit_map_button, (
            "Add a black grey-scale layer above the target. Paint white where the image may "
            "change; black keeps it."))
        self.progressive_check = QtWidgets.QCheckBox("One pass per exemplar")
        set_tip(self.progressive_check, "Run one pass per exemplar, each result feeding the next.")
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.edit_map_button)
        row.addStretch(1)
        self.roles_box.body_layout.addLayout(row)
        self.roles_box.body_layout.addWidget(self.progressive_check)
        lay.addWidget(self.roles_box)

        # parameters: the few a painter touches, the rest under Advanced; the seed
        self.params_box = Section("Parameters", "parameters", bold=True)
        self.form = ParamForm()
        self.params_box.body_layout.addWidget(self.form)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("Seed"))
        self.seed_spin = QtWidgets.QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.random_check = QtWidgets.QCheckBox("Random")
        row.addWidget(self.seed_spin, 1)
        row.addWidget(self.random_check)
        self.params_box.body_layout.addLayout(row)
        self.reset_button = QtWidgets.QPushButton("Defaults")
        set_tip(self.reset_button, "Set every parameter of this method to its default.")
        self.params_box.body_layout.addWidget(self.reset_button, 0, Qt.AlignmentFlag.AlignRight)
        lay.addWidget(self.params_box)
        lay.addStretch(1)
        folded = set(self.c.settings.get_json("folded", []) or [])
        for section in (self.roles_box, self.params_box):
            section.set_open(section.body.objectName() not in folded)
            section.toggled.connect(self._remember_folds)
        self.help_button.setChecked(self.c.settings.get_bool("method_help"))
        self.method_help.setVisible(self.help_button.isChecked())

        # -- Variants of the latest result (a sweep): a page only while it has several --------
        self.variants_box = QWidget()
        self.variants_box.setObjectName("variants_page")
        vl = QtWidgets.QVBoxLayout(self.variants_box)
        vl.setContentsMargins(0, 2, 0, 0)
        self.variant_strip = VariantStrip()
        vl.addWidget(self.variant_strip)
        vl.addStretch(1)
        self.variants_page = scroll_area("variants_scroll")  # each page gives way in a low docker
        self.variants_page.setWidget(self.variants_box)
        self.tabs.addTab(self.variants_page, "Variants")
        self.tabs.setTabVisible(self.tabs.indexOf(self.variants_page), False)

        # -- History ----------------------------------------------------------------------------
        self.history_box = QWidget()
        self.history_box.setObjectName("history_page")
        hl = QtWidgets.QVBoxLayout(self.history_box)
        hl.setContentsMargins(0, 2, 0, 0)
        hl.setSpacing(2)
        self.history_list = QtWidgets.QListWidget()
        self.history_list.setObjectName("history")
        self.history_list.setIconSize(QtGui.QPixmap(40, 40).size())
        self.history_list.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.history_list.setMinimumHeight(0)
        set_tip(self.history_list, "Every pass of this document, newest first: its layer, method, "
                                   "seed and parameters (hover one).")
        hl.addWidget(self.history_list, 1)
        row = QtWidgets.QHBoxLayout()
        self.again_button = QtWidgets.QPushButton("Apply again")
        set_tip(self.again_button, "Run this pass again: the same method, parameters, seed and layers.")
        self.source_button = QtWidgets.QPushButton("Use as source")
        set_tip(self.source_button, "Make this result the edited layer of the next pass.")
        row.addWidget(self.again_button)
        row.addWidget(self.source_button)
        hl.addLayout(row)
        self.history_page = scroll_area("history_scroll")
        self.history_page.setWidget(self.history_box)
        self.tabs.addTab(self.history_page, "History")

        # -- pinned bottom: run, progress, the latest message -------------------------------
        footer = QWidget()
        footer.setObjectName("panel_footer")
        fl = QtWidgets.QVBoxLayout(footer)
        fl.setContentsMargins(0, 0, 0, 0)
        fl.setSpacing(2)
        row = QtWidgets.QHBoxLayout()
        row.setSpacing(4)
        self.preview = QtWidgets.QLabel()
        self.preview.setObjectName("preview")
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setFixedSize(self.PREVIEW_SIZE, self.PREVIEW_SIZE)
        self.preview.hide()
        row.addWidget(self.preview)
        col = QtWidgets.QVBoxLayout()
        col.setSpacing(2)
        buttons = QtWidgets.QHBoxLayout()
        self.generate_button = QtWidgets.QPushButton(plugin_icon("generate"), "Generate")
        self.generate_button.setObjectName("generate")
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.setObjectName("cancel")
        self.cancel_button.setEnabled(False)
        buttons.addWidget(self.generate_button, 1)
        buttons.addWidget(self.cancel_button)
        self.status_dot = QtWidgets.QToolButton()  # the connection: its colour, its lead
        self.status_dot.setObjectName("connection_dot")
        self.status_dot.setText("\u25cf")
        self.status_dot.setAutoRaise(True)
        self.settings_button = QtWidgets.QToolButton()
        self.settings_button.setObjectName("settings")
        self.settings_button.setText("\u2699")
        set_tip(self.settings_button, "Settings: the backend (install, update), memory, models, advanced")
        buttons.addWidget(self.status_dot)
        buttons.addWidget(self.settings_button)
        col.addLayout(buttons)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("")
        self.progress.hide()  # while a job runs
        col.addWidget(self.progress)
        row.addLayout(col, 1)
        fl.addLayout(row)
        self.error_label = wrapped_label()
        self.error_label.setObjectName("error")
        self.error_label.setStyleSheet("color: #c0392b;")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error_label.hide()
        fl.addWidget(self.error_label)
        self.message_label = wrapped_label()
        self.message_label.setObjectName("message")
        self.message_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message_label.hide()
        fl.addWidget(self.message_label)
        outer.addWidget(footer)
        self.footer = footer

        # bindings: widgets -> controller
        self.start_button.clicked.connect(self._on_lead_action)
        self.connect_button.clicked.connect(lambda: self.c.connect_backend())
        self.settings_button.clicked.connect(self.open_settings)
        self.status_dot.clicked.connect(self.toggle_lead)
        self.help_button.toggled.connect(self._on_help)
        self.log_button.clicked.connect(self.open_log)
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
        self.installer.progress.connect(self._on_install_progress)
        self.installer.finished.connect(self._on_installed)
        c.methodsChanged.connect(self._show_methods)
        c.modelsChanged.connect(self._show_models)
        c.methodChanged.connect(lambda _: self._show_models())  # what the method can use
        c.methodChanged.connect(lambda _: self._show_method())
        c.modelVariantChanged.connect(self._show_method)
        c.paramsChanged.connect(lambda mid: self._show_method() if mid == self.c.method_id else None)
        c.rolesChanged.connect(self._show_roles)
        c.layersChanged.connect(self._show_roles)
        c.busyChanged.connect(self._show_busy)
        c.progressChanged.connect(self._show_progress)
        c.previewChanged.connect(self._show_preview)
        c.errorChanged.connect(self._show_error)
        c.messageChanged.connect(self._show_message)
        c.historyChanged.connect(self._show_history)
        c.variantsChanged.connect(self._show_variants)

        self._layer_timer = QTimer(self)
        self._layer_timer.setInterval(1500)
        self._layer_timer.timeout.connect(lambda: self.c.refresh_layers())
        self._layer_timer.start()
        c.destroyed.connect(self._layer_timer.stop)  # a panel that outlives its controller

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
    def lead(self) -> lead_mod.Lead:
        """What the connection area says and offers now (lead.py)."""
        return lead_mod.decide(lead_mod.facts(self.c.link, self.installer))

    def _show_connection(self, *_):
        lead = self.lead()
        self.status_dot.setStyleSheet(f"color: {lead_mod.TONES.get(lead.tone, '#808080')};")
        set_tip(self.status_dot, lead.text + ("" if lead.open else
                                              " \u2014 click for the backend's controls and log."))
        self.lead_box.setVisible(lead.open or self._lead_asked)
        self.status_label.setText(lead.text)
        set_tip(self.status_label, lead.text)
        self.start_button.setText(lead.button)
        set_tip(self.start_button, lead.tip)
        self.start_button.setVisible(bool(lead.button))
        self.start_button.setProperty("action", lead.action)
        self.install_bar.setVisible(self.installer.running)
        log = self.c.log_path()
        self.log_button.setEnabled(log is not None)
        set_tip(self.log_button, f"Open the backend's log (for a bug report: what it printed, its "
                                 f"errors): {log}" if log is not None else
                "The log of a backend this panel starts goes to the state folder; none yet.")

    def _show_methods(self):
        self._building = True
        self.method_combo.clear()
        for m in self.c.methods:
            self.method_combo.addItem(m.get("title") or m["id"], m["id"])
            self.method_combo.setItemData(self.method_combo.count() - 1,
                                          wrap_tooltip(m.get("description", "")),
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
        self._building = False
        self._show_model_hint()

    def _show_model_hint(self):
        """What to do without a checkpoint, or why this one was chosen for this machine."""
        c = self.c
        hint = (models_ui.help_text(c.models, c.models_info) or models_ui.why_chosen(
            c.models, c.method_id, c.model, c.settings, c.models_info, c.health) if c.models else "")
        self.model_hint.setText(hint)
        self.model_hint.setVisible(bool(hint))

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
        set_tip(self.method_help, desc.get("help", ""))
        self.form.build(for_model(fields_from_schema(desc.get("params")), self.c.model_variant()),
                        self.c.param_values())
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
            label = wrapped_label(title + ("" if role.get("required") else " (optional)"))
            set_tip(label, role.get("help", ""))
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
        self.progress.setVisible(busy)
        if not busy:
            self._show_preview(None)
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
            # an upload names its bytes itself (client.JobRunner): the step counts KiB
            self.progress.setFormat(stage if stage.endswith((" MB", " kB")) else f"{stage} {step}/{total}")
        else:
            self.progress.setRange(0, 0)
            self.progress.setFormat(stage)

    def _show_preview(self, image):
        """The running job's latest preview beside Generate (while it runs: afterwards the
        canvas has the result, and the row keeps its height for the pages above)."""
        if image is None or image.isNull() or not self.c.busy:
            self.preview.clear()
            self.preview.hide()
            return
        size = self.PREVIEW_SIZE
        pix = QPixmap.fromImage(image).scaled(size, size, Qt.AspectRatioMode.KeepAspectRatio,
                                              Qt.TransformationMode.SmoothTransformation)
        self.preview.setPixmap(pix)
        set_tip(self.preview, "The running job's latest preview (also shown on the canvas).")
        self.preview.show()

    def _fit_footer(self):
        """Give the error and the message the height their wrapped text needs at the panel's
        width (a layout squeezes word-wrapped labels otherwise): the scrolled part gives way,
        and where even that is not enough the docker asks Krita for the room."""
        margins = self.layout().contentsMargins()
        width = max(50, self.width() - margins.left() - margins.right())
        for label in (self.error_label, self.message_label):
            label.setMinimumHeight(label.heightForWidth(width) if label.isVisibleTo(self) and label.text() else 0)

    def resizeEvent(self, event):
        self._fit_footer()
        super().resizeEvent(event)

    def _show_error(self, text: str):
        """An error takes the message's place (both would not fit a small docker); the
        message comes back when the error is cleared (by the next action)."""
        self.error_label.setText(text)
        self.error_label.setVisible(bool(text))
        self.message_label.setVisible(bool(self.message_label.text()) and not text)
        self._fit_footer()

    def _show_message(self, text: str):
        self.message_label.setText(text)
        self.message_label.setVisible(bool(text) and not self.error_label.text())
        self._fit_footer()

    def _show_history(self):
        self.history_list.clear()
        for entry in self.c.history:
            item = QtWidgets.QListWidgetItem(entry.summary())
            set_tip(item, "\n".join(f"{k}: {v}" for k, v in sorted(entry.params.items())))
            if entry.thumbnail is not None:
                item.setIcon(QIcon(QPixmap.fromImage(entry.thumbnail)))
            self.history_list.addItem(item)
        if self.c.history:
            self.history_list.setCurrentRow(0)
        n = len(self.c.history)
        self.tabs.setTabText(self.tabs.indexOf(self.history_page), f"History ({n})" if n else "History")
        self.again_button.setEnabled(bool(n))
        self.source_button.setEnabled(bool(n))

    def _show_variants(self):
        variants = list(self.c.variants)
        same = len(variants) == len(self._shown_variants) and all(
            a is b for a, b in zip(variants, self._shown_variants))
        if same:  # only the pick changed: keep the strip (and where it is scrolled to)
            self.variant_strip.set_picked(self.c.picked)
        else:
            self.variant_strip.set_variants([(v.label, v.thumbnail) for v in variants], self.c.picked)
            self._shown_variants = variants
        index = self.tabs.indexOf(self.variants_page)
        self.tabs.setTabText(index, f"Variants ({len(variants)})")
        several = len(variants) > 1
        if not several and self.tabs.currentIndex() == index:
            self.tabs.setCurrentWidget(self.scroll)
        self.tabs.setTabVisible(index, several)
        if several and not same:  # new variants: the painter picks one now
            self.tabs.setCurrentIndex(index)

    # -- widgets -> controller ------------------------------------------------------------
    def _on_variant(self, index: int):
        self.c.pick_variant(index)
        self.variant_strip.set_picked(self.c.picked)  # back to the shown one if it failed

    def toggle_lead(self):
        """The dot: show the lead (the backend's controls, its log) at the top of Edit, or
        fold it again when a backend is connected."""
        self._lead_asked = not (self._lead_asked and self.lead_box.isVisibleTo(self))
        self._show_connection()
        if self.lead_box.isVisibleTo(self.scroll):
            self.tabs.setCurrentWidget(self.scroll)
            self.scroll.verticalScrollBar().setValue(0)

    def _remember_folds(self, _open: bool = True):
        self.c.settings.set_json("folded", sorted(s.body.objectName() for s in (self.roles_box, self.params_box)
                                                  if not s.is_open()))

    def _on_help(self, on: bool):
        self.method_help.setVisible(on)
        self.c.settings.set("method_help", on)

    def _on_lead_action(self):
        action = self.start_button.property("action")
        if action in (lead_mod.INSTALL, lead_mod.PROGRESS):
            self.open_install()
        elif action == lead_mod.START:
            self.c.start_backend()
        elif action == lead_mod.STOP:
            self.c.stop_backend()
        elif action == lead_mod.TRUST:
            self.trust.offer()
        elif action == lead_mod.FORGET:
            self.trust.forget()

    def open_install(self):
        """The install window (what is installed where, PyTorch's build, progress, the log);
        one per docker, not modal: the install goes on when it is closed."""
        from .backend_setup import InstallDialog

        if self._install_dialog is None:
            self._install_dialog = InstallDialog(self.c, self.installer, self)
        self._install_dialog.show()
        self._install_dialog.raise_()
        return self._install_dialog

    def _on_install_progress(self, percent: int, _text: str):
        self.install_bar.setValue(percent)
        self._show_connection()

    def _on_installed(self, ok: bool, message: str):
        """A good install starts the backend (the lead then says so); a failed one says why."""
        self._show_connection()
        if ok and not self.c.connected and not self.c.process.running:
            self.c.set_error("")
            self.c.start_backend()
        elif not ok and message != "Cancelled.":
            self.c.set_error(message)

    def _on_model(self, text: str):
        if self._building:
            return
        idx = self.model_combo.findText(text)
        model = self.model_combo.itemData(idx) if idx >= 0 else text
        self.c.set_model(model or "")
        self._show_model_hint()

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

    def open_log(self) -> str:
        """Open the backend's log file with the system's viewer; the path opened ("" if none)."""
        path = self.c.log_path()
        if path is None:
            self.c.set_message("There is no backend log yet: it is written when the panel starts "
                               "the backend.")
            return ""
        self.open_url(QUrl.fromLocalFile(str(path)))
        return str(path)

    def open_url(self, url):
        QtGui.QDesktopServices.openUrl(url)

    def open_settings(self):
        from .backend_setup import SettingsDialog

        dlg = SettingsDialog(self.c, self, self.installer)
        try:
            if dlg.exec_() if hasattr(dlg, "exec_") else dlg.exec():
                dlg.save()
                self.c.connect_backend()
        finally:
            dlg.deleteLater()  # its install pane lets go of the installer (an install goes on)


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
