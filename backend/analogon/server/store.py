"""The content-addressed image store: images by the SHA-256 of their uploaded bytes.

Uploads are kept as they came (PNG bytes, or raw RGBA8 with the size in the file name), so a
download in the same format returns exactly the uploaded bytes. Results are stored as raw
RGBA8; their id is the SHA-256 of those bytes. Recently used decoded images stay in memory.
The folder is kept under a size cap by deleting the images used longest ago.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.images import raw_image_id
from ..errors import AnalogonError

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
PNG = "image/png"
RGBA = "application/x-analogon-rgba"
_RAW_RE = re.compile(r"^([0-9a-f]{64})\.(\d+)x(\d+)\.rgba$")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 256 * 1024 * 1024
    max_side: int = 8192
    max_pixels: int = 8192 * 8192

    def to_json(self) -> dict[str, int]:
        return {"max_body_bytes": self.max_body_bytes, "max_side": self.max_side,
                "max_pixels": self.max_pixels}


@dataclass(frozen=True)
class StoredImage:
    sha: str
    width: int
    height: int

    def to_json(self) -> dict:
        return {"sha": self.sha, "width": self.width, "height": self.height}


def too_large(message: str, **detail) -> AnalogonError:
    return AnalogonError("too_large", message, detail or None, status=413)


def bad_image(message: str, **detail) -> AnalogonError:
    return AnalogonError("bad_image", message, detail or None, status=400)


def check_sha(sha: str) -> str:
    if not SHA_RE.match(sha or ""):
        raise AnalogonError("bad_sha", "An image id is the lowercase hex SHA-256 of its bytes "
                            "(64 characters).", {"sha": sha}, status=400)
    return sha


def check_size(width: int, height: int, limits: Limits) -> None:
    if width <= 0 or height <= 0:
        raise bad_image(f"An image of {width}×{height} pixels has no pixels.")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise too_large(
            f"The image is {width}×{height} pixels; the limit is {limits.max_side} pixels on a side "
            f"and {limits.max_pixels} pixels in all. Use a smaller region or scale the layer down.",
            width=width, height=height, **limits.to_json())


def decode_png(data: bytes, limits: Limits) -> np.ndarray:
    """PNG (or any format Pillow reads) bytes to RGBA8, checking the size before decoding."""
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Exception:
        raise bad_image("These bytes are not an image that can be read (expected PNG).") from None
    check_size(w, h, limits)
    try:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr16 = np.asarray(im, dtype=np.uint32)
            grey = (arr16 >> 8).astype(np.uint8) if arr16.max() > 255 else arr16.astype(np.uint8)
            im = Image.fromarray(grey, "L")
        rgba = np.asarray(im.convert("RGBA"))
    except Exception as e:
        raise bad_image(f"The image could not be decoded ({type(e).__name__}: it may be truncated).") from None
    return np.ascontiguousarray(rgba)


def encode_png(rgba: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_raw(data: bytes, width: int, height: int, limits: Limits) -> np.ndarray:
    check_size(width, height, limits)
    if len(data) != width * height * 4:
        raise bad_image(
            f"Raw RGBA for {width}×{height} pixels is {width * height * 4} bytes, got {len(data)}.",
            expected=width * height * 4, got=len(data))
    return np.frombuffer(data, np.uint8).reshape(height, width, 4)


class ImageStore:
    def __init__(self, folder: str | os.PathLike, limits: Limits | None = None,
                 memory_bytes: int = 512 * 1024**2, disk_cap_bytes: int = 8 * 1024**3):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.memory_bytes = memory_bytes
        self.disk_cap_bytes = disk_cap_bytes
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._mem_size = 0
        self._lock = threading.RLock()

    # -- paths --------------------------------------------------------------------------
    def _find(self, sha: str) -> tuple[Path, int | None, int | None] | None:
        png = self.folder / f"{sha}.png"
        if png.exists():
            return png, None, None
        for p in self.folder.glob(f"{sha}.*.rgba"):
            m = _RAW_RE.match(p.name)
            if m:
                return p, int(m.group(2)), int(m.group(3))
        return None

    def __contains__(self, sha: str) -> bool:
        if not SHA_RE.match(sha or ""):
            return False
        with self._lock:
            return sha in self._mem or self._find(sha) is not None

    def info(self, sha: str) -> StoredImage | None:
        found = self._find(sha)
        if found is None:
            return None
        path, w, h = found
        if w is None:
            with Image.open(path) as im:
                w, h = im.size
        return StoredImage(sha, w, h)

    # -- writing ------------------------------------------------------------------------
    def put_bytes(self, sha: str, body: bytes, content_type: str,
                  width: int | None = None, height: int | None = None) -> tuple[StoredImage, bool]:
        """Store an upload. Returns (image, created). Checks the hash, the format and the limits."""
        check_sha(sha)
        existing = self.info(sha) if sha in self else None
        if existing is not None:
            return existing, False
        if len(body) > self.limits.max_body_bytes:
            raise too_large(f"The upload is {len(body)} bytes; the limit is {self.limits.max_body_bytes}.")
        ctype = (content_type or "").split(";")[0].strip().lower()
        if ctype == RGBA and (width is None or height is None):
            raise bad_image("Raw RGBA uploads need the X-Image-Width and X-Image-Height headers.")
        if ctype == RGBA:
            rgba = decode_raw(body, width, height, self.limits)
            expected = raw_image_id(body, width, height)
            path = self.folder / f"{sha}.{width}x{height}.rgba"
        elif ctype in (PNG, "application/octet-stream", ""):
            rgba = decode_png(body, self.limits)
            expected = hashlib.sha256(body).hexdigest()
            path = self.folder / f"{sha}.png"
        else:
            raise AnalogonError("unsupported_media_type", f"Images are uploaded as {PNG} or {RGBA}, "
                                f"not {ctype}.", status=415)
        if expected != sha:
            raise AnalogonError("hash_mismatch", "The uploaded bytes do not match their id "
                                "(the upload may have been cut short).", {"sha": sha}, status=400)
        self._write(path, body)
        self._remember(sha, rgba)
        self._enforce_cap()
        return StoredImage(sha, rgba.shape[1], rgba.shape[0]), True

    def put_array(self, rgba: np.ndarray) -> StoredImage:
        """Store an RGBA8 array (a result); its id is the raw image id of its pixels."""
        rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
        data = rgba.tobytes()
        h, w = rgba.shape[:2]
        sha = raw_image_id(data, w, h)
        with self._lock:
            found = self._find(sha)
            if found is None:
                self._write(self.folder / f"{sha}.{w}x{h}.rgba", data)
            self._remember(sha, rgba)
        self._enforce_cap()
        return StoredImage(sha, w, h)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    # -- reading ------------------------------------------------------------------------
    def load(self, sha: str) -> np.ndarray:
        """Decoded RGBA8 (read-only array)."""
        with self._lock:
            if sha in self._mem:
                self._mem.move_to_end(sha)
                return self._mem[sha]
            found = self._find(sha)
        if found is None:
            raise AnalogonError("image_not_found", "No image with this id is stored; upload it first.",
                                {"sha": sha}, status=404)
        path, w, h = found
        if w is None:
            rgba = decode_png(path.read_bytes(), self.limits)
        else:
            rgba = np.fromfile(path, np.uint8).reshape(h, w, 4)
        self._touch(path)
        self._remember(sha, rgba)
        return rgba

    def get_bytes(self, sha: str, fmt: str = "png") -> tuple[bytes, StoredImage]:
        """The image as PNG (``fmt='png'``) or raw RGBA8 (``'rgba'``): the uploaded bytes when the
        format matches, else converted."""
        found = self._find(sha)
        if found is None:
            raise AnalogonError("image_not_found", "No image with this id is stored.", {"sha": sha},
                                status=404)
        path, w, h = found
        self._touch(path)
        if fmt == "png" and w is None:
            data = path.read_bytes()
            return data, self.info(sha)
        if fmt == "rgba" and w is not None:
            return path.read_bytes(), StoredImage(sha, w, h)
        rgba = self.load(sha)
        info = StoredImage(sha, rgba.shape[1], rgba.shape[0])
        return (encode_png(rgba) if fmt == "png" else rgba.tobytes()), info

    # -- housekeeping -------------------------------------------------------------------
    def _remember(self, sha: str, rgba: np.ndarray) -> None:
        try:
            rgba.setflags(write=False)  # shared between jobs: nobody edits it in place
        except ValueError:
            pass
        with self._lock:
            if sha in self._mem:
                self._mem.move_to_end(sha)
                return
            if rgba.nbytes > self.memory_bytes:
                return
            self._mem[sha] = rgba
            self._mem_size += rgba.nbytes
            while self._mem_size > self.memory_bytes and self._mem:
                _, old = self._mem.popitem(last=False)
                self._mem_size -= old.nbytes

    @staticmethod
    def _touch(path: Path) -> None:
        try:
            os.utime(path)
        except OSError:
            pass

    def _enforce_cap(self) -> None:
        with self._lock:
            files = []
            for p in self.folder.iterdir():
                if p.name.startswith("."):
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime_ns, st.st_size, p))
            total = sum(s for _, s, _ in files)
            if total <= self.disk_cap_bytes:
                return
            files.sort()
            for _, size, p in files[:-1]:  # never the newest
                if total <= self.disk_cap_bytes:
                    break
                p.unlink(missing_ok=True)
                total -= size
                old = self._mem.pop(p.name[:64], None)
                if old is not None:
                    self._mem_size -= old.nbytes

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if not p.name.startswith("."))
