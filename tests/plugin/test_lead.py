"""The first screen's decisions (lead.py): what the connection area says and offers for each
situation a painter meets, what Generate says when it cannot reach a backend, and where the
facts come from (an installed backend, a command or an address the painter set)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from analogon_krita.ui import lead
from analogon_krita.ui.lead import INSTALL, PROGRESS, START, STOP, Facts, decide, refusal

REFUSED = "The Analogon backend is not running at http://127.0.0.1:7871 (connection refused)."
FOUND = "/home/p/.local/share/analogon/venv/bin/analogon"


def facts(**kw) -> Facts:
    base = dict(state="unreachable", message=REFUSED, reason="unreachable", bundled="0.1.0")
    base.update(kw)
    return Facts(**base)


def test_nothing_installed_offers_the_install_and_never_a_command():
    got = decide(facts())
    assert (got.tone, got.action, got.button, got.open) == ("idle", INSTALL, "Install backend", True)
    assert got.text.startswith("The Analogon backend is not installed yet. Install backend sets it up")
    assert "several GB" in got.text
    for word in ("command", "connection refused", "127.0.0.1", "settings"):
        assert word not in got.text


def test_nothing_installed_and_nothing_to_install_says_how_to_get_it():
    got = decide(facts(bundled=""))
    assert (got.tone, got.action, got.button) == ("problem", "", "")
    assert "release zip" in got.text and "Import Python Plugin from File" in got.text
    assert "analogon serve" in got.text and "command" not in got.text


def test_installed_but_not_running_offers_start():
    got = decide(facts(command=FOUND))
    assert (got.tone, got.action, got.button) == ("idle", START, "Start backend")
    assert got.text == ("The Analogon backend is installed but not running. Start backend starts it; "
                        "it stops when Krita quits.")


@pytest.mark.parametrize("ours,action,button", [(True, STOP, "Stop backend"), (False, "", "")])
def test_connected_folds_away(ours, action, button):
    message = "Connected to http://127.0.0.1:41991 (v0.1.0, cpu)"
    got = decide(facts(state="connected", message=message, reason="", command=FOUND, ours=ours,
                       process="ready" if ours else "stopped"))
    assert (got.tone, got.text, got.action, got.button, got.open) == ("ok", message, action, button, False)


def test_starting_offers_stop():
    got = decide(facts(state="starting", message="Starting the backend\u2026", process="starting",
                       command=FOUND, ours=True))
    assert (got.tone, got.action, got.button, got.text) == ("busy", STOP, "Stop backend",
                                                            "Starting the backend\u2026")


def test_a_failed_start_shows_its_last_words_and_offers_start_again():
    message = ("The backend stopped (exit code 1). Its last words: ValueError: the model file is "
               "damaged (log: /tmp/backend.log)")
    got = decide(facts(process="failed", message=message, command=FOUND))
    assert (got.tone, got.text, got.action) == ("problem", message, START)


@pytest.mark.parametrize("command,action", [(None, ""), (FOUND, START)])
def test_an_address_the_painter_set_is_named_with_where_to_change_it(command, action):
    got = decide(facts(address="http://127.0.0.1:7871", command=command))
    assert got.tone == "problem" and got.action == action
    assert got.text.startswith(REFUSED) and "\u2699 \u25b8 Advanced" in got.text


def test_a_command_the_painter_set_that_does_not_answer_is_a_problem():
    got = decide(facts(command="/opt/analogon/bin/analogon", configured=True))
    assert (got.tone, got.action) == ("problem", START)
    assert got.text == f"{REFUSED} Start backend starts a new one."


def test_another_failure_than_nothing_listening_is_named():
    timeout = "The backend did not answer within 5 s."
    got = decide(facts(command=FOUND, reason="timeout", message=timeout))
    assert got.tone == "problem" and got.text.startswith(timeout)


def test_an_install_in_progress_says_what_it_does():
    got = decide(facts(installing=True, install_status="Installing PyTorch (cpu): 812 / 2300 MB, 14.2 MB/s"))
    assert (got.tone, got.action, got.button) == ("busy", PROGRESS, "Show progress")
    assert got.text == "Installing the backend: Installing PyTorch (cpu): 812 / 2300 MB, 14.2 MB/s"


@pytest.mark.parametrize("kw,expect", [
    ({}, "Cannot generate: the Analogon backend is not installed yet. Press \u201cInstall backend\u201d above."),
    ({"command": FOUND}, "Cannot generate: the Analogon backend is not running. Press \u201cStart backend\u201d above."),
    ({"installing": True}, "Cannot generate yet: the backend is being installed. Generate works once it has started."),
    ({"command": FOUND, "state": "starting", "process": "starting"},
     "Cannot generate yet: the backend is still starting. Press Generate again in a moment."),
    ({"command": FOUND, "configured": True},
     f"Cannot generate: {REFUSED} Press \u201cStart backend\u201d, or check the backend address under "
     "\u2699 \u25b8 Advanced."),
    ({"address": "http://127.0.0.1:7871"},
     f"Cannot generate: {REFUSED} Start the backend at that address, or clear the address under "
     "\u2699 \u25b8 Advanced to use one this docker starts."),
])
def test_generate_says_what_is_missing_and_what_to_press(kw, expect):
    assert refusal(facts(**kw)) == expect


class Settings(dict):
    def get(self, key, default=""):
        return super().get(key, default)


@pytest.fixture
def bare(monkeypatch, tmp_path):
    """A computer with no backend anywhere the docker looks."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ANALOGON_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path


def test_find_command_reads_the_setting_then_the_installed_backend(bare):
    assert lead.find_command(Settings()) == (None, False)
    assert lead.find_command(Settings(backend_command=" /x/analogon ")) == ("/x/analogon", True)
    exe = bare / "data" / "venv" / "bin" / "analogon"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    assert lead.find_command(Settings()) == (str(exe), False)


def test_start_with_nothing_installed_says_install_not_command(kapp, bare):
    from analogon_krita.controller import Controller

    c = Controller(app=kapp)
    c.start_backend()
    assert not c.process.running and c.connection == "unreachable"
    assert c.connection_message == ("The Analogon backend is not installed yet. Press \u201cInstall "
                                    "backend\u201d in the Analogon docker.")
    assert "command" not in c.connection_message


def test_facts_of_a_link_and_an_installer(kapp, bare):
    from analogon_krita.controller import Controller
    from analogon_krita.install.installer import Installer

    wheel = bare / "analogon-0.4.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    c = Controller(app=kapp)
    c.settings.set("backend_url", " http://127.0.0.1:9 ")
    c.link.reason = "unreachable"
    inst = Installer(venv=bare / "venv", wheel=wheel)
    inst.progress.emit(40, "Installing PyTorch (cpu)\u2026")
    f = lead.facts(c.link, inst)
    assert (f.command, f.configured, f.address, f.bundled, f.reason) == (None, False, "http://127.0.0.1:9",
                                                                        "0.4.0", "unreachable")
    assert (f.installing, f.install_status, f.ours, f.process) == (False, "Installing PyTorch (cpu)\u2026",
                                                                   False, "stopped")
    assert os.environ["PATH"] == str(Path(bare) / "bin")
