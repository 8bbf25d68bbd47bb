"""Getting a recommended checkpoint: downloaded from the Hugging Face hub into the models
folder, with progress, resume, a SHA-256 check and cancel.

huggingface_hub does the hub's part: the file's address (:func:`hf_hub_url`, honouring
``HF_ENDPOINT``), its size and SHA-256 (:func:`get_hf_file_metadata`: a large file's ETag on
the hub is the SHA-256 of its content) and the transfer (:func:`http_get`, which asks for the
missing range when it resumes). The bytes go to ``<models>/.downloads/<file>.part``; an
interrupted or cancelled download leaves that file, and the next attempt goes on from its end.
A finished file is checked against the expected SHA-256 (the catalog's, the publisher's
file as released, pinned here; else the hub's) and only then moved into the models folder, in one rename: the models folder never
holds a half-written or unverified checkpoint. A mismatch deletes the download.

One file is downloaded by one process at a time: a download holds ``<file>.lock`` beside its
``.part`` (:class:`FileLock`: ``flock`` on POSIX, ``msvcrt.locking`` on Windows), so two
backends sharing a models folder, or a backend and ``analogon download``, never write the same
``.part``; the second waits, then finds the file there. Before it writes, a download checks
that the disk has room for what is missing (``needs N GB, M GB free``); a ``.part`` the disk
refuses to grow (full, over quota) is removed, not kept as a promise to resume.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import AnalogonError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
STAGING = ".downloads"
LOCK_POLL_S = 0.2  # how often a download waiting for another one's file looks again
KEEP_FINISHED_S = 600.0  # a finished download's state is kept this long for its client
KEEP_FINISHED = 50  # and at most this many


@dataclass(frozen=True)
class Recommended:
    id: str
    title: str
    repo_id: str
    filename: str
    family: str
    methods: tuple[str, ...]  # the methods it is recommended for (the papers' models)
    size_bytes: int  # about; the hub's figure is used when downloading
    sha256: str | None = None  # None: the hub's SHA-256 is the reference
    revision: str = "main"
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "methods": list(self.methods)}


CATALOG: tuple[Recommended, ...] = (
    Recommended("sd15", "Stable Diffusion 1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                "v1-5-pruned-emaonly.safetensors", "sd1", ("appearance", "dia"), 4_265_146_304,
                sha256="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
                note="Cross-Image Attention and Diffusion Image Analogies were published on SD 1.5."),
    Recommended("sd21", "Stable Diffusion 2.1 (768, v-prediction)", "stabilityai/stable-diffusion-2-1",
                "v2-1_768-ema-pruned.safetensors", "sd2", ("difference",), 5_200_000_000,
                sha256="dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
                note="Difference Inversion was published on SD 2.1."),
    Recommended("sdxl-base", "Stable Diffusion XL 1.0 base", "stabilityai/stable-diffusion-xl-base-1.0",
                "sd_xl_base_1.0.safetensors", "sdxl", ("pixels",), 6_938_078_334,
                sha256="31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
                note="PIXELS was published on SDXL (needs a GPU with 8 GB or more)."),
)


CATALOG_ENV = "ANALOGON_CATALOG"  # a JSON file of entries that replaces CATALOG


def catalog() -> list[Recommended]:
    """The recommended models: :data:`CATALOG`, or the entries of the JSON file that
    ``$ANALOGON_CATALOG`` names (a studio's mirror of them, or its own checkpoints; with
    ``HF_ENDPOINT`` for where they are served). Each entry has the fields of
    :class:`Recommended`; one without a ``sha256`` is checked against the hub's."""
    path = os.environ.get(CATALOG_ENV)
    if not path:
        return list(CATALOG)
    import json

    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
        return [Recommended(**{**r, "methods": tuple(r.get("methods", ()))}) for r in rows]
    except (OSError, ValueError, TypeError) as e:
        raise AnalogonError("bad_catalog", f"The catalogue {path} (${CATALOG_ENV}) cannot be read: "
                            f"{type(e).__name__}: {str(e)[:200]}.", status=500) from None


def find(entry_id: str) -> Recommended:
    entries = catalog()
    for e in entries:
        if e.id == entry_id:
            return e
    raise AnalogonError("unknown_download", f"No recommended model called {entry_id!r} "
                        f"(one of {', '.join(e.id for e in entries)}).", status=404)


class DownloadCancelled(Exception):
    pass


def verify(entry: Recommended, path: Path, progress: "ProgressFn | None" = None,
           cancel: threading.Event | None = None) -> dict[str, Any]:
    """Whether the file at ``path`` is the publisher's ``entry`` (its SHA-256 against the pinned
    one): {ok, sha256, expected, path, size_bytes}."""
    if not entry.sha256:
        raise AnalogonError("no_checksum", f"No SHA-256 is pinned for {entry.title}; there is nothing "
                            "to verify it against.", status=409)
    if not path.is_file():
        raise AnalogonError("model_not_found", f"{path} is not a file.", status=404)
    got = sha256_of(path, progress, cancel)
    return {"id": entry.id, "path": str(path), "size_bytes": path.stat().st_size, "sha256": got,
            "expected": entry.sha256, "ok": got == entry.sha256}


ProgressFn = Callable[[str, int, int], None]  # (stage, bytes done, total)


def _progress_class(progress: ProgressFn, cancel: threading.Event | None, total: int):
    """A tqdm for huggingface_hub's http_get that reports bytes and stops on cancel."""
    from tqdm.auto import tqdm

    class Progress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            progress("downloading", int(self.n), total)
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled()
            return out

    return Progress


def sha256_of(path: Path, progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress("verifying", done, total)
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled()
    return h.hexdigest()


def size_text(n: int) -> str:
    """Bytes in the decimal units disks are sold in: 512 B, 600.0 kB, 4.3 GB."""
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


# -- one file, one writer ---------------------------------------------------------------------

def _lock_fd(fd: int) -> bool:
    """Lock an open file exclusively without waiting; False when another holder has it."""
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock_fd(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class FileLock:
    """An exclusive lock on a file that holds across processes and threads (each holder opens
    the file itself; ``flock`` and ``msvcrt.locking`` locks belong to the open file). The holder
    removes the file as it lets go, so nothing is left behind; a waiter that then gets the lock
    of the removed file sees that it is no longer at its path and tries again. (Windows cannot
    remove an open file: there the lock file stays, empty.)"""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:  # its folder was removed in between: make it again
                continue
            try:
                locked = _lock_fd(fd)
                if locked and _is_at(fd, self.path):
                    self._fd = fd
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            if not locked:
                return False

    def acquire(self, cancel: threading.Event | None = None, waiting: Callable[[], None] | None = None) -> None:
        """Wait for the lock; ``waiting()`` is called while another holder has it, and a set
        ``cancel`` ends the wait with :class:`DownloadCancelled`."""
        while not self.try_acquire():
            if waiting is not None:
                waiting()
            if cancel is not None and cancel.wait(LOCK_POLL_S):
                raise DownloadCancelled()
            if cancel is None:
                time.sleep(LOCK_POLL_S)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        try:
            _unlock_fd(fd)
        finally:
            os.close(fd)


# -- one download -------------------------------------------------------------------------------

class _PartFile:
    """The ``.part`` file as ``http_get`` writes it: each write goes to the disk at once, and a
    write the disk refuses is remembered (told apart from a network failure)."""

    def __init__(self, f: io.BufferedWriter):
        self._f = f
        self.write_error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            n = self._f.write(data)
            self._f.flush()
            return n
        except OSError as e:
            self.write_error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def _check_space(models_dir: Path, need: int, filename: str) -> None:
    free = shutil.disk_usage(models_dir).free
    if need > free:
        raise AnalogonError("not_enough_space", f"Not enough space: {filename} needs {size_text(need)}, "
                            f"{size_text(free)} free in {models_dir}. Make room and start it again.",
                            {"needed_bytes": need, "free_bytes": free}, status=507)


def _refused_write(part: Path, models_dir: Path, filename: str, error: OSError) -> AnalogonError:
    """The error for a ``.part`` the disk would not grow, which is removed (not kept to resume)."""
    part.unlink(missing_ok=True)
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        free = shutil.disk_usage(models_dir).free
        return AnalogonError("disk_full", f"The disk filled up while {filename} was downloading "
                             f"({size_text(free)} free in {models_dir} now); the partial file was removed. "
                             "Make room and start it again.", {"free_bytes": free}, status=507)
    return AnalogonError("write_failed", f"{filename} could not be written ({error.strerror or error}); "
                         "the partial file was removed.", status=507)


def download(entry: Recommended, models_dir: Path, progress: ProgressFn | None = None,
             cancel: threading.Event | None = None, endpoint: str | None = None,
             token: str | None = None) -> Path:
    """Download one catalog entry into ``models_dir``; returns the final path. Raises
    :class:`DownloadCancelled` (the partial file stays for resuming) or AnalogonError. While
    another process or thread downloads the same file, waits (stage ``waiting``) for it."""
    progress = progress or (lambda stage, done, total: None)
    models_dir = Path(models_dir)
    final = models_dir / entry.filename
    if not final.exists():
        staging = models_dir / STAGING
        lock = FileLock(staging / (entry.filename + ".lock"))
        lock.acquire(cancel, lambda: progress("waiting", 0, 0))
        try:
            if not final.exists():  # not finished by the one this waited for
                _fetch(entry, models_dir, progress, cancel, endpoint, token)
        finally:
            lock.release()
            try:
                staging.rmdir()
            except OSError:  # a partial file, or another download's lock
                pass
    size = final.stat().st_size
    progress("done", size, size)
    return final


def _fetch(entry: Recommended, models_dir: Path, progress: ProgressFn, cancel: threading.Event | None,
           endpoint: str | None, token: str | None) -> None:
    """The transfer, the check and the rename into ``models_dir``, holding the file's lock."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get

    part = models_dir / STAGING / (entry.filename + ".part")
    progress("connecting", 0, 0)
    url = hf_hub_url(entry.repo_id, entry.filename, revision=entry.revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except Exception as e:  # offline, unknown repo, gated, ...
        raise AnalogonError("download_failed", f"Cannot reach {entry.repo_id} on the Hugging Face hub "
                            f"({type(e).__name__}: {str(e)[:200]}).", status=502) from None
    total = int(meta.size or 0)
    hub_sha = (meta.etag or "").strip('"').lower()
    expected = (entry.sha256 or (hub_sha if SHA256_RE.match(hub_sha) else "")).lower()
    if not expected:
        raise AnalogonError("no_checksum", f"The hub gives no SHA-256 for {entry.filename}; it is not "
                            "downloaded unverified.", status=502)
    if entry.sha256 and SHA256_RE.match(hub_sha) and hub_sha != expected:
        # The hub serves another file than the one the publisher released: say so before
        # gigabytes arrive only to be deleted.
        raise AnalogonError("checksum_mismatch", f"The hub's {entry.filename} is not the file the "
                            f"publisher released (SHA-256 {hub_sha[:12]}… instead of {expected[:12]}…); "
                            "it is not downloaded.", {"expected": expected, "hub": hub_sha}, status=502)
    have = part.stat().st_size if part.exists() else 0
    if total and have > total:  # not the file we started (the hub's changed): start again
        part.unlink()
        have = 0
    if total:
        _check_space(models_dir, total - have, entry.filename)
    if not total or have < total:
        refused: OSError | None = None
        with open(part, "ab") as f:
            out = _PartFile(f)
            try:
                http_get(meta.location or url, out, resume_size=have, expected_size=total or None,
                         headers={"authorization": f"Bearer {token}"} if token else None,
                         displayed_filename=entry.filename,
                         tqdm_class=_progress_class(progress, cancel, total))
            except DownloadCancelled:
                raise
            except Exception as e:
                if out.write_error is None:
                    raise AnalogonError("download_failed", f"The download of {entry.filename} stopped "
                                        f"({type(e).__name__}: {str(e)[:200]}); starting it again resumes it.",
                                        status=502) from None
                refused = out.write_error
        if refused is not None:
            raise _refused_write(part, models_dir, entry.filename, refused)
    got = sha256_of(part, progress, cancel)
    if got != expected:
        part.unlink(missing_ok=True)
        raise AnalogonError("checksum_mismatch", f"{entry.filename} arrived damaged (SHA-256 {got[:12]}… "
                            f"instead of {expected[:12]}…) and was deleted; download it again.",
                            {"expected": expected, "got": got}, status=502)
    os.replace(part, models_dir / entry.filename)


# -- running downloads in the server ---------------------------------------------------------------

@dataclass
class DownloadJob:
    id: str
    entry: Recommended
    status: str = "queued"  # queued | running | done | error | cancelled
    stage: str = ""
    bytes: int = 0
    total: int = 0
    path: str | None = None
    error: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None  # time.monotonic() when it ended
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        """Queued or running, and not asked to stop."""
        return self.status in ("queued", "running") and not self.cancel.is_set()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.entry.id, "status": self.status, "stage": self.stage,
                "bytes": self.bytes, "total": self.total, "path": self.path, "error": self.error}


class Downloads:
    """Downloads in background threads, at most one active per file: starting a file that is
    downloading returns that download, unless it was cancelled; then a new one starts (and waits
    for the cancelled one to let go of the file). A finished download is kept for
    ``keep_finished_s`` seconds, at most ``keep_finished`` of them; then its id is unknown.
    ``on_done()`` is called when a download has put its file in place."""

    def __init__(self, models_dir: Path, endpoint: str | None = None, on_done: Callable[[], Any] | None = None,
                 keep_finished_s: float = KEEP_FINISHED_S, keep_finished: int = KEEP_FINISHED):
        self.models_dir = Path(models_dir)
        self.endpoint = endpoint
        self.on_done = on_done
        self.keep_finished_s = keep_finished_s
        self.keep_finished = keep_finished
        self._jobs: dict[str, DownloadJob] = {}
        self._lock = threading.Lock()

    def start(self, entry_id: str) -> DownloadJob:
        entry = find(entry_id)
        with self._lock:
            self._expire()
            for job in self._jobs.values():
                if job.entry.filename == entry.filename and job.active:
                    return job
            job = DownloadJob(uuid.uuid4().hex[:12], entry)
            self._jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), name=f"analogon-download-{entry_id}", daemon=True).start()
        return job

    def _run(self, job: DownloadJob) -> None:
        job.status = "running"

        def progress(stage: str, done: int, total: int):
            job.stage, job.bytes = stage, done
            if total:
                job.total = total

        try:
            path = download(job.entry, self.models_dir, progress, job.cancel, endpoint=self.endpoint)
            job.path, job.status = str(path), "done"
        except DownloadCancelled:
            job.status = "cancelled"
        except AnalogonError as e:
            job.error, job.status = e.to_json(), "error"
        except Exception as e:  # pragma: no cover - reported, not raised in a thread
            job.error = {"code": "download_failed", "message": f"{type(e).__name__}: {e}", "detail": None}
            job.status = "error"
        finally:
            job.ended = time.monotonic()
        if job.status == "done" and self.on_done is not None:
            self.on_done()

    def _expire(self) -> None:
        """Forget finished downloads past their time or beyond the count (the lock is held)."""
        now = time.monotonic()
        finished = sorted((j for j in self._jobs.values() if j.ended is not None), key=lambda j: j.ended)
        excess = len(finished) - self.keep_finished
        for i, job in enumerate(finished):
            if i < excess or now - job.ended > self.keep_finished_s:
                del self._jobs[job.id]

    def get(self, job_id: str) -> DownloadJob:
        with self._lock:
            self._expire()
            job = self._jobs.get(job_id)
        if job is None:
            raise AnalogonError("download_not_found", f"No download {job_id!r}.", status=404)
        return job

    def cancel(self, job_id: str) -> DownloadJob:
        job = self.get(job_id)
        job.cancel.set()
        return job

    def stop_all(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
