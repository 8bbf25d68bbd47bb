"""A backend started by a program (Krita) ends with it: ``analogon serve --parent-pid PID``.

When the parent dies, even by SIGKILL (no chance to stop its children), the backend stops
itself: first cleanly (SIGTERM to itself: the server removes server.json), and if that has
not finished after a short grace, at once (a running job is not waited for).

How the death is noticed:
- Linux: the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) when the parent
  is the direct parent, plus polling (the parent's pid and its start time, so that a reused
  pid is not taken for the parent);
- Windows: a handle of the parent process, waited on (a handle keeps the process object,
  so a reused pid cannot fool it);
- macOS and others: polling the parent's pid and our own parent pid.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("analogon.lifeline")

POLL_S = 0.5
GRACE_S = 2.0


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


class _WindowsParent:
    SYNCHRONIZE = 0x00100000
    PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
    WAIT_TIMEOUT = 0x102

    def __init__(self, pid: int):
        import ctypes

        self.k32 = ctypes.WinDLL("kernel32", use_last_error=True)
        self.handle = self.k32.OpenProcess(self.SYNCHRONIZE | self.PROCESS_QUERY_LIMITED_INFORMATION,
                                           False, int(pid))

    def alive(self) -> bool:
        if not self.handle:
            return False
        return self.k32.WaitForSingleObject(self.handle, 0) == self.WAIT_TIMEOUT


class ParentWatch:
    """Tells whether the parent given at start is still alive."""

    def __init__(self, pid: int):
        self.pid = int(pid)
        self.ppid_at_start = os.getppid() if hasattr(os, "getppid") else None
        self._win = _WindowsParent(self.pid) if sys.platform == "win32" else None
        self._start = _linux_start_time(self.pid) if sys.platform.startswith("linux") else None

    def alive(self) -> bool:
        if self._win is not None:
            return self._win.alive()
        if self.ppid_at_start == self.pid and os.getppid() != self.pid:
            return False  # we were re-parented: our parent is gone
        if not _posix_alive(self.pid):
            return False
        if self._start is not None and _linux_start_time(self.pid) != self._start:
            return False  # the pid now belongs to another process
        return True


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
    print(f"analogon: {reason}; stopping", file=sys.stderr, flush=True)
    try:
        if sys.platform == "win32":
            raise OSError  # no SIGTERM to oneself there: go straight to the hard stop below
        os.kill(os.getpid(), signal.SIGTERM)  # the server's clean shutdown
    except OSError:
        os._exit(0)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0)  # still here: a job or a hung shutdown; the parent is gone, so is our purpose


def watch_parent(pid: int | None, poll_s: float = POLL_S) -> threading.Thread | None:
    """Stop this process when ``pid`` dies (see the module's doc). No-op without a pid."""
    if not pid:
        return None
    pid = int(pid)
    watch = ParentWatch(pid)
    if not watch.alive():
        _stop_self(f"the parent process {pid} is not running")
        return None
    pdeath = _set_parent_death_signal(pid)

    def run():
        while watch.alive():
            time.sleep(poll_s)
        _stop_self(f"the parent process {pid} ended")

    t = threading.Thread(target=run, name="analogon-parent-watch", daemon=True)
    t.start()
    log.info("watching parent process %d (parent-death signal: %s)", pid, pdeath)
    return t
