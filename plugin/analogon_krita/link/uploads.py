"""Sending an image to the backend: one ``PUT /v1/images/{sha}``, or, for a large image to a
backend on another machine, a resumable upload in chunks (docs/protocol.md, "Resumable
uploads"), so that a connection that drops halfway costs the chunk in flight and not the
whole layer.

:class:`Upload` decides and drives it. In chunks when the client talks to a backend on another
machine (``Client.remote``: the painter's choice, which an SSH tunnel on 127.0.0.1 is too) and
the body is at least ``Client.resumable_min_bytes`` (8 MiB): ``POST /v1/uploads``, then
``PUT /v1/uploads/{id}`` with ``Upload-Offset``, ``Client.chunk_bytes`` (4 MiB) at a time, or
less when the server's ``chunk_max`` says so. When a chunk fails on the way (the connection
drops or stalls, a proxy answers 502-504), the upload waits (0.5 s, then twice as long each
time), asks the server for its offset (``GET /v1/uploads/{id}``) and goes on from there; the
chunk size halves after each failure (down to 256 KiB) and grows back as chunks get through.
After ``RETRIES`` failures in a row without the server's offset moving, it gives up with a
message that says so; the bytes already sent stay on the server (a day), and the next attempt
at the same image opens the same upload and goes on where it stopped. A backend without the
API (``404`` to the ``POST``) gets the single PUT, and this client stops asking
(``Client.resumable = False``). ``abort()`` stops the request in flight and abandons the upload
on the server (``DELETE``).

Everything runs on Qt's event loop: nothing here blocks.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from ..qt import QObject, QTimer, pyqtSignal
from .client import ApiError, Response

MIN_CHUNK_BYTES = 256 * 1024
RETRYABLE = ("connection_lost", "timeout", "network_error", "incomplete_body")


class Upload(QObject):
    """One image on its way. ``progress(sent, total)`` in bytes of the body; ``callback``
    gets one :class:`client.Response` at the end: the answer that stored the image
    (``{sha, width, height, ...}``), or the error (``aborted`` after :meth:`abort`)."""

    progress = pyqtSignal(object, object)  # bytes the server has (or that went out), bytes in all
    retrying = pyqtSignal(str)  # "the connection dropped at 12.0 of 36.0 MB: going on in 2 s"

    RETRIES = 5
    BACKOFF_MS = 500  # the first wait; it doubles each time, up to BACKOFF_MAX_MS
    BACKOFF_MAX_MS = 8000

    def __init__(self, client, payload, callback: Callable[[Response], None] | None,
                 timeout_ms: int | None = None):
        super().__init__(client)
        self.client = client
        self.payload = payload
        self.callback = callback
        self.timeout_ms = timeout_ms
        self.total = len(payload.body)
        self.mode = ""  # "single" or "resumable"
        self.call = None  # the request in flight
        self.upload_id: str | None = None
        self.offset = 0  # the bytes the server holds
        self.chunk = max(MIN_CHUNK_BYTES, int(client.chunk_bytes))
        self.chunk_max = self.chunk
        self.chunks = 0  # chunks the server took
        self.failures = 0  # in a row, without the server's offset moving
        self.resumes: list[int] = []  # the offsets the server reported after a failure
        self.aborted = False
        self.finished = False
        self._progress_at = -1
        self._failed_at = -1
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)

    # -- starting -------------------------------------------------------------------------
    def start(self) -> "Upload":
        c = self.client
        if c.remote and c.resumable is not False and self.total >= c.resumable_min_bytes:
            self._open()
        else:
            self._single()
        return self

    def _single(self):
        self.mode = "single"
        self.call = self.client.put_image(self.payload, self._end, self.timeout_ms)
        self.call.reply.uploadProgress.connect(self._on_single_progress)

    def _on_single_progress(self, sent: int, total: int):
        if total > 0:
            self.progress.emit(int(sent), int(total))

    def _open(self):
        self.mode = "resumable"
        p = self.payload
        body: dict[str, Any] = {"sha256": p.sha, "length": self.total,
                                "content_type": p.headers()["Content-Type"]}
        if p.format != "png":
            body.update(width=p.width, height=p.height)
        if p.format == "deflate":
            body["encoding"] = "deflate"
        self.call = self.client.send_json("POST", "/v1/uploads", body, self._after_open)

    def _after_open(self, resp: Response):
        self.call = None
        if self.aborted:  # cancelled meanwhile: what the server opened goes at once
            if resp.ok:
                self.upload_id = (resp.json() or {}).get("id")
            return self._abandon()
        if resp.status in (404, 405) and (resp.error is None or resp.error.code in (
                "not_found", "method_not_allowed", f"http_{resp.status}")):
            self.client.resumable = False  # a backend without resumable uploads: one PUT
            return self._single()
        if resp.error is not None:
            return self._failed(resp, self._open) if self._retryable(resp) else self._end(resp)
        data = resp.json() or {}
        self.client.resumable = True
        self.upload_id = str(data.get("id") or "")
        self.chunk_max = max(1, min(self.chunk_max, int(data.get("chunk_max") or self.chunk_max)))
        self.chunk = min(self.chunk, self.chunk_max)
        self._at(int(data.get("offset") or 0))  # an upload of this image left open earlier goes on
        self._send_chunk()

    # -- chunks ---------------------------------------------------------------------------
    def _at(self, offset: int):
        self.offset = max(0, min(int(offset), self.total))
        self._report(self.offset)

    def _report(self, sent: int):
        if sent != self._progress_at:
            self._progress_at = sent
            self.progress.emit(sent, self.total)

    def _send_chunk(self):
        start = self.offset
        piece = self.payload.body[start:start + self.chunk]  # empty at the end: the server then stores it
        self.call = self.client.send("PUT", f"/v1/uploads/{self.upload_id}", piece,
                                     {"Upload-Offset": str(start), "Content-Type": "application/octet-stream"},
                                     self._after_chunk, self.timeout_ms, retry=False)
        self.call.reply.uploadProgress.connect(
            lambda sent, total, start=start: total > 0 and self._report(start + int(sent)))

    def _after_chunk(self, resp: Response):
        self.call = None
        if self.aborted:
            return self._abandon()
        if resp.ok:
            data = resp.json() or {}
            self.chunks += 1
            self.chunk = min(self.chunk_max, self.chunk * 2)  # it gets through: larger again
            if data.get("complete"):
                self._report(self.total)
                return self._end(resp)
            self._at(int(data.get("offset") or 0))
            return self._send_chunk()
        err = resp.error
        if err is not None and err.code == "offset_mismatch" and isinstance(err.detail, dict) \
                and isinstance(err.detail.get("offset"), int):
            # the server holds another offset (a chunk that went partly through, sent again)
            self.resumes.append(err.detail["offset"])
            return self._failed(resp, lambda: self._resume_at(err.detail["offset"]), wait=False)
        if self._retryable(resp):
            return self._failed(resp, self._ask_offset)
        self._end(resp)  # hash_mismatch, storage_quota, upload_not_found, ...: no use trying again

    @staticmethod
    def _retryable(resp: Response) -> bool:
        if resp.status is None:
            return resp.error is not None and resp.error.code in RETRYABLE
        return resp.status in (502, 503, 504) or (resp.error is not None and resp.error.code == "incomplete_body")

    def _failed(self, resp: Response, then: Callable[[], None], wait: bool = True):
        """A chunk (or the question) did not get through: try again after a wait, unless this
        happened ``RETRIES`` times in a row without the server's offset moving."""
        if self.offset > self._failed_at:
            self.failures = 0  # it got further since the last failure
        self._failed_at = self.offset
        self.failures += 1
        self.chunk = max(MIN_CHUNK_BYTES, self.chunk // 2)
        if self.failures > self.RETRIES:
            return self._end(Response(None, error=ApiError(
                "upload_interrupted",
                f"The connection to the backend kept dropping: the upload stopped at {_mb(self.offset)} of "
                f"{_mb(self.total)} after {self.RETRIES} tries ({resp.error.message if resp.error else resp.status}). "
                "The part that arrived is kept on the server for a day: run it again to go on from there.")))
        if not wait:
            self.retrying.emit(f"the connection dropped; going on from {_mb(self.offset)} of {_mb(self.total)}")
            return then()
        delay = min(self.BACKOFF_MAX_MS, self.BACKOFF_MS * 2 ** (self.failures - 1))
        self.retrying.emit(f"the connection dropped at {_mb(self.offset)} of {_mb(self.total)}; "
                           f"trying again in {delay / 1000:g} s ({self.failures} of {self.RETRIES})")
        try:
            self._timer.timeout.disconnect()
        except (TypeError, RuntimeError):
            pass
        self._timer.timeout.connect(then)
        self._timer.start(int(delay))

    def _ask_offset(self):
        if self.aborted:
            return
        self.call = self.client.send("GET", f"/v1/uploads/{self.upload_id}", callback=self._after_offset)

    def _after_offset(self, resp: Response):
        self.call = None
        if self.aborted:
            return self._abandon()
        if resp.ok:
            data = resp.json() or {}
            self.resumes.append(int(data.get("offset") or 0))
            if data.get("complete"):  # the last chunk got through; its answer did not
                self._report(self.total)
                return self._end(resp)
            return self._resume_at(int(data.get("offset") or 0))
        if resp.status == 404:  # gone from the server (expired, or stored and forgotten)
            self.call = self.client.has_image(self.payload.sha, self._after_lost)
            return
        if self._retryable(resp):
            return self._failed(resp, self._ask_offset)
        self._end(resp)

    def _resume_at(self, offset: int):
        if self.aborted:
            return self._abandon()
        self._at(offset)
        self._send_chunk()

    def _after_lost(self, resp: Response):
        self.call = None
        if self.aborted:
            return self._end(_aborted())
        p = self.payload
        if resp.status == 200:  # it was stored
            self._report(self.total)
            return self._end(Response(200, json.dumps({"sha": p.sha, "width": p.width, "height": p.height,
                                                       "complete": True}).encode()))
        self.upload_id = None
        self._failed(Response(404, error=ApiError("upload_not_found", "the upload was gone from the server")),
                     self._open)  # start it again

    # -- endings --------------------------------------------------------------------------
    def abort(self):
        """Stop: the request in flight is aborted, and the upload is abandoned on the server."""
        if self.finished or self.aborted:
            return
        self.aborted = True
        self._timer.stop()
        call = self.call
        if self.mode == "single":
            if call is not None:
                call.abort()  # its answer ends it, as cancelled
            return
        self._end(_aborted())
        if call is not None and self.upload_id is None:
            return  # the POST is left to answer: the upload it opens is then abandoned
        if call is not None:
            call.abort()  # a chunk on its way: _after_chunk abandons the upload
        else:
            self._abandon()

    def _abandon(self):
        upload_id, self.upload_id = self.upload_id, None
        if upload_id:
            self.client.send("DELETE", f"/v1/uploads/{upload_id}")
        self._end(_aborted())
        self.deleteLater()

    def _end(self, resp: Response):
        if self.finished:
            return
        self.finished = True
        self._timer.stop()
        self.payload = None  # the body is not kept (a layer's can be tens of megabytes)
        callback, self.callback = self.callback, None
        if self.call is None or self.mode == "single":
            self.deleteLater()  # else the answer still to come (after an abort) does it
        if callback is not None:
            callback(resp)


def _aborted() -> Response:
    return Response(None, error=ApiError("aborted", "The request was cancelled."))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
