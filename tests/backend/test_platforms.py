"""The platform branches that can run here, with sys.platform / os.name monkeypatched: port
exclusivity, the plugin's folder for doctor, memory figures without /proc."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil  # imported before any test fakes sys.platform
import pytest

from analogon import server as srv_mod


class RecordingSocket:
    def __init__(self):
        self.options = []

    def setsockopt(self, level, name, value):
        self.options.append((level, name, value))


def test_port_exclusivity_per_platform(monkeypatch):
    s = RecordingSocket()
    monkeypatch.setattr(srv_mod.os, "name", "nt")
    srv_mod.set_exclusive(s)
    exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", -5)
    assert s.options == [(socket.SOL_SOCKET, exclusive, 1)]
    assert socket.SO_REUSEADDR not in [o[1] for o in s.options]
    s = RecordingSocket()
    monkeypatch.setattr(srv_mod.os, "name", "posix")
    srv_mod.set_exclusive(s)
    assert s.options == [(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)]


def test_a_second_server_cannot_take_the_port():
    from analogon.errors import AnalogonError

    first = srv_mod.bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(AnalogonError) as e:
            srv_mod.bind_socket("127.0.0.1", port)
        assert e.value.code == "port_in_use"
    finally:
        first.close()


@pytest.mark.parametrize("platform,env,expect", [
    ("linux", {"XDG_DATA_HOME": "/d"}, "/d/krita/pykrita"),
    ("linux", {}, "{home}/.local/share/krita/pykrita"),
    ("win32", {"APPDATA": "C:/Users/p/AppData/Roaming"}, "C:/Users/p/AppData/Roaming/krita/pykrita"),
    ("darwin", {}, "{home}/Library/Application Support/krita/pykrita"),
])
def test_doctor_finds_the_plugin_per_platform(tmp_path, monkeypatch, platform, env, expect):
    from analogon import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "platform", platform)
    assert cli.krita_plugin_dir() == Path(expect.format(home=tmp_path))


def test_doctor_reports_an_installed_plugin(tmp_path, monkeypatch):
    from analogon import cli

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    pdir = tmp_path / "Library" / "Application Support" / "krita" / "pykrita"
    (pdir / "analogon_krita").mkdir(parents=True)
    (pdir / "analogon_krita.desktop").write_text("[Desktop Entry]\n")
    rep = cli.doctor_report()
    assert rep["plugin"] == {"folder": str(pdir), "installed": True}


def test_memory_figures_come_from_psutil(monkeypatch):
    """memory_info asks psutil (which knows every platform), not /proc."""
    from types import SimpleNamespace

    from analogon.server.app import memory_info

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=16 * 2**30, available=5 * 2**30))
    monkeypatch.setattr(psutil, "Process", lambda pid=None: SimpleNamespace(
        memory_info=lambda: SimpleNamespace(rss=123 * 2**20)))
    info = memory_info()
    assert (info["system_total_bytes"], info["system_available_bytes"], info["process_rss_bytes"]) == \
        (16 * 2**30, 5 * 2**30, 123 * 2**20)
