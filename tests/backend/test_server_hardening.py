"""Hardening of the real server on a loopback port (issue 15): caller mistakes are 4xx with
the documented codes, nothing damaged is served or used, memory is estimated before a job
runs, event streams end, and the image store answers without listing its folder."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from typing import Literal

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import Field

from analogon import methods
from analogon.core.images import raw_image_id
from analogon.methods.base import Inputs, JobContext, Method, MethodParams, MethodResult, Role
from analogon.server import Settings, ServerThread, server_json_state, write_server_json
from analogon.server.store import ImageStore, Limits, StoreInUse
from test_engine_methods import EchoMethod
from test_models_discovery import unblock_fifos
from test_server import assert_error, assert_healthy, events, image, png_bytes, sha, submit, upload

RAW = "application/x-analogon-rgba"


class OomParams(MethodParams):
    kind: Literal["memory", "cpu_alloc", "cuda"] = "memory"
    steps: int = Field(1, ge=1, le=10)


class OomMethod(Method):
    """Fails the way an allocation fails."""

    id = "test-oom"
    title = "Test out of memory"
    description = "A test method that runs out of memory."
    Params = OomParams
    roles = (Role("source", "Source"),)
    target_role = "source"

    def run(self, ctx: JobContext, inputs: Inputs, params: OomParams) -> MethodResult:
        ctx.progress("denoise", 1, 1)
        if params.kind == "memory":
            raise MemoryError()
        if params.kind == "cuda":
            raise type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 20.00 GiB")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1099511627776 bytes. Error code 12")


@pytest.fixture(scope="module")
def registered():
    echo = methods.register(EchoMethod())
    oom = methods.register(OomMethod())
    yield echo
    methods.unregister(echo.id)
    methods.unregister(oom.id)


def _settings(state_dir, **kw):
    return Settings(port=0, state_dir=state_dir, cache_dir="", device="cpu",
                    limits=Limits(max_body_bytes=1024 * 1024, max_side=512, max_pixels=512 * 256), **kw)


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    with ServerThread(_settings(tmp_path_factory.mktemp("state"), header_timeout_s=0.5, body_timeout_s=0.5)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                      timeout=30) as c:
        yield c


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width×height (valid CRC), with a token of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def encoded(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


# -- 1. formats ------------------------------------------------------------------------------------

def test_only_png_and_raw_rgba_are_taken(server, client, monkeypatch):
    from PIL import EpsImagePlugin

    opened = []
    real_open = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open",
                        lambda self: (opened.append(1), real_open(self))[1])
    rgb = image(16, 16, seed=11)[..., :3]
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
           b"/a { a } def a\nshowpage\n%%EOF\n")  # a loop, were it ever run
    for body in (encoded(rgb, "JPEG"), encoded(rgb, "BMP"), encoded(rgb, "GIF"), encoded(rgb, "TIFF"), eps):
        r = client.put(f"/v1/images/{sha(body)}", content=body, headers={"Content-Type": "image/png"})
        assert_error(r, 400, "bad_image")
        assert client.head(f"/v1/images/{sha(body)}").status_code == 404
    assert opened == [], "an EPS upload reached Pillow's EPS reader (Ghostscript)"
    assert_healthy(server)


def test_an_upload_without_content_type_is_415(client):
    body = png_bytes(image(8, 8, seed=12))
    r = client.put(f"/v1/images/{sha(body)}", content=body, headers={"Content-Type": ""})
    assert_error(r, 415, "unsupported_media_type")
    r = client.put(f"/v1/images/{sha(body)}", content=body, headers={"Content-Type": "application/octet-stream"})
    assert_error(r, 415, "unsupported_media_type")


# -- 3. no 500 for caller mistakes -------------------------------------------------------------------

def _post_raw(client, text: str | bytes):
    body = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return client.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})


def test_non_portable_json_is_400_bad_json(server, client):
    s = upload(client, image(seed=13))
    bodies = [
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"shift": NaN}}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"shift": Infinity}}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"shift": -Infinity}}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"shift": 1e400}}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"delay": -1e400}}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "seed": NaN}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "seed": 1e400}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"x": [1, NaN]}}' % s,
        '{"method": "test-echo", "images": {"source": "%s", "exemplar": [{"sha": "%s", "x": NaN}]}}' % (s, s),
        '{"method": "test-echo", "images": {"source": "%s", "exemplar": [{"sha": "%s", "x": Infinity}]}}' % (s, s),
        '{"method": "test-echo", "images": {"source": "%s", "exemplar": [{"sha": "%s", "x": 99999999999999999999}]}}' % (s, s),
        '{"method": "\\ud800", "images": {"source": "%s"}}' % s,
        '{"method": "test-echo", "model": "\\udfff", "images": {"source": "%s"}}' % s,
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"\\ud800": 1}}' % s,
        '{"method": "test-echo", "images": {"source": "%s", "\\ud800x": "%s"}}' % (s, s),
        '{"method": "test-echo", "images": {"source": "%s"}, "params": {"fail": "\\udbff"}}' % s,
        b'{"method": "test-echo\xff\xfe"}',  # not UTF-8
        "[" * 100_000 + "]" * 100_000,  # deeper than any parser's stack
        '{"a": ' * 100 + "1" + "}" * 100,
    ]
    for body in bodies:
        r = _post_raw(client, body)
        assert_error(r, 400, "bad_json")
        r.content.decode("utf-8")  # the error itself is valid UTF-8 JSON
    assert_healthy(server)


def test_bad_last_event_id_is_400(server, client):
    s = upload(client, image(seed=14))
    job = submit(client, method="test-echo", params={"steps": 1}, images={"source": s})
    for value in ("²", "¹", "9" * 5000, "-1", "1.5", "0x10", "1 2"):
        r = client.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": value.encode("utf-8")})
        assert_error(r, 400, "bad_event_id")
    assert events(client, job)[-1][0] == "done"


# -- 4. event streams --------------------------------------------------------------------------------

def _stream(client, job_id: str, last_id: str | None = None, timeout: float = 10) -> list[tuple[int, str, dict]]:
    """(id, event, data) until the server ends the stream. On a finished job a stream that
    does not end fails with httpx.ReadTimeout (keep-alives come every 15 s, the bound is 10 s)."""
    out, cur = [], {}
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("id: "):
                cur["id"] = int(line[4:])
            elif line.startswith("event: "):
                cur["event"] = line[7:]
            elif line.startswith("data: "):
                out.append((cur.get("id"), cur.get("event"), json.loads(line[6:])))
                cur = {}
    return out


def test_resuming_a_finished_job_at_or_after_its_end_ends_at_once(client):
    s = upload(client, image(seed=15))
    job = submit(client, method="test-echo", params={"steps": 3}, images={"source": s})
    full = _stream(client, job, timeout=120)  # the model may still be loading
    last = full[-1][0]
    assert full[-1][1] == "done"
    assert _stream(client, job, str(last - 1)) == full[-1:]
    for after in (last, last + 1, 10**17):
        assert _stream(client, job, str(after)) == [full[-1]]  # the terminal event, then the end
    ids = [n for n, _, _ in full]
    assert ids == sorted(set(ids)) and ids[0] == 1


def test_shutdown_ends_every_stream_with_a_final_event(registered, tmp_path):
    srv = ServerThread(_settings(tmp_path / "state")).start()
    stopped = False
    try:
        c = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=30)
        s = upload(c, image(seed=16))
        running = submit(c, method="test-echo", params={"steps": 50, "delay": 0.2}, images={"source": s})
        queued = submit(c, method="test-echo", params={"steps": 1}, images={"source": s})
        got: dict[str, list] = {}
        ready = {running: threading.Event(), queued: threading.Event()}

        def listen(job_id):
            out, kind = [], None
            try:
                with c.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                    for line in r.iter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            out.append((kind, json.loads(line[6:])))
                            if kind == "progress" and out[-1][1].get("stage") == "denoise" or kind == "queued":
                                ready[job_id].set()
            except httpx.HTTPError as e:
                out.append(("transport", repr(e)))
            got[job_id] = out
            ready[job_id].set()

        threads = [threading.Thread(target=listen, args=(j,)) for j in (running, queued)]
        for t in threads:
            t.start()
        for e in ready.values():
            assert e.wait(120)
        srv.stop()
        stopped = True
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        for job_id in (running, queued):
            kind, data = got[job_id][-1]
            assert kind == "error" and data["code"] == "shutting_down", got[job_id][-3:]
    finally:
        if not stopped:
            srv.stop()


# -- 5. memory -------------------------------------------------------------------------------------------

def test_huge_declared_png_sizes_are_413(server, client):
    for w, h in ((20000, 20000), (60000, 60000), (513, 4), (100000, 1)):
        body = png_declaring(w, h)
        r = client.put(f"/v1/images/{sha(body)}", content=body, headers={"Content-Type": "image/png"})
        body_json = assert_error(r, 413, "too_large")
        assert body_json["detail"]["width"] == w
    assert_healthy(server)


def test_a_job_that_would_not_fit_is_refused_before_it_runs(server, client, registered):
    s = upload(client, image(300, 200, seed=17))
    budget = server.app.state.budget
    calls = len(registered.calls)
    budget.host_bytes = 1024 * 1024  # 1 MiB free
    try:
        r = client.post("/v1/jobs", json={"method": "test-echo", "params": {"steps": 1}, "images": {"source": s}})
        body = assert_error(r, 413, "out_of_memory")
        # 1 MiB cannot hold even the model: the refusal names it, not the region's size.
        assert "smaller model" in body["message"] and body["detail"]["cause"] == "model"
        d = body["detail"]
        assert d["needed_bytes"] > d["available_bytes"] == 1024 * 1024 and (d["width"], d["height"]) == (300, 200)
    finally:
        budget.host_bytes = None
    assert len(registered.calls) == calls  # nothing ran
    job = submit(client, method="test-echo", params={"steps": 1}, images={"source": s})
    assert events(client, job)[-1][0] == "done"


def test_the_estimate_grows_with_the_pixels():
    from analogon.engine import ImageRef, PreparedJob
    from analogon.server.memory import estimate
    from analogon.server.store import StoredImage

    class Sizes:
        def __init__(self, w, h):
            self.w, self.h = w, h

        def info(self, sha):
            return StoredImage(sha, self.w, self.h)

    m = methods.get("pixels") if "pixels" in {x.id for x in methods.all_methods()} else EchoMethod()
    job = PreparedJob(m, m.Params(), {m.target_role: ImageRef("a" * 64)}, "tiny-sd", 1)
    small, big = estimate(job, Sizes(1024, 1024)), estimate(job, Sizes(8192, 8192))
    assert big.full_res_bytes == 64 * small.full_res_bytes and big.model_bytes == small.model_bytes
    assert big.full_res_bytes > 2 * 1024**3  # an 8192² job needs gigabytes: refused on a small machine
    sdxl = PreparedJob(m, m.Params(), job.refs, "stabilityai/stable-diffusion-xl-base-1.0", 1)
    assert estimate(sdxl, Sizes(1024, 1024)).model_bytes > 10 * small.model_bytes


@pytest.mark.parametrize("kind", ["memory", "cpu_alloc", "cuda"])
def test_allocation_failures_are_out_of_memory(server, client, kind):
    s = upload(client, image(seed=18))
    job = submit(client, method="test-oom", params={"kind": kind}, images={"source": s})
    kind_, data = events(client, job)[-1]
    assert kind_ == "error" and data["code"] == "out_of_memory", data
    assert "ran out of memory" in data["message"]
    assert_healthy(server)


def test_a_png_upload_keeps_no_decoded_pixels(server, client):
    body = png_bytes(image(256, 256, seed=19))
    s = sha(body)
    assert client.put(f"/v1/images/{s}", content=body, headers={"Content-Type": "image/png"}).status_code == 201
    assert s not in server.app.state.store._mem


PEAK_SCRIPT = r"""
import io, sys
import numpy as np
from PIL import Image
from analogon.server import store
side = int(sys.argv[1])
buf = io.BytesIO()
Image.new("RGBA", (side, side)).save(buf, format="PNG")
data = buf.getvalue()
def hwm():
    return [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
open("/proc/self/clear_refs", "w").write("5")
base = hwm()
rgba = getattr(store, "read_png", store.decode_png)(data, store.Limits())
assert rgba.shape == (side, side, 4)
print(hwm() - base)
"""


def test_decoding_a_png_peaks_near_the_image_and_its_rgba(tmp_path):
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc to measure the peak")
    side = 4096
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(side)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rgba = side * side * 4
    peak = int(out.stdout.strip().splitlines()[-1])
    # the decoded image and the RGBA result (2×), plus strips; before: about 4× (copies and joins)
    assert peak < 2.6 * rgba, f"decoding peaked at {peak / rgba:.2f}× the RGBA size"


# -- 6. the store ----------------------------------------------------------------------------------------

def _raw(seed: int, w: int = 4, h: int = 4) -> tuple[str, bytes]:
    body = image(w, h, seed=seed).tobytes()
    return raw_image_id(body, w, h), body


def test_store_lookups_never_list_the_folder(tmp_path, monkeypatch):
    import os
    import pathlib

    store = ImageStore(tmp_path / "images")
    shas = []
    for i in range(50):
        s, body = _raw(i)
        store.put_bytes(s, body, RAW, 4, 4)
        shas.append(s)
    res = store.put_array(image(4, 4, seed=999))
    store.close()
    store = ImageStore(tmp_path / "images")  # reads the folder once, here

    def no_listing(*a, **k):
        raise AssertionError("the store listed its folder")

    for name in ("iterdir", "glob", "rglob"):
        monkeypatch.setattr(pathlib.Path, name, no_listing)
    monkeypatch.setattr(os, "scandir", no_listing)
    monkeypatch.setattr(os, "listdir", no_listing)
    s, body = _raw(1000)
    assert store.put_bytes(s, body, RAW, 4, 4)[1] is True
    assert shas[7] in store and store.info(shas[7]).width == 4
    assert store.load(shas[8]).shape == (4, 4, 4)
    assert store.get_bytes(res.sha, "rgba")[0] == image(4, 4, seed=999).tobytes()
    assert store.put_array(image(4, 4, seed=998)).sha in store
    assert "f" * 64 not in store
    store.close()


def test_eviction_takes_downloaded_results_first_then_results_then_uploads(tmp_path):
    one = 8 * 8 * 4
    store = ImageStore(tmp_path / "images", disk_cap_bytes=6 * one)
    uploads = []
    for i in range(2):
        s, body = _raw(i, 8, 8)
        store.put_bytes(s, body, RAW, 8, 8)
        uploads.append(s)
    results = [store.put_array(image(8, 8, seed=100 + i)).sha for i in range(4)]
    assert store.disk_bytes() == 6 * one
    store.get_bytes(results[2], "rgba")  # the plugin downloaded this one
    store.put_array(image(8, 8, seed=200))  # over the cap by one
    assert results[2] not in store and all(s in store for s in uploads)
    assert all(s in store for s in (results[0], results[1], results[3]))
    store.put_array(image(8, 8, seed=201))  # next: the oldest result not downloaded
    assert results[0] not in store and uploads[0] in store
    assert store.disk_bytes() <= 6 * one
    store.close()


def test_results_expire_by_age(tmp_path):
    import os
    import time

    store = ImageStore(tmp_path / "images")
    old = store.put_array(image(4, 4, seed=300)).sha
    s, body = _raw(301)
    store.put_bytes(s, body, RAW, 4, 4)
    store.close()
    path = next((tmp_path / "images" / old[:2]).glob(old + ".*"))
    past = time.time() - 30 * 24 * 3600
    os.utime(path, (past, past))
    upath = next((tmp_path / "images" / s[:2]).glob(s + ".*"))
    os.utime(upath, (past, past))
    store = ImageStore(tmp_path / "images", result_max_age_s=7 * 24 * 3600)
    assert old not in store and s in store  # results expire; uploads stay until the cap
    store.close()


def test_the_store_cap_and_result_age_are_serve_options():
    from analogon.cli import _base_parser, _memory, _settings_from_args

    args = _base_parser().parse_args(["serve", "--image-store-cap", "500M", "--result-max-age-days", "2"])
    settings = _settings_from_args(args, _memory(args))
    assert settings.image_store_cap_bytes == 500 * 1024**2
    assert settings.result_max_age_s == 2 * 24 * 3600
    args = _base_parser().parse_args(["serve", "--image-store-cap", "3G", "--result-max-age-days", "0"])
    settings = _settings_from_args(args, _memory(args))
    assert settings.image_store_cap_bytes == 3 * 1024**3 and settings.result_max_age_s is None


def test_an_old_flat_store_is_moved_into_the_new_layout(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    png = png_bytes(image(5, 3, seed=400))
    (folder / f"{sha(png)}.png").write_bytes(png)
    s, body = _raw(401, 4, 4)
    (folder / f"{s}.4x4.rgba").write_bytes(body)
    store = ImageStore(folder)
    assert store.info(sha(png)).width == 5 and store.get_bytes(sha(png), "png")[0] == png
    assert store.get_bytes(s, "rgba")[0] == body
    store.close()


# -- 7. crash leftovers ----------------------------------------------------------------------------------

def test_leftovers_and_damaged_files_are_never_served(tmp_path):
    folder = tmp_path / "images"
    store = ImageStore(folder)
    s_raw, body = _raw(500, 8, 8)
    store.put_bytes(s_raw, body, RAW, 8, 8)
    png = png_bytes(image(6, 6, seed=501))
    store.put_bytes(sha(png), png, "image/png")
    store.close()
    raw_path = next((folder / s_raw[:2]).glob(s_raw + ".*"))
    png_path = next((folder / sha(png)[:2]).glob(sha(png) + ".*"))
    tmp = raw_path.with_name(f".{raw_path.name}.99999.1.tmp")
    tmp.write_bytes(body[:10])  # a write cut short by kill -9
    raw_path.write_bytes(body[:-7])  # truncated
    png_path.write_bytes(png[:20] + bytes([png[20] ^ 1]) + png[21:])  # one bit changed
    store = ImageStore(folder)
    assert not tmp.exists() and store.removed_at_start["tmp"] == 1
    assert s_raw not in store and store.info(s_raw) is None
    assert store.info(sha(png)) is None and not png_path.exists()
    with pytest.raises(Exception) as e:
        store.get_bytes(s_raw, "rgba")
    assert getattr(e.value, "code", None) == "image_not_found"
    # uploading again replaces what was damaged
    assert store.put_bytes(sha(png), png, "image/png")[1] is True
    assert store.get_bytes(sha(png), "png")[0] == png
    store.close()


def test_damaged_stored_images_through_the_server(server, client):
    store = server.app.state.store
    png = png_bytes(image(6, 6, seed=502))
    s = sha(png)
    assert client.put(f"/v1/images/{s}", content=png, headers={"Content-Type": "image/png"}).status_code == 201
    raw_body = image(7, 5, seed=503).tobytes()
    rid = raw_image_id(raw_body, 7, 5)
    assert client.put(f"/v1/images/{rid}", content=raw_body, headers={
        "Content-Type": RAW, "X-Image-Width": "7", "X-Image-Height": "5"}).status_code == 201
    for sha_, data in ((s, b"\x89PNG\r\n\x1a\n" + b"\x00" * 20), (rid, raw_body[:33])):
        path = next((store.folder / sha_[:2]).glob(sha_ + ".*"))
        path.write_bytes(data)  # damaged on disk while the server runs
        store._mem.pop(sha_, None)
        store._index[sha_].verified = False
    assert_error(client.get(f"/v1/images/{rid}", params={"format": "rgba"}), 404, "image_not_found")
    assert client.head(f"/v1/images/{s}").status_code == 404
    r = client.put(f"/v1/images/{s}", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 201 and client.get(f"/v1/images/{s}").content == png
    assert_healthy(server)


def test_a_stale_server_json_is_told_from_a_live_one(tmp_path):
    state = tmp_path / "state"
    assert server_json_state(state) == "absent"
    srv = ServerThread(_settings(state), write_json=True).start()
    try:
        assert server_json_state(state) == "live"
        with pytest.raises(StoreInUse):  # a second backend on the same state folder
            ServerThread(_settings(state))
    finally:
        srv.stop()
    write_server_json(state, "http://127.0.0.1:9", "t")  # what a killed backend leaves
    assert server_json_state(state) == "stale"
    srv = ServerThread(_settings(state), write_json=True).start()  # replaces it
    try:
        assert json.loads((state / "server.json").read_text())["url"] == srv.url
        assert httpx.get(srv.url + "/v1/health").json()["pid"] == json.loads(
            (state / "server.json").read_text())["pid"]
    finally:
        srv.stop()


# -- 8. leniency and contract ----------------------------------------------------------------------------

def test_ids_with_a_trailing_newline_are_refused(client):
    body = png_bytes(image(4, 4, seed=600))
    r = client.put(f"/v1/images/{sha(body)}%0A", content=body, headers={"Content-Type": "image/png"})
    assert_error(r, 400, "bad_sha")
    assert_error(client.get(f"/v1/images/{sha(body)}%0A"), 400, "bad_sha")


def test_size_headers_are_plain_digits(client):
    body = bytes(40)
    rid = raw_image_id(body, 10, 1)
    for value in ("1_0", "+10", "0x10", "１０", "10.0", "-10", "1e1"):
        r = client.put(f"/v1/images/{rid}", content=body, headers={
            "Content-Type": RAW, "X-Image-Width": value.encode("utf-8"), "X-Image-Height": "1"})
        assert_error(r, 400, "bad_image")
    r = client.put(f"/v1/images/{rid}", content=body, headers={
        "Content-Type": RAW, "X-Image-Width": "10", "X-Image-Height": "1"})
    assert r.status_code == 201


def test_seed_must_be_a_json_integer(client):
    s = upload(client, image(seed=601))
    for seed in (True, "7", 7.0, [7]):
        r = client.post("/v1/jobs", json={"method": "test-echo", "seed": seed, "images": {"source": s}})
        assert_error(r, 422, "invalid_params")
    for field, value in (("method", 5), ("model", 3)):
        r = client.post("/v1/jobs", json={"method": "test-echo", field: value, "images": {"source": s}})
        assert_error(r, 422, "invalid_params")


def test_a_job_body_must_be_json(client):
    s = upload(client, image(seed=602))
    body = json.dumps({"method": "test-echo", "images": {"source": s}})
    r = client.post("/v1/jobs", content=body, headers={"Content-Type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")


def test_host_names_are_parsed_strictly(server, client):
    port = server.url.rsplit(":", 1)[1]
    for host in ("[::1].evil.example", f"localhost:{port}@evil.example", "localhost:port",
                 "127.0.0.1:80:80", "localhost.", "[::1]x", "user@localhost", "localhost:123456"):
        assert_error(client.get("/v1/methods", headers={"Host": host}), 403, "forbidden_host")


def test_a_client_that_never_finishes_its_headers_is_closed(server):
    host, port = server.url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert s.recv(1024) == b"", "the connection is still held"
    with socket.create_connection((host, int(port)), timeout=30) as s:  # and one that never starts
        assert s.recv(1024) == b""
    assert_healthy(server)


def test_head_health_and_allow_headers(server, client):
    r = httpx.head(server.url + "/v1/health")
    assert r.status_code == 200
    r = client.put("/v1/jobs/" + "0" * 32)
    assert_error(r, 405, "method_not_allowed")
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}
    r = client.post("/v1/images/" + "0" * 64)
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "PUT"}


def test_the_openapi_document_is_the_contract(client):
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # comes with schemathesis (the test extra)
    doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearer"]["description"]}
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/v1/health"]["get"]["security"] == []
    params = {p["name"]: p for p in doc["paths"]["/v1/images/{sha}"]["get"]["parameters"]}
    assert params["sha"]["schema"]["pattern"] == "^[0-9a-f]{64}$"
    params = {p["name"]: p for p in doc["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"]}
    assert params["job_id"]["schema"]["pattern"] == "^[0-9a-f]{32}$"
    post = doc["paths"]["/v1/jobs"]["post"]
    assert {"202", "400", "401", "403", "404", "413", "415", "422", "500", "503"} <= set(post["responses"])
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    put = doc["paths"]["/v1/images/{sha}"]["put"]
    assert {"200", "201", "400", "401", "403", "413", "415"} <= set(put["responses"])
    variants = doc["components"]["schemas"]["JobRequest"]["oneOf"]
    assert any(v["$ref"].endswith("/TestEchoJob") for v in variants)
    # the bodies the server sends match the document
    error_schema = jsonschema_rs.validator_for(doc["components"]["schemas"]["Error"])
    s = upload(client, image(seed=603))
    for body, status in ((client.post("/v1/jobs", json={"method": "test-echo", "images": {}}), 422),
                         (client.post("/v1/jobs", json={"method": "test-echo", "images": {"source": s},
                                                        "params": {"steps": 0}}), 422),
                         (_post_raw(client, b"{"), 400)):
        assert body.status_code == status
        error_schema.validate(body.json())
        assert str(status) in post["responses"]


# -- 9. model folders and downloads (issue 28) --------------------------------------------------------

def _raw_request(server, head: bytes, body_pieces=(), pause: float = 0.0, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send ``head`` (request line and headers), then each piece of body after ``pause``
    seconds; (what came back until the server closed, seconds from the last piece to the close)."""
    host, port = server.url.rsplit("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        for piece in body_pieces:
            time.sleep(pause)
            s.sendall(piece)
        t0, got = time.monotonic(), b""
        while chunk := s.recv(65536):
            got += chunk
        return got, time.monotonic() - t0


def test_a_body_that_never_arrives_is_closed(server):
    """Item 5: a request whose body never arrived after complete headers was held open with no
    limit. Now the server closes it when no byte came for body_timeout_s (0.5 s here)."""
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    got, waited = _raw_request(server, head, [b'{"method": '])
    assert got == b"" and waited < 5, (got, waited)
    head_put = (f"PUT /v1/images/{'0' * 64} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                f"{server.token}\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n").encode()
    got, waited = _raw_request(server, head_put)
    assert got == b"" and waited < 5
    # a slow body that keeps coming is not cut: 8 pieces 0.2 s apart take longer than the timeout
    body = json.dumps({"method": "test-echo", "images": {}}).encode()
    pieces = [body[i * len(body) // 8:(i + 1) * len(body) // 8] for i in range(8)]
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    got, _ = _raw_request(server, head, pieces, pause=0.2)
    assert got.startswith(b"HTTP/1.1 422"), got[:200]
    assert_healthy(server)


def test_a_job_body_without_content_type_is_415(client):
    """Item 5: a job body with no Content-Type got 422 (or ran) where the protocol says 415."""
    s = upload(client, image(seed=900))
    body = json.dumps({"method": "test-echo", "images": {"source": s}}).encode()
    r = client.post("/v1/jobs", content=body)
    assert "content-type" not in r.request.headers
    assert_error(r, 415, "unsupported_media_type")


def test_download_bodies_are_strict_i_json(server, client):
    """Item 4: download bodies were not parsed as strict I-JSON like job bodies."""
    for body in ('{"model": NaN}', '{"model": Infinity}', '{"model": 1e400}', '{"model": 99999999999999999999999}',
                 '{"model": "\\ud800"}', '{"model": "nope", "model": "sd15"}', '[' * 1000 + ']' * 1000, '{"model": '):
        r = client.post("/v1/downloads", content=body.encode("utf-8", "surrogatepass"),
                        headers={"Content-Type": "application/json"})
        assert_error(r, 400, "bad_json")
    assert_error(client.post("/v1/downloads", content=b'{"model": "nope"}'), 415, "unsupported_media_type")
    assert_error(client.post("/v1/downloads", content=b'{"model": "nope"}', headers={"Content-Type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/v1/downloads", json={"model": 5}), 422, "invalid_params")
    assert_error(client.post("/v1/downloads", json={"model": "nope", "x": 1}), 422, "invalid_params")
    assert_error(client.post("/v1/downloads", json={"model": "nope"}), 404, "unknown_download")
    assert_error(client.post("/v1/jobs", content=b'{"method": "test-echo", "method": "x"}',
                             headers={"Content-Type": "application/json"}), 400, "bad_json")
    assert_healthy(server)


def test_a_model_that_is_not_found_says_nothing_of_the_path(client, tmp_path):
    """Item 5: a job's model field told whether a local path exists (a folder without
    model_index.json, a missing checkpoint file). Now each is "not found", in the same words."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "model.safetensors").mkdir()
    s = upload(client, image(seed=901))
    answers = set()
    for name in ("folder", "no-folder", "notes.txt", "no-notes.txt", "model.safetensors", "no-model.safetensors"):
        spec = str(tmp_path / name)
        kind, err = events(client, submit(client, method="test-echo", model=spec, images={"source": s}))[-1]
        assert kind == "error", (name, err)
        answers.add((err["code"], err["message"].replace(repr(spec), "<spec>"), json.dumps(err["detail"])))
    assert len(answers) == 1 and next(iter(answers))[0] == "model_not_found", answers


@pytest.mark.skipif(os.name != "posix", reason="a FIFO")
def test_the_loader_never_opens_a_fifo_named_like_a_checkpoint(tmp_path):
    """Item 5: a FIFO named *.safetensors as a job's model was opened, and the open held the
    whole process. Now it is "not found" (run in a process of its own: a hang fails the test)."""
    os.mkfifo(tmp_path / "fifo.safetensors")
    script = ("import sys; from analogon.models import LoadOptions, ModelError, load_bundle\n"
              "try:\n    load_bundle(sys.argv[1], LoadOptions(device='cpu'))\n"
              "except ModelError as e:\n    print(e.code)")
    try:
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "fifo.safetensors")],
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a FIFO as a model hung")
    finally:
        unblock_fifos(tmp_path)
    assert out.stdout.strip() == "model_not_found", out.stderr[-2000:]
