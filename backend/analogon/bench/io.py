"""Section `io`: moving layers through the real server, PNG against raw RGBA8, and job latency.

For each size, the median of ``--repeat`` runs of
- ``png_codec_ms``: PNG encode (zlib level 1) + decode alone, no server;
- ``png_up_ms`` / ``png_down_ms``: encode + SHA-256 + PUT (the server decodes to check) /
  GET of a stored result (the server encodes) + decode;
- ``raw_up_ms`` / ``raw_down_ms``: the same with ``application/x-analogon-rgba``;
the re-upload skip as the plugin does it (``skip_ms``: the raw id, i.e. SHA-256 of the layer's
bytes, then ``HEAD /v1/images/{sha}`` answered 200, so nothing is sent; ``hash_ms``: the hashing
alone), and the body sizes. Then, on a warm model, the time from POST /v1/jobs to the first event
(``queued``), to ``started`` and to the method's first progress step.

The images look like a painted photo: smooth gradients and shapes with a little noise.
"""
from __future__ import annotations

import hashlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.images import raw_image_id
from . import register

RAW = "application/x-analogon-rgba"


def test_image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], axis=-1) * 220 + 20
    disc = (x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.06
    img[disc] = (200, 90, 40)
    img += rng.normal(0, 3, img.shape)
    rgba = np.empty((size, size, 4), np.uint8)
    rgba[..., :3] = np.clip(img, 0, 255)
    rgba[..., 3] = 255
    return rgba


def png_encode(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def _median_ms(fn, repeat: int) -> float:
    times = []
    for i in range(repeat):
        t = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def run(opts) -> list[dict]:
    import httpx

    from ..server import ServerThread, Settings

    if getattr(opts, "io_sizes", None):
        sizes = [int(v) for v in opts.io_sizes.split(",")]
    else:
        sizes = [512, 1024] if opts.quick else [512, 2048, 4096]
    repeat = max(1, opts.repeat)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="analogon-bench-") as tmp:
        settings = Settings(port=0, state_dir=Path(tmp), cache_dir="", device=opts.device or "cpu")
        with ServerThread(settings) as srv, httpx.Client(
                base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=300) as c:
            store = srv.app.state.store
            for size in sizes:
                base = test_image(size)
                counter = [0]

                def fresh() -> np.ndarray:  # a new sha each time: re-uploads would be no-ops
                    counter[0] += 1
                    img = base.copy()
                    img[0, 0, 0] = counter[0] % 256
                    img[0, 1, 0] = counter[0] // 256 % 256
                    return img

                png_bytes = len(png_encode(base))

                def codec(_):
                    png_decode(png_encode(base))

                def png_up(_):
                    body = png_encode(fresh())
                    sha = hashlib.sha256(body).hexdigest()
                    r = c.put(f"/v1/images/{sha}", content=body, headers={"Content-Type": "image/png"})
                    assert r.status_code == 201, r.text

                def raw_up(_):
                    img = fresh()
                    body = img.tobytes()
                    sha = raw_image_id(body, size, size)
                    r = c.put(f"/v1/images/{sha}", content=body, headers={
                        "Content-Type": RAW, "X-Image-Width": str(size), "X-Image-Height": str(size)})
                    assert r.status_code == 201, r.text

                results = [store.put_array(fresh()).sha for _ in range(repeat * 2)]

                def png_down(i):
                    store._mem.clear()  # a result not yet encoded or cached
                    r = c.get(f"/v1/images/{results[i]}")
                    png_decode(r.content)

                def raw_down(i):
                    r = c.get(f"/v1/images/{results[repeat + i]}", params={"format": "rgba"})
                    np.frombuffer(r.content, np.uint8).reshape(size, size, 4)

                kept = base.copy()
                kept_body = kept.tobytes()
                kept_sha = raw_image_id(kept_body, size, size)
                r = c.put(f"/v1/images/{kept_sha}", content=kept_body, headers={
                    "Content-Type": RAW, "X-Image-Width": str(size), "X-Image-Height": str(size)})
                assert r.status_code in (200, 201), r.text

                def skip(_):  # the plugin's path for a layer the server already has
                    sha = raw_image_id(kept.tobytes(), size, size)
                    r = c.head(f"/v1/images/{sha}")
                    assert r.status_code == 200, r.status_code

                def hash_only(_):
                    raw_image_id(kept.tobytes(), size, size)

                row = {"size": f"{size}x{size}",
                       "png_codec_ms": _median_ms(codec, repeat),
                       "png_up_ms": _median_ms(png_up, repeat),
                       "png_down_ms": _median_ms(png_down, repeat),
                       "raw_up_ms": _median_ms(raw_up, repeat),
                       "raw_down_ms": _median_ms(raw_down, repeat),
                       "skip_ms": _median_ms(skip, repeat),
                       "hash_ms": _median_ms(hash_only, repeat),
                       "png_MiB": round(png_bytes / 2**20, 2),
                       "raw_MiB": round(size * size * 4 / 2**20, 2)}
                row["png_roundtrip_ms"] = row["png_up_ms"] + row["png_down_ms"]
                row["raw_roundtrip_ms"] = row["raw_up_ms"] + row["raw_down_ms"]
                rows.append(row)
            rows += job_latency(c, opts, repeat)
    return rows


def job_latency(c, opts, repeat: int) -> list[dict]:
    """Submit -> first events on a warm model, with a method that does one step."""
    from .. import methods
    from ..methods.base import Method, MethodParams, MethodResult, ResultImage, Role

    class Noop(Method):
        id = "bench-noop"
        title = "Benchmark no-op"
        Params = MethodParams
        roles = (Role("source", "Source"),)
        target_role = "source"

        def run(self, ctx, inputs, params):
            ctx.progress("step", 1, 1)
            return MethodResult([ResultImage(inputs.get("source").rgba)])

    methods.register(Noop())
    try:
        body = png_encode(test_image(64))
        sha = hashlib.sha256(body).hexdigest()
        c.put(f"/v1/images/{sha}", content=body, headers={"Content-Type": "image/png"})
        marks: dict[str, list[float]] = {"queued": [], "started": [], "progress": [], "done": []}
        for i in range(repeat + 1):  # the first run loads the model (not counted)
            t0 = time.perf_counter()
            r = c.post("/v1/jobs", json={"method": "bench-noop", "model": "tiny-sd", "images": {"source": sha}})
            job = r.json()["id"]
            seen: dict[str, float] = {}
            with c.stream("GET", f"/v1/jobs/{job}/events") as s:
                for line in s.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                        if kind in marks and kind not in seen:
                            seen[kind] = (time.perf_counter() - t0) * 1000
                        if kind in ("done", "error", "cancelled"):
                            break
            if i > 0:
                for k in marks:
                    if k in seen:
                        marks[k].append(seen[k])
        return [{"size": "job latency (warm tiny-sd)",
                 **{f"to_{k}_ms": statistics.median(v) for k, v in marks.items() if v}}]
    finally:
        methods.unregister("bench-noop")


def add_arguments(p) -> None:
    p.add_argument("--io-sizes", metavar="N,N,...", help="io: square image sizes (default 512,2048,4096)")


register("io", run, "image upload/download through the real server (PNG vs raw RGBA8), job latency",
         add_arguments)
