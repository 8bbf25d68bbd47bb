"""A backend started by a program (Krita) ends with it: ``analogon serve --parent-pid PID``.

When the parent dies, even by SIGKILL (no chance to stop its children), the backend ends
within a few seconds, whatever it is doing, and its private state folder (the token) goes
with it. Three layers, fastest first:

1. The operating system. Linux: the kernel's parent-death signal
   (``prctl(PR_SET_PDEATHSIG, SIGTERM)``) when the parent is the direct parent: the server's
   clean shutdown. Windows: the plugin puts the backend into a job object that is killed when
   Krita's last handle to it closes (``backend_process.kill_on_close_job``).
2. A watchdog *process* (this file run as a script: ``python -I -S lifeline.py``; it imports
   nothing but the standard library). It polls the parent every 0.25 s (its pid and its
   start time, so that a reused pid is not taken for the parent; Windows: a handle of the
   parent process). When the parent is gone it sends the backend SIGTERM, SIGKILL after
   ``DOG_GRACE_S`` (Windows: TerminateProcess at once), and removes the backend's private state
   folder. It also removes that folder after any other end of the backend (a crash, the
   out-of-memory killer), and ends itself when the backend is gone. Being a process of its
   own, it needs nothing from the backend: a backend whose threads are all stuck behind the
   GIL (a long C call that does not release it: loading weights, some numpy/safetensors
   work) cannot run a signal handler or a watcher thread, but it can be killed.
3. A watcher thread in the backend, in case the watchdog could not be started: SIGTERM to
   itself, then ``os._exit`` after a grace (it needs the GIL to do either).

The private state folder is removed only when it is one the Krita plugin made for this
parent: it holds ``owner.json`` naming the parent's pid, it is not a link, and no live
process holds its image store. Only what a backend writes there is removed (server.json,
owner.json, the image store); the folder itself only if nothing else is left in it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("analogon.lifeline")

POLL_S = 0.5         # the watcher thread (fallback)
GRACE_S = 2.0        # the watcher thread: SIGTERM to itself → os._exit
DOG_POLL_S = 0.25    # the watchdog process: how often it looks at the parent
DOG_GRACE_S = 1.0    # the watchdog: SIGTERM → SIGKILL (a backend whose parent is gone has
                     # nothing left worth a long clean shutdown; its folder is removed anyway)
OWNER_FILE = "owner.json"  # written by the Krita plugin: {"krita_pid": ...}
STATE_FILES = ("server.json", OWNER_FILE)
STORE_DIR = "images"


# -- is a process alive ----------------------------------------------------------------------

def _linux_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie: dead, not yet reaped
            return None
        return fields[19]  # field 22 of stat: start time in clock ticks after boot
    except (OSError, IndexError):
        return None


def _posix_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


class _WindowsProcess:
    SYNCHRONIZE = 0x00100000
    PROCESS_TERMINATE = 0x0001
    PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
    WAIT_TIMEOUT = 0x102

    def __init__(self, pid: int, terminate: bool = False):
        import ctypes
        from ctypes import wintypes

        self.k32 = k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        k32.OpenProcess.restype = wintypes.HANDLE
        k32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
        k32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
        k32.WaitForSingleObject.restype = wintypes.DWORD
        k32.TerminateProcess.argtypes = (wintypes.HANDLE, wintypes.UINT)
        access = self.SYNCHRONIZE | self.PROCESS_QUERY_LIMITED_INFORMATION
        if terminate:
            access |= self.PROCESS_TERMINATE
        self.handle = k32.OpenProcess(access, False, int(pid))

    def alive(self) -> bool:
        if not self.handle:
            return False
        return self.k32.WaitForSingleObject(self.handle, 0) == self.WAIT_TIMEOUT

    def terminate(self) -> None:
        if self.handle:
            self.k32.TerminateProcess(self.handle, 1)

    def wait(self, timeout_s: float) -> bool:
        if not self.handle:
            return True
        return self.k32.WaitForSingleObject(self.handle, int(timeout_s * 1000)) != self.WAIT_TIMEOUT


# the name this class had first (the parent is what the backend watches)
_WindowsParent = _WindowsProcess


class ParentWatch:
    """Tells whether the parent given at start is still alive. ``start`` is the parent's
    start time as read earlier (Linux), when another process hands the watch on."""

    def __init__(self, pid: int, start: str | None = None):
        self.pid = int(pid)
        self.ppid_at_start = os.getppid() if hasattr(os, "getppid") else None
        self._win = _WindowsProcess(self.pid) if sys.platform == "win32" else None
        if sys.platform.startswith("linux"):
            self.start = start or _linux_start_time(self.pid)
        else:
            self.start = None

    def alive(self) -> bool:
        if self._win is not None:
            return self._win.alive()
        if self.ppid_at_start == self.pid and os.getppid() != self.pid:
            return False  # we were re-parented: our parent is gone
        if not _posix_alive(self.pid):
            return False
        if self.start is not None and _linux_start_time(self.pid) != self.start:
            return False  # the pid now belongs to another process (or it is a zombie)
        return True


# -- the private state folder ----------------------------------------------------------------

def _store_held(folder: Path) -> bool:
    """Whether a live process holds the image store in ``folder`` (its lock dies with it)."""
    try:
        import fcntl
    except ImportError:  # Windows: an open lock file cannot be removed anyway
        return False
    path = folder / STORE_DIR / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def is_private_state_dir(folder: str | os.PathLike | None, parent_pid: int | None) -> bool:
    """Whether ``folder`` is a private state folder the Krita plugin made for a backend of
    ``parent_pid``: a real folder (not a link) with ``owner.json`` naming that pid."""
    if not folder or not parent_pid:
        return False
    folder = Path(folder)
    try:
        if folder.is_symlink() or not folder.is_dir():
            return False
        owner = folder / OWNER_FILE
        if owner.is_symlink() or not owner.is_file():
            return False
        data = json.loads(owner.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("krita_pid") == int(parent_pid)


def remove_private_state_dir(folder: str | os.PathLike | None, parent_pid: int | None) -> bool:
    """Remove a backend's private state folder (see :func:`is_private_state_dir`) unless a
    live process holds its image store. Only what a backend writes is removed; the folder
    itself only when nothing else is left. Returns whether the folder is gone."""
    if not is_private_state_dir(folder, parent_pid):
        return False
    folder = Path(folder)
    if _store_held(folder):
        return False
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    for e in entries:
        try:
            if e.name == STORE_DIR and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            elif e.name in STATE_FILES or e.name.startswith(".server.json."):
                if not e.is_dir(follow_symlinks=False):
                    os.unlink(e.path)
        except OSError:
            pass
    try:
        os.rmdir(folder)  # only if empty: whatever else someone put there stays
    except OSError:
        return False
    return True


# the folder this backend removes when it ends (set by watch_parent)
_private: dict = {"dir": None, "parent": None}


def remove_own_state_dir() -> bool:
    """Remove this backend's private state folder, if it was given one (``watch_parent``).
    Call it after the server has stopped (its image store closed)."""
    folder, parent = _private["dir"], _private["parent"]
    if folder is None:
        return False
    gone = remove_private_state_dir(folder, parent)
    if gone:
        _private["dir"] = None
    return gone


# -- the watchdog process --------------------------------------------------------------------

def _say(msg: str) -> None:
    try:
        print(f"analogon: {msg}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class _Backend:
    """The watchdog's view of the backend, its parent process."""

    def __init__(self, pid: int):
        self.pid = int(pid)
        self._win = _WindowsProcess(self.pid, terminate=True) if sys.platform == "win32" else None
        # POSIX: while the backend is our parent, its pid is its own (a dead parent's
        # children are re-parented at once), so the signals below cannot reach another process
        self._ours = self._win is not None or os.getppid() == self.pid

    def alive(self) -> bool:
        if not self._ours:
            return False
        if self._win is not None:
            return self._win.alive()
        return os.getppid() == self.pid

    def gone(self) -> bool:
        """Whether the backend has certainly ended (its folder may then be removed)."""
        if self._win is not None:
            return bool(self._win.handle) and not self._win.alive()
        if self._ours:
            return os.getppid() != self.pid
        return not _posix_alive(self.pid)  # it was gone before we started (or never ours)

    def signal(self, sig) -> None:
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except OSError:
                pass

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, grace_s: float) -> bool:
        """SIGTERM (the server's clean shutdown), SIGKILL after ``grace_s``. Windows: there
        is no clean stop from outside; TerminateProcess at once."""
        if self._win is not None:
            self._win.terminate()
            return self._win.wait(2.0)
        self.signal(signal.SIGTERM)
        if self.wait(grace_s):
            return True
        _say(f"the backend (pid {self.pid}) did not stop within {grace_s:g} s; killing it")
        self.signal(signal.SIGKILL)
        return self.wait(2.0)


def run_watchdog(parent_pid: int, backend_pid: int, state_dir: str | None = None,
                 parent_start: str | None = None, poll_s: float = DOG_POLL_S,
                 grace_s: float = DOG_GRACE_S) -> int:
    """The watchdog's loop (see the module's doc). Returns when the backend is gone."""
    for name in ("SIGINT", "SIGHUP"):  # a Ctrl+C or a closed terminal is for the backend
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (OSError, ValueError):
                pass
    backend = _Backend(backend_pid)
    parent = ParentWatch(parent_pid, start=parent_start)
    while backend.alive():
        if not parent.alive():
            _say(f"the parent process {parent_pid} ended; stopping the backend (pid {backend_pid})")
            backend.stop(grace_s)
            break
        time.sleep(poll_s)
    if state_dir and backend.gone() and remove_private_state_dir(state_dir, parent_pid):
        _say(f"removed the backend's state folder {state_dir}")
    return 0


def _watchdog_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="analogon-lifeline")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--parent-start", default=None)
    p.add_argument("--backend-pid", type=int, required=True)
    p.add_argument("--state-dir", default=None)
    p.add_argument("--grace", type=float, default=DOG_GRACE_S)
    a = p.parse_args(argv)
    return run_watchdog(a.parent_pid, a.backend_pid, a.state_dir, a.parent_start, grace_s=a.grace)


_dog: list = []  # the watchdog's Popen (kept referenced)


def start_watchdog(parent_pid: int, state_dir: str | os.PathLike | None = None,
                   parent_start: str | None = None) -> subprocess.Popen | None:
    """Start the watchdog process for this backend. None when it cannot be started."""
    exe = sys.executable
    if not exe:
        return None
    here = os.path.abspath(__file__)
    if os.path.isfile(here) and here.endswith(".py"):
        cmd = [exe, "-I", "-S", here]  # no site, no package: only the standard library
    else:  # pragma: no cover - an installation without source files
        cmd = [exe, "-m", "analogon.lifeline"]
    cmd += ["--parent-pid", str(int(parent_pid)), "--backend-pid", str(os.getpid())]
    if parent_start:
        cmd += ["--parent-start", str(parent_start)]
    if state_dir:
        cmd += ["--state-dir", str(state_dir)]
    kw: dict = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "close_fds": True}
    tries = [kw]
    if sys.platform == "win32":
        # out of the plugin's kill-on-close job (when it allows that), so that it outlives
        # the job's kill and removes the folder; without breakaway it dies with the backend
        CREATE_NO_WINDOW, CREATE_BREAKAWAY_FROM_JOB = 0x08000000, 0x01000000
        tries = [dict(kw, creationflags=CREATE_NO_WINDOW | CREATE_BREAKAWAY_FROM_JOB),
                 dict(kw, creationflags=CREATE_NO_WINDOW)]
    for options in tries:
        try:
            proc = subprocess.Popen(cmd, **options)
        except (OSError, ValueError) as e:
            err = e
            continue
        _dog.append(proc)
        return proc
    log.warning("cannot start the lifeline watchdog (%s); the watcher thread remains", err)
    return None


# -- in the backend --------------------------------------------------------------------------

def _set_parent_death_signal(parent_pid: int) -> bool:
    """Linux: have the kernel send SIGTERM when the parent dies (only if it is our parent)."""
    if not sys.platform.startswith("linux") or os.getppid() != parent_pid:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # the parent may have died before the call: then no signal comes
    return os.getppid() == parent_pid


def _stop_self(reason: str) -> None:
    log.warning("%s: the backend stops", reason)
    _say(f"{reason}; stopping")
    try:
        if sys.platform == "win32":
            raise OSError  # no SIGTERM to oneself there: go straight to the hard stop below
        os.kill(os.getpid(), signal.SIGTERM)  # the server's clean shutdown
    except OSError:
        remove_own_state_dir()
        os._exit(0)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    # still here: a job or a hung shutdown; the parent is gone, so is our purpose
    remove_own_state_dir()
    os._exit(0)


def watch_parent(pid: int | None, state_dir: str | os.PathLike | None = None, poll_s: float = POLL_S,
                 watchdog: bool = True) -> threading.Thread | None:
    """End this process when ``pid`` dies (see the module's doc). No-op without a pid.
    ``state_dir``: this backend's state folder, removed when it ends if it is a private one
    made for this parent (:func:`is_private_state_dir`)."""
    if not pid:
        return None
    pid = int(pid)
    watch = ParentWatch(pid)
    if state_dir and is_private_state_dir(state_dir, pid):
        _private["dir"], _private["parent"] = Path(state_dir), pid
    if not watch.alive():
        log.warning("the parent process %d is not running: the backend stops", pid)
        _say(f"the parent process {pid} is not running; stopping")
        remove_own_state_dir()
        os._exit(0)
    pdeath = _set_parent_death_signal(pid)
    dog = start_watchdog(pid, _private["dir"], watch.start) if watchdog else None

    def run():
        while watch.alive():
            time.sleep(poll_s)
        _stop_self(f"the parent process {pid} ended")

    t = threading.Thread(target=run, name="analogon-parent-watch", daemon=True)
    t.start()
    log.info("watching parent process %d (parent-death signal: %s, watchdog: %s)", pid, pdeath,
             dog.pid if dog is not None else "none")
    return t


if __name__ == "__main__":
    sys.exit(_watchdog_main(sys.argv[1:]))
