"""Starting and stopping a local backend, reading its token, waiting until it is ready.

The backend writes ``server.json`` ({url, token, pid, version}) into its state folder when it
listens. We start it with a private state folder (``analogon-krita-*`` in the temporary
folder) and ``--port 0``, wait for that file and for ``GET /v1/health``, and stop it when
Krita quits (only if we started it).

A backend must not outlive Krita, also when Krita is killed: it is started with
``--parent-pid`` (Krita's pid) and ends within a few seconds of Krita, taking its private
folder along (see the backend's ``analogon.lifeline``: Linux's parent-death signal and a
watchdog process). On Windows it is also put into a job object that Windows kills when Krita
ends (:func:`kill_on_close_job`). The private folders of backends that are gone are removed
the next time Krita starts. Everything the backend prints goes to a log file in the state folder
(``logs/backend.log``, the one before as ``backend.1.log``); when it stops unexpectedly,
its "last words" are the log's last error lines.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..qt import QIODevice, QObject, QProcess, QProcessEnvironment, QTimer, pyqtSignal

SERVER_FILE = "server.json"
OWNER_FILE = "owner.json"  # {krita_pid}: which Krita started the backend of a private folder
STATE_PREFIX = "analogon-krita-"
LOG_NAME = "backend.log"
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


def log_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """Where the logs of the backends the plugin starts go: ``logs`` in the state folder."""
    return Path(state_dir or default_state_dir()) / "logs"


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid runs (a zombie counts as gone)."""
    if not pid or pid <= 0:
        return False
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import ctypes

        k32 = ctypes.windll.kernel32
        handle = k32.OpenProcess(0x1000, False, int(pid))  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = k32.GetExitCodeProcess(handle, ctypes.byref(code))
        k32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) said it exists


def _json_pid(path: Path, key: str) -> int | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def remove_stale_state_dirs(tmp: str | os.PathLike | None = None, min_age_s: float = 600.0) -> list[Path]:
    """Remove the private folders (token, server.json) of backends that are gone: neither
    the Krita that started one nor the backend itself runs. A folder that names no process
    is removed once it is older than ``min_age_s``. Returns the folders removed."""
    import time

    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(STATE_PREFIX + "*"):
        try:
            if not d.is_dir() or d.is_symlink():
                continue
            pids = [_json_pid(d / OWNER_FILE, "krita_pid"), _json_pid(d / SERVER_FILE, "pid")]
            if any(pid_alive(p) for p in pids if p):
                continue
            if not any(pids) and time.time() - d.stat().st_mtime < min_age_s:
                continue  # being made right now, perhaps
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        if not d.exists():
            removed.append(d)
    return removed


_PROGRESS = re.compile(r"(\d+%\|)|(\|[\s\S]*\|\s*\d+/\d+)|(\d+(\.\d+)?\s*(it/s|s/it)\])")
_ERRORISH = re.compile(r"error|exception|fatal|killed|cannot|can't|could not|failed|refused|"
                       r"out of memory|no such|not found|denied|errno|abort", re.IGNORECASE)


def last_words(path: str | os.PathLike | None, lines: int = 3, max_chars: int = 400) -> str:
    """What a backend said last that explains why it stopped, from its log: the exception
    of the last traceback, else the last lines that read like errors, else its last lines;
    never progress bars (lines redrawn with carriage returns, tqdm bars)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            raw = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    text = []
    for line in raw.split("\n"):
        line = line.split("\r")[-1].rstrip()  # what a carriage-return redraw left showing
        if line.strip() and not _PROGRESS.search(line):
            text.append(line)
    text = [t for t in text if not t.startswith("=== ")]  # our own start markers
    last_tb = max((i for i, t in enumerate(text) if t.startswith("Traceback (most recent call last)")),
                  default=-1)
    if last_tb >= 0:
        after = [t for t in text[last_tb + 1:] if not t[:1].isspace()]
        if after:
            picked = after[:lines]
            return _clip("\n".join(picked), max_chars)
    errors = [t.strip() for t in text if _ERRORISH.search(t)]
    picked = errors[-lines:] if errors else [t.strip() for t in text[-lines:]]
    return _clip("\n".join(picked), max_chars)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else "\u2026" + text[-(n - 1):]


def open_log(directory: Path, header: str) -> Path:
    """The log file for a backend about to start: the previous one is kept as ``backend.1.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOG_NAME
    if path.exists():
        try:
            os.replace(path, directory / "backend.1.log")
        except OSError:
            pass
    with open(path, "a", encoding="utf-8") as f:
        f.write(header.rstrip() + "\n")
    return path


def default_command() -> str:
    """The backend the docker installed (``installer.venv_dir``), else ``analogon`` on PATH,
    else a virtual environment in a usual place, else plain ``analogon`` (the error message
    then says how to set it)."""
    from ..install.installer import installed_command

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


def _job_limit_struct():
    """JOBOBJECT_EXTENDED_LIMIT_INFORMATION (winnt.h), with fixed-size fields (a DWORD is
    32 bits, a LARGE_INTEGER 64, ULONG_PTR and SIZE_T pointer-sized)."""
    import ctypes

    u32, i64, u64, size = ctypes.c_uint32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_size_t

    class Basic(ctypes.Structure):
        _fields_ = [("PerProcessUserTimeLimit", i64), ("PerJobUserTimeLimit", i64),
                    ("LimitFlags", u32), ("MinimumWorkingSetSize", size),
                    ("MaximumWorkingSetSize", size), ("ActiveProcessLimit", u32),
                    ("Affinity", size), ("PriorityClass", u32), ("SchedulingClass", u32)]

    class IoCounters(ctypes.Structure):
        _fields_ = [(n, u64) for n in ("ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
                                        "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]

    class Extended(ctypes.Structure):
        _fields_ = [("BasicLimitInformation", Basic), ("IoInfo", IoCounters),
                    ("ProcessMemoryLimit", size), ("JobMemoryLimit", size),
                    ("PeakProcessMemoryUsed", size), ("PeakJobMemoryUsed", size)]

    return Extended


class _Job:
    """A Windows job object handle; closing it (or Krita's end) kills what is still in it."""

    def __init__(self, k32, handle):
        self._k32, self.handle = k32, handle

    def close(self):
        handle, self.handle = self.handle, None
        if handle:
            self._k32.CloseHandle(handle)


def kill_on_close_job(pid: int | None):
    """Windows: put the process ``pid`` into a new job object that Windows kills when its
    last handle closes, which Krita holds: when Krita ends, also by a crash or the task
    manager, the backend ends with it (JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE). Breakaway is
    allowed, so that the backend's watchdog can stay out of it and remove the private folder
    afterwards. Returns the job (keep it; ``close()`` it once the backend has stopped), or
    None elsewhere and where Windows refuses (e.g. Krita in a job that forbids nesting)."""
    if sys.platform != "win32" or not pid:
        return None
    import ctypes
    from ctypes import wintypes

    JobObjectExtendedLimitInformation = 9
    KILL_ON_JOB_CLOSE, BREAKAWAY_OK = 0x2000, 0x0800
    PROCESS_SET_QUOTA, PROCESS_TERMINATE = 0x0100, 0x0001
    try:
        k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        k32.CreateJobObjectW.restype = wintypes.HANDLE
        k32.CreateJobObjectW.argtypes = (ctypes.c_void_p, wintypes.LPCWSTR)
        k32.SetInformationJobObject.restype = wintypes.BOOL
        k32.SetInformationJobObject.argtypes = (wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD)
        k32.OpenProcess.restype = wintypes.HANDLE
        k32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        k32.AssignProcessToJobObject.restype = wintypes.BOOL
        k32.AssignProcessToJobObject.argtypes = (wintypes.HANDLE, wintypes.HANDLE)
        k32.CloseHandle.argtypes = (wintypes.HANDLE,)
        job = k32.CreateJobObjectW(None, None)
        if not job:
            return None
        info = _job_limit_struct()()
        info.BasicLimitInformation.LimitFlags = KILL_ON_JOB_CLOSE | BREAKAWAY_OK
        ok = bool(k32.SetInformationJobObject(job, JobObjectExtendedLimitInformation,
                                              ctypes.byref(info), ctypes.sizeof(info)))
        proc = k32.OpenProcess(PROCESS_SET_QUOTA | PROCESS_TERMINATE, False, int(pid)) if ok else None
        ok = ok and bool(proc) and bool(k32.AssignProcessToJobObject(job, proc))
        if proc:
            k32.CloseHandle(proc)
        if not ok:
            k32.CloseHandle(job)
            return None
        return _Job(k32, job)
    except (OSError, AttributeError, ValueError):
        return None


_RUNNING: "set[BackendProcess]" = set()


@atexit.register
def _stop_all():  # last resort when Krita exits without telling us
    for proc in list(_RUNNING):
        try:
            proc.stop(wait_ms=1000)
        except RuntimeError:  # the Qt side is already gone (the process died with it)
            pass


_SWEPT = False  # the stale private folders are looked at once per Krita session


class BackendProcess(QObject):
    """A backend subprocess. Signals: ``stateChanged(state, message)`` with state in
    stopped/starting/ready/failed; ``ready(ServerInfo)``. ``info`` keeps the address of the
    last backend that was ready, also after it stopped, so that messages name it."""

    stateChanged = pyqtSignal(str, str)
    ready = pyqtSignal(object)

    def __init__(self, parent: QObject | None = None, start_timeout_ms: int = 180_000,
                 poll_ms: int = 200, log_directory: str | os.PathLike | None = None):
        super().__init__(parent)
        global _SWEPT
        if not _SWEPT:
            _SWEPT = True
            remove_stale_state_dirs()
        self.state = "stopped"
        self.message = ""
        self.info: ServerInfo | None = None
        self.state_dir: Path | None = None
        self.log_directory = Path(log_directory) if log_directory else None
        self.log_path: Path | None = None
        self.start_timeout_ms = start_timeout_ms
        self._proc: QProcess | None = None
        self._poll = QTimer(self)
        self._poll.setInterval(poll_ms)
        self._poll.timeout.connect(self._on_poll)
        self._deadline = QTimer(self)
        self._deadline.setSingleShot(True)
        self._deadline.timeout.connect(self._on_deadline)
        self._health_call = None
        self._client = None
        self._job = None  # Windows: the kill-on-close job the backend runs in

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.state() != QProcess.ProcessState.NotRunning

    @property
    def pid(self) -> int | None:
        if self._proc is None:
            return None
        pid = self._proc.processId()
        return int(pid) if pid else None

    @property
    def url(self) -> str:
        """The address of the backend we started last ("" before it was ready)."""
        return self.info.url if self.info is not None else ""

    def latest_log(self) -> Path | None:
        """The log of the backend started last (also from an earlier Krita session)."""
        if self.log_path is not None and self.log_path.exists():
            return self.log_path
        path = (self.log_directory or log_dir()) / LOG_NAME
        return path if path.exists() else None

    def _set_state(self, state: str, message: str = ""):
        self.state, self.message = state, message
        self.stateChanged.emit(state, message)

    def start(self, command: str = "", model: str | None = None, extra_args: list[str] | None = None,
              env: dict[str, str] | None = None):
        if self.running:
            return
        import time

        remove_stale_state_dirs()
        argv = split_command(command)
        self.state_dir = Path(tempfile.mkdtemp(prefix=STATE_PREFIX))
        (self.state_dir / OWNER_FILE).write_text(json.dumps({"krita_pid": os.getpid()}), encoding="utf-8")
        args = argv[1:] + ["serve", "--host", "127.0.0.1", "--port", "0",
                           "--state-dir", str(self.state_dir), "--parent-pid", str(os.getpid())]
        if model:
            args += ["--model", model]
        args += list(extra_args or [])
        self.log_path = open_log(self.log_directory or log_dir(),
                                 f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} Krita (pid {os.getpid()}) "
                                 f"starts: {' '.join([argv[0]] + args)}")
        self.info = None
        proc = QProcess(self)
        penv = QProcessEnvironment.systemEnvironment()
        for k, v in (env or {}).items():
            penv.insert(k, v)
        proc.setProcessEnvironment(penv)
        proc.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        # the operating system writes the output: nothing is lost when Krita is busy or dies
        proc.setStandardOutputFile(str(self.log_path), QIODevice.OpenModeFlag.Append)
        proc.errorOccurred.connect(self._on_error)
        proc.finished.connect(self._on_finished)
        self._proc = proc
        self._program = argv[0]
        self._set_state("starting", "Starting the backend\u2026")
        _RUNNING.add(self)
        proc.start(argv[0], args)
        if sys.platform == "win32":  # Windows ends the backend with Krita, whatever kills Krita
            if self._job is not None:
                self._job.close()
            self._job = kill_on_close_job(proc.processId())
        self._poll.start()
        self._deadline.start(self.start_timeout_ms)

    def last_output(self, lines: int = 3) -> str:
        """The backend's last words: the log's last error lines (see :func:`last_words`)."""
        return last_words(self.log_path, lines)

    def _on_error(self, error):
        if error == QProcess.ProcessError.FailedToStart:
            self._fail(f"Cannot start the backend: \u201c{self._program}\u201d was not found or is "
                       "not executable. Set the backend command in the Analogon settings "
                       "(for example /path/to/venv/bin/analogon).")

    def _on_finished(self, code, status=None):
        if self.state in ("starting", "ready"):
            tail = self.last_output()
            where = f" at {self.url}" if self.url else ""
            crashed = status == QProcess.ExitStatus.CrashExit
            msg = (f"The backend{where} was killed or crashed." if crashed
                   else f"The backend{where} stopped (exit code {code}).")
            if tail:
                msg += " Its last words: " + tail
            if self.log_path is not None:
                msg += f" (log: {self.log_path})"
            self._fail(msg)
        _RUNNING.discard(self)
        self._remove_state_dir()

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
            tail = self.last_output()
            self._fail(f"The backend did not become ready within {self.start_timeout_ms // 1000} s."
                       + (" Its last words: " + tail if tail else ""))
            self.stop()

    def _fail(self, message: str):
        self._poll.stop()
        self._deadline.stop()
        if not self.running:
            _RUNNING.discard(self)
        if self.state != "failed":
            self._set_state("failed", message)

    def _remove_state_dir(self):
        job, self._job = self._job, None
        if job is not None:  # the backend has ended: nothing of it is left running
            job.close()
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None

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
        self._remove_state_dir()
        if self.state != "stopped":
            self._set_state("stopped", "The backend was stopped.")
