"""The QtNetwork client against the real backend server over loopback (and two tiny local
servers for the failure cases a real server does not produce on demand)."""
from __future__ import annotations

import socket
import threading

import pytest
from conftest import process_events, wait_until
from PyQt6.QtCore import QTimer

from analogon_krita.link.client import (
    Client, EventStream, ImagePayload, ImageRef, JobRunner, JobSpec, SseParser, raw_image_id, sha256_hex,
)


def rgba(w, h, colour=(200, 40, 40, 255)):
    return bytes(colour) * (w * h)


def call(fn, *args, timeout=20, **kw):
    box = []
    fn(*args, callback=box.append, **kw) if "callback" in fn.__code__.co_varnames else fn(*args, box.append, **kw)
    assert wait_until(lambda: box, timeout), "no answer"
    return box[0]


def make_runner(client, spec):
    runner = JobRunner(client, spec)
    log = {"stages": [], "progress": [], "previews": 0, "done": None, "failed": None, "cancelled": False}
    runner.stage.connect(log["stages"].append)
    runner.progress.connect(lambda s, a, b: log["progress"].append((s, a, b)))
    runner.preview.connect(lambda img: log.__setitem__("previews", log["previews"] + 1))
    runner.done.connect(lambda r: log.__setitem__("done", r))
    runner.failed.connect(lambda m: log.__setitem__("failed", m))
    runner.cancelled.connect(lambda: log.__setitem__("cancelled", True))
    return runner, log


def finished(log):
    return log["done"] is not None or log["failed"] is not None or log["cancelled"]


def pixels_spec(w=64, h=64, steps=4, seed=3, colour=(120, 160, 200, 255)):
    source = ImagePayload.from_rgba(rgba(w, h, colour), w, h)
    ex = bytearray(rgba(16, 16, (250, 250, 20, 255)))
    exemplar = ImagePayload.from_rgba(bytes(ex), 16, 16)
    emap = bytearray(w * h * 4)
    for y in range(16, 32):
        for x in range(16, 32):
            emap[(y * w + x) * 4:(y * w + x) * 4 + 4] = b"\xff\xff\xff\xff"
    edit_map = ImagePayload.from_rgba(bytes(emap), w, h)
    return JobSpec("pixels", {"source": ImageRef(source), "exemplar": [ImageRef(exemplar, 16, 16)],
                              "edit_map": [ImageRef(edit_map, 0, 0)]},
                   {"steps": steps, "strength": 0.5}, "tiny-sd", seed)


@pytest.fixture
def client(backend, qtbot=None):
    c = Client(backend.url, backend.token)
    yield c
    c.deleteLater()


def test_health_methods_models(client):
    resp = call(client.health)
    assert resp.ok and resp.json()["status"] == "ok"
    methods = call(client.methods).json()["methods"]
    ids = [m["id"] for m in methods]
    assert ids, "the backend lists no methods"
    for m in methods:
        assert {"id", "title", "roles", "params"} <= set(m)
        names = {r["name"] for r in m["roles"]}
        assert {"edit_map", "mask"} <= names
    models = call(client.models).json()
    assert any(m["id"] == "tiny-sd" for m in models["models"])


def test_wrong_token_gives_readable_message(backend):
    c = Client(backend.url, "not-the-token")
    resp = call(c.methods)
    assert resp.status == 401 and not resp.ok
    assert "token" in resp.error.message and "Connect again" in resp.error.message


def test_upload_is_keyed_by_sha_and_skipped_when_stored(client):
    data = rgba(8, 4, (1, 2, 3, 4))
    p = ImagePayload.from_rgba(data, 8, 4)
    assert p.sha == raw_image_id(data, 8, 4) != raw_image_id(data, 4, 8)
    assert call(client.has_image, p.sha).status == 404
    first = call(client.put_image, p)
    assert first.status == 201 and first.json()["width"] == 8
    assert call(client.has_image, p.sha).status == 200
    again = call(client.put_image, p)
    assert again.status == 200
    back = call(client.get_image_rgba, p.sha)
    assert back.body == data and back.headers["x-image-width"] == "8"


def test_png_upload_round_trips(client):
    data = bytes(range(256)) * 4  # 16x16 RGBA with varied values
    p = ImagePayload.from_rgba(data, 16, 16, fmt="png")
    assert p.body[:8] == b"\x89PNG\r\n\x1a\n" and p.sha == sha256_hex(p.body)
    assert call(client.put_image, p).status in (200, 201)
    assert call(client.get_image_rgba, p.sha).body == data


def test_bad_upload_has_json_error(client):
    p = ImagePayload(b"abc", 1, 1)  # 3 bytes is not 1x1 RGBA
    resp = call(client.put_image, p)
    assert resp.status == 400 and resp.error.code == "bad_image" and resp.error.message


def test_job_runs_with_progress_and_result(client):
    spec = pixels_spec()
    runner, log = make_runner(client, spec)
    runner.start()
    assert wait_until(lambda: finished(log), 120), log
    assert log["failed"] is None, log["failed"]
    res = log["done"]
    assert res.seed == 3 and res.job_id
    (img, w, h, label, sha) = res.images[0]
    assert (w, h) == (64, 64) and len(img) == 64 * 64 * 4
    assert log["progress"], "no progress event arrived"
    assert "uploading" in log["stages"] and "downloading" in log["stages"]
    assert len(runner.uploaded) == 3
    # The same images again: every upload is skipped (HEAD says stored).
    runner2, log2 = make_runner(client, pixels_spec())
    runner2.start()
    assert wait_until(lambda: finished(log2), 120)
    assert runner2.uploaded == [] and len(runner2.skipped) == 3
    assert log2["done"].images[0][0] == img, "same seed and inputs should give the same result"


def test_invalid_params_message_names_the_field(client):
    spec = pixels_spec()
    spec.params = {"steps": 100000}
    runner, log = make_runner(client, spec)
    runner.start()
    assert wait_until(lambda: finished(log), 30)
    assert log["failed"] and "steps" in log["failed"]


def test_cancel_while_running_gives_cancelled_not_result(client):
    spec = pixels_spec(steps=200, seed=5, colour=(10, 200, 30, 255))
    spec.params = {"steps": 200, "strength": 1.0}
    runner, log = make_runner(client, spec)
    runner.progress.connect(lambda *a: runner.cancel())
    runner.start()
    assert wait_until(lambda: finished(log), 60)
    assert log["cancelled"] and log["done"] is None and log["failed"] is None
    status = call(client.job, runner.job_id).json()["status"]
    assert status == "cancelled"


def test_cancel_during_upload_sends_no_job(client):
    w = h = 2048
    big = bytes(range(256)) * (w * h * 4 // 256)
    spec = JobSpec("pixels", {"source": ImageRef(ImagePayload.from_rgba(big, w, h))}, {"steps": 2})
    runner, log = make_runner(client, spec)
    seen = {}
    real_put = client.put_image

    def put_then_cancel(payload, callback, timeout_ms=None):
        c = real_put(payload, callback, timeout_ms)
        seen["call"] = c
        # cancel as soon as part of the body went out, while the rest is still being sent
        c.reply.uploadProgress.connect(lambda sent, total: sent < total and runner.cancel())
        return c

    client.put_image = put_then_cancel
    runner.start()
    assert wait_until(lambda: finished(log), 30)
    assert log["cancelled"] and runner.job_id is None
    assert seen["call"].aborted
    assert call(client.has_image, spec.payloads()[0].sha).status == 404, "the upload completed"


class SilentServer:
    """Accepts connections and never answers (for timeouts)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        try:
            while True:
                c, _ = self.sock.accept()
                self.conns.append(c)
        except OSError:
            pass

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


def test_timeout_message():
    srv = SilentServer()
    try:
        c = Client(f"http://127.0.0.1:{srv.port}", "t", timeout_ms=300)
        resp = call(c.health, timeout=5)
        assert resp.error.code == "timeout" and "0.3 s" in resp.error.message
    finally:
        srv.close()


def test_connection_refused_message():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    c = Client(f"http://127.0.0.1:{port}", "t")
    resp = call(c.health, timeout=10)
    assert resp.error.code == "unreachable"
    assert "not running" in resp.error.message and str(port) in resp.error.message


class DroppingSseServer:
    """First connection: two events, then the connection drops. Later connections: the
    events after the request's Last-Event-ID, up to the terminal event (what the real server
    does); ``replay_all`` sends every event again instead (a server that ignores the header)."""

    replay_all = False

    EVENTS = [("queued", '{"id": "j", "position": 0}'), ("started", '{"id": "j", "model": "m"}'),
              ("progress", '{"stage": "denoise", "step": 1, "total": 2}'),
              ("done", '{"images": [], "seed": 1, "params": {}, "timings": {}}')]

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.last_event_ids: list[int] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                self._serve(c)
            except OSError:  # one connection's failure is not the server's
                pass
            finally:
                c.close()

    def _serve(self, c):
        request = b""
        while b"\r\n\r\n" not in request:  # the whole request, or closing would reset it
            chunk = c.recv(65536)
            if not chunk:
                return  # a connection the client opened and closed without a request
            request += chunk
        self.connections += 1
        last = 0
        for line in request.decode("latin-1").split("\r\n"):
            if line.lower().startswith("last-event-id:"):
                last = int(line.split(":", 1)[1].strip())
        self.last_event_ids.append(last)
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n")
        numbered = list(enumerate(self.EVENTS, 1))
        if self.connections == 1:
            numbered = numbered[:2]
        elif not self.replay_all:
            numbered = [(n, ev) for n, ev in numbered if n > last]
        body = b"".join(f"id: {n}\r\nevent: {e}\r\ndata: {d}\r\n\r\n".encode()
                        for n, (e, d) in numbered)
        c.sendall(head + body[:10])
        c.sendall(body[10:])  # split mid-event: the parser must join the pieces
        c.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("replay_all", [False, True])
def test_event_stream_reconnects_with_last_event_id(replay_all):
    srv = DroppingSseServer()
    srv.replay_all = replay_all
    c = Client(f"http://127.0.0.1:{srv.port}", "t")
    stream = EventStream(c, "j", reconnect_delay_ms=50)
    got = []
    stream.received.connect(lambda t, d: got.append(t))
    stream.start()
    assert wait_until(lambda: stream.finished, 10)
    assert got == ["queued", "started", "progress", "done"]
    assert stream.last_event_id == "4"
    # One reconnect of ours; Qt itself may retry a request whose connection it saw close
    # before it read the answer (seen on a loaded machine), so the server may count more.
    assert stream.reconnects == 1 and srv.connections >= 2
    assert srv.last_event_ids[0] == 0 and srv.last_event_ids[-1] == 2  # resumed after "started"


@pytest.fixture(scope="module")
def preview_server(tmp_path_factory):
    """The real server in this process, with a method that sends a preview at every step
    (the shipped methods send one or two per job on the tiny models)."""
    pytest.importorskip("analogon.server")
    import time

    import numpy as np
    from pydantic import Field

    from analogon import methods
    from analogon.methods.base import Method, MethodParams, MethodResult, ResultImage, Role
    from analogon.server import Settings, ServerThread

    class PreviewParams(MethodParams):
        steps: int = Field(12, ge=1, le=100)
        delay: float = Field(0.25, ge=0, le=2)

    class PreviewEveryStep(Method):
        id = "test-previews"
        title = "Previews at every step"
        description = "A test method."
        Params = PreviewParams
        roles = (Role("source", "Source"),)
        target_role = "source"

        def run(self, ctx, inputs, params):
            out = np.array(inputs.get("source").rgba, copy=True)
            for i in range(params.steps):
                ctx.progress("denoise", i + 1, params.steps)
                time.sleep(params.delay)  # longer than the server's 0.2 s between previews
                ctx.preview(out[..., :3], i + 1)
            return MethodResult([ResultImage(out, label="previews")])

    m = methods.register(PreviewEveryStep())
    settings = Settings(port=0, state_dir=tmp_path_factory.mktemp("preview-state"), cache_dir="", device="cpu")
    with ServerThread(settings) as srv:
        yield srv
    methods.unregister(m.id)


def test_event_stream_resumes_after_several_previews_on_the_real_server(preview_server):
    """The server keeps only the newest preview for late subscribers: a client that skipped
    "replayed" events by counting them lost real ones after a reconnect."""
    client = Client(preview_server.url, preview_server.token)
    source = ImagePayload.from_rgba(rgba(16, 16), 16, 16)
    assert call(client.put_image, source).status in (200, 201)
    submitted = call(client.send_json, "POST", "/v1/jobs", JobSpec(
        "test-previews", {"source": ImageRef(source)}, {"steps": 12}, seed=1).body())
    assert submitted.status == 202, submitted.body
    job_id = submitted.json()["id"]
    stream = EventStream(client, job_id, reconnect_delay_ms=50)
    got, state = [], {"previews": 0, "dropped": False, "failed": None}

    def on_event(etype, data):
        got.append((etype, data))
        if etype == "preview":
            state["previews"] += 1
            if state["previews"] == 3 and not state["dropped"]:
                state["dropped"] = True
                QTimer.singleShot(0, stream._reply.abort)  # the connection drops mid-job

    stream.received.connect(on_event)
    stream.failed.connect(lambda m: state.__setitem__("failed", m))
    stream.start()
    assert wait_until(lambda: stream.finished, 120), got[-3:]
    assert state["failed"] is None, state["failed"]
    assert state["dropped"] and stream.reconnects >= 1
    assert got[-1][0] == "done"
    # every event but the previews the server no longer keeps arrived, once, in order
    replay = EventStream(client, job_id)
    history = []
    replay.received.connect(lambda t, d: history.append((t, d)))
    replay.start()
    assert wait_until(lambda: replay.finished, 30)
    assert [e for e in got if e[0] != "preview"] == [e for e in history if e[0] != "preview"]
    steps = [d["step"] for t, d in got if t == "progress" and d["stage"] == "denoise"]
    assert steps == list(range(1, 13))


def test_sse_parser_handles_chunks_crlf_comments_multiline_ids():
    raw = (b": keep-alive\r\nid: 7\r\nevent: progress\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n"
           b"event: preview\ndata: {}\n\nid: 9\nevent: done\ndata: {}\n\n")
    for cut in range(1, len(raw)):
        p = SseParser()
        out = p.feed(raw[:cut]) + p.feed(raw[cut:])
        # an event without an id line keeps the stream's last id (the HTML standard's rule)
        assert out == [("progress", '{"a":\n1}', "7"), ("preview", "{}", "7"), ("done", "{}", "9")]
    process_events(1)


def test_a_gzip_compressed_raw_download_arrives_as_its_pixels(tmp_path):
    """A backend on another machine compresses raw results (``--compress-downloads``); Qt asks
    for gzip and inflates it: the client sees the pixels, byte for byte."""
    from analogon.server import ServerThread, Settings

    data = bytes((i * 7) % 251 for i in range(64 * 48 * 4))
    p = ImagePayload.from_rgba(data, 64, 48)
    settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu",
                        compress_downloads="always")
    with ServerThread(settings) as srv:
        c = Client(srv.url, srv.token)
        try:
            assert call(c.put_image, p).status == 201
            back = call(c.get_image_rgba, p.sha)
            assert back.ok and back.body == data and back.headers["x-image-width"] == "64"
            assert back.headers.get("content-encoding") == "gzip"  # it did travel compressed
        finally:
            c.deleteLater()
