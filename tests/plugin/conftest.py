"""Plugin tests: PyQt6 offscreen, a fake ``krita`` module, and (when the backend package is
importable) a real backend server on a loopback port."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["ANALOGON_QT_API"] = "pyqt6"

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "plugin"))
sys.path.insert(0, str(HERE))

import fake_krita  # noqa: E402

fake_krita.install()

from PyQt6.QtCore import QCoreApplication, QEventLoop, QTimer  # noqa: E402
from PyQt6.QtWidgets import QApplication  # noqa: E402

_QAPP = QApplication.instance() or QApplication(["analogon-tests"])


@pytest.fixture
def kapp():
    """A fresh fake Krita application (settings, documents) for each test."""
    fake_krita.Krita._app = None
    return fake_krita.Krita.instance()


def wait_until(predicate, timeout: float = 10.0, step_ms: int = 10) -> bool:
    """Run the Qt event loop until ``predicate()`` is true; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        loop = QEventLoop()
        QTimer.singleShot(step_ms, loop.quit)
        loop.exec()
    return bool(predicate())


def process_events(ms: int = 50):
    wait_until(lambda: False, ms / 1000)


def _backend_available() -> str | None:
    if importlib.util.find_spec("analogon") is None or importlib.util.find_spec("analogon.server") is None:
        return "analogon.server cannot be imported yet"
    exe = Path(sys.executable).parent / "analogon"
    if not exe.exists() and not shutil.which("analogon"):
        return "the analogon command is not installed"
    return None


def analogon_command() -> str:
    exe = Path(sys.executable).parent / "analogon"
    return str(exe) if exe.exists() else (shutil.which("analogon") or "analogon")


class Backend:
    def __init__(self, state_dir: Path, proc: subprocess.Popen):
        self.state_dir = state_dir
        self.proc = proc
        info = json.loads((state_dir / "server.json").read_text())
        self.url, self.token = info["url"], info["token"]


@pytest.fixture(scope="session")
def backend(tmp_path_factory):
    """A real `analogon serve` subprocess on a free loopback port (tiny-sd)."""
    reason = _backend_available()
    if reason:
        pytest.skip(f"no backend server to test against: {reason}")
    state = tmp_path_factory.mktemp("backend-state")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(state / "log.txt", "wb")
    proc = subprocess.Popen([analogon_command(), "serve", "--host", "127.0.0.1", "--port", "0",
                             "--state-dir", str(state), "--model", "tiny-sd",
                             "--parent-pid", str(os.getpid())],  # gone with an aborted test run
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while not (state / "server.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the backend did not start: " + (state / "log.txt").read_text()[-2000:])
        time.sleep(0.1)
    b = Backend(state, proc)
    import urllib.request
    while True:
        try:
            urllib.request.urlopen(b.url + "/v1/health", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the backend does not answer /v1/health")
            time.sleep(0.1)
    yield b
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


@pytest.fixture(scope="session")
def release(tmp_path_factory):
    """``make dist``'s output, built once: (zip, wheel)."""
    spec = importlib.util.spec_from_file_location("krita_plugin_release", ROOT / "packaging" / "krita_plugin.py")
    pk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pk)
    out = tmp_path_factory.mktemp("dist")
    z = pk.build_release(out)
    return z, out / f"analogon-{pk.backend_version()}-py3-none-any.whl"
