"""``analogon doctor`` against a backend with TLS and a self-signed certificate (issue 31): it
trusts the certificate by its fingerprint, given with ``--fingerprint`` or read from
server.json, and refuses a different one before anything (the token included) is sent."""
from __future__ import annotations

import shutil

import pytest

from analogon import cli
from analogon.server import Settings, ServerThread

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    settings = Settings(port=0, state_dir=state, cache_dir="", device="cpu", scan_usual_places=False,
                        tls_self_signed=True)
    with ServerThread(settings, write_json=True) as srv:
        srv.state = state
        yield srv


def test_doctor_reads_the_fingerprint_from_server_json(server, capsys):
    rep = cli.doctor_report(state_dir=server.state)["server"]
    assert rep["running"] and rep["url"] == server.url and rep["fingerprint_from"] == "server.json"
    assert rep["tls_fingerprint_sha256"] == server.fingerprint
    assert rep["health"]["authenticated"] is True  # server.json's token, to the backend it names
    assert rep["health"]["tls"]["fingerprint_sha256"] == server.fingerprint
    assert cli.main(["doctor", "--state-dir", str(server.state)]) == 0
    out = capsys.readouterr().out
    assert f"backend server running: yes at {server.url}" in out
    assert f"TLS certificate SHA-256 fingerprint: {server.fingerprint} (matches the one in server.json)" in out


def test_doctor_with_a_given_fingerprint_and_url(server, tmp_path, capsys):
    loose = server.fingerprint.replace(":", "").lower()  # as a painter may paste it
    args = ["doctor", "--url", server.url, "--fingerprint", loose, "--state-dir", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"backend server running: yes at {server.url}" in out and "(matches the one given)" in out
    assert "none sent" in out  # no token given, and no server.json here to take one from
    assert cli.main(args + ["--token", server.token]) == 0
    assert "the server's own token accepted" in capsys.readouterr().out


def test_doctor_refuses_another_certificate_and_an_unknown_one(server, tmp_path, capsys):
    other = "AB:" * 31 + "AB"
    rep = cli.doctor_report(url=server.url, token=server.token, fingerprint=other, state_dir=tmp_path)["server"]
    assert not rep["running"] and rep["code"] == "certificate_mismatch" and "health" not in rep
    assert server.fingerprint in rep["error"] and other in rep["error"] and "nothing was sent" in rep["error"]
    assert cli.main(["doctor", "--url", server.url, "--fingerprint", other, "--state-dir", str(tmp_path)]) == 1
    assert "differs from the one given" in capsys.readouterr().out
    # without a fingerprint a self-signed certificate is not trusted (no authority vouches for it)
    assert cli.main(["doctor", "--url", server.url, "--state-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "--fingerprint" in out and "certificate_untrusted" in out
    with pytest.raises(SystemExit):
        cli.main(["doctor", "--fingerprint", "12:34"])
