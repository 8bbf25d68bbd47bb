"""Resumable uploads: a large image sent in chunks, so that a connection that drops halfway
costs the chunk in flight, not the whole image (docs/protocol.md, "Resumable uploads").

A client opens a session with the image's id, format and total length (``POST /v1/uploads``),
then appends chunks at the offset the server holds (``PUT /v1/uploads/{id}`` with
``Upload-Offset``); after a failure it asks for the offset (``HEAD``/``GET``) and goes on from
there. When the last byte is in, the whole body is checked and stored exactly as a single
``PUT /v1/images/{sha}`` would be (the app does that part).

On disk each session is two files in ``<store>/uploads/``: ``<id>.json`` (what was declared
and by whom, written once) and ``<id>.part`` (the bytes received so far: its size *is* the
offset, its modification time the last activity). So a session survives a restart of the
backend, and nothing of the body is held in memory. Sessions unused for ``max_age_s`` are
removed (at start, when one is opened, and by the app's periodic sweep); so is the oldest idle
session of a token that opens more than ``max_per_owner``, and the oldest idle sessions of
anyone when the lengths declared by all open sessions would pass the image store's cap.

Every method here runs on the server's event loop, except :meth:`UploadSessions.reserved`
(also called from worker threads), so a lock guards only the index.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AnalogonError

log = logging.getLogger(__name__)

UPLOAD_ID_PATTERN = "^[0-9a-f]{32}$"
_ID_RE = re.compile(r"[0-9a-f]{32}")
DONE_KEEP_S = 600.0  # a finished session answers for this long (a client whose last answer was lost)


@dataclass
class Session:
    id: str
    owner: str | None  # the painter who opened it (None: the backend's own token)
    sha: str
    content_type: str
    width: int | None
    height: int | None
    encoding: str  # "" or "deflate"
    length: int  # the body's bytes in all
    kept: int  # the bytes the stored image will take (the pixels, for a deflate body)
    created: float = field(default_factory=time.time)
    offset: int = 0  # bytes received (the .part file's size)
    used: float = field(default_factory=time.time)  # the last chunk (the .part file's mtime)
    writer: int = 0  # the PUT that may write: a newer one at the right offset takes over
    busy: int = 0  # PUTs writing or the body being checked: the sweep leaves it alone
    finishing: Any = None  # asyncio.Future of (StoredImage, created) while the body is checked
    result: Any = None  # (StoredImage, created) once stored

    @property
    def done(self) -> bool:
        return self.result is not None

    def meta(self) -> dict[str, Any]:
        return {"version": 1, "id": self.id, "owner": self.owner, "sha256": self.sha,
                "content_type": self.content_type, "width": self.width, "height": self.height,
                "encoding": self.encoding, "length": self.length, "kept": self.kept,
                "created": self.created}

    def matches(self, owner, sha, content_type, width, height, encoding, length) -> bool:
        return (not self.done and self.finishing is None and self.owner == owner and self.sha == sha
                and self.content_type == content_type and self.width == width and self.height == height
                and self.encoding == encoding and self.length == length)


def not_found(upload_id: str) -> AnalogonError:
    return AnalogonError("upload_not_found", "No upload with this id is open for this token (it may "
                         "have expired, been finished or abandoned): start the upload again.",
                         {"id": str(upload_id)[:80]}, status=404)


class UploadSessions:
    def __init__(self, folder: str | os.PathLike, max_age_s: float = 24 * 3600.0,
                 chunk_max: int = 16 * 1024**2, max_per_owner: int = 32, cap_bytes: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_age_s = float(max_age_s)
        self.chunk_max = int(chunk_max)
        self.max_per_owner = int(max_per_owner)
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self.removed_at_start = 0
        self._load()
        self.sweep()

    # -- files ----------------------------------------------------------------------------
    def part(self, s: Session) -> Path:
        return self.folder / f"{s.id}.part"

    def _meta_path(self, upload_id: str) -> Path:
        return self.folder / f"{upload_id}.json"

    def _load(self) -> None:
        """The sessions a previous run left: each ``<id>.json`` with its ``<id>.part``.
        Anything else in the folder (half a pair, an unreadable ``.json``, a stray file) is
        removed."""
        names = {e.name for e in os.scandir(self.folder) if e.is_file(follow_symlinks=False)}
        for name in sorted(names):
            stem, _, ext = name.partition(".")
            if ext != "json" or _ID_RE.fullmatch(stem) is None or f"{stem}.part" not in names:
                continue
            try:
                d = json.loads((self.folder / name).read_text(encoding="utf-8"))
                st = (self.folder / f"{stem}.part").stat()
                s = Session(stem, d["owner"], d["sha256"], d["content_type"], d["width"], d["height"],
                            d["encoding"], int(d["length"]), int(d["kept"]), float(d["created"]),
                            offset=st.st_size, used=st.st_mtime)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if d.get("id") == stem and s.offset <= s.length:
                self._sessions[stem] = s
        for name in names:
            if name.partition(".")[0] not in self._sessions:
                (self.folder / name).unlink(missing_ok=True)
                self.removed_at_start += 1

    # -- sessions -------------------------------------------------------------------------
    def find(self, owner: str | None, sha: str, content_type: str, width: int | None, height: int | None,
             encoding: str, length: int) -> Session | None:
        """This token's open session for exactly this image (a client that lost the answer to
        its POST, or starts again after a restart, so goes on where the bytes stopped)."""
        self.sweep()
        with self._lock:
            return next((s for s in self._sessions.values()
                         if s.matches(owner, sha, content_type, width, height, encoding, length)), None)

    def create(self, owner: str | None, sha: str, content_type: str, width: int | None,
               height: int | None, encoding: str, length: int, kept: int) -> Session:
        """A new session (its ``.json`` written, its ``.part`` empty)."""
        self._make_room(owner, length)
        s = Session(secrets.token_hex(16), owner, sha, content_type, width, height, encoding, length, kept)
        tmp = self.folder / f".{s.id}.json.tmp"
        tmp.write_text(json.dumps(s.meta()), encoding="utf-8")
        self.part(s).touch()
        os.replace(tmp, self._meta_path(s.id))
        with self._lock:
            self._sessions[s.id] = s
        return s

    def is_open(self, s: Session) -> bool:
        with self._lock:
            return self._sessions.get(s.id) is s

    def _make_room(self, owner: str | None, length: int) -> None:
        """Before a session opens: the token's oldest idle sessions past ``max_per_owner``, and
        anyone's oldest idle sessions while the declared lengths would pass the cap."""
        with self._lock:
            idle = sorted((s for s in self._sessions.values() if not s.done and not s.busy),
                          key=lambda s: s.used)
            mine = [s for s in self._sessions.values() if s.owner == owner and not s.done]
            victims = []
            extra = len(mine) + 1 - self.max_per_owner
            for s in idle:
                if extra <= 0:
                    break
                if s.owner == owner:
                    victims.append(s)
                    extra -= 1
            if self.cap_bytes is not None:
                total = sum(s.length for s in self._sessions.values() if not s.done and s not in victims)
                for s in idle:
                    if total + length <= self.cap_bytes:
                        break
                    if s not in victims:
                        victims.append(s)
                        total -= s.length
        for s in victims:
            log.info("uploads: removing the idle upload %s of %s to make room", s.id, s.owner or "the server")
            self.remove(s)

    def get(self, upload_id: str, owner: str | None) -> Session:
        """The session, for the token that opened it only (another token's is ``404``, in
        the same words as one that never existed)."""
        with self._lock:
            s = self._sessions.get(upload_id) if isinstance(upload_id, str) else None
        if s is None or s.owner != owner:
            raise not_found(upload_id)
        return s

    def remove(self, s: Session) -> None:
        with self._lock:
            if self._sessions.get(s.id) is s:
                del self._sessions[s.id]
        s.writer += 1  # a PUT still writing stops
        self._meta_path(s.id).unlink(missing_ok=True)
        self.part(s).unlink(missing_ok=True)

    def complete(self, s: Session, result: Any) -> None:
        """The image is stored: the files go, the answer stays for ``DONE_KEEP_S``."""
        s.result = result
        s.offset = s.length
        s.used = time.time()
        self._meta_path(s.id).unlink(missing_ok=True)
        self.part(s).unlink(missing_ok=True)

    def reserved(self, owner: str | None, exclude: Session | None = None) -> int:
        """The bytes ``owner``'s open sessions will keep once stored (they count against a
        painter's limit of stored bytes from the moment they are opened)."""
        with self._lock:
            return sum(s.kept for s in self._sessions.values()
                       if s.owner == owner and not s.done and s is not exclude)

    def expires(self, s: Session) -> float:
        return s.used + (DONE_KEEP_S if s.done else self.max_age_s)

    def sweep(self, now: float | None = None) -> int:
        """Remove the sessions unused for ``max_age_s`` (and finished ones after
        ``DONE_KEEP_S``), never one being written or checked. How many went."""
        now = time.time() if now is None else now
        with self._lock:
            victims = [s for s in self._sessions.values() if not s.busy and self.expires(s) <= now]
        for s in victims:
            self.remove(s)
        if victims:
            log.info("uploads: removed %d expired uploads", len(victims))
        return len(victims)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def disk_bytes(self) -> int:
        with self._lock:
            return sum(s.offset for s in self._sessions.values() if not s.done)
