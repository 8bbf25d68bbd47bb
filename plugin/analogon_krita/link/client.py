"""HTTP + server-sent-events client for the Analogon backend, on QtNetwork.

Everything is asynchronous (Krita's UI thread must never block): one-shot requests take a
callback, the event stream and the job runner are QObjects with signals. See
docs/protocol.md for the contract.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ..qt import (
    QByteArray, QImage, QNetworkAccessManager, QNetworkReply, QNetworkRequest, QObject,
    QTimer, QUrl, pyqtSignal, qCompress, to_bytes,
)

RGBA_CONTENT_TYPE = "application/x-analogon-rgba"
DEFAULT_TIMEOUT_MS = 15_000
MiB = 1024 * 1024
RESUMABLE_MIN_BYTES = 8 * MiB  # to a backend on another machine, bodies this large go in chunks
CHUNK_BYTES = 4 * MiB  # (uploads.py)


class ApiError(Exception):
    """A failed request, with a message a painter can read."""

    def __init__(self, code: str, message: str, status: int | None = None, detail: Any = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail

    def __str__(self) -> str:
        return self.message


@dataclass
class Response:
    status: int | None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: ApiError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_image_id(pixels: bytes, width: int, height: int) -> str:
    """A raw RGBA8 image's id: SHA-256 of "{width}x{height}:" and the pixels (docs/protocol.md),
    so that equal bytes at different sizes never share an id."""
    return sha256_hex(f"{width}x{height}:".encode() + pixels)


def _network_message(reply, url: str) -> tuple[str, str]:
    err = reply.error()
    E = QNetworkReply.NetworkError
    if err == E.ConnectionRefusedError:
        return "unreachable", f"The Analogon backend is not running at {url} (connection refused)."
    if err == E.HostNotFoundError:
        return "unreachable", f"The backend address {url} cannot be found."
    if err == E.RemoteHostClosedError:
        return "connection_lost", "The backend closed the connection (did it stop or crash?)."
    if err == E.TimeoutError:
        return "timeout", "The backend did not answer in time."
    if err == E.OperationCanceledError:
        return "aborted", "The request was cancelled."
    return "network_error", f"Cannot talk to the backend at {url}: {reply.errorString()}"


class Call(QObject):
    """One request in flight: a timeout that restarts on progress, and abort()."""

    def __init__(self, client: "Client", reply, callback, timeout_ms: int, url: str):
        super().__init__(client)
        self.client = client
        self.reply = reply
        self.callback = callback
        self.url = url
        self.timed_out = False
        self.aborted = False
        self._done = False
        self.timer = QTimer(self)
        self.timer.setSingleShot(True)
        self.timer.setInterval(max(1, int(timeout_ms)))
        self.timer.timeout.connect(self._on_timeout)
        reply.finished.connect(self._on_finished)
        reply.uploadProgress.connect(self._restart)
        reply.downloadProgress.connect(self._restart)
        self.timer.start()

    def _restart(self, *_):
        if not self._done:
            self.timer.start()

    def _on_timeout(self):
        self.timed_out = True
        self.reply.abort()

    def abort(self):
        if self._done:
            return
        self.aborted = True
        self.reply.abort()

    @property
    def done(self) -> bool:
        return self._done

    def _on_finished(self):
        if self._done:
            return
        self._done = True
        self.timer.stop()
        reply = self.reply
        status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
        body = to_bytes(reply.readAll())
        headers = {}
        for pair in reply.rawHeaderPairs():
            headers[to_bytes(pair[0]).decode("latin-1").lower()] = to_bytes(pair[1]).decode("latin-1")
        resp = Response(int(status) if status is not None else None, body, headers)
        if self.timed_out:
            secs = self.timer.interval() / 1000
            resp.error = ApiError("timeout", f"The backend did not answer within {secs:g} s.")
            resp.status = None
        elif self.aborted:
            resp.error = ApiError("aborted", "The request was cancelled.")
            resp.status = None
        elif resp.status is None:
            problem = self.client.tls_problem
            if reply.error() == QNetworkReply.NetworkError.SslHandshakeFailedError and problem:
                from .remote import certificate_message

                resp.error = ApiError(problem["code"], certificate_message(problem), None, dict(problem))
            else:
                code, msg = _network_message(reply, self.client.base_url)
                resp.error = ApiError(code, msg)
        elif not (200 <= resp.status < 300):
            resp.error = _http_error(resp, self.client.remote)
        reply.deleteLater()
        self.deleteLater()
        if self.callback is not None:
            self.callback(resp)


def _http_error(resp: Response, remote: bool = False) -> ApiError:
    code, message, detail = f"http_{resp.status}", f"The backend answered with error {resp.status}.", None
    try:
        data = json.loads(resp.body.decode("utf-8"))
        if isinstance(data, dict):
            code = data.get("code") or code
            message = data.get("message") or message
            detail = data.get("detail")
            if not isinstance(message, str):
                message = str(message)
    except (ValueError, UnicodeDecodeError):
        pass
    if resp.status == 401 and remote:  # a painter's token: the server says why (e.g. revoked)
        message = (f"{message} Check the token under \u2699 \u25b8 Connection: the server's owner "
                   "makes one with \u201canalogon tokens create YOUR-NAME\u201d.")
    elif resp.status == 401:
        message = ("The backend refused the access token. If you restarted the backend, "
                   "press Connect again so that the new token is read.")
    return ApiError(code, message, resp.status, detail)


class Client(QObject):
    """Talks to one backend: base URL + bearer token.

    ``pinned()`` gives the SHA-256 fingerprint trusted for this address (remote.py): a TLS
    certificate that no authority vouches for is accepted only when it is exactly that one;
    otherwise the handshake fails before anything is sent, and ``tls_problem`` says what was
    presented (the request's error is ``certificate_unknown`` or ``certificate_changed``).
    ``remote``: a backend on another machine (its messages name the Connection settings, and
    large images go to it in resumable chunks: :meth:`upload_image`)."""

    def __init__(self, base_url: str, token: str | None = None, parent: QObject | None = None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, pinned: Callable[[], str] | None = None,
                 remote: bool = False):
        super().__init__(parent)
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_ms = timeout_ms
        self.pinned = pinned
        self.remote = remote
        self.tls_problem: dict[str, Any] | None = None
        # resumable uploads (uploads.py): None until the backend is asked; False: it has none
        self.resumable: bool | None = None
        self.resumable_min_bytes = RESUMABLE_MIN_BYTES
        self.chunk_bytes = CHUNK_BYTES
        self.nam = QNetworkAccessManager(self)
        self.nam.sslErrors.connect(self._on_ssl_errors)

    def _on_ssl_errors(self, reply, errors):
        """The certificate's errors are ignored only for the pinned certificate (compared by its
        SHA-256 fingerprint); anything else fails the handshake, before the request is sent."""
        from .remote import CHANGED, UNKNOWN, fingerprint

        cert = reply.sslConfiguration().peerCertificate()
        if cert.isNull():
            cert = next((e.certificate() for e in errors if not e.certificate().isNull()), cert)
        fp = fingerprint(cert)
        trusted = (self.pinned() if self.pinned is not None else "") or ""
        if fp and fp == trusted:
            reply.ignoreSslErrors(errors)
            self.tls_problem = None
            return
        self.tls_problem = {"code": CHANGED if trusted else UNKNOWN, "url": self.base_url,
                            "fingerprint": fp, "pinned": trusted,
                            "errors": [e.errorString() for e in errors]}

    # -- plumbing -------------------------------------------------------------------------
    def _request(self, path: str, headers: dict[str, str] | None = None):
        req = QNetworkRequest(QUrl(self.base_url + path))
        if self.token:
            req.setRawHeader(b"Authorization", f"Bearer {self.token}".encode())
        for k, v in (headers or {}).items():
            req.setRawHeader(k.encode(), str(v).encode())
        return req

    def send(self, verb: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, callback: Callable[[Response], None] | None = None,
             timeout_ms: int | None = None, retry: bool = True) -> Call:
        """Send a request; ``callback(Response)`` is called once. Idempotent requests are
        retried once when a kept-alive connection turns out to be closed."""
        req = self._request(path, headers)
        verb = verb.upper()
        if verb == "GET":
            reply = self.nam.get(req)
        elif verb == "HEAD":
            reply = self.nam.head(req)
        elif verb == "DELETE":
            reply = self.nam.deleteResource(req)
        elif verb == "PUT":
            reply = self.nam.put(req, QByteArray(body or b""))
        elif verb == "POST":
            reply = self.nam.post(req, QByteArray(body or b""))
        else:
            reply = self.nam.sendCustomRequest(req, verb.encode(), QByteArray(body or b""))

        def on_done(resp: Response):
            if (retry and verb in ("GET", "HEAD", "DELETE") and resp.error is not None
                    and resp.error.code == "connection_lost"):
                self.send(verb, path, body, headers, callback, timeout_ms, retry=False)
                return
            if callback is not None:
                callback(resp)

        return Call(self, reply, on_done, timeout_ms or self.timeout_ms, self.base_url)

    def send_json(self, verb: str, path: str, payload: Any, callback, timeout_ms: int | None = None) -> Call:
        body = json.dumps(payload).encode("utf-8")
        return self.send(verb, path, body, {"Content-Type": "application/json"}, callback, timeout_ms)

    # -- endpoints ------------------------------------------------------------------------
    def health(self, callback, timeout_ms: int | None = None) -> Call:
        return self.send("GET", "/v1/health", callback=callback, timeout_ms=timeout_ms)

    def methods(self, callback) -> Call:
        return self.send("GET", "/v1/methods", callback=callback)

    def models(self, callback) -> Call:
        return self.send("GET", "/v1/models", callback=callback)

    def job(self, job_id: str, callback) -> Call:
        return self.send("GET", f"/v1/jobs/{job_id}", callback=callback)

    def cancel_job(self, job_id: str, callback=None) -> Call:
        return self.send("DELETE", f"/v1/jobs/{job_id}", callback=callback)

    def has_image(self, sha: str, callback) -> Call:
        return self.send("HEAD", f"/v1/images/{sha}", callback=callback)

    def put_image(self, payload: "ImagePayload", callback, timeout_ms: int | None = None) -> Call:
        return self.send("PUT", f"/v1/images/{payload.sha}", payload.body, payload.headers(),
                         callback, timeout_ms)

    def upload_image(self, payload: "ImagePayload", callback, timeout_ms: int | None = None):
        """Send an image: one PUT, or to a backend on another machine, for a large body, a
        resumable upload in chunks that goes on after a dropped connection. An
        :class:`uploads.Upload` (``progress(sent, total)``, ``abort()``); ``callback(Response)``
        once at the end."""
        from .uploads import Upload

        return Upload(self, payload, callback, timeout_ms).start()

    def get_image_rgba(self, sha: str, callback) -> Call:
        return self.send("GET", f"/v1/images/{sha}?format=rgba", callback=callback, timeout_ms=60_000)

    def events(self, job_id: str, parent: QObject | None = None) -> "EventStream":
        return EventStream(self, job_id, parent or self)


PNG_QUALITY = 50  # Qt's PNG writer: zlib level 4, about 4x faster than its default for 5 % more bytes
DEFLATE_LEVEL = 1  # qCompress: the fastest level; images gain little from higher ones


def deflate(rgba: bytes) -> bytes:
    """Raw pixels as HTTP's ``deflate`` (a zlib stream): Qt's qCompress without the 4-byte
    big-endian length it writes first."""
    return to_bytes(qCompress(QByteArray(rgba), DEFLATE_LEVEL))[4:]


@dataclass
class ImagePayload:
    """An image as it is uploaded: raw RGBA8 (``rgba``), raw RGBA8 compressed (``deflate``,
    sent with ``Content-Encoding: deflate``; its id is the raw id of the pixels), or PNG."""

    body: bytes
    width: int
    height: int
    format: str = "rgba"  # or "deflate" or "png"
    sha: str = ""
    measured: dict[str, int] = field(default_factory=dict)  # "auto": each format's size in bytes

    def __post_init__(self):
        if not self.sha:
            if self.format == "deflate":
                raise ValueError("a deflate payload is made by from_rgba (its id is the pixels')")
            self.sha = (raw_image_id(self.body, self.width, self.height) if self.format == "rgba"
                        else sha256_hex(self.body))

    @classmethod
    def from_rgba(cls, rgba: bytes, width: int, height: int, fmt: str = "rgba") -> "ImagePayload":
        """``fmt``: rgba, deflate, png, or ``auto``: whichever of the three measures smallest
        (for a backend across a network, where the bytes cost more than the encoding)."""
        if len(rgba) != width * height * 4:
            raise ValueError(f"expected {width * height * 4} bytes of RGBA, got {len(rgba)}")
        if fmt == "auto":
            made = [cls.from_rgba(rgba, width, height, f) for f in ("rgba", "deflate", "png")]
            best = min(made, key=lambda p: len(p.body))  # a tie keeps the first: raw, then deflate
            best.measured = {p.format: len(p.body) for p in made}
            return best
        if fmt == "png":
            from ..qt import image_to_bytes, rgba_image

            return cls(image_to_bytes(rgba_image(rgba, width, height), quality=PNG_QUALITY), width,
                       height, "png")
        if fmt == "deflate":
            return cls(deflate(rgba), width, height, "deflate", raw_image_id(rgba, width, height))
        return cls(bytes(rgba), width, height, "rgba")

    def headers(self) -> dict[str, str]:
        if self.format == "png":
            return {"Content-Type": "image/png"}
        out = {"Content-Type": RGBA_CONTENT_TYPE, "X-Image-Width": str(self.width),
               "X-Image-Height": str(self.height)}
        if self.format == "deflate":
            out["Content-Encoding"] = "deflate"
        return out


TERMINAL_EVENTS = ("done", "error", "cancelled")


class SseParser:
    """Incremental text/event-stream parser: feed bytes, get (event, data, id) triples.

    ``id`` is the stream's last event id when the event was dispatched (an ``id:`` line sets
    it and it stays until the next one, as in the HTML standard); "" when the server sent none.
    """

    def __init__(self):
        self._buf = b""
        self._event = ""
        self._data: list[str] = []
        self.last_id = ""

    def feed(self, chunk: bytes) -> list[tuple[str, str, str]]:
        self._buf += chunk
        out = []
        while True:
            idx = self._buf.find(b"\n")
            if idx < 0:
                break
            line = self._buf[:idx].rstrip(b"\r").decode("utf-8", "replace")
            self._buf = self._buf[idx + 1:]
            if not line:
                if self._data or self._event:
                    out.append((self._event or "message", "\n".join(self._data), self.last_id))
                self._event, self._data = "", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
            elif name == "id" and "\0" not in value:
                self.last_id = value
        return out


class EventStream(QObject):
    """Follows GET /v1/jobs/{id}/events, reading as bytes arrive (readyRead).

    Each event has an id (``id:``, counting up per job). If the connection drops before a
    terminal event it reconnects with ``Last-Event-ID`` set to the last id read, and the server
    sends only what came after it; an event whose id is not above the last one read (a server
    that replays anyway) is skipped. Emits ``received(type, data)`` for each event and
    ``failed(message)`` when it gives up.
    """

    received = pyqtSignal(str, object)
    failed = pyqtSignal(str)

    def __init__(self, client: Client, job_id: str, parent: QObject | None = None,
                 max_reconnects: int = 5, idle_timeout_ms: int = 120_000, reconnect_delay_ms: int = 500):
        super().__init__(parent)
        self.client = client
        self.job_id = job_id
        self.max_reconnects = max_reconnects
        self.reconnect_delay_ms = reconnect_delay_ms
        self.reconnects = 0
        self.last_event_id = ""  # the id of the last event delivered ("" before the first)
        self.finished = False
        self._reply = None
        self._parser = SseParser()
        self._idle = QTimer(self)
        self._idle.setSingleShot(True)
        self._idle.setInterval(idle_timeout_ms)
        self._idle.timeout.connect(self._on_idle)

    def start(self):
        self._open()

    def _open(self):
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        req = self.client._request(f"/v1/jobs/{self.job_id}/events", headers)
        self._parser = SseParser()
        self._reply = self.client.nam.get(req)
        self._reply.readyRead.connect(self._on_ready)
        self._reply.finished.connect(self._on_finished)
        self._idle.start()

    def _on_ready(self):
        reply = self.sender() or self._reply
        if reply is not self._reply:
            return
        self._idle.start()
        for etype, raw, event_id in self._parser.feed(to_bytes(reply.readAll())):
            if _id_number(event_id) is not None and _id_number(self.last_event_id) is not None \
                    and _id_number(event_id) <= _id_number(self.last_event_id):
                continue  # read before the reconnect
            if event_id:
                self.last_event_id = event_id
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {"raw": raw}
            if etype in TERMINAL_EVENTS:
                self.finished = True
                self._idle.stop()
            self.received.emit(etype, data)
            if self.finished:
                self.close()
                return

    def _on_idle(self):
        if self._reply is not None and not self.finished:
            self._reply.abort()  # finished -> reconnect

    def _on_finished(self):
        reply = self.sender() or self._reply
        if reply is not self._reply:
            return
        if reply.bytesAvailable():
            self._on_ready()
        if self.finished or self._reply is None:
            return
        status = reply.attribute(QNetworkRequest.Attribute.HttpStatusCodeAttribute)
        if status is not None and int(status) >= 400:
            err = _http_error(Response(int(status), to_bytes(reply.readAll())))
            self._give_up(err.message)
            return
        self._reply = None
        reply.deleteLater()
        if self.reconnects >= self.max_reconnects:
            _, msg = _network_message(reply, self.client.base_url)
            self._give_up("Lost the connection to the backend while following the job. " + msg)
            return
        self.reconnects += 1
        QTimer.singleShot(self.reconnect_delay_ms * self.reconnects, self._reopen)

    def _reopen(self):
        if not self.finished and self._reply is None:
            self._open()

    def _give_up(self, message: str):
        self.finished = True
        self.close()
        self.failed.emit(message)

    def close(self):
        self._idle.stop()
        reply, self._reply = self._reply, None
        if reply is not None:
            try:
                reply.readyRead.disconnect(self._on_ready)
                reply.finished.disconnect(self._on_finished)
            except (TypeError, RuntimeError):
                pass
            reply.abort()
            reply.deleteLater()


def _id_number(event_id: str) -> int | None:
    return int(event_id) if event_id.isascii() and event_id.isdigit() and len(event_id) <= 18 else None


@dataclass
class ImageRef:
    """An image for a role: payload (uploaded) placed at (x, y) on the target canvas."""

    payload: ImagePayload
    x: int | None = None
    y: int | None = None
    scale: float = 1.0
    sha: str = ""  # for images already on the server (a previous result)

    def ref_json(self):
        sha = self.payload.sha if self.payload is not None else self.sha
        if self.x is None and self.y is None and self.scale == 1.0:
            return sha
        return {"sha": sha, "x": int(self.x or 0), "y": int(self.y or 0), "scale": float(self.scale)}


@dataclass
class JobSpec:
    method: str
    images: dict[str, ImageRef | list[ImageRef]]
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    seed: int | None = None

    def payloads(self) -> list[ImagePayload]:
        seen, out = set(), []
        for v in self.images.values():
            for ref in (v if isinstance(v, list) else [v]):
                p = ref.payload
                if p is not None and p.sha not in seen:
                    seen.add(p.sha)
                    out.append(p)
        return out

    def body(self) -> dict[str, Any]:
        images = {}
        for role, v in self.images.items():
            images[role] = [r.ref_json() for r in v] if isinstance(v, list) else v.ref_json()
        body: dict[str, Any] = {"method": self.method, "params": self.params, "images": images}
        if self.model:
            body["model"] = self.model
        if self.seed is not None:
            body["seed"] = int(self.seed)
        return body


@dataclass
class JobResult:
    images: list[tuple[bytes, int, int, str, str]]  # (rgba, width, height, label, sha)
    seed: int | None
    params: dict[str, Any]
    timings: dict[str, Any]
    job_id: str
    info: dict[str, Any] = field(default_factory=dict)  # what the method adds (captions, ...)
    # per image: the result *layer* (rgba, width, height, sha) — transparent where nothing
    # changes — or None from a backend that sends only the finished image
    layers: list[tuple[bytes, int, int, str] | None] = field(default_factory=list)


class JobRunner(QObject):
    """Runs one job: uploads (skipping images the server has; large ones to a backend on
    another machine in resumable chunks, uploads.py), submits, follows the events, downloads
    the results. ``cancel()`` works in every phase, uploads included."""

    stage = pyqtSignal(str)
    progress = pyqtSignal(str, int, int)  # stage, step, total (-1 when unknown)
    uploading = pyqtSignal(str, int, int)  # "uploading image 1 of 3: 2.1 of 8.0 MB", KiB sent, KiB
    preview = pyqtSignal(object)  # QImage
    done = pyqtSignal(object)  # JobResult
    failed = pyqtSignal(str)
    cancelled = pyqtSignal()

    def __init__(self, client: Client, spec: JobSpec, parent: QObject | None = None,
                 upload_timeout_ms: int = 60_000):
        super().__init__(parent)
        self.client = client
        self.spec = spec
        self.upload_timeout_ms = upload_timeout_ms
        self.job_id: str | None = None
        self.state = "idle"  # uploading, submitting, running, downloading, finished
        self.uploaded: list[str] = []
        self.skipped: list[str] = []
        self._call: Call | None = None
        self._stream: EventStream | None = None
        self._cancel_requested = False
        self._pending: list[ImagePayload] = []
        self._results: list = []
        self._done_data: dict | None = None

    # -- phases ---------------------------------------------------------------------------
    def start(self):
        self._pending = list(self.spec.payloads())
        self.state = "uploading"
        self.stage.emit("uploading")
        self._next_upload()

    def _next_upload(self):
        if self._cancel_requested:
            return self._finish_cancelled()
        if not self._pending:
            return self._submit()
        payload = self._pending[0]
        self._call = self.client.has_image(payload.sha, lambda r, p=payload: self._after_head(p, r))

    def _after_head(self, payload: ImagePayload, resp: Response):
        self._call = None
        if self._cancel_requested:
            return self._finish_cancelled()
        if resp.status == 200:
            self.skipped.append(payload.sha)
            self._pending.pop(0)
            return self._next_upload()
        if resp.status != 404 and resp.error is not None:
            return self._fail(resp.error.message)
        self._shown = -1
        self._sent = (0, len(payload.body))
        self._call = self.client.upload_image(payload, lambda r, p=payload: self._after_put(p, r),
                                              timeout_ms=self.upload_timeout_ms)
        self._call.progress.connect(self._on_upload)  # the body as it goes out
        self._call.retrying.connect(self._on_retrying)

    def _on_upload(self, sent: int, total: int):
        """``uploading("uploading image 1 of 3: 2.1 of 8.0 MB", KiB sent, KiB in all)`` (kB
        below a megabyte), at most once per per-mille."""
        if total <= 0 or self.state != "uploading":
            return
        self._sent = (sent, total)
        permille = sent * 1000 // total
        if permille == self._shown:
            return
        self._shown = permille
        self.uploading.emit(f"{self._image_label()}: {_amount(sent, total)}",
                            -(-sent // 1024), max(1, -(-total // 1024)))

    def _image_label(self) -> str:
        count = len(self.uploaded) + len(self.skipped) + len(self._pending)
        return f"uploading image {len(self.uploaded) + len(self.skipped) + 1} of {count}"

    def _on_retrying(self, what: str):
        """A chunk of a resumable upload did not get through: say so while it waits."""
        if self.state == "uploading":
            sent, total = self._sent
            self._shown = -1
            self.uploading.emit(f"{self._image_label()}: {what}", -(-sent // 1024), max(1, -(-total // 1024)))

    def _after_put(self, payload: ImagePayload, resp: Response):
        self._call = None
        if self._cancel_requested:
            return self._finish_cancelled()
        if resp.error is not None:
            return self._fail(f"Uploading an image failed: {resp.error.message}")
        self.uploaded.append(payload.sha)
        self._pending.pop(0)
        self._next_upload()

    def _submit(self):
        self.state = "submitting"
        self.stage.emit("submitting")
        self._call = self.client.send_json("POST", "/v1/jobs", self.spec.body(), self._after_submit)

    def _after_submit(self, resp: Response):
        self._call = None
        if resp.error is not None:
            if self._cancel_requested:
                return self._finish_cancelled()
            return self._fail(_job_error_message(resp.error))
        data = resp.json() or {}
        self.job_id = data.get("id")
        if self._cancel_requested:  # cancelled while the POST was in flight
            self.client.cancel_job(self.job_id)
            return self._finish_cancelled()
        self.state = "running"
        self.stage.emit("queued")
        self._stream = self.client.events(self.job_id, self)
        self._stream.received.connect(self._on_event)
        self._stream.failed.connect(self._on_stream_failed)
        self._stream.start()

    def _on_event(self, etype: str, data: dict):
        if etype == "queued":
            self.stage.emit("queued")
        elif etype == "started":
            self.stage.emit("starting")
        elif etype == "progress":
            stage = str(data.get("stage") or "")
            step, total = data.get("step"), data.get("total")
            self.progress.emit(stage, int(step) if step is not None else -1,
                               int(total) if total is not None else -1)
        elif etype == "preview":
            try:
                img = QImage.fromData(QByteArray(base64.b64decode(data.get("png", ""))), "PNG")
            except (ValueError, TypeError):
                img = None
            if img is not None and not img.isNull():
                self.preview.emit(img)
        elif etype == "done":
            if self._cancel_requested:
                return self._finish_cancelled()
            self._done_data = data
            self._download()
        elif etype == "error":
            self._fail(data.get("message") or "The backend reported an error.")
        elif etype == "cancelled":
            self._finish_cancelled()

    def _on_stream_failed(self, message: str):
        if self._cancel_requested:
            return self._finish_cancelled()
        self._fail(message)

    def _download(self):
        self.state = "downloading"
        self.stage.emit("downloading")
        self._to_fetch = []
        for info in (self._done_data or {}).get("images") or []:
            self._to_fetch.append((info, "image"))
            if isinstance(info.get("layer"), dict) and info["layer"].get("sha"):
                self._to_fetch.append((info["layer"], "layer"))
        self._results = []
        self._layers = []
        self._next_download()

    def _next_download(self):
        if self._cancel_requested:
            return self._finish_cancelled()
        if not self._to_fetch:
            d = self._done_data or {}
            self.state = "finished"
            return self.done.emit(JobResult(self._results, d.get("seed"), d.get("params") or {},
                                            d.get("timings") or {}, self.job_id or "",
                                            d.get("info") or {}, self._layers))
        info, kind = self._to_fetch.pop(0)
        self._call = self.client.get_image_rgba(
            info["sha"], lambda r, i=info, k=kind: self._after_download(i, r, k))

    def _after_download(self, info: dict, resp: Response, kind: str = "image"):
        self._call = None
        if resp.error is not None:
            return self._fail(f"Downloading the result failed: {resp.error.message}")
        w = int(resp.headers.get("x-image-width", info.get("width", 0)))
        h = int(resp.headers.get("x-image-height", info.get("height", 0)))
        if len(resp.body) != w * h * 4:
            return self._fail("The backend sent a result image of the wrong size.")
        if kind == "layer":
            self._layers[-1] = (resp.body, w, h, info["sha"])
        else:
            self._results.append((resp.body, w, h, info.get("label", ""), info["sha"]))
            self._layers.append(None)
        self._next_download()

    # -- endings --------------------------------------------------------------------------
    def cancel(self):
        """Stop the job: aborts an upload in progress, or asks the backend to cancel."""
        if self.state in ("finished", "idle") or self._cancel_requested:
            if self.state == "idle":
                self._cancel_requested = True
                self._finish_cancelled()
            return
        self._cancel_requested = True
        if self.state == "uploading" and self._call is not None:
            self._call.abort()  # the callback then finishes as cancelled
        elif self.state == "running" and self.job_id:
            self.client.cancel_job(self.job_id, self._after_cancel_request)
        elif self.state == "downloading":
            if self._call is not None:
                self._call.abort()
            else:
                self._finish_cancelled()
        # submitting: _after_submit sends the DELETE once the id is known

    def _after_cancel_request(self, resp: Response):
        if self.state == "finished":
            return
        if resp.error is not None and resp.status not in (409,):
            # The job may have ended already; the stream tells. If the stream is gone, end here.
            if self._stream is None or self._stream.finished:
                self._finish_cancelled()

    def _finish_cancelled(self):
        if self.state == "finished":
            return
        self.state = "finished"
        self._close_stream()
        self.cancelled.emit()

    def _fail(self, message: str):
        if self.state == "finished":
            return
        self.state = "finished"
        self._close_stream()
        self.failed.emit(message)

    def _close_stream(self):
        if self._stream is not None:
            self._stream.close()


def _amount(sent: int, total: int) -> str:
    """``2.1 of 8.0 MB``, or ``12 of 40 kB`` for less than a megabyte."""
    if total < 1_000_000:
        return f"{-(-sent // 1000)} of {-(-total // 1000)} kB"
    return f"{sent / 1e6:.1f} of {total / 1e6:.1f} MB"


def _job_error_message(err: ApiError) -> str:
    if err.code == "invalid_params" and isinstance(err.detail, list):
        parts = []
        for d in err.detail[:5]:
            if isinstance(d, dict):
                loc = ".".join(str(x) for x in d.get("loc", []) if x not in ("body", "params"))
                parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
        if parts:
            return f"{err.message} ({'; '.join(parts)})"
    return err.message
