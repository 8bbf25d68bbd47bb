"""Starting and stopping a local backend, reading its token, waiting until it is ready.

The backend writes ``server.json`` ({url, token, pid, version}) into its state folder when it
listens. We start it with a private state folder and ``--port 0``, wait for that file and for
``GET /v1/health``, and stop it when Krita quits (only if we started it).
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .qt import QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

SERVER_FILE = "server.json"
DEFAULT_URL = "http://127.0.0.1:7871"


@dataclass
class ServerInfo:
    url: str
    token: str | None = None
    pid: int | None = None
    version: str | None = None


def default_state_dir() -> Path:
    """Where a backend the user started himself writes server.json (docs/protocol.md)."""
    env = os.environ.get("ANALOGON_STATE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "analogon"
    return Path.home() / ".local" / "state" / "analogon"


def read_server_info(state_dir: str | os.PathLike) -> ServerInfo | None:
    path = Path(state_dir) / SERVER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("url"):
        return None
    pid = data.get("pid")
    return ServerInfo(str(data["url"]).rstrip("/"), data.get("token"),
                      int(pid) if isinstance(pid, int) else None, data.get("version"))


def default_command() -> str:
    """The backend the docker installed (``installer.venv_dir``), else ``analogon`` on PATH,
    else a virtual environment in a usual place, else plain ``analogon`` (the error message
    then says how to set it)."""
    from .installer import installed_command

    mine = installed_command()
    if mine is not None:
        return str(mine)
    found = shutil.which("analogon")
    if found:
        return found
    home = Path.home()
    exe = "analogon.exe" if sys.platform == "win32" else "analogon"
    bindir = "Scripts" if sys.platform == "win32" else "bin"
    for venv in (home / ".local" / "share" / "analogon" / "venv", home / "analogon" / ".venv",
                 home / ".venvs" / "analogon"):
        candidate = venv / bindir / exe
        if candidate.exists():
            return str(candidate)
    return "analogon"


def split_command(command: str) -> list[str]:
    command = (command or "").strip() or default_command()
    if os.path.exists(command):  # a path with spaces, unquoted
        return [command]
    return shlex.split(command, posix=sys.platform != "win32")


def force_kill(pid: int) -> bool:
    """The last resort when QProcess.kill() did not end the process: SIGKILL on POSIX;
    on Windows (no SIGKILL there) TerminateProcess, which os.kill does for any signal."""
    sig = getattr(signal, "SIGKILL", None)
    try:
        os.kill(pid, sig if sig is not None else signal.SIGTERM)
        return True
    except OSError:
        return False


_RUNNING: "set[BackendProcess]" = set()


@atexit.register
def _stop_all():  # last resort when Krita exits without telling us
    for proc in list(_RUNNING):
        try:
            proc.stop(wait_ms=1000)
        except RuntimeError:  # the Qt side is already gone (the process died with it)
            pass


class BackendProcess(QObject):
    """A backend subprocess. Signals: ``stateChanged(state, message)`` with state in
    stopped/starting/ready/failed; ``ready(ServerInfo)``."""

    stateChanged = pyqtSignal(str, str)
    ready = pyqtSignal(object)

    def __init__(self, parent: QObject | None = None, start_timeout_ms: int = 180_000,
                 poll_ms: int = 200):
        super().__init__(parent)
        self.state = "stopped"
        self.message = ""
        self.info: ServerInfo | None = None
        self.state_dir: Path | None = None
        self.start_timeout_ms = start_timeout_ms
        self._proc: QProcess | None = None
        self._output = b""
        self._poll = QTimer(self)
        self._poll.setInterval(poll_ms)
        self._poll.timeout.connect(self._on_poll)
        self._deadline = QTimer(self)
        self._deadline.setSingleShot(True)
        self._deadline.timeout.connect(self._on_deadline)
        self._health_call = None
        self._client = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning

    @property
    def pid(self) -> int | None:
        if self._proc is None:
            return None
        pid = self._proc.processId()
        return int(pid) if pid else None

    def _set_state(self, state: str, message: str = ""):
        self.state, self.message = state, message
        self.stateChanged.emit(state, message)

    def start(self, command: str = "", model: str | None = None, extra_args: list[str] | None = None,
              env: dict[str, str] | None = None):
        if self.running:
            return
        argv = split_command(command)
        self.state_dir = Path(tempfile.mkdtemp(prefix="analogon-krita-"))
        args = argv[1:] + ["serve", "--host", "127.0.0.1", "--port", "0",
                           "--state-dir", str(self.state_dir)]
        if model:
            args += ["--model", model]
        args += list(extra_args or [])
        self._output = b""
        self.info = None
        proc = QProcess(self)
        penv = QProcessEnvironment.systemEnvironment()
        for k, v in (env or {}).items():
            penv.insert(k, v)
        proc.setProcessEnvironment(penv)
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        proc.readyReadStandardOutput.connect(self._on_output)
        proc.errorOccurred.connect(self._on_error)
        proc.finished.connect(self._on_finished)
        self._proc = proc
        self._program = argv[0]
        self._set_state("starting", "Starting the backend\u2026")
        _RUNNING.add(self)
        proc.start(argv[0], args)
        self._poll.start()
        self._deadline.start(self.start_timeout_ms)

    def _on_output(self):
        if self._proc is not None:
            self._output = (self._output + bytes(self._proc.readAllStandardOutput().data()))[-8000:]

    def last_output(self, lines: int = 3) -> str:
        text = self._output.decode("utf-8", "replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def _on_error(self, error):
        if error == QProcess.ProcessError.FailedToStart:
            self._fail(f"Cannot start the backend: \u201c{self._program}\u201d was not found or is "
                       "not executable. Set the backend command in the Analogon settings "
                       "(for example /path/to/venv/bin/analogon).")

    def _on_finished(self, code, status=None):
        if self.state in ("starting", "ready"):
            tail = self.last_output()
            msg = f"The backend stopped (exit code {code})."
            if tail:
                msg += " Its last words: " + tail
            self._fail(msg)
        _RUNNING.discard(self)

    def _on_poll(self):
        if self.state != "starting" or self._health_call is not None:
            return
        info = read_server_info(self.state_dir) if self.state_dir else None
        if info is None:
            return
        from .client import Client

        if self._client is None or self._client.base_url != info.url:
            self._client = Client(info.url, info.token, self)
        self._health_call = self._client.health(lambda r, i=info: self._after_health(i, r),
                                                timeout_ms=5000)

    def _after_health(self, info: ServerInfo, resp):
        self._health_call = None
        if self.state != "starting":
            return
        if resp.ok:
            self._poll.stop()
            self._deadline.stop()
            self.info = info
            self._set_state("ready", f"Backend ready at {info.url}")
            self.ready.emit(info)

    def _on_deadline(self):
        if self.state == "starting":
            self._fail(f"The backend did not become ready within {self.start_timeout_ms // 1000} s. "
                       + (("Its last words: " + self.last_output()) if self._output else ""))
            self.stop()

    def _fail(self, message: str):
        self._poll.stop()
        self._deadline.stop()
        if not self.running:
            _RUNNING.discard(self)
        if self.state != "failed":
            self._set_state("failed", message)

    def stop(self, wait_ms: int = 5000):
        """Stop the backend if we started it (terminate, then kill)."""
        self._poll.stop()
        self._deadline.stop()
        proc, self._proc = self._proc, None
        _RUNNING.discard(self)
        if proc is not None:
            try:
                proc.finished.disconnect(self._on_finished)
                proc.errorOccurred.disconnect(self._on_error)
            except (TypeError, RuntimeError):
                pass
            if proc.state() != QProcess.ProcessState.NotRunning:
                pid = proc.processId()
                proc.terminate()
                if not proc.waitForFinished(wait_ms):
                    proc.kill()
                    proc.waitForFinished(2000)
                if proc.state() != QProcess.ProcessState.NotRunning and pid:
                    force_kill(int(pid))
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None
        if self.state != "stopped":
            self._set_state("stopped", "The backend was stopped.")
