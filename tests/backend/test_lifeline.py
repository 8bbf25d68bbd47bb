"""A backend started with --parent-pid ends with its parent, even when the parent is killed
(SIGKILL: it cannot stop its children itself)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from analogon.lifeline import ParentWatch

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

CHILD = ("import os, sys, time; from analogon.lifeline import watch_parent; "
         "watch_parent(int(sys.argv[1])); print('watching', flush=True); time.sleep(120)")
PARENT = ("import subprocess, sys, os, time; "
          "c = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())]); "
          "print(c.pid, flush=True); time.sleep(120)")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not alive(pid):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def test_the_watched_process_ends_within_seconds_of_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the child is watching (its imports are light)
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        took = wait_gone(child, 5.0)
        assert took is not None, "the child outlived its killed parent by 5 s"
    finally:
        for pid in (child, parent.pid):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_parent_that_is_gone_at_start_stops_the_process_at_once():
    proc = subprocess.run([sys.executable, "-c", CHILD, "999999999"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 or "watching" not in proc.stdout
    assert "watching" not in proc.stdout


def test_parent_watch_sees_its_own_parent_alive():
    assert ParentWatch(os.getppid()).alive()
    assert ParentWatch(os.getpid()).alive()
