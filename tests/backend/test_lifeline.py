"""A backend started with --parent-pid ends with its parent, even when the parent is killed
(SIGKILL: it cannot stop its children itself)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analogon.lifeline import ParentWatch, remove_private_state_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
ROOT = Path(__file__).resolve().parents[2]
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

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


# -- the private state folder --------------------------------------------------------------

def _private_dir(root, owner):
    d = root / "analogon-krita-x"
    (d / "images" / "ab").mkdir(parents=True)
    (d / "images" / "ab" / "abcd.png").write_bytes(b"png")
    (d / "images" / ".lock").write_text("")
    (d / "owner.json").write_text(json.dumps({"krita_pid": owner}))
    (d / "server.json").write_text(json.dumps({"url": "http://127.0.0.1:1", "token": "t", "pid": 1}))
    (d / ".server.json.77").write_text("{}")
    return d


def test_a_private_state_folder_is_removed_only_when_it_is_ours(tmp_path):
    d = _private_dir(tmp_path, owner=4242)
    assert not remove_private_state_dir(d, 4243)  # another Krita's
    assert not remove_private_state_dir(d, None)
    assert (d / "server.json").exists()
    link = tmp_path / "link"
    link.symlink_to(d)
    assert not remove_private_state_dir(link, 4242)  # never through a link
    assert (d / "server.json").exists()
    plain = tmp_path / "plain"  # a state folder the user gave: no owner.json
    plain.mkdir()
    (plain / "server.json").write_text("{}")
    assert not remove_private_state_dir(plain, 4242)
    assert (plain / "server.json").exists()
    assert remove_private_state_dir(d, 4242)
    assert not d.exists() and plain.exists()


def test_only_what_a_backend_writes_is_removed(tmp_path):
    d = _private_dir(tmp_path, owner=4242)
    (d / "notes.txt").write_text("mine")
    assert not remove_private_state_dir(d, 4242)  # the folder stays for the file it does not know
    assert sorted(os.listdir(d)) == ["notes.txt"]


def test_a_folder_whose_image_store_a_live_process_holds_stays(tmp_path):
    import fcntl

    d = _private_dir(tmp_path, owner=4242)
    with open(d / "images" / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert not remove_private_state_dir(d, 4242)
        assert (d / "server.json").exists()
    assert remove_private_state_dir(d, 4242)


# -- the watchdog process ------------------------------------------------------------------

def children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def wait_for(cond, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def kill_all(*pids):
    for pid in pids:
        if pid and alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


STAND_IN = ("import sys, time; from analogon.lifeline import watch_parent; "
            "watch_parent(int(sys.argv[1]), state_dir=sys.argv[2]); print('watching', flush=True); "
            "time.sleep(float(sys.argv[3]))")


@linux
def test_the_watchdog_ends_with_the_backend_and_removes_its_folder(tmp_path):
    """A backend that ends by itself (here: without removing its folder) takes its watchdog
    along; the watchdog removes the private folder."""
    d = _private_dir(tmp_path, owner=os.getpid())
    backend = subprocess.Popen([sys.executable, "-c", STAND_IN, str(os.getpid()), str(d), "2"],
                               stdout=subprocess.PIPE, text=True)
    dog = None
    try:
        assert backend.stdout.readline().strip() == "watching"
        dogs = children(backend.pid)
        assert len(dogs) == 1, dogs
        dog = dogs[0]
        assert "lifeline" in open(f"/proc/{dog}/cmdline").read()
        backend.wait(10)
        assert wait_for(lambda: not alive(dog), 3.0) is not None, "the watchdog outlived the backend"
        assert wait_for(lambda: not d.exists(), 3.0) is not None, os.listdir(d)
    finally:
        kill_all(backend.pid, dog)
        backend.wait(5)


# -- a real backend, its Krita killed --------------------------------------------------------

FAKE_KRITA = r"""
import json, os, subprocess, sys, time
state = sys.argv[1]
with open(os.path.join(state, "owner.json"), "w") as f:  # as the plugin does
    json.dump({"krita_pid": os.getpid()}, f)
backend = subprocess.Popen([sys.executable, "-c", sys.argv[2], "serve", "--host", "127.0.0.1",
                            "--port", "0", "--model", "tiny-sd", "--state-dir", state,
                            "--parent-pid", str(os.getpid())])
print(backend.pid, flush=True)
time.sleep(120)
"""

BACKEND = "import sys; from analogon.cli import main; sys.exit(main(sys.argv[1:]))"

# a worker thread in a long C call that keeps the GIL (what loading weights or some
# numpy/safetensors work can do): no Python code of the backend runs until it returns, neither
# a signal handler nor a watcher thread. SIGTERM is blocked in this thread only, as the kernel
# delivers it to any thread: the C call is not cut short by it.
GIL_HOG = r"""
import ctypes, os, signal, sys, threading, time
def hog():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    state = sys.argv[sys.argv.index("--state-dir") + 1]
    while not os.path.exists(os.path.join(state, "server.json")):
        time.sleep(0.05)
    open(os.environ["HOG_MARK"], "w").close()
    ctypes.PyDLL(None).sleep(60)  # PyDLL: the GIL is held for the whole call
threading.Thread(target=hog, daemon=True).start()
"""

BUSY = "while True: pass"


def _kill_krita_under_load(tmp_path, backend_code: str, busy: int = 4) -> tuple[float, float]:
    """Start a real backend from a stand-in Krita, load the CPU with ``busy`` processes,
    SIGKILL the stand-in; returns (seconds until the backend was gone, until its folder was)."""
    state = tmp_path / "analogon-krita-test"
    state.mkdir()
    mark = tmp_path / "hogging"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               HOG_MARK=str(mark))
    krita = subprocess.Popen([sys.executable, "-c", FAKE_KRITA, str(state), backend_code],
                             stdout=subprocess.PIPE, text=True, env=env)
    backend = dog = None
    load = []
    try:
        backend = int(krita.stdout.readline())
        started = wait_for(lambda: (state / "server.json").exists() or not alive(backend), 90.0)
        assert started is not None and alive(backend), "the backend did not start"
        dogs = children(backend)
        assert len(dogs) == 1, f"expected one watchdog process, got {dogs}"
        dog = dogs[0]
        if "GIL" in backend_code or "PyDLL" in backend_code:
            assert wait_for(mark.exists, 10.0) is not None
            time.sleep(0.3)  # the backend is inside the C call now
        load = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
        time.sleep(0.5)
        os.kill(krita.pid, signal.SIGKILL)
        t0 = time.monotonic()
        krita.wait(5)
        wait_for(lambda: not alive(backend), 10.0)
        gone = time.monotonic() - t0
        wait_for(lambda: not state.exists(), 10.0)
        folder = time.monotonic() - t0
        assert not alive(backend), "the backend outlived its killed Krita by 10 s"
        assert gone < 5.0, f"the backend outlived its killed Krita by {gone:.1f} s"
        assert not state.exists(), f"its state folder is still there: {os.listdir(state)}"
        assert folder < 5.0, f"its state folder was removed {folder:.1f} s after Krita's end"
        assert wait_for(lambda: not alive(dog), 3.0) is not None, "the watchdog is still running"
        print(f"backend gone {gone:.2f} s, folder {folder:.2f} s after Krita's SIGKILL")
        return gone, folder
    finally:
        for p in load:
            p.kill()
        for p in load:
            p.wait(5)
        kill_all(backend, dog, krita.pid)
        krita.wait(5)


@linux
@pytest.mark.slow
def test_a_backend_ends_with_a_killed_krita_under_cpu_load(tmp_path):
    _kill_krita_under_load(tmp_path, BACKEND)


@linux
@pytest.mark.slow
def test_a_backend_stuck_in_a_c_call_that_holds_the_gil_ends_with_krita(tmp_path):
    _kill_krita_under_load(tmp_path, GIL_HOG + "\n" + BACKEND)


@pytest.mark.skipif(importlib.util.find_spec("PyQt6") is None, reason="the plugin needs PyQt6 outside Krita")
def test_the_windows_job_limits_have_the_layout_of_winnt_h():
    """The plugin's kill-on-close job (Windows only) passes JOBOBJECT_EXTENDED_LIMIT_INFORMATION;
    its layout is checked here against winnt.h's size (144 bytes on 64 bits, 112 on 32)."""
    code = ("import ctypes, sys; from analogon_krita.link import backend_process as bp; "
            "print(ctypes.sizeof(bp._job_limit_struct()), ctypes.sizeof(ctypes.c_void_p), "
            "bp.kill_on_close_job(12345) if sys.platform != 'win32' else None)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "plugin"), ANALOGON_QT_API="pyqt6",
               QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    size, pointer, job = out.stdout.split()
    assert int(size) == (144 if int(pointer) == 8 else 112)
    assert job == "None"  # elsewhere than Windows: no job
