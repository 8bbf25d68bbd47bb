"""The settings dialog and its tabs: the backend (install, update, uninstall), the connection
(this computer's backend or one on another machine: link/remote.py), memory, models (folders
and *Get a model*), and Advanced (the developer's and connection fields). The
install pane is also the docker's install window. The work is done by ``install.installer``,
``link.backend_options`` and the backend's ``/v1/downloads``."""
from __future__ import annotations

from typing import Any

from ..install import installer as inst
from ..link import backend_options as bo
from ..link import remote
from ..qt import QTimer, QtWidgets
from .widgets import set_tip

# where each stage of a download (the backend's /v1/downloads) sits on the bar's 0..1000
DOWNLOAD_STAGE_SPAN = {"downloading": (0, 950), "verifying": (950, 1000), "done": (1000, 1000)}


class InstallPane(QtWidgets.QWidget):
    """Install, update or uninstall the backend: what goes where, PyTorch's build, the
    progress and the log of the run."""

    def __init__(self, controller, installer: inst.Installer, parent=None):
        super().__init__(parent)
        self.c = controller
        self.installer = installer
        lay = QtWidgets.QVBoxLayout(self)
        self.install_status = QtWidgets.QLabel()
        self.install_status.setObjectName("install_status")
        self.install_status.setWordWrap(True)
        lay.addWidget(self.install_status)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(QtWidgets.QLabel("PyTorch for"))
        self.variant = QtWidgets.QComboBox()
        for key, text in inst.VARIANTS:
            self.variant.addItem(text, key)
        self.variant.setCurrentIndex(max(0, self.variant.findData(inst.detect_variant())))
        set_tip(self.variant, "Detected from this machine; change it if it is wrong.")
        row.addWidget(self.variant, 1)
        lay.addLayout(row)
        row = QtWidgets.QHBoxLayout()
        self.install_button = QtWidgets.QPushButton("Install backend")
        self.update_button = QtWidgets.QPushButton("Update")
        self.uninstall_button = QtWidgets.QPushButton("Uninstall")
        self.cancel_install_button = QtWidgets.QPushButton("Cancel")
        for b in (self.install_button, self.update_button, self.uninstall_button, self.cancel_install_button):
            row.addWidget(b)
        lay.addLayout(row)
        self.install_progress = QtWidgets.QProgressBar()
        self.install_progress.setRange(0, 100)
        self.install_progress.setFormat("")
        lay.addWidget(self.install_progress)
        self.install_step = QtWidgets.QLabel()  # the step, what it downloads, MB and MB/s
        self.install_step.setObjectName("install_step")
        self.install_step.setWordWrap(True)
        lay.addWidget(self.install_step)
        self.install_log = QtWidgets.QPlainTextEdit()
        self.install_log.setObjectName("install_log")
        self.install_log.setReadOnly(True)
        self.install_log.setMaximumBlockCount(2000)
        lay.addWidget(self.install_log, 1)
        self.install_button.clicked.connect(self._install)
        self.update_button.clicked.connect(lambda: self.installer.update(self.variant.currentData()))
        self.uninstall_button.clicked.connect(self._uninstall)
        self.cancel_install_button.clicked.connect(self.installer.cancel)
        self.installer.progress.connect(self._on_install_progress)
        self.installer.started.connect(self.install_log.clear)  # this run's lines only
        self.installer.logLine.connect(self._append_log)
        self.installer.finished.connect(lambda ok, msg: self._show_install_state(msg))
        if self.installer.installed_variant():  # Update keeps the build it was installed with
            self.variant.setCurrentIndex(max(0, self.variant.findData(self.installer.installed_variant())))
        self._show_install_state()

    def ask(self, title: str, text: str) -> bool:
        """A yes/no question (tests answer it themselves)."""
        Buttons = QtWidgets.QMessageBox.StandardButton
        return QtWidgets.QMessageBox.question(self, title, text, Buttons.Yes | Buttons.No,
                                              Buttons.No) == Buttons.Yes

    def _append_log(self, line: str):
        """The log follows its tail, unless the painter scrolled up to read."""
        bar = self.install_log.verticalScrollBar()
        at_end = bar.value() >= bar.maximum() - 2
        self.install_log.appendPlainText(line)
        if at_end:
            bar.setValue(bar.maximum())

    def _install(self):
        if self.installer.installed():
            size = inst.gigabytes(self.installer.disk_usage())
            if not self.ask("Install again", f"Install the backend again? The installed one in "
                            f"{self.installer.venv} ({size}) is removed first and everything is "
                            "downloaded again. Update installs this plugin's backend into it instead."):
                return
        self.installer.install(self.variant.currentData())

    def _uninstall(self):
        size = inst.gigabytes(self.installer.disk_usage())
        if not self.ask("Uninstall the backend", f"Uninstall the Analogon backend? This frees {size}: the "
                        f"environment in {self.installer.venv}, its Python and the download cache. "
                        "Your models are kept."):
            return
        if self.c.process.running:
            self.c.stop_backend()
        self.installer.uninstall()
        self._show_install_state("Uninstalled.")

    def _on_install_progress(self, percent: int, text: str):
        self.install_progress.setValue(percent)
        self.install_progress.setFormat(f"{percent} %")
        self.install_step.setText(text)
        self._show_install_state()

    def _show_install_state(self, message: str = ""):
        running = self.installer.running
        installed = self.installer.installed()
        have = self.installer.installed_version() if installed else ""
        bundled = inst.wheel_version(self.installer.wheel) if self.installer.wheel else ""
        if running:
            text = f"Installing backend {bundled} into {self.installer.venv}\u2026"
        elif installed:
            built = dict(inst.VARIANTS).get(self.installer.installed_variant(), "")
            text = f"Backend {have} installed in {self.installer.venv}" + (f" (PyTorch for {built})." if built else ".")
            if bundled and have != bundled:
                text += f" This plugin carries {bundled}: Update installs it."
        elif bundled:
            text = (f"No backend installed. Install backend puts backend {bundled} with PyTorch into "
                    f"{self.installer.venv}: a download of several GB for a GPU (less for CPU only), "
                    "5\u201320 minutes. It needs no Python of yours: a suitable one is downloaded "
                    "when there is none.")
        else:
            text = ("This copy of the plugin carries no backend: install the release zip, or set the "
                    "backend command under Advanced.")
        self.install_status.setText(text + (f"\n{message}" if message else ""))
        self.install_button.setEnabled(not running and bool(bundled))
        self.update_button.setEnabled(not running and installed and bool(bundled))
        self.uninstall_button.setEnabled(not running and (installed or bool(self.installer.leftover_dirs())))
        self.cancel_install_button.setEnabled(running)
        self.variant.setEnabled(not running)


class InstallDialog(QtWidgets.QDialog):
    """The docker's install window: the install pane and Close (the install goes on)."""

    def __init__(self, controller, installer: inst.Installer, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Install the Analogon backend")
        lay = QtWidgets.QVBoxLayout(self)
        self.pane = InstallPane(controller, installer, self)
        lay.addWidget(self.pane, 1)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        lay.addWidget(buttons)
        self.resize(560, 420)


# the Advanced tab: what a developer or a painter with a backend elsewhere sets
ADVANCED = (
    ("backend_command", "Backend command", "analogon",
     "The command Start backend runs, e.g. /home/me/analogon/.venv/bin/analogon. Empty: the "
     "backend that Install backend installed, else analogon on PATH."),
    ("backend_url", "Backend address", "read from server.json",
     "A backend you run yourself, e.g. http://127.0.0.1:7871. Empty: the one the docker starts, "
     "else the address in server.json."),
    ("state_dir", "Backend state folder", "the default",
     "Where a backend you started yourself writes server.json with its token. Empty: the default."),
    ("padding", "Selection padding (px)", "32", "Context around the selection sent to the backend."),
    ("feather", "Feather (px)", "8", "Softness of the selection edge when the result is placed."),
)


def on_disk(entry: dict[str, Any], models: list[dict[str, Any]]) -> str:
    """" — already on disk (ComfyUI)" when a checkpoint the backend found elsewhere is this
    catalogue entry's file (by its name and size), else ""."""
    from pathlib import PurePath

    for m in models:
        if m.get("source") == "embedded" or not m.get("id"):
            continue
        same_size = not entry.get("size_bytes") or not m.get("size_bytes") or m["size_bytes"] == entry["size_bytes"]
        if PurePath(str(m["id"])).name == entry.get("filename") and same_size:
            where = m.get("location") or str(PurePath(str(m["id"])).parent)
            return f" \u2014 already on disk ({where})"
    # The backend lists checkpoints of the entry's family it found (newer backends).
    same = [d for d in entry.get("on_disk") or [] if d.get("same_file")]
    if same:
        return f" \u2014 already on disk ({same[0].get('location') or same[0].get('id')})"
    kin = entry.get("on_disk") or []
    if kin:
        more = f" and {len(kin) - 1} more" if len(kin) > 1 else ""
        return (f" \u2014 you already have a checkpoint of this family: {kin[0].get('name')}"
                f" ({kin[0].get('location')}){more}")
    return ""


def verifiable(entry: dict[str, Any]) -> str | None:
    """The file the Verify button checks for a catalogue entry: "" for the one in the models
    folder, a found checkpoint's id when it is the publisher's file by name and size, None
    when there is nothing to verify."""
    if not entry.get("sha256"):
        return None
    if entry.get("installed"):
        return ""
    same = [d for d in entry.get("on_disk") or [] if d.get("same_file")]
    return str(same[0]["id"]) if same else None


def verdict(result: dict[str, Any]) -> str:
    """The Verify button's answer in words."""
    got, want = str(result.get("sha256", "")), str(result.get("expected", ""))
    if result.get("ok"):
        return f"Verified: {result.get('path')} is the publisher's file (SHA-256 {got[:12]}\u2026)."
    return (f"{result.get('path')} is not the publisher's file: its SHA-256 is {got[:12]}\u2026, the "
            f"publisher's is {want[:12]}\u2026. It may be damaged or another release; download it again "
            "if the methods misbehave.")


class BackendSetup(QtWidgets.QTabWidget):
    def __init__(self, controller, installer: inst.Installer | None = None, parent=None):
        super().__init__(parent)
        self._download_id = ""
        self._calls: list = []  # the requests in flight (a Call that is not referenced is collected)
        self.c = controller
        self.settings = controller.settings
        self.installer = installer if installer is not None else inst.shared()
        self.addTab(self._install_tab(), "Backend")
        self.connection = remote.RemotePage(controller)
        self.addTab(self.connection, "Connection")
        self.addTab(self._memory_tab(), "Memory")
        # what the docker passes to a backend it starts: nothing to say about a remote one
        self.connection.modeChanged.connect(lambda far: self.setTabEnabled(2, not far))
        self.setTabEnabled(2, not self.connection.remote())
        self.addTab(self._models_tab(), "Models")
        self.addTab(self._advanced_tab(), "Advanced")
        self._poll = QTimer(self)
        self._poll.setInterval(400)
        self._poll.timeout.connect(self._poll_download)

    # -- install ---------------------------------------------------------------------------
    def _install_tab(self):
        w = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(w)
        lay.setContentsMargins(0, 0, 0, 0)
        self.install_pane = InstallPane(self.c, self.installer, w)
        lay.addWidget(self.install_pane, 1)
        self.autostart = QtWidgets.QCheckBox("Start the backend with Krita")
        self.autostart.setChecked(self.settings.get_bool("autostart"))
        lay.addWidget(self.autostart)
        return w

    # -- advanced ----------------------------------------------------------------------------
    def _advanced_tab(self):
        w = QtWidgets.QWidget()
        form = QtWidgets.QFormLayout(w)
        note = QtWidgets.QLabel("For a backend you run yourself, and for developers. Empty fields "
                                "use the backend the docker installs and starts.")
        note.setWordWrap(True)
        form.addRow(note)
        self.edits = {}
        for key, label, placeholder, tip in ADVANCED:
            e = QtWidgets.QLineEdit(self.settings.get(key))
            set_tip(e, tip)
            e.setPlaceholderText(placeholder)
            form.addRow(label, e)
            self.edits[key] = e
        self.format = QtWidgets.QComboBox()
        self.format.addItem("Automatic (raw here; the smallest encoding to another machine)", "auto")
        self.format.addItem("Raw RGBA (fast)", "rgba")
        self.format.addItem("Compressed raw RGBA (deflate)", "deflate")
        self.format.addItem("PNG (smaller)", "png")
        self.format.setCurrentIndex(max(0, self.format.findData(remote.chosen_upload_format(self.settings))))
        form.addRow("Upload format", self.format)
        return w

    # -- memory ------------------------------------------------------------------------------
    def _memory_tab(self):
        w = QtWidgets.QWidget()
        form = QtWidgets.QFormLayout(w)
        self.preset = QtWidgets.QComboBox()
        for key, text in bo.PRESET_CHOICES:
            self.preset.addItem(text, key)
        form.addRow("Memory preset", self.preset)
        self.preset_summary = QtWidgets.QLabel()
        self.preset_summary.setWordWrap(True)
        form.addRow(self.preset_summary)
        self.device = QtWidgets.QComboBox()
        for key, text in bo.DEVICE_CHOICES:
            self.device.addItem(text, key)
        self.dtype = QtWidgets.QComboBox()
        for key, text in bo.DTYPE_CHOICES:
            self.dtype.addItem(text, key)
        self.offload = QtWidgets.QCheckBox("Keep idle model parts in CPU memory (small GPUs)")
        self.tiling = QtWidgets.QCheckBox("Decode large images in tiles")
        self.max_pixels = QtWidgets.QSpinBox()
        self.max_pixels.setRange(0, 64 * 1024 * 1024)
        self.max_pixels.setSingleStep(256 * 256)
        self.max_pixels.setSpecialValueText("automatic")
        form.addRow("Device", self.device)
        form.addRow("Precision", self.dtype)
        form.addRow("CPU offload", self.offload)
        form.addRow("VAE tiling", self.tiling)
        form.addRow("Max working pixels", self.max_pixels)
        form.addRow(QtWidgets.QLabel("Changes take effect when the backend starts again."))
        s = self.settings
        self.preset.setCurrentIndex(max(0, self.preset.findData(s.get("memory_preset", "auto") or "auto")))
        self.device.setCurrentIndex(max(0, self.device.findData(s.get("device", ""))))
        self.dtype.setCurrentIndex(max(0, self.dtype.findData(s.get("dtype", ""))))
        self.offload.setChecked(s.get_bool("cpu_offload"))
        self.tiling.setChecked(s.get_bool("vae_tiling"))
        self.max_pixels.setValue(max(0, s.get_int("max_pixels")))
        self.preset.currentIndexChanged.connect(lambda _: self._show_preset())
        self._show_preset()
        return w

    def _show_preset(self):
        key = self.preset.currentData()
        self.preset_summary.setText(bo.preset_summary(key, self.c.health if self.c.connected else None))
        custom = key == "custom"
        for wdg in (self.device, self.dtype, self.offload, self.tiling, self.max_pixels):
            wdg.setEnabled(custom)
        p = bo.PRESETS.get(key)
        if p is not None:  # show what the preset means in the explicit fields
            self.device.setCurrentIndex(max(0, self.device.findData(p["device"] or "")))
            self.dtype.setCurrentIndex(max(0, self.dtype.findData(p["dtype"])))
            self.offload.setChecked(p["cpu_offload"])
            self.tiling.setChecked(p["vae_tiling"])
            self.max_pixels.setValue(p["max_pixels"])

    # -- models ------------------------------------------------------------------------------
    def _models_tab(self):
        w = QtWidgets.QWidget()
        lay = QtWidgets.QVBoxLayout(w)
        lay.addWidget(QtWidgets.QLabel("Folders with checkpoints (ComfyUI, Automatic1111 / Forge, Krita AI "
                                       "Diffusion and the Hugging Face cache are searched anyway):"))
        self.folders = QtWidgets.QListWidget()
        for f in bo.model_folders(self.settings):
            self.folders.addItem(f)
        lay.addWidget(self.folders)
        row = QtWidgets.QHBoxLayout()
        add = QtWidgets.QPushButton("Add folder\u2026")
        remove = QtWidgets.QPushButton("Remove")
        add.clicked.connect(self._add_folder)
        remove.clicked.connect(lambda: self.folders.takeItem(self.folders.currentRow()))
        row.addWidget(add)
        row.addWidget(remove)
        row.addStretch(1)
        lay.addLayout(row)
        self.show_dev = QtWidgets.QCheckBox("Show developer models (tiny-sd, tiny-sdxl: random weights; toy-sd-64)")
        self.show_dev.setChecked(self.settings.get_bool("show_developer_models"))
        lay.addWidget(self.show_dev)
        box = QtWidgets.QGroupBox("Get a model")
        bl = QtWidgets.QVBoxLayout(box)
        self.catalog_dir = QtWidgets.QLabel()  # where downloads go
        self.catalog_dir.setWordWrap(True)
        bl.addWidget(self.catalog_dir)
        self.catalog = QtWidgets.QListWidget()
        bl.addWidget(self.catalog)
        row = QtWidgets.QHBoxLayout()
        self.download_button = QtWidgets.QPushButton("Download")
        self.cancel_download_button = QtWidgets.QPushButton("Cancel")
        self.cancel_download_button.setEnabled(False)
        self.verify_button = QtWidgets.QPushButton("Verify")
        self.verify_button.setToolTip("Check the file on disk against the publisher's SHA-256 "
                                      "(reads the whole file: a few seconds per GB).")
        self.verify_button.setEnabled(False)
        row.addWidget(self.download_button)
        row.addWidget(self.cancel_download_button)
        row.addWidget(self.verify_button)
        bl.addLayout(row)
        self.download_progress = QtWidgets.QProgressBar()
        self.download_progress.setRange(0, 1000)
        self.download_progress.setFormat("")
        bl.addWidget(self.download_progress)
        self.download_status = QtWidgets.QLabel()
        self.download_status.setWordWrap(True)
        bl.addWidget(self.download_status)
        lay.addWidget(box)
        self.download_button.clicked.connect(self.start_download)
        self.cancel_download_button.clicked.connect(self.cancel_download)
        self.verify_button.clicked.connect(self.verify_model)
        self.catalog.currentItemChanged.connect(lambda *_: self._update_verify())
        self.refresh_catalog()
        return w

    def _add_folder(self):
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "A folder with checkpoints")
        if folder:
            self.folders.addItem(folder)

    def refresh_catalog(self):
        client = self.c.client if self.c.connected else None
        if client is None:
            self.download_status.setText("Start or connect the backend to download models.")
            self.download_button.setEnabled(False)
            return
        self._send("GET", "/v1/downloads/catalog", self._show_catalog)

    def _show_catalog(self, resp):
        if not resp.ok:
            self.download_status.setText(resp.error.message if resp.error else "No catalog.")
            return
        data = resp.json() or {}
        self.catalog.clear()
        for m in data.get("models", []):
            done = " \u2014 downloaded" if m.get("installed") else on_disk(m, self.c.models)
            item = QtWidgets.QListWidgetItem(f"{m['title']} (about {m['size_bytes'] / 1e9:.1f} GB; for "
                                             f"{', '.join(m['methods']) or 'any method'}){done}")
            item.setToolTip(f"{m['repo_id']}/{m['filename']}\n{m.get('note', '')}")
            item.setData(256, m["id"])  # Qt.UserRole
            item.setData(257, verifiable(m))  # the file Verify checks ("": the models folder's)
            self.catalog.addItem(item)
        if self.catalog.count():
            self.catalog.setCurrentRow(0)
        self.download_button.setEnabled(self.catalog.count() > 0 and not self._download_id)
        self.catalog_dir.setText(f"Into {data.get('models_dir', '')}")
        self._update_verify()

    def _update_verify(self):
        item = self.catalog.currentItem()
        self.verify_button.setEnabled(item is not None and item.data(257) is not None
                                      and not self._download_id)

    def verify_model(self):
        item = self.catalog.currentItem()
        if item is None or item.data(257) is None or self.c.client is None:
            return
        payload = {"model": item.data(256)}
        if item.data(257):
            payload["path"] = item.data(257)
        self.verify_button.setEnabled(False)
        self.download_status.setText("Verifying\u2026 (reads the whole file)")
        self._send("POST", "/v1/downloads/verify", self._verified, payload)

    def _verified(self, resp):
        self._update_verify()
        if not resp.ok:
            self.download_status.setText(resp.error.message if resp.error else "Verifying failed.")
            return
        self.download_status.setText(verdict(resp.json() or {}))

    def start_download(self):
        item = self.catalog.currentItem()
        if item is None or self.c.client is None:
            return
        self.download_button.setEnabled(False)
        self._send("POST", "/v1/downloads", self._started, {"model": item.data(256)})

    def _started(self, resp):
        if not resp.ok:
            self.download_status.setText(resp.error.message if resp.error else "The download did not start.")
            self.download_button.setEnabled(True)
            return
        self._download_id = (resp.json() or {}).get("id", "")
        self.download_progress.setValue(0)
        self.cancel_download_button.setEnabled(True)
        self._poll.start()

    def cancel_download(self):
        if self._download_id and self.c.client is not None:
            self._send("DELETE", f"/v1/downloads/{self._download_id}")

    def _poll_download(self):
        if not self._download_id or self.c.client is None:
            return self._poll.stop()
        self._send("GET", f"/v1/downloads/{self._download_id}", self._show_download)

    def _show_download(self, resp):
        if not resp.ok:
            return
        st: dict[str, Any] = resp.json() or {}
        total, done = st.get("total") or 0, st.get("bytes") or 0
        lo, hi = DOWNLOAD_STAGE_SPAN.get(st.get("stage", ""), (0, 1000))
        if total:  # one bar for the stages: it never goes back when the checksum starts
            self.download_progress.setValue(max(self.download_progress.value(),
                                                 int(lo + (hi - lo) * min(1.0, done / total))))
        self.download_progress.setFormat(f"{st.get('stage', '')} {done / 1e6:.0f} / {total / 1e6:.0f} MB")
        if st.get("status") in ("done", "error", "cancelled"):
            self._poll.stop()
            self._download_id = ""
            self.cancel_download_button.setEnabled(False)
            self.download_button.setEnabled(True)
            self.download_status.setText({"done": f"Downloaded: {st.get('path')}",
                                          "cancelled": "Cancelled; downloading it again resumes it."}.get(
                st["status"], (st.get("error") or {}).get("message", "The download failed.")))
            if st["status"] == "done":
                self.refresh_catalog()
                self.c.connect_backend()  # the model list now has it

    def _send(self, verb: str, path: str, callback=None, payload: Any = None):
        client = self.c.client
        if client is None:
            return None
        self._calls = [c for c in self._calls if not c.done]
        call = (client.send_json(verb, path, payload, callback) if payload is not None
                else client.send(verb, path, callback=callback))
        self._calls.append(call)
        return call

    # -- saving ------------------------------------------------------------------------------
    def save(self):
        s = self.settings
        for key, e in self.edits.items():
            s.set(key, e.text().strip())
        s.set("autostart", self.autostart.isChecked())
        self.connection.save()
        s.set("upload_format", self.format.currentData())
        s.set("memory_preset", self.preset.currentData())
        if self.preset.currentData() == "custom":
            s.set("device", self.device.currentData())
            s.set("dtype", self.dtype.currentData())
            s.set("cpu_offload", self.offload.isChecked())
            s.set("vae_tiling", self.tiling.isChecked())
            s.set("max_pixels", self.max_pixels.value())
        s.set_json("model_folders", [self.folders.item(i).text() for i in range(self.folders.count())])
        s.set("show_developer_models", self.show_dev.isChecked())


class SettingsDialog(QtWidgets.QDialog):
    """\u2699: the backend, memory, models and advanced tabs; OK saves them."""

    def __init__(self, controller, parent=None, installer: inst.Installer | None = None):
        super().__init__(parent)
        self.setWindowTitle("Analogon settings")
        self.c = controller
        lay = QtWidgets.QVBoxLayout(self)
        self.setup = BackendSetup(controller, installer, self)
        lay.addWidget(self.setup, 1)
        buttons = QtWidgets.QDialogButtonBox(QtWidgets.QDialogButtonBox.StandardButton.Ok
                                             | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)

    def save(self):
        self.setup.save()
