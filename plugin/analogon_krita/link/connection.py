"""The link to the backend, one per Krita: where the backend is, whether it answers, what it
offers, and the backend process the docker starts.

Where: in remote mode (``remote.py``: a backend on another machine) the address and token the
painter entered, and nothing is ever started or installed for it; otherwise a backend this link
started (its real address), else the address in the settings, else
the ``server.json`` a running backend wrote (one whose process is gone is ignored), else the
one started last (gone: named in every message), else the default address. Connecting is health, then the methods, then the models;
``methodsLoaded`` and ``modelsLoaded`` hand those to whoever keeps the panel's choices (the
controller), before ``stateChanged("connected", …)``. A health check every 5 s notices a
backend that went away and reconnects when it is back.
"""
from __future__ import annotations

from typing import Any, Callable

from ..qt import QObject, QTimer, pyqtSignal
from . import remote
from .backend_process import (DEFAULT_URL, BackendProcess, ServerInfo, default_state_dir, log_dir,
                              pid_alive, read_server_info)
from .client import Client, Response


class Connection(QObject):
    stateChanged = pyqtSignal(str, str)  # state, message
    methodsLoaded = pyqtSignal()  # ``methods`` is new
    modelsLoaded = pyqtSignal()  # ``models``, ``models_info`` and ``default_model`` are new
    certificateProblem = pyqtSignal(object)  # ``certificate``: a TLS certificate not trusted (remote.py)

    def __init__(self, settings, parent: QObject | None = None,
                 idle: Callable[[], bool] = lambda: True):
        """``idle()``: whether a health check may run now (no job in flight)."""
        super().__init__(parent)
        self.settings = settings
        self.idle = idle
        self.state = "disconnected"
        self.message = "Not connected."
        self.server: ServerInfo | None = None
        self.client: Client | None = None
        self.process = BackendProcess(self)
        self.process.stateChanged.connect(self._on_process_state)
        self.process.ready.connect(lambda info: self.connect())
        self.reason = ""  # why the last health check failed (the client's error code)
        self.certificate: dict[str, Any] | None = None  # what a refused certificate's handshake saw
        self.health: dict[str, Any] = {}
        self.methods: list[dict[str, Any]] = []
        self.models: list[dict[str, Any]] = []
        self.models_info: dict[str, Any] = {}  # the rest of /v1/models: recommended, models_dir, searched
        self.default_model = ""
        self.connecting = False
        self._after_connect: list[Callable[[bool], None]] = []
        self._timer = QTimer(self)
        self._timer.setInterval(5000)
        self._timer.timeout.connect(self._on_health_tick)

    def set_state(self, state: str, message: str):
        if (state, message) != (self.state, self.message):
            self.state, self.message = state, message
            self.stateChanged.emit(state, message)

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def _state_dir(self) -> str | None:
        return self.settings.get("state_dir").strip() or None

    @property
    def remote(self) -> bool:
        """A backend on another machine (remote.py): never started or installed here."""
        return remote.is_remote(self.settings)

    def address(self) -> ServerInfo:
        """Where to find the backend (see the module's docstring)."""
        if self.remote:
            return ServerInfo(remote.remote_url(self.settings), remote.remote_token(self.settings) or None)
        if self.process.state == "ready" and self.process.info is not None:
            return self.process.info
        info = read_server_info(self._state_dir() or str(default_state_dir()))
        if info is not None and info.pid is not None and not pid_alive(info.pid):
            info = None  # left behind by a backend that is gone (killed, crashed)
        url = self.settings.get("backend_url").strip().rstrip("/")
        if url:
            return ServerInfo(url, info.token if info else None)
        return info or self.process.info or ServerInfo(DEFAULT_URL, None)

    # -- connecting ---------------------------------------------------------------------------
    def connect(self, then: Callable[[bool], None] | None = None):
        """(Re)connect: health, then methods and models. ``then(ok)`` is called at the end."""
        if then is not None:
            self._after_connect.append(then)
        if self.connecting:
            return
        self.connecting = True
        info = self.address()
        if self.remote and not info.url:
            self.set_state("unreachable", "Enter the address of the backend on the other machine "
                           f"under {remote.WHERE}.")
            return self._done(False)
        if (self.client is None or self.client.base_url != info.url or self.client.token != info.token
                or self.client.remote != self.remote):
            self._drop_client()
            url, settings = info.url, self.settings
            self.client = Client(info.url, info.token, self, remote=self.remote,
                                 pinned=lambda: remote.pinned(settings, url) if remote.is_remote(settings) else "")
        self.server = info
        if self.state != "connected" and self.process.state != "starting":
            self.set_state("connecting", f"Connecting to {info.url}\u2026")
        self.client.health(self._after_health, timeout_ms=5000)

    def _after_health(self, resp: Response):
        if not resp.ok:
            self.reason = resp.error.code if resp.error else "no_answer"
            is_cert = self.reason in (remote.UNKNOWN, remote.CHANGED)
            self.certificate = dict(resp.error.detail, kind=self.reason) if is_cert else None
            if self.process.state != "starting":
                self.set_state("unreachable", resp.error.message if resp.error else "no answer")
            if is_cert:
                self.certificateProblem.emit(self.certificate)
            return self._done(False)
        self.reason = ""
        self.certificate = None
        self.health = resp.json() or {}
        self.client.methods(self._after_methods)

    def _after_methods(self, resp: Response):
        if not resp.ok:
            self.set_state("unreachable", resp.error.message if resp.error else "no methods")
            return self._done(False)
        self.methods = list((resp.json() or {}).get("methods") or [])
        self.methodsLoaded.emit()
        self.client.models(self._after_models)

    def _after_models(self, resp: Response):
        if resp.ok:
            data = resp.json() or {}
            self.models = list(data.get("models") or [])
            self.models_info = {k: v for k, v in data.items() if k != "models"}
            self.default_model = data.get("default") or ""
            self.modelsLoaded.emit()
        version, device = self.health.get("version", ""), self.health.get("device", "")
        where = self.server.url if self.server else ""
        painter = self.health.get("painter") if self.remote else None
        who = f" as {painter.get('name')}" if isinstance(painter, dict) and painter.get("name") else ""
        clear = (" \u2014 not encrypted: your token and images cross the network in clear"
                 if self.remote and where.startswith("http://") and not remote.is_loopback(where) else "")
        self.set_state("connected", f"Connected to {where}{who}"
                       + (f" (v{version}, {device})" if version or device else "") + clear)
        self._done(True)

    # -- a backend on another machine: its certificate (remote.py) ---------------------------
    def _drop_client(self):
        """A new client (and a new QNetworkAccessManager) on the next connect: no kept-alive
        connection or TLS session of the old one is used again."""
        if self.client is not None:
            self.client.deleteLater()
            self.client = None

    def trust(self, fp: str):
        """Pin ``fp`` for the remote address and connect again."""
        remote.pin(self.settings, remote.remote_url(self.settings), fp)
        self.certificate = None
        self._drop_client()
        self.connect()

    def forget_certificate(self):
        """Forget the certificate trusted for the remote address; connecting again shows the
        fingerprint the backend presents now and asks."""
        remote.forget(self.settings, remote.remote_url(self.settings))
        self.certificate = None
        self._drop_client()
        self.connect()

    def _done(self, ok: bool):
        self.connecting = False
        callbacks, self._after_connect = self._after_connect, []
        for cb in callbacks:
            cb(ok)

    # -- the backend process ------------------------------------------------------------------
    def start(self, model: str | None, extra_args: list[str]):
        """Start a local backend (the configured command) and connect to it when ready; in remote
        mode nothing is started (the link connects to the remote backend instead)."""
        if self.remote:
            return self.connect()
        if self.process.running:
            return self.connect()
        from ..ui.lead import NOT_INSTALLED, find_command

        if find_command(self.settings)[0] is None:  # nothing to start: never a riddle about commands
            self.set_state("unreachable", f"{NOT_INSTALLED} Press \u201cInstall backend\u201d in the "
                           "Analogon docker.")
            return
        self.set_state("starting", "Starting the backend\u2026")
        self.process.log_directory = log_dir(self._state_dir())
        self.process.start(self.settings.get("backend_command"), model or None, extra_args=extra_args)

    def log_path(self):
        """The log of the backend started last (this session or an earlier one)."""
        if self.process.log_directory is None:
            self.process.log_directory = log_dir(self._state_dir())
        return self.process.latest_log()

    def stop(self):
        self.process.stop()
        self.set_state("disconnected", "The backend was stopped.")

    def _on_process_state(self, state: str, message: str):
        if state == "failed":
            self.set_state("unreachable", message)
            self._done(False)
        elif state == "starting":
            self.set_state("starting", message)

    # -- watching -----------------------------------------------------------------------------
    def start_monitoring(self, start: Callable[[], None] | None = None):
        """Check the backend every few seconds; ``start`` (autostart) or connect now."""
        if self._timer.isActive():
            return
        self._timer.start()
        if start is not None and not self.remote:
            start()
        else:
            self.connect()

    def _on_health_tick(self):
        if self.connecting or not self.idle() or self.process.state in ("starting", "failed"):
            return  # a backend we started failed: its message (last words) stays until you act
        if self.connected and self.client is not None:
            def check(resp: Response):
                if not resp.ok:
                    self.set_state("unreachable", resp.error.message if resp.error else "no answer")
            self.client.health(check, timeout_ms=4000)
        elif self.state in ("unreachable", "disconnected"):
            self.connect()

    def shutdown(self):
        """Krita is closing: stop watching and stop a backend we started."""
        self._timer.stop()
        self.process.stop(wait_ms=3000)
