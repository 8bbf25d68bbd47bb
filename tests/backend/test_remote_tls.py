"""TLS on a real loopback server (issue 31): a self-signed certificate made once and pinned by
its fingerprint, a certificate the user gives, and the refusal to listen beyond loopback
without TLS. Nothing leaves 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
from urllib.parse import urlsplit

import httpx
import pytest

from analogon import cli
from analogon.errors import AnalogonError
from analogon.server import Settings, ServerThread, serve, tls

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


def settings(state, **kw) -> Settings:
    return Settings(port=0, state_dir=state, cache_dir="", device="cpu", scan_usual_places=False, **kw)


def no_verify() -> ssl.SSLContext:
    """A client context that checks nothing by itself: the pin is the check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class PinMismatch(Exception):
    pass


class PinnedClient:
    """An HTTPS client that trusts exactly one certificate, named by its SHA-256 fingerprint
    (what the docker does: trust on first use, then refuse a changed certificate)."""

    def __init__(self, url: str, pin: str, token: str):
        self.pin = pin
        self.client = httpx.Client(base_url=url, verify=no_verify(), timeout=10,
                                   headers={"Authorization": f"Bearer {token}"})

    def get(self, path: str) -> httpx.Response:
        r = self.client.get(path)
        der = r.extensions["network_stream"].get_extra_info("ssl_object").getpeercert(True)
        if tls.fingerprint(der) != self.pin:
            raise PinMismatch(tls.fingerprint(der))
        return r

    def close(self):
        self.client.close()


def peer_fingerprint(url: str) -> str:
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as raw:
        with no_verify().wrap_socket(raw, server_hostname=u.hostname) as s:
            return tls.fingerprint(s.getpeercert(True))


def openssl_fingerprint(cert) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out.split("=", 1)[1]


def test_self_signed_certificate_is_made_once_pinned_and_a_change_is_detected(tmp_path):
    state = tmp_path / "state"
    with ServerThread(settings(state, tls_self_signed=True), write_json=True) as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        cert, key = state / "tls" / "cert.pem", state / "tls" / "key.pem"
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        first = srv.fingerprint
        assert first == openssl_fingerprint(cert)  # the format openssl prints
        assert len(first.split(":")) == 32 and first == first.upper()
        assert peer_fingerprint(srv.url) == first  # what the server presents
        info = json.loads((state / "server.json").read_text())
        assert info["url"] == srv.url and info["tls_fingerprint_sha256"] == first

        pinned = PinnedClient(srv.url, first, srv.token)
        body = pinned.get("/v1/health").json()
        assert body["authenticated"] is True and body["tls"] == {
            "enabled": True, "fingerprint_sha256": first, "self_signed": True}
        assert pinned.get("/v1/methods").status_code == 200
        pinned.close()
        # without a token: no fingerprint (and nothing else a token tells)
        anon = httpx.get(srv.url + "/v1/health", verify=no_verify()).json()
        assert anon["tls"] == {"enabled": True} and anon["authenticated"] is False and "painter" not in anon
        # a client that trusts only the usual authorities refuses it: it must pin
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(srv.url + "/v1/health")
        # no clear-text answer on the TLS port
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url.replace("https://", "http://") + "/v1/health", timeout=5)
        # the Host check stays on for loopback
        r = httpx.get(srv.url + "/v1/health", verify=no_verify(), headers={"Host": "evil.example"})
        assert r.status_code == 403 and r.json()["code"] == "forbidden_host"

    with ServerThread(settings(state, tls_self_signed=True)) as srv:  # kept: same certificate
        assert srv.fingerprint == first and peer_fingerprint(srv.url) == first
        pinned = PinnedClient(srv.url, first, srv.token)
        assert pinned.get("/v1/health").status_code == 200
        pinned.close()

    shutil.rmtree(state / "tls")  # a new certificate (or someone in between): the pin catches it
    with ServerThread(settings(state, tls_self_signed=True)) as srv:
        assert srv.fingerprint != first and peer_fingerprint(srv.url) == srv.fingerprint
        pinned = PinnedClient(srv.url, first, srv.token)
        with pytest.raises(PinMismatch):
            pinned.get("/v1/health")
        pinned.close()


def test_a_certificate_the_user_gives(tmp_path):
    mine_cert, mine_key = tls.make_self_signed(tmp_path / "mine", ["studio.example"])
    other_cert, other_key = tls.make_self_signed(tmp_path / "other")
    with ServerThread(settings(tmp_path / "state", tls_certfile=mine_cert, tls_keyfile=mine_key)) as srv:
        assert srv.fingerprint == openssl_fingerprint(mine_cert) == peer_fingerprint(srv.url)
        body = httpx.get(srv.url + "/v1/health", verify=no_verify(),
                         headers={"Authorization": f"Bearer {srv.token}"}).json()
        assert body["tls"]["self_signed"] is False
    assert not (tmp_path / "state" / "tls").exists()  # nothing made
    with pytest.raises(AnalogonError) as e:  # a key that is not the certificate's
        ServerThread(settings(tmp_path / "state", tls_certfile=mine_cert, tls_keyfile=other_key))
    assert e.value.code == "tls_bad_certificate"
    with pytest.raises(AnalogonError) as e:
        ServerThread(settings(tmp_path / "state", tls_certfile=tmp_path / "nope.pem", tls_keyfile=mine_key))
    assert e.value.code == "tls_missing_file"
    with pytest.raises(AnalogonError) as e:
        ServerThread(settings(tmp_path / "state", tls_certfile=mine_cert))
    assert e.value.code == "tls_missing_file"
    # the state folder is free again after a refused start
    with ServerThread(settings(tmp_path / "state", tls_certfile=other_cert, tls_keyfile=other_key)) as srv:
        assert peer_fingerprint(srv.url) == openssl_fingerprint(other_cert)


def test_listening_beyond_loopback_without_tls_refuses(tmp_path, capsys):
    state = tmp_path / "state"
    with pytest.raises(AnalogonError) as e:
        serve(Settings(host="0.0.0.0", port=0, allow_remote=True, state_dir=state))
    assert e.value.code == "insecure_remote"
    assert "in clear" in e.value.message and "--tls" in e.value.message and "--insecure" in e.value.message
    assert not state.exists()  # refused before anything was made or bound
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0", "--allow-remote",
                     "--state-dir", str(state)]) == 1
    err = capsys.readouterr().err
    assert "insecure_remote" in err and "token" in err and "ssh -L" in err
    assert not state.exists()
    # what may start (checked without binding anything beyond loopback)
    tls.check_exposure(Settings(host="0.0.0.0", allow_remote=True, insecure=True))
    tls.check_exposure(Settings(host="0.0.0.0", allow_remote=True, tls_self_signed=True))
    tls.check_exposure(Settings(host="192.0.2.7", allow_remote=True, tls_certfile="c", tls_keyfile="k"))
    tls.check_exposure(Settings(host="127.0.0.1", allow_remote=True))  # loopback: no network crossed
    tls.check_exposure(Settings(host="::1"))
    with pytest.raises(AnalogonError) as e:
        tls.check_exposure(Settings(host="0.0.0.0", tls_self_signed=True))
    assert e.value.code == "remote_not_allowed"
