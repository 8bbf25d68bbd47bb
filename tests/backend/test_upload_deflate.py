"""Raw RGBA uploads compressed for real networks (issue 31): ``Content-Encoding: deflate`` (a
zlib stream, what the plugin's Qt ``qCompress`` makes once its 4-byte length is taken off),
on the real server over loopback. The id is the raw id of the pixels, so a compressed upload
and a plain one are the same image."""
from __future__ import annotations

import struct
import zlib

import httpx
import numpy as np
import pytest

from analogon.core.images import raw_image_id
from analogon.server import Settings, ServerThread
from analogon.server.store import Limits

RGBA = "application/x-analogon-rgba"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(port=0, state_dir=tmp_path_factory.mktemp("state"), cache_dir="", device="cpu",
                        limits=Limits(max_body_bytes=256 * 1024, max_side=512, max_pixels=512 * 256))
    with ServerThread(settings) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"},
                      timeout=30) as c:
        yield c


def pixels(w: int, h: int, seed: int = 0) -> bytes:
    img = np.zeros((h, w, 4), np.uint8)
    img[..., 0] = np.arange(w, dtype=np.uint8)[None, :]  # compressible, not constant
    img[..., 1] = np.random.default_rng(seed).integers(0, 4, (h, w))
    img[..., 3] = 255
    return img.tobytes()


def headers(w, h, **more):
    return {"Content-Type": RGBA, "X-Image-Width": str(w), "X-Image-Height": str(h),
            "Content-Encoding": "deflate", **more}


def test_a_deflate_upload_is_stored_as_its_pixels(client):
    w, h = 200, 150
    raw = pixels(w, h)
    body = zlib.compress(raw, 1)
    assert len(body) < len(raw) // 2
    sha = raw_image_id(raw, w, h)
    r = client.put(f"/v1/images/{sha}", content=body, headers=headers(w, h))
    assert r.status_code == 201, r.text
    assert r.json() == {"sha": sha, "width": w, "height": h}
    got = client.get(f"/v1/images/{sha}?format=rgba")
    assert got.status_code == 200 and got.content == raw  # stored inflated: the raw download is the pixels
    # the same pixels sent plain are the same image (already stored)
    r = client.put(f"/v1/images/{sha}", content=raw, headers={"Content-Type": RGBA, "X-Image-Width": str(w),
                                                            "X-Image-Height": str(h)})
    assert r.status_code == 200


def test_qcompress_output_without_its_length_prefix_is_accepted(client):
    """Qt's qCompress writes the inflated length (4 bytes, big-endian) before a zlib stream:
    without those 4 bytes it is HTTP's deflate."""
    w, h = 64, 32
    raw = pixels(w, h, seed=1)
    qcompressed = struct.pack(">I", len(raw)) + zlib.compress(raw, 6)
    sha = raw_image_id(raw, w, h)
    r = client.put(f"/v1/images/{sha}", content=qcompressed[4:], headers=headers(w, h))
    assert r.status_code == 201, r.text
    # with the prefix still on, it is not a zlib stream: refused with a reason, nothing stored
    raw2 = pixels(w, h, seed=2)
    sha2 = raw_image_id(raw2, w, h)
    r = client.put(f"/v1/images/{sha2}", content=struct.pack(">I", len(raw2)) + zlib.compress(raw2),
                   headers=headers(w, h))
    assert r.status_code == 400 and r.json()["code"] == "bad_image" and "zlib" in r.json()["message"]
    assert client.head(f"/v1/images/{sha2}").status_code == 404


@pytest.mark.parametrize("case", ["short", "long", "trailing", "cut", "too_many_pixels", "png"])
def test_bad_deflate_uploads_are_refused(client, case):
    w, h = 40, 30
    raw = pixels(w, h, seed=3)
    sha = raw_image_id(raw, w, h)
    body, hdrs, status, code = zlib.compress(raw), headers(w, h), 400, "bad_image"
    if case == "short":
        body = zlib.compress(raw[:-4])
    elif case == "long":
        body = zlib.compress(raw + b"\0\0\0\0")
    elif case == "trailing":
        body = zlib.compress(raw) + b"junk"
    elif case == "cut":
        body = zlib.compress(raw)[:-10]
    elif case == "too_many_pixels":  # refused before anything is inflated
        hdrs, status, code = headers(10_000, 10), 413, "too_large"
    elif case == "png":
        hdrs, status, code = {"Content-Type": "image/png", "Content-Encoding": "deflate"}, 415, \
            "unsupported_media_type"
    r = client.put(f"/v1/images/{sha}", content=body, headers=hdrs)
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert client.head(f"/v1/images/{sha}").status_code == 404


def test_a_small_body_that_inflates_past_the_body_limit_is_fine_but_not_past_the_pixel_limit(client):
    """The body limit counts the bytes sent; the pixel limit bounds what they inflate to."""
    w, h = 512, 256  # 512 KiB of pixels from a body of a few hundred bytes (the limit is 256 KiB)
    raw = bytes(w * h * 4)
    body = zlib.compress(raw, 9)
    assert len(body) < 256 * 1024 < len(raw)
    sha = raw_image_id(raw, w, h)
    r = client.put(f"/v1/images/{sha}", content=body, headers=headers(w, h))
    assert r.status_code == 201, r.text
    bomb = zlib.compress(bytes(w * h * 4 + 4096), 9)  # more than the headers say: not inflated past them
    r = client.put("/v1/images/" + "0" * 64, content=bomb, headers=headers(w, h))
    assert r.status_code == 400 and r.json()["code"] == "bad_image"


def test_other_encodings_are_unsupported(client):
    raw = pixels(8, 8)
    r = client.put(f"/v1/images/{raw_image_id(raw, 8, 8)}", content=raw,
                   headers=headers(8, 8, **{"Content-Encoding": "gzip"}))
    assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
    assert "deflate" in r.json()["message"]
    r = client.put(f"/v1/images/{raw_image_id(raw, 8, 8)}", content=raw,
                   headers=headers(8, 8, **{"Content-Encoding": "identity"}))
    assert r.status_code == 201


def test_the_openapi_document_names_the_encoding(server):
    doc = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {server.token}"}).json()
    params = {p["name"]: p for p in doc["paths"]["/v1/images/{sha}"]["put"]["parameters"]}
    assert params["Content-Encoding"]["schema"]["enum"] == ["deflate", "identity"]


def test_a_painters_stored_bytes_count_the_inflated_pixels(server):
    """A painter's limit on stored bytes counts what is kept (the pixels), not the few bytes
    that crossed the network: 3 KiB of pixels in a body of a few hundred bytes is refused at a
    limit of 2 KiB, before the body is read."""
    from analogon.server import painters

    token = painters.create_token(server.settings.resolved_state_dir() / painters.TOKENS_FILE, "dora",
                                  max_stored_bytes=2048)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as dora:
        small = bytes(16 * 16 * 4)
        r = dora.put(f"/v1/images/{raw_image_id(small, 16, 16)}", content=zlib.compress(small),
                     headers=headers(16, 16))
        assert r.status_code == 201, r.text
        assert dora.get("/v1/health").json()["painter"]["stored_bytes"] == 1024
        big = bytes(range(256)) * 12  # 3 KiB of pixels
        body = zlib.compress(big)
        assert len(body) < 400
        r = dora.put(f"/v1/images/{raw_image_id(big, 32, 24)}", content=body, headers=headers(32, 24))
        assert r.status_code == 413 and r.json()["code"] == "storage_quota"
        assert r.json()["detail"]["upload_bytes"] == 32 * 24 * 4


def test_raw_downloads_are_gzip_compressed_beyond_loopback_or_when_told(client, tmp_path):
    w, h = 120, 80
    raw = pixels(w, h, seed=5)
    sha = raw_image_id(raw, w, h)
    assert client.put(f"/v1/images/{sha}", content=raw, headers={
        "Content-Type": RGBA, "X-Image-Width": str(w), "X-Image-Height": str(h)}).status_code in (200, 201)
    # "auto" on loopback: the pixels as they are
    with client.stream("GET", f"/v1/images/{sha}?format=rgba") as r:
        assert "content-encoding" not in r.headers and len(r.read()) == len(raw)
    settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu",
                        compress_downloads="always")
    with ServerThread(settings) as srv, httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=30) as c:
        assert c.put(f"/v1/images/{sha}", content=raw, headers={
            "Content-Type": RGBA, "X-Image-Width": str(w), "X-Image-Height": str(h)}).status_code == 201
        with c.stream("GET", f"/v1/images/{sha}?format=rgba") as r:
            sent = b"".join(r.iter_raw())
            assert r.headers["content-encoding"] == "gzip" and r.headers["x-image-width"] == str(w)
        assert len(sent) < len(raw) // 2 and zlib.decompress(sent, 31) == raw
        # a client that does not accept gzip gets the pixels
        r = c.get(f"/v1/images/{sha}?format=rgba", headers={"Accept-Encoding": "identity"})
        assert "content-encoding" not in r.headers and r.content == raw
        # PNG is compressed already
        r = c.get(f"/v1/images/{sha}")
        assert "content-encoding" not in r.headers
