"""Widgets the panel is made of: parameter forms from schema fields, layer pickers, the
strip of a multi-image result's variants."""
from __future__ import annotations

import json
from typing import Any

from ..qt import QIcon, QPixmap, QSize, Qt, QtWidgets, pyqtSignal
from .forms import Field, wrap_tooltip

QWidget = QtWidgets.QWidget


def set_tip(widget, text: str):
    """A tooltip wrapped to a readable width."""
    widget.setToolTip(wrap_tooltip(text))


def form_layout(parent: QWidget | None = None) -> "QtWidgets.QFormLayout":
    """A form layout for a narrow docker: a label that does not fit beside its field goes
    above it, fields take the width."""
    lay = QtWidgets.QFormLayout(parent)
    lay.setRowWrapPolicy(QtWidgets.QFormLayout.RowWrapPolicy.WrapLongRows)
    lay.setFieldGrowthPolicy(QtWidgets.QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return lay


def narrow_combo(combo: "QtWidgets.QComboBox", chars: int = 8) -> "QtWidgets.QComboBox":
    """A combo box whose width does not grow with its longest item (a narrow docker)."""
    combo.setSizeAdjustPolicy(QtWidgets.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    return combo


def scroll_area(name: str) -> "QtWidgets.QScrollArea":
    """A frameless vertical scroll area whose page takes its width (no horizontal bar)."""
    area = QtWidgets.QScrollArea()
    area.setObjectName(name)
    area.setWidgetResizable(True)
    area.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    # set (not 0, which falls back to the scroll bar's minimum of about 70 px): in a low docker
    # the area gives its room to the pinned message
    area.setMinimumHeight(1)
    return area


def wrapped_label(text: str = "") -> "QtWidgets.QLabel":
    label = QtWidgets.QLabel(text)
    label.setWordWrap(True)
    return label


class Section(QWidget):
    """A part of a form under a flat title that folds it away (the title is an arrow button).
    ``toggled(open)`` when the painter folds or opens it."""

    toggled = pyqtSignal(bool)

    def __init__(self, title: str, name: str, parent: QWidget | None = None, bold: bool = False):
        super().__init__(parent)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        self.button = QtWidgets.QToolButton()
        self.button.setObjectName(f"{name}_toggle")
        self.button.setText(title)
        self.button.setCheckable(True)
        self.button.setChecked(True)
        self.button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.button.setArrowType(Qt.ArrowType.DownArrow)
        self.button.setAutoRaise(True)
        self.button.setStyleSheet("QToolButton { border: none; }")  # a title, not a pressed button
        if bold:
            font = self.button.font()
            font.setBold(True)
            self.button.setFont(font)
        lay.addWidget(self.button)
        self.body = QWidget()
        self.body.setObjectName(name)
        self.body_layout = QtWidgets.QVBoxLayout(self.body)
        self.body_layout.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.body)
        self.button.toggled.connect(self._on_toggled)

    def is_open(self) -> bool:
        return self.button.isChecked()

    def set_open(self, on: bool):
        if self.button.isChecked() != bool(on):
            self.button.setChecked(bool(on))  # comes back through toggled
        else:
            self._show(bool(on))

    def _show(self, on: bool):
        self.button.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.body.setVisible(on)

    def _on_toggled(self, on: bool):
        self._show(on)
        self.toggled.emit(on)


class ParamForm(QWidget):
    """A form generated from :class:`forms.Field` s: the fields a painter touches, then an
    *Advanced* toggle with the rest (the schema's ``advanced``), closed by default.
    ``changed(name, value)`` on edits."""

    changed = pyqtSignal(str, object)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        outer = QtWidgets.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.basic = QWidget()
        self.layout_ = form_layout(self.basic)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.basic)
        self.advanced_section = Section("Advanced", "advanced_params")
        self.advanced_section.set_open(False)
        self.advanced_button = self.advanced_section.button
        self.advanced_button.setObjectName("advanced_toggle")
        self.advanced = self.advanced_section.body
        self.advanced_layout = form_layout()
        self.advanced_layout.setContentsMargins(0, 0, 0, 0)
        self.advanced_section.body_layout.addLayout(self.advanced_layout)
        self.advanced_section.toggled.connect(self.show_advanced)
        outer.addWidget(self.advanced_section)
        self.fields: list[Field] = []
        self.editors: dict[str, QWidget] = {}
        self.labels: dict[str, QWidget] = {}
        self._loading = False

    def show_advanced(self, on: bool):
        if self.advanced_section.is_open() != bool(on):
            self.advanced_section.set_open(on)  # comes back here through toggled
            return
        self.advanced.setVisible(bool(on) and bool(self.advanced_layout.rowCount()))

    def build(self, fields: list[Field], values: dict[str, Any]):
        for lay in (self.layout_, self.advanced_layout):
            while lay.rowCount():
                lay.removeRow(0)
        self.editors = {}
        self.labels = {}
        self.fields = list(fields)
        self._loading = True
        for f in fields:
            editor = self._editor(f)
            set_tip(editor, f.tooltip)
            editor.setObjectName(f"param_{f.name}")
            label = wrapped_label(f.label)
            set_tip(label, f.tooltip)
            label.setBuddy(editor)
            (self.advanced_layout if f.advanced else self.layout_).addRow(label, editor)
            self.editors[f.name] = editor
            self.labels[f.name] = label
            self.set_value(f.name, values.get(f.name, f.default))
        self._loading = False
        n = sum(1 for f in fields if f.advanced)
        self.advanced_button.setText(f"Advanced ({n})")
        self.advanced_section.setVisible(n > 0)
        self.show_advanced(self.advanced_section.is_open())

    def _emit(self, name: str):
        if not self._loading:
            self.changed.emit(name, self.value(name))

    def _editor(self, f: Field) -> QWidget:
        if f.kind == "bool":
            w = QtWidgets.QCheckBox()
            w.toggled.connect(lambda _=None, n=f.name: self._emit(n))
        elif f.kind == "int":
            w = QtWidgets.QSpinBox()
            lo, hi = f.spin_range()
            w.setRange(int(lo), int(hi))
            w.valueChanged.connect(lambda _=None, n=f.name: self._emit(n))
        elif f.kind == "float":
            w = QtWidgets.QDoubleSpinBox()
            lo, hi = f.spin_range()
            w.setDecimals(f.decimals())
            w.setRange(lo, hi)
            span = (hi - lo) if f.minimum is not None and f.maximum is not None else 10.0
            w.setSingleStep(max(10 ** -w.decimals(), round(span / 100, w.decimals())))
            w.valueChanged.connect(lambda _=None, n=f.name: self._emit(n))
        elif f.kind == "enum":
            w = narrow_combo(QtWidgets.QComboBox())
            for c in f.choices:
                w.addItem(str(c), c)
            w.currentIndexChanged.connect(lambda _=None, n=f.name: self._emit(n))
        elif f.multiline:
            w = QtWidgets.QPlainTextEdit()
            w.setMaximumHeight(2 * w.fontMetrics().lineSpacing() + 12)  # two lines; it scrolls
            w.textChanged.connect(lambda n=f.name: self._emit(n))
        else:
            w = QtWidgets.QLineEdit()
            if f.kind == "json":
                w.setPlaceholderText("JSON")
            elif f.nullable:
                w.setPlaceholderText("(automatic)")
            w.textChanged.connect(lambda _=None, n=f.name: self._emit(n))
        return w

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def value(self, name: str) -> Any:
        f, w = self.field(name), self.editors[name]
        if f.kind == "bool":
            return w.isChecked()
        if f.kind in ("int", "float"):
            return w.value()
        if f.kind == "enum":
            return w.currentData()
        text = w.toPlainText() if isinstance(w, QtWidgets.QPlainTextEdit) else w.text()
        if f.kind == "json":
            return text
        if f.nullable and text == "":
            return None
        return text

    def values(self) -> dict[str, Any]:
        return {f.name: self.value(f.name) for f in self.fields}

    def set_value(self, name: str, value: Any):
        f, w = self.field(name), self.editors[name]
        loading, self._loading = self._loading, True
        try:
            if f.kind == "bool":
                w.setChecked(bool(value))
            elif f.kind == "int":
                w.setValue(int(value) if value is not None else 0)
            elif f.kind == "float":
                w.setValue(float(value) if value is not None else 0.0)
            elif f.kind == "enum":
                idx = next((i for i, c in enumerate(f.choices) if c == value or str(c) == str(value)), 0)
                w.setCurrentIndex(idx)
            else:
                text = "" if value is None else (json.dumps(value) if f.kind == "json" and not isinstance(value, str) else str(value))
                if isinstance(w, QtWidgets.QPlainTextEdit):
                    w.setPlainText(text)
                else:
                    w.setText(text)
        finally:
            self._loading = loading


NONE_LABEL = "(none)"
SELECTION_LABEL = "(current selection)"


class LayerPicker(QWidget):
    """Picks the layer(s) for one role: a combo box, or a checkable list for roles that
    take several layers. ``picked(role, ids)`` when the user changes it."""

    picked = pyqtSignal(str, list)

    def __init__(self, role: dict, parent: QWidget | None = None):
        super().__init__(parent)
        self.role = role
        self.multiple = bool(role.get("multiple")) and role.get("kind") == "image"
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self._loading = False
        if self.multiple:
            self.list = QtWidgets.QListWidget()
            self.list.setMaximumHeight(90)
            self.list.itemChanged.connect(self._on_list)
            lay.addWidget(self.list)
            self.combo = None
        else:
            self.combo = narrow_combo(QtWidgets.QComboBox())
            self.combo.currentIndexChanged.connect(self._on_combo)
            lay.addWidget(self.combo)
            self.list = None
        set_tip(self, role.get("help", ""))
        self.setObjectName(f"role_{role.get('name')}")

    def set_layers(self, layers: list[tuple[str, str]], chosen: list[str], selection_id: str):
        self._loading = True
        try:
            if self.multiple:
                self.list.clear()
                for lid, name in layers:
                    item = QtWidgets.QListWidgetItem(name)
                    item.setData(Qt.ItemDataRole.UserRole, lid)
                    item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                    item.setCheckState(Qt.CheckState.Checked if lid in chosen else Qt.CheckState.Unchecked)
                    self.list.addItem(item)
            else:
                self.combo.clear()
                if self.role.get("kind") == "mask":
                    self.combo.addItem(SELECTION_LABEL, selection_id)
                if not self.role.get("required") or not layers:
                    self.combo.addItem(NONE_LABEL, "")
                for lid, name in layers:
                    self.combo.addItem(name, lid)
                want = chosen[0] if chosen else ""
                idx = self.combo.findData(want)
                self.combo.setCurrentIndex(idx if idx >= 0 else 0)
        finally:
            self._loading = False

    def chosen(self) -> list[str]:
        if self.multiple:
            out = []
            for i in range(self.list.count()):
                item = self.list.item(i)
                if item.checkState() == Qt.CheckState.Checked:
                    out.append(item.data(Qt.ItemDataRole.UserRole))
            return out
        data = self.combo.currentData()
        return [data] if data else []

    def _on_combo(self, _=None):
        if not self._loading:
            self.picked.emit(self.role["name"], self.chosen())

    def _on_list(self, _=None):
        if not self._loading:
            self.picked.emit(self.role["name"], self.chosen())


class VariantStrip(QWidget):
    """A horizontal row of thumbnails with their labels (the variants of one result). The
    picked one is highlighted. ``picked(i)`` when the user clicks one, ``keep(i)`` when the
    user asks for it as a new layer (context menu or the button, which keeps the picked one)."""

    picked = pyqtSignal(int)
    keep = pyqtSignal(int)

    ICON = 48  # with its two-line label and the scroll bar, the strip fits a docked docker

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.list = QtWidgets.QListWidget()
        self.list.setObjectName("variants")
        self.list.setViewMode(QtWidgets.QListView.ViewMode.IconMode)
        self.list.setFlow(QtWidgets.QListView.Flow.LeftToRight)
        self.list.setWrapping(False)
        self.list.setMovement(QtWidgets.QListView.Movement.Static)
        self.list.setWordWrap(True)
        self.list.setIconSize(QSize(self.ICON, self.ICON))
        self.list.setGridSize(QSize(self.ICON + 44, self.ICON + 34))
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.list.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setFixedHeight(self.ICON + 34 + self.list.horizontalScrollBar().sizeHint().height() + 6)
        self.list.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.SingleSelection)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        set_tip(self.list, "Click a variant to show it in the result layer; right-click to add "
                             "it as a new layer.")
        lay.addWidget(self.list)
        self.keep_button = QtWidgets.QPushButton("Keep as new layer")
        set_tip(self.keep_button, "Add the highlighted variant as another layer above the "
                                    "result, so that the result layer can show another one.")
        lay.addWidget(self.keep_button, 0, Qt.AlignmentFlag.AlignRight)
        self._loading = False
        self.list.currentRowChanged.connect(self._on_row)
        self.list.customContextMenuRequested.connect(self._on_context_menu)
        self.keep_button.clicked.connect(lambda: self.current() >= 0 and self.keep.emit(self.current()))

    def set_variants(self, variants: list[tuple[str, Any]], picked: int):
        """``variants``: (label, thumbnail QImage or None) in order."""
        self._loading = True
        try:
            self.list.clear()
            for label, thumb in variants:
                item = QtWidgets.QListWidgetItem(label)
                set_tip(item, label)
                if thumb is not None and not thumb.isNull():
                    item.setIcon(QIcon(QPixmap.fromImage(thumb)))
                self.list.addItem(item)
        finally:
            self._loading = False
        self.set_picked(picked)

    def set_picked(self, picked: int):
        self._loading = True
        try:
            for i in range(self.list.count()):
                item = self.list.item(i)
                font = item.font()
                font.setBold(i == picked)
                item.setFont(font)
            self.list.setCurrentRow(picked if 0 <= picked < self.list.count() else -1)
        finally:
            self._loading = False

    def current(self) -> int:
        return self.list.currentRow()

    def labels(self) -> list[str]:
        return [self.list.item(i).text() for i in range(self.list.count())]

    def _on_row(self, row: int):
        if not self._loading and row >= 0:
            self.picked.emit(row)

    def menu_for(self, row: int):
        """The context menu of variant ``row``."""
        menu = QtWidgets.QMenu(self)
        show = menu.addAction("Show in the result layer")
        show.triggered.connect(lambda _=False: self.picked.emit(row))
        add = menu.addAction("Add as a new layer")
        add.triggered.connect(lambda _=False: self.keep.emit(row))
        return menu

    def _on_context_menu(self, pos):
        item = self.list.itemAt(pos)
        if item is None:
            return
        menu = self.menu_for(self.list.row(item))
        menu.popup(self.list.viewport().mapToGlobal(pos))
