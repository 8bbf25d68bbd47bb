"""A real ``analogon serve --tls`` on 127.0.0.1 for the remote tests (issue 31): a self-signed
certificate made by the backend in its state folder, its fingerprint read from server.json,
painters' tokens made with ``analogon tokens create``. The standard library only (the Krita
tests load it too). Nothing leaves 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def analogon_command() -> str | None:
    exe = Path(sys.executable).parent / "analogon"
    return str(exe) if exe.exists() else shutil.which("analogon")


def unavailable() -> str | None:
    if analogon_command() is None:
        return "the analogon command is not installed"
    if shutil.which("openssl") is None:
        return "the openssl command is not installed (the backend makes its certificate with it)"
    return None


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def no_verify() -> ssl.SSLContext:
    """For the test's own look at the server: it checks the fingerprint itself."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsBackend:
    """``analogon serve --tls --port PORT --state-dir STATE`` (tiny-sd), ready when it answers."""

    def __init__(self, state: Path, port: int, env: dict[str, str] | None = None, timeout: float = 120):
        self.state, self.port = Path(state), port
        self.state.mkdir(parents=True, exist_ok=True)
        self.cmd = analogon_command()
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
        self.log_path = self.state.parent / (self.state.name + "-log.txt")
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.cmd, "serve", "--host", "127.0.0.1", "--port", str(port), "--tls",
             "--state-dir", str(self.state), "--model", "tiny-sd", "--parent-pid", str(os.getpid())],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float):
        deadline = time.monotonic() + timeout
        info = self.state / "server.json"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("the TLS backend stopped: " + self.log_path.read_text()[-2000:])
            if time.monotonic() > deadline:
                raise RuntimeError("the TLS backend did not start: " + self.log_path.read_text()[-2000:])
            if info.exists():
                try:
                    data = json.loads(info.read_text())
                    self.url, self.token = data["url"], data["token"]
                    self.fingerprint = data["tls_fingerprint_sha256"]
                    status, _ = self.get("/v1/health")
                    if status == 200:
                        return
                except (ValueError, KeyError, OSError):
                    pass
            time.sleep(0.1)

    def get(self, path: str, token: str | None = None) -> tuple[int, object]:
        req = urllib.request.Request(self.url + path)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10, context=no_verify()) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def tokens(self, *args: str) -> str:
        out = subprocess.run([self.cmd, "tokens", *args, "--state-dir", str(self.state)], env=self.env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode:
            raise RuntimeError(f"analogon tokens {' '.join(args)}: {out.stderr}")
        return out.stdout.strip()

    def painter(self, name: str) -> str:
        """A painter's token (``analogon tokens create NAME``)."""
        return self.tokens("create", name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
