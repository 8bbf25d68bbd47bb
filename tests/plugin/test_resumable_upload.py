"""Large images to a backend on another machine go in resumable chunks (docs/protocol.md,
"Resumable uploads"; plugin/analogon_krita/link/uploads.py): the real server in this process, on
127.0.0.1, behind a small proxy (also on 127.0.0.1) that records what the docker sends and can
cut a connection halfway through a chunk, or every connection that carries one. Nothing
leaves 127.0.0.1."""
from __future__ import annotations

import random
import re
import socket
import threading
import time

import pytest
from conftest import wait_until

from analogon_krita.link.client import Client, ImagePayload, ImageRef, JobRunner, JobSpec
from analogon_krita.link.uploads import Upload

MiB = 1024 * 1024
W = H = 1536  # 9.4 MB of raw RGBA: over the 8 MiB from which a remote upload goes in chunks
REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/v1/[^ ]+) HTTP/1\.1\r\n")


class Proxy:
    """127.0.0.1:port -> the server, byte for byte. ``cut_at``: the connection that carries
    the client's byte number N (counted over every connection) is cut right there, once: the
    server gets the bytes before it, the client sees the connection drop. ``refuse_chunks``:
    a connection on which a chunk (``PUT /v1/uploads/...``) begins is cut before any of it
    reaches the server; ``refuse_after_cut_s``: so is every one for that long after the cut (Qt
    sends a request again by itself, at once, when its connection closed under it)."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit("//", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.forwarded = 0  # client bytes that reached the server
        self.cut_at: int | None = None
        self.refuse_chunks = False
        self.refuse_after_cut_s = 0.0
        self._refuse_until = 0.0
        self.cuts = 0
        self.streams: list[bytearray] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the client began, in order per connection."""
        with self._lock:
            return [(m.group(1).decode(), m.group(2).decode()) for s in self.streams
                    for m in REQUEST_LINE.finditer(bytes(s))]

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            stream = bytearray()
            with self._lock:
                self.streams.append(stream)
            threading.Thread(target=self._up, args=(client, server, stream), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client, server, stream):
        try:
            while data := client.recv(256 * 1024):
                with self._lock:
                    stream += data
                    refuse = self.refuse_chunks or time.monotonic() < self._refuse_until
                    if refuse and b"PUT /v1/uploads/" in stream[-(len(data) + 32):]:
                        self.cuts += 1
                        return self._cut(client, server, b"")
                    if self.cut_at is not None and self.forwarded + len(data) > self.cut_at:
                        keep = data[:self.cut_at - self.forwarded]
                        self.forwarded += len(keep)
                        self.cut_at = None
                        self.cuts += 1
                        self._refuse_until = time.monotonic() + self.refuse_after_cut_s
                        return self._cut(client, server, keep)
                    self.forwarded += len(data)
                server.sendall(data)
        except OSError:
            pass
        self._close(client, server)

    def _cut(self, client, server, last: bytes):
        try:
            server.sendall(last)
            server.shutdown(socket.SHUT_WR)  # the server reads what came, then the end
        except OSError:
            pass
        try:
            client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client.close()
        threading.Timer(2.0, server.close).start()

    def _down(self, server, client):
        try:
            while data := server.recv(256 * 1024):
                client.sendall(data)
        except OSError:
            pass
        self._close(client, server)

    @staticmethod
    def _close(*socks):
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from analogon.server import ServerThread, Settings

    settings = Settings(port=0, state_dir=tmp_path_factory.mktemp("state"), cache_dir="", device="cpu",
                        scan_usual_places=False)
    with ServerThread(settings) as srv:
        yield srv


@pytest.fixture
def proxy(server):
    p = Proxy(server.url)
    yield p
    p.close()


def pixels(seed: int, w=W, h=H) -> bytes:
    return random.Random(seed).randbytes(w * h * 4)


def upload(client, payload, timeout=60):
    box, progress = [], []
    u = client.upload_image(payload, box.append)
    u.progress.connect(lambda a, b: progress.append((a, b)))
    assert wait_until(lambda: box, timeout), "the upload did not end"
    return u, box[0], progress


def stored(server, sha) -> bytes | None:
    store = server.app.state.store
    return store.get_bytes(sha, "rgba")[0] if sha in store else None


def open_uploads(server) -> list:
    return [s for s in server.app.state.uploads._sessions.values() if not s.done]


def test_a_large_image_to_a_remote_backend_goes_in_chunks(server, proxy):
    data = pixels(1)
    payload = ImagePayload.from_rgba(data, W, H)
    c = Client(proxy.url, server.token, remote=True)
    u, resp, progress = upload(c, payload)
    assert resp.ok, resp.error
    assert resp.json()["sha"] == payload.sha and resp.json()["complete"] is True
    assert u.mode == "resumable" and u.chunks == 3 and c.resumable is True  # 4 + 4 + 1.4 MB
    requests = proxy.requests()
    assert [m for m, p in requests if p.startswith("/v1/uploads")] == ["POST", "PUT", "PUT", "PUT"]
    assert not any(p.startswith("/v1/images/") and m == "PUT" for m, p in requests)
    assert progress[-1] == (len(data), len(data)) and [a for a, _ in progress] == sorted(a for a, _ in progress)
    assert len(progress) >= 4  # from 0 to the end, chunk by chunk
    assert stored(server, payload.sha) == data
    assert open_uploads(server) == []
    # compressed raw and PNG go in chunks too, and are stored as a single PUT stores them
    noisy = pixels(10)
    for fmt in ("deflate", "png"):
        p = ImagePayload.from_rgba(noisy, W, H, fmt)
        assert len(p.body) >= c.resumable_min_bytes  # noise: nothing to compress
        u, resp, _ = upload(c, p)
        assert resp.ok, resp.error
        assert u.mode == "resumable" and u.chunks == 3 and resp.json()["sha"] == p.sha
        assert stored(server, p.sha) == noisy
        assert server.app.state.store.get_bytes(p.sha, fmt if fmt == "png" else "rgba")[0] == (
            p.body if fmt == "png" else noisy)
    # the same size to a backend on this computer, and a small image to a remote one: one PUT
    for client, rgba, w, h in ((Client(proxy.url, server.token), pixels(2), W, H),
                               (c, pixels(3, 64, 64), 64, 64)):
        p = ImagePayload.from_rgba(rgba, w, h)
        u, resp, _ = upload(client, p)
        assert resp.ok and u.mode == "single"
        assert proxy.requests().count(("PUT", f"/v1/images/{p.sha}")) == 1
        assert proxy.requests().count(("POST", "/v1/uploads")) == 3  # the large ones', only
        assert stored(server, p.sha) == rgba
        client.deleteLater()


@pytest.mark.parametrize("down_s", [0.0, 0.3])
def test_a_dropped_connection_resumes_from_the_servers_offset(server, proxy, down_s):
    """The connection drops halfway through the second chunk. Qt may send the chunk again by
    itself on a new connection: the server answers 409 with its offset, and the upload goes on
    from there. When the network stays down a moment (``down_s``: Qt's own tries fail too), the
    chunk's request fails: the upload waits, asks the server for its offset (GET) and goes on
    from there."""
    data = pixels(4 if down_s else 9)
    payload = ImagePayload.from_rgba(data, W, H)
    c = Client(proxy.url, server.token, remote=True)
    proxy.cut_at = 6 * MiB  # halfway through the second chunk
    proxy.refuse_after_cut_s = down_s
    retrying = []
    box = []
    u = c.upload_image(payload, box.append)
    u.retrying.connect(retrying.append)
    assert wait_until(lambda: box, 60), "the upload did not end"
    assert box[0].ok, box[0].error
    assert proxy.cuts >= 1
    # it went on from what the server had, part of the cut chunk included
    assert u.resumes and 4 * MiB < u.resumes[0] < 6 * MiB, u.resumes
    assert retrying and "dropped" in retrying[0]
    asked = ("GET", f"/v1/uploads/{u.upload_id}") in proxy.requests()
    assert asked == ("trying again in" in retrying[0])  # a wait, then the question
    if down_s:
        assert asked
    assert stored(server, payload.sha) == data
    # what crossed: the image once, the cut chunk's part, and the chunk again when Qt resent it
    # by itself (the server refused it at once, but Qt sends a body out whole) -- never the
    # image twice
    assert proxy.forwarded < len(data) + (0 if asked else 4 * MiB) + 64 * 1024
    assert open_uploads(server) == []
    c.deleteLater()


def test_a_backend_without_resumable_uploads_gets_one_put(tmp_path):
    from analogon.server import ServerThread, Settings

    settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu", scan_usual_places=False)
    with ServerThread(settings) as old:
        routes = old.app.router.routes  # an older backend: no /v1/uploads at all
        routes[:] = [r for r in routes if not getattr(r, "path", "").startswith("/v1/uploads")]
        proxy = Proxy(old.url)
        c = Client(proxy.url, old.token, remote=True)
        try:
            for seed in (5, 6):
                data = pixels(seed)
                p = ImagePayload.from_rgba(data, W, H)
                u, resp, progress = upload(c, p)
                assert resp.ok, resp.error
                assert u.mode == "single" and c.resumable is False
                assert stored(old, p.sha) == data and progress[-1] == (len(data), len(data))
            # it asked once, then knew
            sent = proxy.requests()
            assert sent.count(("POST", "/v1/uploads")) == 1
            assert len([r for r in sent if r[0] == "PUT"]) == 2 and ("PUT", f"/v1/images/{p.sha}") in sent
        finally:
            c.deleteLater()
            proxy.close()


def test_cancel_stops_the_upload_and_abandons_it_on_the_server(server, proxy):
    data = pixels(7)
    payload = ImagePayload.from_rgba(data, W, H)
    c = Client(proxy.url, server.token, remote=True)
    runner = JobRunner(c, JobSpec("pixels", {"source": ImageRef(payload)}, {"steps": 2}))
    ends, shown = [], []
    runner.cancelled.connect(lambda: ends.append("cancelled"))
    runner.failed.connect(ends.append)
    runner.done.connect(lambda r: ends.append("done"))

    def on_uploading(text, sent_kib, total_kib):
        shown.append(text)
        if sent_kib > 5 * 1024:  # in the second chunk
            runner.cancel()

    runner.uploading.connect(on_uploading)
    runner.start()
    assert wait_until(lambda: ends, 60)
    assert ends == ["cancelled"] and runner.job_id is None
    assert any(" of 9.4 MB" in t for t in shown)
    assert wait_until(lambda: open_uploads(server) == [], 10), "the upload is still open on the server"
    assert [m for m, p in proxy.requests() if p.startswith("/v1/uploads")][-1] == "DELETE"
    assert not list(server.app.state.uploads.folder.glob("*.part"))
    assert stored(server, payload.sha) is None
    assert not any(p == "/v1/jobs" for _, p in proxy.requests())
    c.deleteLater()


def test_an_upload_that_keeps_failing_stops_with_a_clear_message_then_goes_on(server, proxy, monkeypatch):
    monkeypatch.setattr(Upload, "BACKOFF_MS", 20)
    data = pixels(8)
    payload = ImagePayload.from_rgba(data, W, H)
    c = Client(proxy.url, server.token, remote=True)
    proxy.refuse_chunks = True  # every chunk's connection drops before it reaches the server
    u, resp, _ = upload(c, payload)
    assert resp.error is not None and resp.error.code == "upload_interrupted"
    assert "kept dropping" in resp.error.message and "run it again" in resp.error.message
    # the first try and RETRIES more (Qt may send each again by itself: more cuts)
    assert u.failures == Upload.RETRIES + 1 and proxy.cuts >= Upload.RETRIES + 1
    assert len(open_uploads(server)) == 1  # kept, for the next try
    # the network is back: the next try finds the upload the server kept and finishes it
    proxy.refuse_chunks = False
    u2, resp, _ = upload(c, payload)
    assert resp.ok, resp.error
    assert u2.upload_id == u.upload_id and u2.resumes == []  # the same upload, no failure
    assert stored(server, payload.sha) == data and open_uploads(server) == []
    c.deleteLater()
