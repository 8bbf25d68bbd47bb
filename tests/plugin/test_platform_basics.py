"""The plugin's platform branches: killing a stuck backend where there is no SIGKILL."""
from __future__ import annotations

import signal
import subprocess
import sys

from analogon_krita.link import backend_process as bp


def test_force_kill_without_sigkill(monkeypatch):
    calls = []
    monkeypatch.delattr(bp.signal, "SIGKILL", raising=False)  # as on Windows
    monkeypatch.setattr(bp.os, "kill", lambda pid, sig: calls.append((pid, sig)))
    assert bp.force_kill(4242)
    assert calls == [(4242, signal.SIGTERM)]  # os.kill on Windows: TerminateProcess


def test_force_kill_ends_a_process_that_ignores_terminate():
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        assert bp.force_kill(proc.pid)
        assert proc.wait(timeout=20) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert not bp.force_kill(proc.pid)  # gone: nothing to kill
