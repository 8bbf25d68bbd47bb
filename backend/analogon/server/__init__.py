"""The backend server: FastAPI app, auth, job queue + worker, content-addressed image store."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path

from .app import DEFAULT_HOST, DEFAULT_PORT, Settings, create_app, default_state_dir  # noqa: F401

log = logging.getLogger(__name__)

__all__ = ["Settings", "create_app", "serve", "bind_socket", "write_server_json", "ServerThread",
           "DEFAULT_HOST", "DEFAULT_PORT", "default_state_dir"]


def set_exclusive(sock: socket.socket) -> None:
    """One server per port. POSIX: SO_REUSEADDR only lets a restarted server reuse a port in
    TIME_WAIT (a second live listener still gets EADDRINUSE). Windows: SO_REUSEADDR would let
    a second server bind the same port; SO_EXCLUSIVEADDRUSE forbids that."""
    if os.name == "nt":
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_EXCLUSIVEADDRUSE", -5), 1)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says it is TCP (with proto 0 every small response waits ~40 ms for an ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    set_exclusive(sock)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        from ..errors import AnalogonError

        raise AnalogonError("port_in_use", f"Cannot listen on {host}:{port} ({e.strerror}). Is another "
                            "backend running? Use --port 0 to pick a free port.") from None
    sock.listen(128)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def write_server_json(state_dir: Path, url: str, token: str) -> Path:
    """server.json, readable by the user only (created with mode 0600, never world-readable)."""
    from .. import __version__

    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(state_dir, 0o700)
    except OSError:
        pass
    path = state_dir / "server.json"
    tmp = state_dir / f".server.json.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token, "pid": os.getpid(), "version": __version__}, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def remove_server_json(path: Path) -> None:
    """Remove server.json if it is still ours."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _uvicorn_server(app, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3,
                            access_log=False, lifespan="on")
    return uvicorn.Server(config)


def serve(settings: Settings, log_level: str = "info") -> int:
    """Run the server until interrupted; writes and removes server.json."""
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.allow_remote:
        from ..errors import AnalogonError

        raise AnalogonError("remote_not_allowed", f"Listening on {settings.host} exposes the backend "
                            "to other machines; add --allow-remote if you mean it.")
    if settings.allow_remote:
        log.warning("--allow-remote: the backend listens on %s and accepts any Host header; anyone "
                    "with the token can use it from the network", settings.host)
    import signal

    def _terminate(signum, frame):  # SIGTERM: stop cleanly (uvicorn re-raises it after shutdown)
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    app = create_app(settings)
    sock = bind_socket(settings.host, settings.port)
    url = url_of(sock, settings.host)
    path = write_server_json(settings.resolved_state_dir(), url, app.state.token)
    print(f"Analogon backend on {url} (token in {path})", flush=True)
    server = _uvicorn_server(app, log_level="warning" if log_level == "info" else log_level)
    try:
        server.run(sockets=[sock])
    finally:
        remove_server_json(path)
        sock.close()
    return 0


class ServerThread:
    """The real server on a loopback port in a background thread (tests, bench, demo).

    >>> with ServerThread(Settings(port=0, state_dir=tmp)) as srv: srv.url, srv.token
    """

    def __init__(self, settings: Settings, write_json: bool = False):
        self.settings = settings
        self.app = create_app(settings)
        self.sock = bind_socket(settings.host, settings.port)
        self.url = url_of(self.sock, settings.host)
        self.token = self.app.state.token
        self.server = _uvicorn_server(self.app)
        self._json = write_server_json(settings.resolved_state_dir(), self.url, self.token) if write_json else None
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                        name="analogon-server", daemon=True)

    def start(self) -> "ServerThread":
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        self.sock.close()
        if self._json is not None:
            remove_server_json(self._json)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
