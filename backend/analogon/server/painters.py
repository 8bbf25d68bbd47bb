"""Painters' tokens, who a request is, and what each painter may keep on the server.

A studio's backend serves several painters (docs/studio.md). Besides the backend's own token
(the one in server.json, as on a painter's own machine), it accepts a token per painter,
made with ``analogon tokens create NAME``. The tokens file (``<state>/tokens.json``, mode 0600)
keeps only the SHA-256 of each token, never the token itself, with the painter's limits:

    {"version": 1, "painters": {"alice": {"sha256": "<hex>", "created": 1700000000.0,
                                          "revoked": null, "max_queued": null,
                                          "max_stored_bytes": null}}}

``revoked`` is the time of ``analogon tokens revoke``; a limit of null is the server's default
(``--painter-max-queued``, ``--painter-max-stored``). The server reads the file again whenever
it changes (its inode, size or modification time), so a revocation needs no restart; a file
it cannot read accepts no painter token at all until it is mended.

Who is asking: the backend's own token is the server's owner (``Principal.owner`` None), who
sees every job and image; a painter sees, lists and cancels only their own jobs, and sees only
the images they uploaded and the results of their own jobs (others answer 404, exactly as an
unknown id).

Stored bytes: each painter *claims* the images they upload (an image already stored counts
too: it is kept for them). What they claim counts against ``max_stored_bytes``. When an upload
would pass the limit, the painter's claims unused for ``keep_s`` seconds and not needed by
their queued or running jobs are released, oldest first (the file goes when nobody else claims
it); if that is not enough, the upload is refused (``413 storage_quota``).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import AnalogonError

log = logging.getLogger(__name__)

TOKENS_FILE = "tokens.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MiB = 1024**2


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise AnalogonError("bad_painter_name", "A painter's name is 1 to 64 letters, digits, dots, dashes or "
                            "underscores, beginning with a letter or digit.", {"name": str(name)[:80]})
    return name


@dataclass(frozen=True)
class Painter:
    name: str
    sha256: str
    created: float
    revoked: float | None = None
    max_queued: int | None = None
    max_stored_bytes: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "created": self.created, "revoked": self.revoked,
                "max_queued": self.max_queued, "max_stored_bytes": self.max_stored_bytes}


def _painter(name: str, d: Any) -> Painter:
    if not isinstance(d, dict) or not isinstance(d.get("sha256"), str) or len(d["sha256"]) != 64:
        raise ValueError(f"painter {name!r}: no sha256")

    def opt_int(key):
        v = d.get(key)
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"painter {name!r}: {key} is not a whole number")
        return v

    revoked = d.get("revoked")
    return Painter(check_name(name), d["sha256"].lower(), float(d.get("created") or 0.0),
                   float(revoked) if revoked is not None else None, opt_int("max_queued"),
                   opt_int("max_stored_bytes"))


def read_tokens(path: Path) -> dict[str, Painter]:
    """The painters in a tokens file ({} when there is none). Raises ValueError/OSError for a
    file that cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    data = json.loads(text)
    painters = data.get("painters") if isinstance(data, dict) else None
    if not isinstance(painters, dict):
        raise ValueError("no painters object")
    return {name: _painter(name, d) for name, d in painters.items()}


def _write_tokens(path: Path, painters: dict[str, Painter]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"version": 1, "painters": {n: p.to_json() for n, p in sorted(painters.items())}}, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer of the tokens file at a time (two ``tokens`` commands at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def create_token(path: Path, name: str, max_queued: int | None = None,
                 max_stored_bytes: int | None = None) -> str:
    """A new token for ``name`` (returned once: only its hash is kept). A painter whose token
    was revoked gets a new one; one with a live token is refused."""
    check_name(name)
    with _locked(path):
        painters = read_tokens(path)
        old = painters.get(name)
        if old is not None and old.active:
            raise AnalogonError("painter_exists", f"{name} already has a token. Revoke it first "
                                f"(analogon tokens revoke {name}), then create a new one.", {"name": name})
        token = secrets.token_urlsafe(32)
        painters[name] = Painter(name, token_hash(token), time.time(), None, max_queued, max_stored_bytes)
        _write_tokens(path, painters)
    return token


def revoke_token(path: Path, name: str) -> Painter:
    with _locked(path):
        painters = read_tokens(path)
        p = painters.get(name)
        if p is None:
            raise AnalogonError("painter_not_found", f"No painter called {name} (analogon tokens list "
                                "shows them).", {"name": name}, status=404)
        if p.active:
            p = Painter(p.name, p.sha256, p.created, time.time(), p.max_queued, p.max_stored_bytes)
            painters[name] = p
            _write_tokens(path, painters)
    return p


@dataclass(frozen=True)
class Principal:
    """Who a request is: the server's owner (``painter`` None) or a painter."""

    painter: Painter | None = None

    @property
    def owner(self) -> str | None:
        return self.painter.name if self.painter is not None else None

    @property
    def is_server(self) -> bool:
        return self.painter is None


SERVER = Principal(None)


class Tokens:
    """The server's view of the tokens: the backend's own, and the painters' from the file,
    read again when the file changes."""

    def __init__(self, token: str, path: Path | None, default_max_queued: int = 16,
                 default_max_stored_bytes: int = 2 * 1024**3):
        self._token = token.encode()
        self.path = Path(path) if path is not None else None  # None: no painters' tokens
        self.default_max_queued = default_max_queued
        self.default_max_stored_bytes = default_max_stored_bytes
        self._lock = threading.Lock()
        self._stamp: tuple | None = ("never",)
        self._by_hash: dict[str, Painter] = {}
        self._by_name: dict[str, Painter] = {}
        self.reloads = 0

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            stamp: tuple | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            stamp = ("error", str(e))
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                painters = read_tokens(self.path) if stamp is not None else {}
            except (OSError, ValueError, AnalogonError) as e:
                log.error("cannot read the tokens file %s (%s): no painter token is accepted until it "
                          "is mended", self.path, e)
                painters = {}
            self._by_name = painters
            self._by_hash = {p.sha256: p for p in painters.values()}
            self._stamp = stamp
            self.reloads += 1

    def authenticate(self, given: bytes) -> Principal | Painter | None:
        """The principal of a bearer token; a revoked painter's ``Painter`` (to say so); None."""
        if not given:
            return None
        if hmac.compare_digest(given, self._token):
            return SERVER
        self._refresh()
        try:
            digest = hashlib.sha256(given).hexdigest()
        except Exception:  # pragma: no cover
            return None
        with self._lock:
            p = self._by_hash.get(digest)
        if p is None:
            return None
        return Principal(p) if p.active else p

    def active(self, owner: str | None) -> bool:
        """Whether jobs of ``owner`` may still run (its token not revoked)."""
        if owner is None:
            return True
        self._refresh()
        with self._lock:
            p = self._by_name.get(owner)
        return p is not None and p.active

    def max_queued(self, p: Painter) -> int:
        return p.max_queued if p.max_queued is not None else self.default_max_queued

    def max_stored_bytes(self, p: Painter) -> int:
        return p.max_stored_bytes if p.max_stored_bytes is not None else self.default_max_stored_bytes


class Claims:
    """Which images each painter holds on the server (their uploads), for what they may see
    and what counts against their stored-bytes limit."""

    def __init__(self, store, keep_s: float = 600.0):
        self.store = store
        self.keep_s = keep_s
        self._lock = threading.Lock()
        self._claims: dict[str | None, OrderedDict[str, float]] = {}  # owner -> sha -> last use

    def claimed(self, owner: str | None, sha: str) -> bool:
        with self._lock:
            return sha in self._claims.get(owner, {})

    def claim(self, owner: str | None, sha: str) -> None:
        with self._lock:
            c = self._claims.setdefault(owner, OrderedDict())
            new = sha not in c
            c[sha] = time.monotonic()
            c.move_to_end(sha)
            if new and len(c) % 1024 == 0:  # now and then, forget images the store has dropped
                for s in [s for s in c if self.store.size_of(s) is None]:
                    del c[s]

    def touch(self, owner: str | None, shas) -> None:
        with self._lock:
            c = self._claims.get(owner)
            if c is None:
                return
            now = time.monotonic()
            for s in shas:
                if s in c:
                    c[s] = now
                    c.move_to_end(s)

    def stored_bytes(self, owner: str | None) -> int:
        """The bytes of the images ``owner`` claims that are still stored (claims on images the
        store has dropped are forgotten)."""
        with self._lock:
            c = self._claims.get(owner)
            if not c:
                return 0
            total = 0
            for s in list(c):
                size = self.store.size_of(s)
                if size is None:
                    del c[s]
                else:
                    total += size
            return total

    def make_room(self, owner: str, need: int, limit: int, pinned: Callable[[], set[str]],
                  reserved: int = 0) -> None:
        """Release ``owner``'s old claims until ``need`` more bytes fit under ``limit``; raise
        ``413 storage_quota`` when they cannot. ``reserved``: bytes already promised to the
        owner's open resumable uploads (server.uploads), counted as stored."""
        have = self.stored_bytes(owner) + reserved
        if have + need <= limit:
            return
        keep = pinned()
        now = time.monotonic()
        released = []
        with self._lock:
            c = self._claims.get(owner, OrderedDict())
            for s, used in list(c.items()):  # oldest used first
                if have + need <= limit:
                    break
                if s in keep or now - used < self.keep_s:
                    continue
                size = self.store.size_of(s) or 0
                del c[s]
                have -= size
                released.append(s)
            others = {s for o, oc in self._claims.items() if o != owner for s in oc}
        for s in released:
            if s not in others and s not in keep:
                self.store.discard_upload(s)
        if released:
            log.info("painter %s: released %d old images to make room", owner, len(released))
        if have + need > limit:
            raise AnalogonError(
                "storage_quota",
                f"This upload ({need / MiB:.1f} MiB) would pass your limit of {limit / MiB:.1f} MiB of images "
                f"on this server: you keep {have / MiB:.1f} MiB that your queued or running jobs need or that "
                f"you used in the last {self.keep_s / 60:g} minutes"
                + (f" (with {reserved / MiB:.1f} MiB of unfinished uploads)" if reserved else "")
                + ". Wait for your jobs to finish, use a smaller region, or ask the server's owner for a "
                "higher limit.",
                {"stored_bytes": have, "upload_bytes": need, "max_stored_bytes": limit}, status=413)
