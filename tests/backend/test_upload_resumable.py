"""Resumable uploads (docs/protocol.md, "Resumable uploads"), on the real server over loopback:
an image sent in chunks is stored exactly as a single PUT stores it; a chunk cut short by a
dropped connection keeps what arrived and the client goes on from the server's offset; a
wrong offset is 409; another token sees nothing; limits and quotas are checked before any
byte is taken; unfinished uploads expire; a body that fails its checks is dropped."""
from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from analogon.core.images import raw_image_id
from analogon.server import Settings, ServerThread, painters
from analogon.server.store import Limits
from analogon.server.uploads import UploadSessions

PNG, RGBA = "image/png", "application/x-analogon-rgba"
CHUNK_MAX = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(port=0, state_dir=tmp_path_factory.mktemp("state"), cache_dir="", device="cpu",
                        scan_usual_places=False, upload_chunk_max_bytes=CHUNK_MAX,
                        limits=Limits(max_body_bytes=1024 * 1024, max_side=512, max_pixels=512 * 512))
    with ServerThread(settings) as srv:
        yield srv


def client_for(server, token) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture
def client(server):
    with client_for(server, server.token) as c:
        yield c


def painter(server, name, **limits) -> httpx.Client:
    token = painters.create_token(server.settings.resolved_state_dir() / painters.TOKENS_FILE, name, **limits)
    return client_for(server, token)


def uploads_folder(server):
    return server.app.state.uploads.folder


def files_of(server, upload_id):
    return sorted(p.name for p in uploads_folder(server).iterdir() if p.name.startswith(upload_id))


def noise(w, h, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)


def png_bytes(rgba) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def payload(kind: str, w=200, h=150, seed=0):
    """(body, sha, POST fields) of an image sent as ``kind``: png, rgba or deflate."""
    rgba = noise(w, h, seed)
    if kind == "deflate":
        rgba[:, : w // 2] = 7  # something to compress
    raw = rgba.tobytes()
    if kind == "png":
        body = png_bytes(rgba)
        return body, hashlib.sha256(body).hexdigest(), {"content_type": PNG}
    fields = {"content_type": RGBA, "width": w, "height": h}
    if kind == "deflate":
        return zlib.compress(raw, 1), raw_image_id(raw, w, h), {**fields, "encoding": "deflate"}
    return raw, raw_image_id(raw, w, h), fields


def open_upload(c, body, sha, fields, status=201) -> dict:
    r = c.post("/v1/uploads", json={"sha256": sha, "length": len(body), **fields})
    assert r.status_code == status, r.text
    return r.json()


def put_chunk(c, upload_id, offset, data) -> httpx.Response:
    return c.put(f"/v1/uploads/{upload_id}", content=data,
                 headers={"Upload-Offset": str(offset), "Content-Type": "application/octet-stream"})


def send_in_chunks(c, body, sha, fields, chunk=CHUNK_MAX) -> tuple[httpx.Response, str]:
    """(the last chunk's answer, the upload's id)"""
    up = open_upload(c, body, sha, fields)
    assert up["offset"] == 0 and up["chunk_max"] == CHUNK_MAX and up["complete"] is False
    offset = 0
    while True:
        r = put_chunk(c, up["id"], offset, body[offset:offset + chunk])
        if r.status_code != 200 or r.json()["complete"]:
            return r, up["id"]
        offset = r.json()["offset"]
        assert r.headers["upload-offset"] == str(offset)


def assert_error(r, status, code) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"code", "message", "detail"} and body["code"] == code and body["message"]
    return body


def stored_file(server, sha):
    store = server.app.state.store
    e = store._index[sha]
    return e.name, store._path(e).read_bytes()


@pytest.mark.parametrize("kind", ["png", "rgba", "deflate"])
def test_a_chunked_upload_stores_the_image_a_single_put_stores(server, client, kind):
    body, sha, fields = payload(kind, seed={"png": 1, "rgba": 2, "deflate": 3}[kind])
    assert len(body) > 3 * 20_000  # several chunks
    r, _ = send_in_chunks(client, body, sha, fields, chunk=20_000)
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["complete"] is True and (got["sha"], got["width"], got["height"]) == (sha, 200, 150)
    assert got["offset"] == got["length"] == len(body)
    assert files_of(server, got["id"]) == []  # the partial data is gone
    chunked = stored_file(server, sha)
    # the same body by a single PUT: the same stored file, name and bytes
    assert server.app.state.store.discard_upload(sha)
    headers = {"Content-Type": fields["content_type"]}
    if kind != "png":
        headers.update({"X-Image-Width": "200", "X-Image-Height": "150"})
    if kind == "deflate":
        headers["Content-Encoding"] = "deflate"
    single = client.put(f"/v1/images/{sha}", content=body, headers=headers)
    assert single.status_code == 201 and single.json() == {"sha": sha, "width": 200, "height": 150}
    assert stored_file(server, sha) == chunked
    fmt = "png" if kind == "png" else "rgba"
    down = client.get(f"/v1/images/{sha}?format={fmt}")
    assert down.content == (body if kind != "deflate" else zlib.decompress(body))


def test_a_dropped_chunk_keeps_what_arrived_and_the_upload_goes_on_from_the_servers_offset(server, client):
    body, sha, fields = payload("rgba", seed=4)
    up = open_upload(client, body, sha, fields)
    assert put_chunk(client, up["id"], 0, body[:CHUNK_MAX]).json()["offset"] == CHUNK_MAX
    # the second chunk: its headers announce the rest, 20000 bytes arrive, then the connection drops
    host, port = server.url.rsplit("//", 1)[1].rsplit(":", 1)
    head = (f"PUT /v1/uploads/{up['id']} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
            f"Upload-Offset: {CHUNK_MAX}\r\nContent-Length: {len(body) - CHUNK_MAX}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body[CHUNK_MAX:CHUNK_MAX + 20000])
        deadline = time.monotonic() + 10
        while client.head(f"/v1/uploads/{up['id']}").headers["upload-offset"] != str(CHUNK_MAX + 20000):
            assert time.monotonic() < deadline, "the partial chunk was not written"
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while server.app.state.uploads.get(up["id"], None).busy:  # the server saw the drop
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r = client.head(f"/v1/uploads/{up['id']}")
    assert r.status_code == 200 and r.headers["upload-length"] == str(len(body))
    offset = int(r.headers["upload-offset"])
    assert offset == CHUNK_MAX + 20000  # the partial chunk was kept, not thrown away
    assert client.get(f"/v1/uploads/{up['id']}").json()["offset"] == offset
    while offset < len(body):
        r = put_chunk(client, up["id"], offset, body[offset:offset + CHUNK_MAX])
        assert r.status_code in (200, 201), r.text
        offset = r.json()["offset"]
    assert r.status_code == 201 and r.json()["sha"] == sha
    assert client.get(f"/v1/images/{sha}?format=rgba").content == body


def test_a_newer_put_at_the_right_offset_takes_over_from_a_stalled_one(server, client):
    """A client that gave up on a chunk whose connection stalls (the server has not noticed)
    sends again from the offset the server reports; the old request writes nothing more."""
    body, sha, fields = payload("rgba", seed=5)
    up = open_upload(client, body, sha, fields)
    host, port = server.url.rsplit("//", 1)[1].rsplit(":", 1)
    head = (f"PUT /v1/uploads/{up['id']} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {server.token}\r\n"
            f"Upload-Offset: 0\r\nContent-Length: {CHUNK_MAX}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as stalled:
        stalled.sendall(head + body[:1000])
        deadline = time.monotonic() + 10
        while (offset := int(client.head(f"/v1/uploads/{up['id']}").headers["upload-offset"])) != 1000:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = put_chunk(client, up["id"], offset, body[offset:offset + 5000])
        assert r.status_code == 200 and r.json()["offset"] == 6000
        stalled.sendall(b"\xee" * 3000)  # the old request wakes up: none of it may land
        time.sleep(0.3)
        assert client.get(f"/v1/uploads/{up['id']}").json()["offset"] == 6000
    offset = 6000
    while offset < len(body):
        r = put_chunk(client, up["id"], offset, body[offset:offset + CHUNK_MAX])
        assert r.status_code in (200, 201), r.text
        offset = r.json()["offset"]
    assert r.status_code == 201
    assert client.get(f"/v1/images/{sha}?format=rgba").content == body


def test_a_wrong_or_missing_offset(server, client):
    body, sha, fields = payload("rgba", seed=6)
    up = open_upload(client, body, sha, fields)
    err = assert_error(put_chunk(client, up["id"], 5, body[5:100]), 409, "offset_mismatch")
    assert err["detail"] == {"offset": 0, "length": len(body)}
    assert put_chunk(client, up["id"], 0, body[:100]).json()["offset"] == 100
    err = assert_error(put_chunk(client, up["id"], 0, body[:100]), 409, "offset_mismatch")  # sent twice
    assert err["detail"]["offset"] == 100
    for bad in ("", "abc", "-1", "1e3", "1" * 19):
        r = client.put(f"/v1/uploads/{up['id']}", content=b"x", headers={"Upload-Offset": bad} if bad else {})
        assert_error(r, 400, "bad_offset")
    assert client.get(f"/v1/uploads/{up['id']}").json()["offset"] == 100  # none of that was written
    # a chunk over chunk_max or past the declared length: 413 before a byte is read
    assert_error(put_chunk(client, up["id"], 100, body[100:100 + CHUNK_MAX + 1]), 413, "too_large")
    up2 = open_upload(client, body[:4000], raw_image_id(body[:4000], 25, 40),
                      {"content_type": RGBA, "width": 25, "height": 40})
    err = assert_error(put_chunk(client, up2["id"], 0, body[:4001]), 413, "too_large")
    assert err["detail"]["length"] == 4000
    assert client.get(f"/v1/uploads/{up2['id']}").json()["offset"] == 0
    # an id that was never opened
    assert_error(client.get("/v1/uploads/" + "0" * 32), 404, "upload_not_found")
    assert_error(put_chunk(client, "0" * 32, 0, b"x"), 404, "upload_not_found")
    assert client.head("/v1/uploads/nothing").status_code == 404


def test_another_token_sees_no_upload(server):
    body, sha, fields = payload("rgba", seed=7)
    with painter(server, "alice") as alice, painter(server, "bob") as bob, client_for(server, server.token) as owner:
        up = open_upload(alice, body, sha, fields)
        assert put_chunk(alice, up["id"], 0, body[:1000]).status_code == 200
        for c in (bob, owner):  # in the same words as an id that never existed
            for r in (c.get(f"/v1/uploads/{up['id']}"), put_chunk(c, up["id"], 1000, body[1000:2000]),
                      c.delete(f"/v1/uploads/{up['id']}")):
                assert_error(r, 404, "upload_not_found")
                assert r.json()["message"] == owner.get("/v1/uploads/" + "f" * 32).json()["message"]
            assert c.head(f"/v1/uploads/{up['id']}").status_code == 404
        # bob opening the same image gets a session of his own
        assert open_upload(bob, body, sha, fields)["id"] != up["id"]
        r = alice.get(f"/v1/uploads/{up['id']}")
        assert r.status_code == 200 and r.json()["offset"] == 1000


def test_limits_and_quotas_are_checked_before_any_byte(server, client):
    folder = uploads_folder(server)
    before = set(os.listdir(folder))
    body, sha, fields = payload("rgba", seed=8)  # 120000 bytes kept
    with painter(server, "carol", max_stored_bytes=200_000) as carol:
        open_upload(carol, body, sha, fields)
        # a second open upload: together they would pass her limit (open uploads count)
        body2, sha2, fields2 = payload("rgba", seed=9)
        err = assert_error(carol.post("/v1/uploads", json={"sha256": sha2, "length": len(body2), **fields2}),
                           413, "storage_quota")
        assert err["detail"] == {"stored_bytes": 120_000, "upload_bytes": 120_000, "max_stored_bytes": 200_000}
        # a deflate body counts the pixels it keeps, not the bytes sent
        raw = bytes(300 * 200 * 4)
        err = assert_error(carol.post("/v1/uploads", json={
            "sha256": raw_image_id(raw, 300, 200), "length": 500, "content_type": RGBA, "width": 300,
            "height": 200, "encoding": "deflate"}), 413, "storage_quota")
        assert err["detail"]["upload_bytes"] == 240_000
    # the body limit and the pixel limits
    assert_error(client.post("/v1/uploads", json={"sha256": sha, "length": 1024 * 1024 + 1, "content_type": PNG}),
                 413, "too_large")
    assert_error(client.post("/v1/uploads", json={"sha256": sha, "length": 4 * 600 * 10, "content_type": RGBA,
                                                  "width": 600, "height": 10}), 413, "too_large")
    assert_error(client.post("/v1/uploads", json={"sha256": sha, "length": 99, "content_type": RGBA,
                                                  "width": 5, "height": 5}), 400, "bad_image")
    assert_error(client.post("/v1/uploads", json={"sha256": sha, "length": 99, "content_type": RGBA}),
                 400, "bad_image")
    assert_error(client.post("/v1/uploads", json={"sha256": sha, "length": 9, "content_type": "image/jpeg"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/v1/uploads", json={"sha256": sha, "length": 9, "content_type": PNG,
                                                  "encoding": "deflate"}), 415, "unsupported_media_type")
    assert_error(client.post("/v1/uploads", json={"sha256": "ABC", "length": 9, "content_type": PNG}),
                 400, "bad_sha")
    assert_error(client.post("/v1/uploads", json={"sha256": sha, "length": 0, "content_type": PNG}),
                 422, "invalid_params")
    assert_error(client.post("/v1/uploads", content=b'{"sha256": 1', headers={"Content-Type": "application/json"}),
                 400, "bad_json")
    new = set(os.listdir(folder)) - before  # carol's one upload, nothing else
    assert len(new) == 2 and len({n.split(".")[0] for n in new}) == 1


def test_opening_the_same_upload_again_finds_it(server, client):
    body, sha, fields = payload("png", seed=10)
    up = open_upload(client, body, sha, fields)
    assert put_chunk(client, up["id"], 0, body[:3000]).json()["offset"] == 3000
    again = open_upload(client, body, sha, fields, status=200)
    assert again["id"] == up["id"] and again["offset"] == 3000
    other = open_upload(client, body[:-1], sha, fields)  # another length: another upload
    assert other["id"] != up["id"]
    assert client.delete(f"/v1/uploads/{other['id']}").status_code == 204
    assert files_of(server, other["id"]) == []


def test_a_body_that_fails_its_checks_is_dropped_with_its_upload(server, client):
    body, sha, fields = payload("rgba", seed=11)
    wrong = hashlib.sha256(b"something else").hexdigest()
    reserved = server.app.state.uploads.reserved(None)
    r, upload_id = send_in_chunks(client, body, wrong, fields)
    assert_error(r, 400, "hash_mismatch")
    assert files_of(server, upload_id) == []
    assert_error(client.get(f"/v1/uploads/{upload_id}"), 404, "upload_not_found")
    assert client.head(f"/v1/images/{wrong}").status_code == 404
    assert server.app.state.uploads.reserved(None) == reserved  # nothing promised any more
    # a PNG that is not one: bad_image, dropped too
    junk = b"\x89PNG\r\n\x1a\n" + bytes(200_000)
    r, upload_id = send_in_chunks(client, junk, hashlib.sha256(junk).hexdigest(), {"content_type": PNG})
    assert_error(r, 400, "bad_image")
    assert files_of(server, upload_id) == []


def test_the_answer_to_the_last_chunk_can_be_asked_again(server, client):
    body, sha, fields = payload("rgba", seed=12)
    r, upload_id = send_in_chunks(client, body, sha, fields)
    assert r.status_code == 201
    again = put_chunk(client, upload_id, len(body), b"")  # a client whose answer was lost
    assert again.status_code == 200 and again.json()["complete"] and again.json()["sha"] == sha
    assert client.get(f"/v1/uploads/{upload_id}").json()["complete"] is True
    assert_error(put_chunk(client, upload_id, 0, body[:10]), 409, "offset_mismatch")


def test_unfinished_uploads_expire(server, client, tmp_path):
    body, sha, fields = payload("rgba", seed=13)
    up = open_upload(client, body, sha, fields)
    put_chunk(client, up["id"], 0, body[:5000])
    uploads = server.app.state.uploads
    assert files_of(server, up["id"]) == [f"{up['id']}.json", f"{up['id']}.part"]
    uploads.sweep(now=time.time() + 3600)  # (finished uploads of earlier tests go after ten minutes)
    assert uploads.is_open(uploads.get(up["id"], None))  # an unfinished one is kept a day, by default
    assert uploads.sweep(now=time.time() + 25 * 3600) >= 1
    assert files_of(server, up["id"]) == []
    assert_error(client.get(f"/v1/uploads/{up['id']}"), 404, "upload_not_found")
    # at start: a session left by an earlier run is kept, an old one is removed
    folder = tmp_path / "uploads"
    first = UploadSessions(folder)
    keep = first.create("alice", sha, RGBA, 200, 150, "", len(body), len(body))
    old = first.create("bob", sha, RGBA, 200, 150, "", len(body), len(body))
    first.part(keep).write_bytes(body[:777])
    os.utime(first.part(old), (time.time() - 2 * 24 * 3600,) * 2)
    (folder / "stray.part").write_bytes(b"x")
    again = UploadSessions(folder)
    assert again.get(keep.id, "alice").offset == 777 and len(again) == 1
    assert sorted(os.listdir(folder)) == [f"{keep.id}.json", f"{keep.id}.part"]


def test_the_periodic_sweep_removes_an_abandoned_upload(tmp_path):
    settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu", scan_usual_places=False,
                        upload_max_age_s=0.3, upload_sweep_s=0.1)
    with ServerThread(settings) as srv, client_for(srv, srv.token) as c:
        body, sha, fields = payload("rgba", seed=14)
        up = open_upload(c, body, sha, fields)
        put_chunk(c, up["id"], 0, body[:5000])
        deadline = time.monotonic() + 10
        while files_of(srv, up["id"]):
            assert time.monotonic() < deadline, "the sweep did not run"
            time.sleep(0.05)
        assert c.head(f"/v1/uploads/{up['id']}").status_code == 404


def test_open_uploads_past_the_cap_make_room(tmp_path):
    folder = tmp_path / "uploads"
    sessions = UploadSessions(folder, cap_bytes=1000, max_per_owner=2)
    a = sessions.create("alice", "a" * 64, PNG, None, None, "", 600, 600)
    b = sessions.create("bob", "b" * 64, PNG, None, None, "", 300, 300)
    c = sessions.create("carol", "c" * 64, PNG, None, None, "", 300, 300)  # 1200 > 1000: alice's goes
    assert not sessions.is_open(a) and sessions.is_open(b) and sessions.is_open(c)
    c2 = sessions.create("carol", "d" * 64, PNG, None, None, "", 10, 10)
    c3 = sessions.create("carol", "e" * 64, PNG, None, None, "", 10, 10)  # a third of carol's: her oldest goes
    assert not sessions.is_open(c) and sessions.is_open(c2) and sessions.is_open(c3) and sessions.is_open(b)


def test_health_and_the_openapi_document_name_resumable_uploads(server, client):
    limits = httpx.get(server.url + "/v1/health").json()["limits"]
    assert limits["upload_chunk_max_bytes"] == CHUNK_MAX and limits["upload_max_age_s"] == 24 * 3600
    doc = client.get("/openapi.json").json()
    ops = doc["paths"]["/v1/uploads/{upload_id}"]
    assert set(ops) == {"put", "head", "get", "delete"} and "post" in doc["paths"]["/v1/uploads"]
    assert {"200", "201", "400", "404", "409", "413"} <= set(ops["put"]["responses"])
    params = {p["name"]: p for p in ops["put"]["parameters"]}
    assert params["Upload-Offset"]["required"] and params["upload_id"]["schema"]["pattern"] == "^[0-9a-f]{32}$"
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    schemas = doc["components"]["schemas"]
    upload = jsonschema_rs.validator_for({**schemas["Upload"], "components": {"schemas": schemas}})
    body, sha, fields = payload("rgba", seed=15)
    up = open_upload(client, body, sha, fields)
    upload.validate(up)
    upload.validate(put_chunk(client, up["id"], 0, body[:100]).json())
    upload.validate(send_in_chunks(client, body[:4000], raw_image_id(body[:4000], 40, 25),
                                   {"content_type": RGBA, "width": 40, "height": 25})[0].json())
    jsonschema_rs.validator_for(schemas["UploadRequest"]).validate(json.loads(json.dumps(
        {"sha256": sha, "length": len(body), **fields})))
