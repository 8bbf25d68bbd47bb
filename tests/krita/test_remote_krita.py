"""The docker and a backend on another machine, in real Krita 5 and Krita 6 (issue 31): a
backend started outside Krita with ``--tls`` (its self-signed certificate) and a painter's
token; Krita's profile (kritarc) pre-seeded with the remote address, the token and the pinned
fingerprint; the plugin's controller connects without asking, starts nothing of its own, and
one PIXELS pass adds its result layer. The backend side confirms the job was the painter's.
Everything stays on 127.0.0.1 (the Krita 6 root shares the host's network)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kritas

pytestmark = pytest.mark.krita

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def _tls_backend():
    spec = importlib.util.spec_from_file_location("tls_backend", ROOT / "tests" / "plugin" / "tls_backend.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kritarc(config: Path, url: str, token: str, fingerprint: str, port: int):
    """The profile as the docker leaves it once the painter entered the address and token and
    trusted the certificate (remote.py's settings keys), plus autostart: in ``kritarc`` (Krita)
    and ``kritarunnerrc`` (what kritarunner reads and writes instead)."""
    pins = json.dumps({f"https://127.0.0.1:{port}": fingerprint}, sort_keys=True)
    for name in ("kritarc", "kritarunnerrc"):
        (config / name).write_text(
            "[analogon]\n"
            "autostart=true\n"
            "connection=remote\n"
            f"pinned_certificates={pins}\n"
            f"remote_token={token}\n"
            f"remote_url={url}\n")


@pytest.fixture(scope="module", params=kritas.KRITAS)
def report(request, tmp_path_factory):
    krita = kritas.get(request.param)
    reason = krita.unavailable("kritarunner")
    if reason:
        pytest.skip(reason)
    tb = _tls_backend()
    reason = tb.unavailable()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    tmp = tmp_path_factory.mktemp("remote-" + krita.name)
    for d in ("data", "config", "tmp", "cache", "home", "py"):
        (tmp / d).mkdir()
    shutil.copy2(HERE / "remote_scenario.py", tmp / "py")
    shutil.copytree(ROOT / "plugin" / "analogon_krita", tmp / "py" / "analogon_krita",
                    ignore=shutil.ignore_patterns("__pycache__"))
    port = tb.free_port()
    with tb.TlsBackend(tmp / "server-state", port) as srv:  # outside Krita, on this machine
        token = srv.painter("krita-painter")
        _kritarc(tmp / "config", srv.url, token, srv.fingerprint, port)
        out = tmp / "report.json"
        env = {"QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp / "home"),
               "XDG_DATA_HOME": str(tmp / "data"), "XDG_CONFIG_HOME": str(tmp / "config"),
               "XDG_CACHE_HOME": str(tmp / "cache"), "XDG_STATE_HOME": str(tmp / "cache"),
               "TMPDIR": str(tmp / "tmp"), "PYTHONPATH": str(tmp / "py"),
               "ANALOGON_NO_REGISTER": "1", "ANALOGON_QT_API": "", "ANALOGON_KRITA_REPORT": str(out),
               # a local start would run this (and fail loudly): it must never be run
               "ANALOGON_BACKEND_COMMAND": "/nonexistent/analogon"}
        with krita.session(tmp):
            argv, penv = krita.command(["kritarunner", "-s", "remote_scenario", "-f", "main"], env)
            proc = subprocess.run(argv, env=penv, capture_output=True, timeout=600)
        if not out.exists():
            pytest.fail(f"{krita.name} wrote no report (exit code {proc.returncode}). stderr:\n"
                        + proc.stderr.decode(errors="replace")[-3000:])
        data = json.loads(out.read_text())
        data["server_jobs"] = srv.get("/v1/jobs", srv.token)[1]
        data["server"] = {"url": srv.url, "fingerprint": srv.fingerprint, "log": srv.log_path.read_text()}
    data["krita"] = krita
    print(f"remote pass in {krita.name}: {time.monotonic() - t0:.0f} s in all")
    return data


def test_remote_in_real_krita_connects_with_the_pinned_certificate_and_the_painters_token(report):
    assert "traceback" not in report, report["traceback"]
    assert report["krita_version"].startswith(f"{report['krita'].major}.")
    assert report["binding"] == {5: "PyQt5", 6: "PyQt6"}[report["krita"].major]
    srv = report["server"]
    # the profile as written before Krita started
    assert report["settings"]["connection"] == "remote" and report["settings"]["remote_url"] == srv["url"]
    assert list(report["settings"]["pins"].values()) == [srv["fingerprint"]]
    assert report["page"]["remote"] and report["page"]["url"] == srv["url"]
    assert srv["fingerprint"] in report["page"]["certificate"] and report["page"]["forget_enabled"]
    con = report["connect"]
    assert con["state"] == "connected", con
    assert con["message"].startswith(f"Connected to {srv['url']} as krita-painter")
    assert con["painter"] == "krita-painter" and con["tls"]["fingerprint_sha256"] == srv["fingerprint"]
    assert report["asked"] == []  # pinned: nothing to ask


def test_remote_in_real_krita_runs_a_pass_and_the_result_layer_appears(report):
    assert "traceback" not in report, report["traceback"]
    p = report.get("pass")
    assert p is not None, report["connect"]
    assert p["how"] == "done", p["error"]
    assert p["layer"] in p["names"] and p["names"][-1] == p["layer"] and p["history"] == 1
    x, y, w, h = p["bounds"]  # the change, inside the edit map's white square
    assert w * h > 0 and x >= 4 and y >= 4 and x + w <= 28 and y + h <= 28
    assert p["alpha_inside"]["opaque"] == p["alpha_inside"]["n"]
    assert p["alpha_outside"]["transparent"] == p["alpha_outside"]["n"]
    assert p["differs"]
    # the images went in the measured formats (small flat layers: compressed), with progress
    assert p["formats"] and "rgba" not in p["formats"], p["formats"]
    assert p["uploads"] and p["uploads"][-1].endswith(" kB")
    # the job was the painter's on the server; no local backend was started
    done = [j for j in report["server_jobs"]["jobs"] if j["status"] == "done"]
    assert [j["owner"] for j in done] == ["krita-painter"]
    assert report["process"] == {"state": "stopped", "pid": None}


def test_remote_in_real_krita_refuses_a_changed_certificate_and_asks_after_forget(report):
    assert "traceback" not in report, report["traceback"]
    ch = report.get("changed")
    assert ch is not None, report["connect"]
    assert ch["ok"] == [False] and ch["reason"] == "certificate_changed"
    assert report["server"]["fingerprint"] in ch["message"] and "AB:" * 31 + "AB" in ch["message"]
    assert "nothing was sent" in ch["message"] and ch["lead"] == "Forget the old certificate"
    fo = report["forgot"]
    assert fo["reason"] == "certificate_unknown" and fo["pins"] == {}  # forgotten, and not trusted (said no)
    assert len(fo["asked"]) == 1 and report["server"]["fingerprint"] in fo["asked"][0]
