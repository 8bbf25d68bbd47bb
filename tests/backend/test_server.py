"""The real server on a loopback port: auth, Host check, errors, images, jobs, events."""
from __future__ import annotations

import hashlib
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from analogon import methods
from analogon.core.images import raw_image_id
from analogon.server import Settings, ServerThread
from analogon.server.store import Limits
from analogon.methods.base import MethodParams
from test_engine_methods import EchoMethod


@pytest.fixture(scope="module")
def echo():
    m = methods.register(EchoMethod())
    yield m
    methods.unregister(m.id)


@pytest.fixture(scope="module")
def server(echo, tmp_path_factory):
    settings = Settings(
        port=0, state_dir=tmp_path_factory.mktemp("state"), cache_dir="", device="cpu",
        limits=Limits(max_body_bytes=1024 * 1024, max_side=512, max_pixels=512 * 256),
    )
    with ServerThread(settings) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                      timeout=30) as c:
        yield c


def png_bytes(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def image(w=16, h=16, rgb=(40, 80, 120), a=255, seed=None) -> np.ndarray:
    out = np.zeros((h, w, 4), np.uint8)
    out[..., :3] = rgb
    out[..., 3] = a
    if seed is not None:
        out[..., :3] = np.random.default_rng(seed).integers(0, 256, (h, w, 3))
    return out


def upload(client, rgba: np.ndarray) -> str:
    body = png_bytes(rgba)
    r = client.put(f"/v1/images/{sha(body)}", content=body, headers={"Content-Type": "image/png"})
    assert r.status_code in (200, 201), r.text
    return sha(body)


def events(client, job_id: str) -> list[tuple[str, dict]]:
    out, kind = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def submit(client, **body) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    return r.json()["id"]


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and isinstance(body["message"], str) and body["message"]
    assert "detail" in body
    return body


def assert_healthy(server):
    r = httpx.get(server.url + "/v1/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


# -- auth and host ---------------------------------------------------------------------------

def test_health_needs_no_token(server):
    r = httpx.get(server.url + "/v1/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ok"
    assert body["device"] == "cpu" and body["limits"]["max_side"] == 512
    assert {"version", "dtype", "memory", "loaded_models", "queue"} <= set(body)


def test_auth_refused_without_or_with_wrong_token(server):
    for path in ("/v1/methods", "/v1/models", "/openapi.json", "/v1/jobs/x", "/nowhere"):
        assert_error(httpx.get(server.url + path), 401, "unauthorized")
        r = httpx.get(server.url + path, headers={"Authorization": "Bearer not-the-token"})
        assert_error(r, 401, "unauthorized")
    r = httpx.get(server.url + "/v1/methods", headers={"Authorization": server.token})  # no scheme
    assert_error(r, 401, "unauthorized")
    assert_error(httpx.put(server.url + "/v1/images/" + "a" * 64, content=b"x"), 401, "unauthorized")
    assert_healthy(server)


def test_non_loopback_host_refused(server, client):
    for host in ("evil.example", "192.168.1.20:7871", "localhost.evil.example", "127.0.0.1.nip.io"):
        r = client.get("/v1/methods", headers={"Host": host})
        assert_error(r, 403, "forbidden_host")
        assert_error(httpx.get(server.url + "/v1/health", headers={"Host": host}), 403, "forbidden_host")
    for host in ("localhost:7871", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
        assert client.get("/v1/methods", headers={"Host": host}).status_code == 200, host


# -- discovery ---------------------------------------------------------------------------------

def test_methods_and_models(client):
    ms = {m["id"]: m for m in client.get("/v1/methods").json()["methods"]}
    echo = ms["test-echo"]
    assert echo["params"]["properties"]["steps"]["maximum"] == 50
    assert [r["name"] for r in echo["roles"]] == ["source", "exemplar", "edit_map", "mask"]
    models = client.get("/v1/models").json()
    assert models["default"] == "tiny-sd"
    assert {"tiny-sd", "tiny-sdxl"} <= {m["id"] for m in models["models"]}
    spec = client.get("/openapi.json").json()
    assert "/v1/jobs" in spec["paths"] and "/v1/images/{sha}" in spec["paths"]


def test_unknown_paths_and_methods_are_json(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.post("/v1/health"), 405, "method_not_allowed")
    assert_error(client.get("/v1/jobs/does-not-exist"), 404, "job_not_found")
    assert_error(client.delete("/v1/jobs/does-not-exist"), 404, "job_not_found")
    assert_error(client.get("/v1/jobs/does-not-exist/events"), 404, "job_not_found")


# -- images ------------------------------------------------------------------------------------

def test_upload_png_and_raw_round_trip(client):
    rgba = image(20, 10, seed=1)
    rgba[..., 3] = np.arange(20, dtype=np.uint8)[None, :] * 12
    body = png_bytes(rgba)
    s = sha(body)
    assert client.head(f"/v1/images/{s}").status_code == 404
    r = client.put(f"/v1/images/{s}", content=body, headers={"Content-Type": "image/png"})
    assert r.status_code == 201 and r.json() == {"sha": s, "width": 20, "height": 10}
    r = client.put(f"/v1/images/{s}", content=body, headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["sha"] == s  # re-upload is a no-op
    assert client.head(f"/v1/images/{s}").status_code == 200
    got = client.get(f"/v1/images/{s}")
    assert got.content == body and got.headers["content-type"] == "image/png"
    raw = client.get(f"/v1/images/{s}", params={"format": "rgba"})
    assert raw.headers["x-image-width"] == "20" and raw.headers["x-image-height"] == "10"
    assert np.array_equal(np.frombuffer(raw.content, np.uint8).reshape(10, 20, 4), rgba)
    # raw upload, downloaded as PNG
    raw_body = image(7, 5, seed=2).tobytes()
    raw_id = raw_image_id(raw_body, 7, 5)
    r = client.put(f"/v1/images/{raw_id}", content=raw_body, headers={
        "Content-Type": "application/x-analogon-rgba", "X-Image-Width": "7", "X-Image-Height": "5"})
    assert r.status_code == 201 and r.json()["width"] == 7
    png = client.get(f"/v1/images/{raw_id}").content
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image(7, 5, seed=2))
    assert client.get(f"/v1/images/{raw_id}", params={"format": "rgba"}).content == raw_body
    # the plain SHA-256 of raw bytes is not their id: the size is part of it
    r = client.put(f"/v1/images/{sha(raw_body)}", content=raw_body, headers={
        "Content-Type": "application/x-analogon-rgba", "X-Image-Width": "7", "X-Image-Height": "5"})
    assert r.status_code == 400 and r.json()["code"] == "hash_mismatch"


def test_equal_raw_bytes_at_other_sizes_are_other_images(client):
    black = bytes(4 * 6 * 4)  # an all-black map: 4×6 and 6×4 have the same bytes
    ids = []
    for w, h in ((4, 6), (6, 4)):
        i = raw_image_id(black, w, h)
        r = client.put(f"/v1/images/{i}", content=black, headers={
            "Content-Type": "application/x-analogon-rgba", "X-Image-Width": str(w), "X-Image-Height": str(h)})
        assert r.status_code == 201, r.text
        assert (r.json()["width"], r.json()["height"]) == (w, h)
        ids.append(i)
    assert ids[0] != ids[1]
    assert client.head(f"/v1/images/{ids[1]}").headers["x-image-width"] == "6"


def test_bad_uploads_are_4xx_json_and_server_keeps_serving(server, client):
    good = png_bytes(image(16, 16, seed=3))
    cases = [
        (good[: len(good) // 2], {"Content-Type": "image/png"}, 400, "bad_image"),  # truncated
        (b"this is not an image" * 10, {"Content-Type": "image/png"}, 400, "bad_image"),
        (b"\x00" * 99, {"Content-Type": "application/x-analogon-rgba", "X-Image-Width": "5",
                        "X-Image-Height": "5"}, 400, "bad_image"),  # wrong length
        (b"\x00" * 100, {"Content-Type": "application/x-analogon-rgba"}, 400, "bad_image"),  # no size
        (png_bytes(image(600, 8)), {"Content-Type": "image/png"}, 413, "too_large"),  # side
        (png_bytes(image(400, 400)), {"Content-Type": "image/png"}, 413, "too_large"),  # pixels
        (b"\x00" * (1024 * 1024 + 1), {"Content-Type": "application/x-analogon-rgba",
                                       "X-Image-Width": "1", "X-Image-Height": "1"}, 413, "too_large"),
        (good, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ]
    for body, headers, status, code in cases:
        r = client.put(f"/v1/images/{sha(body)}", content=body, headers=headers)
        assert_error(r, status, code)
        assert client.head(f"/v1/images/{sha(body)}").status_code == 404
        assert_healthy(server)
    # hash mismatch, and ids that are not SHA-256
    assert_error(client.put("/v1/images/" + "0" * 64, content=good,
                            headers={"Content-Type": "image/png"}), 400, "hash_mismatch")
    assert_error(client.put("/v1/images/NOTASHA", content=good), 400, "bad_sha")
    assert_error(client.get("/v1/images/" + "f" * 64), 404, "image_not_found")
    assert_error(client.get(f"/v1/images/{upload(client, image())}", params={"format": "jpeg"}),
                 400, "bad_format")
    assert_healthy(server)


# -- jobs: bad requests ----------------------------------------------------------------------------

def test_bad_job_requests(server, client):
    s = upload(client, image(seed=4))
    r = client.post("/v1/jobs", content=b'{"method": "test-echo", "images": ',
                    headers={"Content-Type": "application/json"})
    assert_error(r, 400, "bad_json")
    assert_error(client.post("/v1/jobs", json={"method": "no-such", "images": {"source": s}}),
                 404, "unknown_method")
    body = assert_error(client.post("/v1/jobs", json={"method": "test-echo", "params": {"steps": 500},
                                                      "images": {"source": s}}), 422, "invalid_params")
    assert body["detail"][0]["loc"] == ["steps"]
    assert_error(client.post("/v1/jobs", json={"method": "test-echo", "params": {"colour": 1},
                                                "images": {"source": s}}), 422, "invalid_params")
    assert_error(client.post("/v1/jobs", json={"method": "test-echo", "seed": -3,
                                                "images": {"source": s}}), 422, "invalid_params")
    assert_error(client.post("/v1/jobs", json={"method": "test-echo", "surprise": 1,
                                                "images": {"source": s}}), 422, "invalid_params")
    assert_error(client.post("/v1/jobs", json={"method": "test-echo", "images": {}}),
                 422, "invalid_images")
    assert_error(client.post("/v1/jobs", json={"method": "test-echo", "images": {"source": "e" * 64}}),
                 404, "image_not_found")
    assert_error(client.post("/v1/jobs", json=[1, 2]), 422, "invalid_params")
    assert_healthy(server)


# -- jobs: running ---------------------------------------------------------------------------------

def test_event_stream_sequence_and_result(client):
    src = image(24, 16, (10, 20, 30))
    s = upload(client, src)
    job = submit(client, method="test-echo", params={"steps": 3, "shift": 7}, seed=42,
                 images={"source": s})
    evs = events(client, job)
    kinds = [k for k, _ in evs]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "done"
    assert kinds.count("done") == 1 and "error" not in kinds
    steps = [d["step"] for k, d in evs if k == "progress" and d["stage"] == "denoise"]
    assert steps == [1, 2, 3]
    assert all(d["total"] == 3 for k, d in evs if k == "progress" and d["stage"] == "denoise")
    assert kinds.index("preview") < kinds.index("done")
    prev = next(d for k, d in evs if k == "preview")
    import base64

    p = Image.open(io.BytesIO(base64.b64decode(prev["png"])))
    assert max(p.size) <= 256 and p.size == (24, 16)
    done = evs[-1][1]
    assert done["seed"] == 42 and done["params"] == {**MethodParams().model_dump(), "steps": 3, "delay": 0.0, "fail": "", "shift": 7}
    assert evs[1][1]["model"] == "tiny-sd" and "total" in done["timings"]
    (res,) = done["images"]
    assert (res["width"], res["height"]) == (24, 16)
    raw = client.get(f"/v1/images/{res['sha']}", params={"format": "rgba"}).content
    out = np.frombuffer(raw, np.uint8).reshape(16, 24, 4)
    assert (out[..., :3] == (17, 27, 37)).all() and (out[..., 3] == 255).all()
    # the same result as a layer: only the change (here everything changed: the whole image)
    lay = res["layer"]
    assert (lay["width"], lay["height"]) == (24, 16)
    raw = client.get(f"/v1/images/{lay['sha']}", params={"format": "rgba"}).content
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(16, 24, 4), out)
    st = client.get(f"/v1/jobs/{job}").json()
    assert st["status"] == "done" and st["result"]["images"][0]["sha"] == res["sha"]
    # a late subscriber gets the whole history again, ending with the terminal event
    assert [k for k, _ in events(client, job)] == kinds
    # a random seed is chosen and reported
    job2 = submit(client, method="test-echo", images={"source": s})
    done2 = events(client, job2)[-1][1]
    assert isinstance(done2["seed"], int) and done2["params"]["steps"] == 3


def test_queue_runs_jobs_in_order(echo, client):
    s = upload(client, image(seed=5))
    first = len(echo.calls)
    ids, positions = [], []
    for i in range(4):
        r = client.post("/v1/jobs", json={"method": "test-echo", "seed": 100 + i,
                                          "params": {"steps": 2, "delay": 0.05}, "images": {"source": s}})
        ids.append(r.json()["id"])
        positions.append(r.json()["position"])
    assert positions == sorted(positions) and positions[-1] >= 2
    for j in ids:
        assert events(client, j)[-1][0] == "done"
    assert [c["seed"] for c in echo.calls[first:]] == [100, 101, 102, 103]


def test_cancel_queued_and_running(echo, client):
    s = upload(client, image(seed=6))
    running = submit(client, method="test-echo", params={"steps": 50, "delay": 0.1}, images={"source": s})
    queued = submit(client, method="test-echo", params={"steps": 1}, seed=7, images={"source": s})
    assert client.get(f"/v1/jobs/{queued}").json()["position"] == 1
    calls_before = len(echo.calls)
    r = client.delete(f"/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert [k for k, _ in events(client, queued)] == ["queued", "cancelled"]
    # wait until the long job is inside its loop, then cancel it
    deadline = time.monotonic() + 20
    while client.get(f"/v1/jobs/{running}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    while not any(k == "progress" and d["stage"] == "denoise"
                  for k, d in _history(client, running)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    r = client.delete(f"/v1/jobs/{running}")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    evs = events(client, running)
    assert evs[-1] == ("cancelled", {"id": running})
    assert time.monotonic() - t0 < 2.0  # within a step or two of 0.1 s
    steps = [d["step"] for k, d in evs if k == "progress" and d["stage"] == "denoise"]
    assert max(steps) < 50
    assert client.get(f"/v1/jobs/{running}").json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "cancelled"
    # the cancelled queued job never ran; the worker goes on with new jobs
    assert all(c["seed"] != 7 for c in echo.calls[calls_before:])
    after = submit(client, method="test-echo", params={"steps": 1}, images={"source": s})
    assert events(client, after)[-1][0] == "done"
    r = client.delete(f"/v1/jobs/{after}")  # cancelling a finished job leaves it as it is
    assert r.json() == {"id": after, "status": "done", "cancel_requested": False}


def _history(client, job_id):
    """The events so far, without waiting for the end (reads until the stream would block)."""
    out, kind = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=2) as r:
        try:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    out.append((kind, json.loads(line[6:])))
                    if kind == "progress" and out[-1][1].get("stage") == "denoise":
                        break
        except httpx.ReadTimeout:
            pass
    return out


def test_failing_methods_leave_the_server_healthy(server, client):
    s = upload(client, image(seed=8))
    j1 = submit(client, method="test-echo", params={"fail": "crash"}, images={"source": s})
    err = events(client, j1)[-1]
    assert err[0] == "error" and err[1]["code"] == "internal_error" and "boom at step 1" in err[1]["message"]
    j2 = submit(client, method="test-echo", params={"fail": "analogon"}, images={"source": s})
    err = events(client, j2)[-1]
    assert err == ("error", {"code": "test_failure", "message": "The test method failed on purpose.",
                             "detail": {"step": 1}})
    st = client.get(f"/v1/jobs/{j2}").json()
    assert st["status"] == "error" and st["error"]["code"] == "test_failure"
    j3 = submit(client, method="test-echo", model="/no/such/model.safetensors", images={"source": s})
    err = events(client, j3)[-1][1]
    assert err["code"] == "model_not_found" and "model.safetensors" in err["message"]
    assert_healthy(server)
    j4 = submit(client, method="test-echo", params={"steps": 1}, images={"source": s})
    assert events(client, j4)[-1][0] == "done"


def test_placed_exemplar_and_edit_map_through_the_server(client):
    src = image(32, 32, (0, 0, 0))
    ex = image(4, 4, (255, 255, 255))
    emap = np.zeros((32, 32, 4), np.uint8)
    emap[:16] = 255  # top half may change
    s_src, s_ex, s_map = upload(client, src), upload(client, ex), upload(client, emap)
    job = submit(client, method="test-echo", params={"steps": 1}, images={
        "source": s_src, "exemplar": [{"sha": s_ex, "x": 2, "y": 2}, {"sha": s_ex, "x": 2, "y": 20}],
        "edit_map": s_map})
    done = events(client, job)[-1][1]
    raw = client.get(f"/v1/images/{done['images'][0]['sha']}", params={"format": "rgba"}).content
    out = np.frombuffer(raw, np.uint8).reshape(32, 32, 4)
    assert (out[2:6, 2:6, :3] == 255).all()  # pasted where the map allows
    assert np.array_equal(out[16:], src[16:])  # bottom half untouched, exemplar or not
