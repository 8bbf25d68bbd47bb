"""The content-addressed image store: images by the SHA-256 of their uploaded bytes.

Uploads are kept as they came (PNG bytes, or raw RGBA8), so a download in the same format
returns exactly the uploaded bytes. Results are stored as raw RGBA8; their id is the raw id
of those bytes. Recently used decoded images stay in memory.

On disk each image is one file, ``<folder>/<sha[:2]>/<sha>.<kind>.<width>x<height>.<fmt>``:
``kind`` is ``up`` (an upload), ``res`` (a result) or ``dl`` (a result the plugin has
downloaded), ``fmt`` is ``png`` or ``rgba``. Everything the store needs to know is in the
name, so the folder is read once at start (into an in-memory index) and never listed again:
a lookup is a dictionary hit, whatever the number of files.

Every file is checked against its id (the SHA-256 of its bytes) the first time it is read in
a process; a file that does not match (cut short by a crash, damaged) is removed and the
image counts as not stored. Files half-written when the process was killed (``.tmp``) are
removed at start. One process at a time uses a store (a lock file in the folder).

The folder is kept under a size cap, and results under an age limit: downloaded results go
first, then other results, then uploads, each oldest-used first.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.images import raw_image_id
from ..errors import AnalogonError

log = logging.getLogger(__name__)

SHA_PATTERN = "^[0-9a-f]{64}$"
SHA_RE = re.compile(r"[0-9a-f]{64}")  # use with fullmatch: "$" would let a trailing newline in
PNG = "image/png"
RGBA = "application/x-analogon-rgba"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NAME_RE = re.compile(r"([0-9a-f]{64})\.(up|res|dl)\.([0-9]{1,9})x([0-9]{1,9})\.(png|rgba)")
_LEGACY_RAW_RE = re.compile(r"([0-9a-f]{64})\.([0-9]{1,9})x([0-9]{1,9})\.rgba")
_LEGACY_PNG_RE = re.compile(r"([0-9a-f]{64})\.png")
KINDS = ("dl", "res", "up")  # eviction order
STRIP_BYTES = 8 * 1024 * 1024  # decode-to-RGBA works in row strips of about this size


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


def is_sha(sha) -> bool:
    return isinstance(sha, str) and SHA_RE.fullmatch(sha) is not None


def check_sha(sha: str) -> str:
    if not is_sha(sha):
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


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk, without decoding anything.
    Raises ``bad_image`` for bytes that are not a PNG."""
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise bad_image("These bytes are not a PNG image (the protocol takes PNG or raw RGBA8).")
    return struct.unpack(">II", data[16:24])


def _open_png(data: bytes, limits: Limits) -> Image.Image:
    """A PNG, size-checked before Pillow sees it; only Pillow's PNG reader is used."""
    w, h = png_size(data)
    check_size(w, h, limits)
    try:
        im = Image.open(io.BytesIO(data), formats=["PNG"])
        if im.size != (w, h):
            raise ValueError("size")
    except Image.DecompressionBombError:
        raise too_large(f"The image is {w}×{h} pixels, over the limit.", width=w, height=h) from None
    except Exception:
        raise bad_image("These bytes are not a PNG image that can be read.") from None
    return im


def validate_png(data: bytes, limits: Limits) -> tuple[int, int]:
    """Check that ``data`` is a complete, decodable PNG within the limits: (width, height).
    Decodes in the image's own mode and keeps nothing."""
    im = _open_png(data, limits)
    try:
        im.load()
    except Exception as e:
        raise bad_image(f"The PNG could not be decoded ({type(e).__name__}: it may be truncated).") from None
    finally:
        size = im.size
        im.close()
    return size


def _rgba_strips(im: Image.Image) -> np.ndarray:
    """An opened image as RGBA8, converted in row strips: the peak is the decoded image plus
    the result, not several full-size copies."""
    w, h = im.size
    im.load()
    scale16 = False
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        lo, hi = im.getextrema()
        scale16 = hi > 255
    out = np.empty((h, w, 4), np.uint8)
    rows = max(1, STRIP_BYTES // max(1, w * 4))
    for y0 in range(0, h, rows):
        part = im.crop((0, y0, w, min(h, y0 + rows)))
        if part.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: the high byte if used
            arr = np.asarray(part, dtype=np.uint32)
            part = Image.fromarray(((arr >> 8) if scale16 else arr).astype(np.uint8), "L")
        out[y0:y0 + part.size[1]] = np.asarray(part.convert("RGBA"))
    return out


def read_png(data: bytes, limits: Limits) -> np.ndarray:
    """PNG bytes (and only PNG) to RGBA8, checking the size before decoding."""
    im = _open_png(data, limits)
    try:
        return _rgba_strips(im)
    except AnalogonError:
        raise
    except Exception as e:
        raise bad_image(f"The PNG could not be decoded ({type(e).__name__}: it may be truncated).") from None
    finally:
        im.close()


def decode_png(data: bytes, limits: Limits) -> np.ndarray:
    """Image file bytes (PNG, or any format Pillow reads: the command line's input files) to
    RGBA8, checking the size before decoding. The server takes PNG only (``read_png``)."""
    if data[:8] == PNG_SIGNATURE:
        return read_png(data, limits)
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
    except Exception:
        raise bad_image("These bytes are not an image that can be read (expected PNG).") from None
    check_size(w, h, limits)
    try:
        return _rgba_strips(im)
    except Exception as e:
        raise bad_image(f"The image could not be decoded ({type(e).__name__}: it may be truncated).") from None


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


DEFLATE = "deflate"
ENCODINGS = ("", "identity", DEFLATE)  # Content-Encoding of an upload: none, or zlib (RFC 9110)


def inflate_raw(data: bytes, width: int, height: int, limits: Limits) -> bytes:
    """A raw RGBA upload sent with ``Content-Encoding: deflate`` (a zlib stream, RFC 1950, as
    HTTP's "deflate" is): exactly ``width*height*4`` bytes once inflated, never more (the size
    is checked against the limits first and the stream is read no further than that)."""
    check_size(width, height, limits)
    expected = width * height * 4
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, expected + 1)
    except zlib.error as e:
        raise bad_image(f"The deflate-encoded body is not a zlib stream ({e}).") from None
    if len(out) != expected or not d.eof or d.unconsumed_tail or d.unused_data:
        got = "more" if len(out) > expected or d.unconsumed_tail else (
            f"{len(out)} bytes" + ("" if d.eof else " and is cut short"))
        raise bad_image(f"Raw RGBA for {width}\u00d7{height} pixels is {expected} bytes; the "
                        f"deflate-encoded body inflates to {got}.", expected=expected)
    return out


def check_encoding(encoding: str | None, content_type: str | None) -> str:
    """An upload's Content-Encoding, normalised: "" (none) or ``deflate`` (raw RGBA only);
    anything else is ``415``."""
    enc = (encoding or "").strip().lower()
    if enc == "identity":
        enc = ""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if enc not in ENCODINGS or (enc == DEFLATE and ctype != RGBA):
        raise AnalogonError(
            "unsupported_media_type", f"Content-Encoding {enc} is not accepted"
            + (f" for {ctype}" if enc == DEFLATE else "") + f": raw RGBA ({RGBA}) may be sent "
            "with Content-Encoding: deflate (a zlib stream), everything else without one.",
            {"content_encoding": enc, "content_type": ctype or None}, status=415)
    return enc


def _content_id(data: bytes, fmt: str, width: int, height: int) -> str:
    return hashlib.sha256(data).hexdigest() if fmt == "png" else raw_image_id(data, width, height)


@dataclass
class _Entry:
    sha: str
    kind: str  # up, res, dl
    fmt: str  # png, rgba
    width: int
    height: int
    size: int
    used: float = field(default_factory=time.time)
    verified: bool = False

    @property
    def name(self) -> str:
        return f"{self.sha}.{self.kind}.{self.width}x{self.height}.{self.fmt}"

    @property
    def info(self) -> StoredImage:
        return StoredImage(self.sha, self.width, self.height)


class StoreInUse(AnalogonError):
    pass


class ImageStore:
    def __init__(self, folder: str | os.PathLike, limits: Limits | None = None,
                 memory_bytes: int = 512 * 1024**2, disk_cap_bytes: int = 8 * 1024**3,
                 result_max_age_s: float | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.memory_bytes = memory_bytes
        self.disk_cap_bytes = int(disk_cap_bytes)
        self.result_max_age_s = result_max_age_s
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._mem_size = 0
        self._lock = threading.RLock()
        self._index: dict[str, _Entry] = {}
        self._order: dict[str, OrderedDict[str, _Entry]] = {k: OrderedDict() for k in KINDS}
        self._total = 0
        self._lock_file = None
        self.removed_at_start: dict[str, int] = {"tmp": 0, "damaged": 0}
        self._acquire_folder()
        t = time.perf_counter()
        self._scan()
        self.scan_s = time.perf_counter() - t
        self._expire_results()
        self._enforce_cap()

    # -- the folder -----------------------------------------------------------------------
    def _acquire_folder(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return
        f = open(self.folder / ".lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise StoreInUse("store_in_use", f"Another backend is using the image store in {self.folder}. "
                             "Stop it, or give this one another --state-dir.", status=409) from None
        self._lock_file = f

    def close(self) -> None:
        f, self._lock_file = self._lock_file, None
        if f is not None:
            f.close()  # releases the lock

    @staticmethod
    def folder_in_use(folder: str | os.PathLike) -> bool:
        """Whether a live process holds this store (how a stale server.json is told apart)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover
            return False
        path = Path(folder) / ".lock"
        if not path.exists():
            return False
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return False

    def _shard(self, sha: str) -> Path:
        return self.folder / sha[:2]

    def _path(self, e: _Entry) -> Path:
        return self._shard(e.sha) / e.name

    def _scan(self) -> None:
        """Read the folder once: index every image, remove leftovers of a killed process
        (``.tmp`` files, raw files of the wrong length), move files of the old flat layout."""
        for d in list(os.scandir(self.folder)):
            if d.is_file(follow_symlinks=False):
                self._legacy(d)
                continue
            if not (d.is_dir(follow_symlinks=False) and len(d.name) == 2):
                continue
            for f in os.scandir(d.path):
                if f.name.endswith(".tmp"):
                    self._unlink(Path(f.path))
                    self.removed_at_start["tmp"] += 1
                    continue
                m = _NAME_RE.fullmatch(f.name)
                if m is None or not f.is_file(follow_symlinks=False) or m.group(1)[:2] != d.name:
                    continue
                st = f.stat()
                e = _Entry(m.group(1), m.group(2), m.group(5), int(m.group(3)), int(m.group(4)),
                           st.st_size, used=st.st_mtime)
                if (e.fmt == "rgba" and st.st_size != e.width * e.height * 4) or e.sha in self._index:
                    log.warning("image store: removing damaged %s", f.name)
                    self._unlink(Path(f.path))
                    self.removed_at_start["damaged"] += 1
                    continue
                self._add(e)
        for kind in KINDS:  # oldest used first
            order = self._order[kind]
            for e in sorted(order.values(), key=lambda e: e.used):
                order.move_to_end(e.sha)

    def _legacy(self, d: os.DirEntry) -> None:
        name = d.name
        if name.startswith(".") and name.endswith(".tmp"):
            self._unlink(Path(d.path))
            self.removed_at_start["tmp"] += 1
            return
        m = _LEGACY_RAW_RE.fullmatch(name)
        if m:
            sha, fmt, w, h = m.group(1), "rgba", int(m.group(2)), int(m.group(3))
        elif _LEGACY_PNG_RE.fullmatch(name):
            sha, fmt = name[:64], "png"
            try:
                with open(d.path, "rb") as f:
                    w, h = png_size(f.read(33))
            except (OSError, AnalogonError):
                return
        else:
            return
        st = d.stat()
        e = _Entry(sha, "up", fmt, w, h, st.st_size, used=st.st_mtime)
        if sha in self._index:
            return
        self._shard(sha).mkdir(exist_ok=True)
        os.replace(d.path, self._path(e))
        self._add(e)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            import shutil

            shutil.rmtree(path, ignore_errors=True)

    # -- the index --------------------------------------------------------------------------
    def _add(self, e: _Entry) -> None:
        self._index[e.sha] = e
        self._order[e.kind][e.sha] = e
        self._total += e.size

    def _drop(self, e: _Entry, why: str | None = None) -> None:
        with self._lock:
            if self._index.get(e.sha) is e:
                del self._index[e.sha]
                self._order[e.kind].pop(e.sha, None)
                self._total -= e.size
            old = self._mem.pop(e.sha, None)
            if old is not None:
                self._mem_size -= old.nbytes
        if why:
            log.warning("image store: %s %s is %s; removed", e.fmt, e.sha, why)
        self._unlink(self._path(e))

    def _use(self, e: _Entry) -> None:
        e.used = time.time()
        with self._lock:
            order = self._order[e.kind]
            if e.sha in order:
                order.move_to_end(e.sha)
        try:
            os.utime(self._path(e))  # the age survives a restart
        except OSError:
            pass

    def _read_verified(self, e: _Entry) -> bytes | None:
        """The file's bytes, checked against the id; None (and the file removed) when it is
        missing or does not match."""
        try:
            data = self._path(e).read_bytes()
        except FileNotFoundError:
            self._drop(e, "missing")
            return None
        except OSError as err:
            self._drop(e, f"unreadable ({err.strerror})")
            return None
        if len(data) != e.size or (not e.verified and _content_id(data, e.fmt, e.width, e.height) != e.sha):
            self._drop(e, "damaged (its bytes do not match its id)")
            return None
        e.verified = True
        return data

    def _check(self, sha: str) -> _Entry | None:
        """The entry of a stored, intact image (read and hashed once per process)."""
        with self._lock:
            e = self._index.get(sha)
        if e is None:
            return None
        if e.verified:
            try:
                if self._path(e).stat().st_size == e.size:
                    return e
            except OSError:
                pass
            self._drop(e, "missing or changed")
            return None
        return e if self._read_verified(e) is not None else None

    def __contains__(self, sha: str) -> bool:
        if not is_sha(sha):
            return False
        with self._lock:
            if sha in self._mem:
                return True
        return self._check(sha) is not None

    def info(self, sha: str) -> StoredImage | None:
        if not is_sha(sha):
            return None
        e = self._check(sha)
        return None if e is None else e.info

    def __len__(self) -> int:
        return len(self._index)

    def size_of(self, sha: str) -> int | None:
        """The stored file's size in bytes, from the index (nothing is read); None when not stored."""
        with self._lock:
            e = self._index.get(sha)
            return None if e is None else e.size

    def discard_upload(self, sha: str) -> bool:
        """Remove an upload (never a result) from the store; whether it was there."""
        with self._lock:
            e = self._index.get(sha)
            if e is None or e.kind != "up":
                return False
        self._drop(e)
        return True

    # -- writing ----------------------------------------------------------------------------
    def put_bytes(self, sha: str, body: bytes, content_type: str,
                  width: int | None = None, height: int | None = None,
                  encoding: str = "") -> tuple[StoredImage, bool]:
        """Store an upload. Returns (image, created). Checks the format, the limits and the hash.
        ``encoding``: the upload's Content-Encoding (``deflate`` for raw RGBA, else none)."""
        check_sha(sha)
        encoding = check_encoding(encoding, content_type)
        existing = self._check(sha)
        if existing is not None:
            self._use(existing)
            return existing.info, False
        if len(body) > self.limits.max_body_bytes:
            raise too_large(f"The upload is {len(body)} bytes; the limit is {self.limits.max_body_bytes}.")
        ctype = (content_type or "").split(";")[0].strip().lower()
        rgba = None
        if ctype == RGBA:
            if width is None or height is None:
                raise bad_image("Raw RGBA uploads need the X-Image-Width and X-Image-Height headers.")
            if encoding == DEFLATE:
                body = inflate_raw(body, width, height, self.limits)
            rgba = decode_raw(body, width, height, self.limits)
            fmt = "rgba"
        elif ctype == PNG:
            width, height = png_size(body)
            check_size(width, height, self.limits)
            fmt = "png"
        else:
            raise AnalogonError(
                "unsupported_media_type", f"Images are uploaded as {PNG} or {RGBA}, "
                + (f"not {ctype}." if ctype else "with that Content-Type header."), status=415)
        if _content_id(body, fmt, width, height) != sha:
            raise AnalogonError("hash_mismatch", "The uploaded bytes do not match their id "
                                "(the upload may have been cut short).", {"sha": sha}, status=400)
        if fmt == "png":
            width, height = validate_png(body, self.limits)  # decoded once, nothing kept
        e = _Entry(sha, "up", fmt, width, height, len(body), verified=True)
        self._write(e, body)
        if rgba is not None:  # raw: the array is the body itself, no extra memory
            self._remember(sha, rgba)
        return e.info, True

    def put_array(self, rgba: np.ndarray) -> StoredImage:
        """Store an RGBA8 array (a result); its id is the raw image id of its pixels."""
        rgba = np.ascontiguousarray(rgba, dtype=np.uint8)
        data = rgba.tobytes()
        h, w = rgba.shape[:2]
        sha = raw_image_id(data, w, h)
        e = self._check(sha)
        if e is None:
            e = _Entry(sha, "res", "rgba", w, h, len(data), verified=True)
            self._write(e, data)
        else:
            self._use(e)
        self._remember(sha, rgba)
        self._expire_results()
        return StoredImage(sha, w, h)

    def _write(self, e: _Entry, data: bytes) -> None:
        path = self._path(e)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            self._unlink(tmp)
            raise
        with self._lock:
            old = self._index.get(e.sha)
            if old is not None:  # replaced a damaged file of another kind or name
                self._order[old.kind].pop(old.sha, None)
                self._total -= old.size
                if old.name != e.name:
                    self._unlink(self._path(old))
            self._add(e)
        self._enforce_cap(keep=e.sha)

    def _mark_downloaded(self, e: _Entry) -> None:
        if e.kind != "res":
            return
        with self._lock:
            if self._index.get(e.sha) is not e:
                return
            old = self._path(e)
            self._order["res"].pop(e.sha, None)
            e.kind = "dl"
            try:
                os.replace(old, self._path(e))
            except OSError:
                e.kind = "res"
            self._order[e.kind][e.sha] = e

    # -- reading ----------------------------------------------------------------------------
    def _not_found(self, sha: str) -> AnalogonError:
        return AnalogonError("image_not_found", "No image with this id is stored; upload it first.",
                             {"sha": sha}, status=404)

    def load(self, sha: str) -> np.ndarray:
        """Decoded RGBA8 (read-only array)."""
        with self._lock:
            if sha in self._mem:
                self._mem.move_to_end(sha)
                return self._mem[sha]
            e = self._index.get(sha) if is_sha(sha) else None
        data = self._read_verified(e) if e is not None else None
        if data is None:
            raise self._not_found(sha)
        if e.fmt == "png":
            rgba = read_png(data, self.limits)
        else:
            rgba = np.frombuffer(data, np.uint8).reshape(e.height, e.width, 4)
        self._use(e)
        self._remember(sha, rgba)
        return rgba

    def get_bytes(self, sha: str, fmt: str = "png") -> tuple[bytes, StoredImage]:
        """The image as PNG (``fmt='png'``) or raw RGBA8 (``'rgba'``): the stored bytes when the
        format matches, else converted. Reading a result marks it downloaded."""
        with self._lock:
            e = self._index.get(sha) if is_sha(sha) else None
        data = self._read_verified(e) if e is not None else None
        if data is None:
            raise self._not_found(sha)
        self._use(e)
        self._mark_downloaded(e)
        if fmt != e.fmt:
            rgba = (read_png(data, self.limits) if e.fmt == "png"
                    else np.frombuffer(data, np.uint8).reshape(e.height, e.width, 4))
            data = encode_png(rgba) if fmt == "png" else rgba.tobytes()
        return data, e.info

    # -- housekeeping -----------------------------------------------------------------------
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

    def _enforce_cap(self, keep: str | None = None) -> None:
        """Remove images until the folder is under the cap: downloaded results, then results,
        then uploads, each oldest-used first; never ``keep`` (the image just written)."""
        victims = []
        with self._lock:
            total = self._total
            for kind in KINDS:
                for e in self._order[kind].values():
                    if total <= self.disk_cap_bytes:
                        break
                    if e.sha != keep:
                        victims.append(e)
                        total -= e.size
        for e in victims:
            self._drop(e)
        if victims:
            log.info("image store: removed %d images to stay under %d bytes", len(victims),
                     self.disk_cap_bytes)

    def _expire_results(self) -> None:
        if not self.result_max_age_s:
            return
        limit = time.time() - self.result_max_age_s
        victims = []
        with self._lock:
            for kind in ("dl", "res"):
                for e in self._order[kind].values():
                    if e.used >= limit:
                        break
                    victims.append(e)
        for e in victims:
            self._drop(e)

    def disk_bytes(self) -> int:
        with self._lock:
            return self._total
