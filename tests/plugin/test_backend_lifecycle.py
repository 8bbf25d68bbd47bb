"""The backend the panel starts: its output in a log file in the state folder, last words
from the log's error lines (never progress bars), the real address in every message (also
after a crash), the private folders of backends that are gone removed, and Krita's pid
passed on so that the backend ends with Krita (tests/krita checks a SIGKILL of Krita)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import analogon_command, wait_until

from analogon_krita.controller import Controller
from analogon_krita.link import backend_process as bp
from analogon_krita.ui.panel import AnalogonPanel

TQDM = "".join(f"\rdenoise:  {k * 10}%|{'#' * k}{' ' * (10 - k)}| {k}/10 [00:0{k}<00:01, 7.1it/s]"
               for k in range(11))


def test_last_words_are_the_exception_of_the_last_traceback(tmp_path):
    log = tmp_path / "backend.log"
    log.write_text("=== start\nAnalogon backend on http://127.0.0.1:40001 (token in x)\n"
                   + TQDM + "\n"
                   "Traceback (most recent call last):\n"
                   '  File "x.py", line 1, in <module>\n'
                   "    run()\n"
                   "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
                   + TQDM + "\n")
    words = bp.last_words(log)
    assert words == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_last_words_without_a_traceback_are_error_lines_else_the_last_lines(tmp_path):
    log = tmp_path / "backend.log"
    log.write_text("loading tiny-sd\nERROR: model folder /x not found\n" + TQDM + "\nstill here\n")
    assert bp.last_words(log) == "ERROR: model folder /x not found"
    log.write_text("one\ntwo\n" + TQDM + "\n")
    assert bp.last_words(log, lines=2) == "one\ntwo"
    assert bp.last_words(tmp_path / "missing.log") == "" and bp.last_words(None) == ""


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_folders_of_backends_that_are_gone_are_removed(tmp_path):
    def folder(name, owner=None, server=None, age=0.0):
        d = tmp_path / (bp.STATE_PREFIX + name)
        d.mkdir()
        (d / "token").write_text("secret")
        if owner is not None:
            (d / bp.OWNER_FILE).write_text(json.dumps({"krita_pid": owner}))
        if server is not None:
            (d / bp.SERVER_FILE).write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": server}))
        if age:
            t = time.time() - age
            os.utime(d, (t, t))
        return d

    gone = folder("gone", owner=dead_pid(), server=dead_pid())
    old_format = folder("oldformat", server=dead_pid())
    ours = folder("ours", owner=os.getpid())
    backend_alive = folder("backendalive", owner=dead_pid(), server=os.getpid())
    fresh_unknown = folder("fresh")
    stale_unknown = folder("stale", age=3600)
    other = tmp_path / "something-else"
    other.mkdir()
    removed = set(bp.remove_stale_state_dirs(tmp_path))
    assert removed == {gone, old_format, stale_unknown}
    assert all(d.exists() for d in (ours, backend_alive, fresh_unknown, other))
    assert not gone.exists() and not stale_unknown.exists()


def fake_backend(tmp_path, body: str) -> str:
    script = tmp_path / "fake-analogon"
    script.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    script.chmod(0o755)
    return str(script)


def test_a_backend_that_fails_gives_its_last_words_not_a_progress_bar(kapp, tmp_path):
    kapp.writeSetting("analogon", "state_dir", str(tmp_path / "state"))
    kapp.writeSetting("analogon", "backend_command", fake_backend(tmp_path, (
        f"sys.stderr.write({TQDM!r}); sys.stderr.flush()\n"
        "print('args:', ' '.join(sys.argv[1:]), flush=True)\n"
        "raise ValueError('the model file is damaged')")))
    c = Controller(app=kapp)
    c.start_backend()
    assert wait_until(lambda: c.connection == "unreachable", 30), c.connection_message
    msg = c.connection_message
    assert "exit code 1" in msg and "ValueError: the model file is damaged" in msg
    assert "it/s" not in msg and "%|" not in msg
    log = c.log_path()
    assert log is not None and log.parent == tmp_path / "state" / "logs"
    text = log.read_text()
    assert f"--parent-pid {os.getpid()}" in text and "Traceback" in text and str(log) in msg
    # its private folder is gone with it
    assert wait_until(lambda: c.process.state_dir is None, 5)
    # the panel opens that log
    panel = AnalogonPanel(c)
    opened = []
    panel.open_url = lambda url: opened.append(url.toLocalFile())
    assert panel.log_button.isEnabled()
    panel.log_button.click()
    assert opened == [str(log)]
    # a second start keeps the first log as backend.1.log
    c.start_backend()
    assert wait_until(lambda: c.process.state == "failed" and not c.process.running, 30)
    assert (log.parent / "backend.1.log").exists()
    panel.deleteLater()
    c.deleteLater()


@pytest.fixture
def started(kapp, tmp_path, backend):  # `backend`: skips when no backend can run here
    kapp.writeSetting("analogon", "state_dir", str(tmp_path / "state"))
    kapp.writeSetting("analogon", "backend_command", analogon_command())
    c = Controller(app=kapp)
    c.set_model("tiny-sd")
    c.start_backend()
    assert wait_until(lambda: c.connection in ("connected", "unreachable") and not c.link.connecting, 120), \
        c.connection_message
    assert c.connection == "connected", c.connection_message
    yield c
    c.shutdown()
    c.deleteLater()


def test_a_killed_backend_is_named_by_its_real_address(kapp, started):
    c = started
    url = c.process.url
    assert url.startswith("http://127.0.0.1:") and url != bp.DEFAULT_URL
    assert url in c.connection_message
    log = c.log_path()
    assert f"Analogon backend on {url}" in log.read_text()
    state_dir = c.process.state_dir
    os.kill(c.process.pid, signal.SIGKILL)
    assert wait_until(lambda: c.connection == "unreachable", 20)
    msg = c.connection_message
    assert url in msg and "killed or crashed" in msg and str(log) in msg
    assert not state_dir.exists()
    c.link._on_health_tick()  # the monitor leaves the message alone
    assert c.connection_message == msg
    done = []
    c.connect_backend(done.append)  # connect again: the address it tries is the real one
    assert wait_until(lambda: done, 20) and done == [False]
    assert url in c.connection_message and bp.DEFAULT_URL not in c.connection_message


def test_a_server_json_left_by_a_backend_that_is_gone_is_not_used(kapp, tmp_path):
    """server.json of a killed backend names an address nobody answers on (or, worse, someone
    else does): the link ignores it when its process is gone, and uses it while it runs."""
    from analogon_krita.controller import Controller

    kapp.writeSetting("analogon", "state_dir", str(tmp_path))
    kapp.writeSetting("analogon", "backend_url", "")
    c = Controller(app=kapp)
    (tmp_path / bp.SERVER_FILE).write_text(json.dumps({"url": "http://127.0.0.1:4711", "token": "t",
                                                       "pid": dead_pid()}))
    assert c.server_address().url == bp.DEFAULT_URL
    (tmp_path / bp.SERVER_FILE).write_text(json.dumps({"url": "http://127.0.0.1:4711", "token": "t",
                                                       "pid": os.getpid()}))
    info = c.server_address()
    assert (info.url, info.token) == ("http://127.0.0.1:4711", "t")
