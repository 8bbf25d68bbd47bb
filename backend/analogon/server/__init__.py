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

__all__ = ["Settings", "create_app", "serve", "bind_socket", "write_server_json", "server_json_state",
           "ServerThread", "DEFAULT_HOST", "DEFAULT_PORT", "default_state_dir"]


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


def url_of(sock: socket.socket, host: str, tls: bool = False) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def server_json_state(state_dir: Path) -> str:
    """``"live"`` when a backend holds this state folder, ``"stale"`` when server.json was left
    by one that is gone (killed: it could not remove it), ``"absent"`` when there is none.
    A live backend holds a lock on its image store; the lock dies with the process."""
    from .store import ImageStore

    path = Path(state_dir) / "server.json"
    if not path.exists():
        return "absent"
    return "live" if ImageStore.folder_in_use(Path(state_dir) / "images") else "stale"


def write_server_json(state_dir: Path, url: str, token: str, tls_fingerprint: str | None = None) -> Path:
    """server.json, readable by the user only (created with mode 0600, never world-readable).
    Call it while holding the state folder (after ``create_app``): a server.json already there
    is then stale, and replaced. With TLS it carries the certificate's SHA-256 fingerprint
    (``tls_fingerprint_sha256``) for a client on this machine to pin."""
    from .. import __version__

    state_dir.mkdir(parents=True, exist_ok=True)
    old = state_dir / "server.json"
    if old.exists():
        try:
            pid = json.loads(old.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            pid = None
        log.warning("replacing a stale server.json (left by process %s, which is gone)", pid)
    try:
        os.chmod(state_dir, 0o700)
    except OSError:
        pass
    path = state_dir / "server.json"
    tmp = state_dir / f".server.json.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        data = {"url": url, "token": token, "pid": os.getpid(), "version": __version__}
        if tls_fingerprint:
            data["tls_fingerprint_sha256"] = tls_fingerprint
        json.dump(data, f)
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


def _protocol(header_timeout_s: float, body_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for each request's line and headers, and one for
    its body: a client that opens a connection and never finishes its headers is closed after
    ``header_timeout_s``; one whose body stops arriving (no byte for ``body_timeout_s`` while
    the server waits for it) is closed too. uvicorn only times out idle kept-alive connections.
    The body's clock does not run while the server itself holds reading back (the application
    has not taken what came)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimeoutProtocol(H11Protocol):
        _header_timer = None
        _body_timer = None
        _body_cycle = None  # the request whose body is awaited
        _last_body_data = 0.0

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def _arm_header_timer(self):
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._on_header_timeout)

        def _disarm_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _awaiting_request(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if self._header_timer is None and self._awaiting_request():
                self._arm_header_timer()  # the first bytes of another request on this connection
            self._last_body_data = self.loop.time()
            super().data_received(data)
            if self.cycle is not cycle:  # a request's headers arrived
                self._disarm_header_timer()
            if self._awaiting_body() and self._body_cycle is not self.cycle:
                self._body_cycle = self.cycle
                self._arm_body_timer(body_timeout_s)

        def _awaiting_body(self) -> bool:
            c = self.cycle
            return c is not None and c.more_body and not c.response_complete and not c.disconnected

        def _arm_body_timer(self, delay: float) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
            self._body_timer = self.loop.call_later(delay, self._on_body_timeout)

        def _disarm_body_timer(self) -> None:
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            self._body_cycle = None

        def _on_body_timeout(self) -> None:
            self._body_timer = None
            if self.cycle is not self._body_cycle or not self._awaiting_body() or self.transport.is_closing():
                self._body_cycle = None
                return
            if self.flow.read_paused:  # the server's own wait: the client's clock starts again
                self._last_body_data = self.loop.time()
            idle = self.loop.time() - self._last_body_data
            if idle < body_timeout_s:
                self._arm_body_timer(body_timeout_s - idle)
                return
            self.transport.close()  # the application's receive() then answers http.disconnect

        def on_response_complete(self) -> None:
            self._disarm_header_timer()  # uvicorn's keep-alive timeout takes over
            self._disarm_body_timer()
            super().on_response_complete()

        def connection_lost(self, exc):
            self._disarm_header_timer()
            self._disarm_body_timer()
            super().connection_lost(exc)

        def _on_header_timeout(self):
            self._header_timer = None
            if self._awaiting_request() and not self.transport.is_closing():
                self.transport.close()

    return TimeoutProtocol


def _uvicorn_server(app, log_level: str = "warning"):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # end the jobs first: their event streams then end, and the connections close
            begin = getattr(app.state, "begin_shutdown", None)
            if begin is not None:
                try:
                    await begin()
                except Exception:  # pragma: no cover
                    log.exception("ending the jobs at shutdown failed")
            await super().shutdown(sockets)

    settings = getattr(app.state, "settings", None)
    tls = getattr(app.state, "tls", None)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3,
                            access_log=False, lifespan="on",
                            http=_protocol(getattr(settings, "header_timeout_s", 10.0),
                                           getattr(settings, "body_timeout_s", 30.0)),
                            ssl_certfile=str(tls.certfile) if tls else None,
                            ssl_keyfile=str(tls.keyfile) if tls else None)
    return Server(config)


def serve(settings: Settings, log_level: str = "info") -> int:
    """Run the server until interrupted; writes and removes server.json. Refuses to listen
    beyond loopback without ``allow_remote``, and then without TLS unless ``insecure``."""
    from .tls import check_exposure, is_loopback, wants_tls

    check_exposure(settings)
    if settings.allow_remote:
        log.warning("--allow-remote: the backend listens on %s and accepts any Host header; anyone "
                    "with a token can use it from the network", settings.host)
        if not is_loopback(settings.host) and not wants_tls(settings):
            log.warning("--insecure: no TLS; tokens and images cross the network in clear")
    import signal

    def _terminate(signum, frame):  # SIGTERM: stop cleanly (uvicorn re-raises it after shutdown)
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    app = create_app(settings)
    tls = app.state.tls
    try:
        sock = bind_socket(settings.host, settings.port)
    except BaseException:
        app.state.store.close()
        raise
    url = url_of(sock, settings.host, tls is not None)
    path = write_server_json(settings.resolved_state_dir(), url, app.state.token,
                             tls.fingerprint_sha256 if tls else None)
    print(f"Analogon backend on {url} (token in {path})", flush=True)
    if tls is not None:
        print(f"TLS certificate {tls.certfile}" + (" (self-signed, made by the backend)" if tls.self_signed else ""),
              flush=True)
        print(f"TLS certificate SHA-256 fingerprint: {tls.fingerprint_sha256}", flush=True)
    workers = app.state.queue.workers
    if len(workers) > 1:
        print(f"{len(workers)} workers: " + ", ".join(w.device for w in workers), flush=True)
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
        try:
            self.sock = bind_socket(settings.host, settings.port)
        except BaseException:
            self.app.state.store.close()
            raise
        self.tls = self.app.state.tls
        self.fingerprint = self.tls.fingerprint_sha256 if self.tls else None
        self.url = url_of(self.sock, settings.host, self.tls is not None)
        self.token = self.app.state.token
        self.server = _uvicorn_server(self.app)
        self._json = write_server_json(settings.resolved_state_dir(), self.url, self.token,
                                       self.fingerprint) if write_json else None
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
        if self._thread.is_alive():
            self.server.should_exit = True
            self._thread.join(15)
        else:  # never started: release what create_app holds
            self.app.state.store.close()
        self.sock.close()
        if self._json is not None:
            remove_server_json(self._json)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
