"""Getting a recommended checkpoint: downloaded from the Hugging Face hub into the models
folder, with progress, resume, a SHA-256 check and cancel.

huggingface_hub does the hub's part: the file's address (:func:`hf_hub_url`, honouring
``HF_ENDPOINT``), its size and SHA-256 (:func:`get_hf_file_metadata`: a large file's ETag on
the hub is the SHA-256 of its content) and the transfer (:func:`http_get`, which asks for the
missing range when it resumes). The bytes go to ``<models>/.downloads/<file>.part``; an
interrupted or cancelled download leaves that file, and the next attempt goes on from its end.
A finished file is checked against the expected SHA-256 (the catalog's when it has one, else
the hub's) and only then moved into the models folder, in one rename: the models folder never
holds a half-written or unverified checkpoint. A mismatch deletes the download.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import AnalogonError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
STAGING = ".downloads"


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
                "v1-5-pruned-emaonly.safetensors", "sd1", ("appearance", "dia"), 4_300_000_000,
                note="Cross-Image Attention and Diffusion Image Analogies were published on SD 1.5."),
    Recommended("sd21", "Stable Diffusion 2.1 (768, v-prediction)", "stabilityai/stable-diffusion-2-1",
                "v2-1_768-ema-pruned.safetensors", "sd2", ("difference",), 5_200_000_000,
                note="Difference Inversion was published on SD 2.1."),
    Recommended("sdxl-base", "Stable Diffusion XL 1.0 base", "stabilityai/stable-diffusion-xl-base-1.0",
                "sd_xl_base_1.0.safetensors", "sdxl", ("pixels",), 6_900_000_000,
                note="PIXELS was published on SDXL (needs a GPU with 8 GB or more)."),
)


def catalog() -> list[Recommended]:
    return list(CATALOG)


def find(entry_id: str) -> Recommended:
    for e in CATALOG:
        if e.id == entry_id:
            return e
    raise AnalogonError("unknown_download", f"No recommended model called {entry_id!r} "
                        f"(one of {', '.join(e.id for e in CATALOG)}).", status=404)


class DownloadCancelled(Exception):
    pass


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


def download(entry: Recommended, models_dir: Path, progress: ProgressFn | None = None,
             cancel: threading.Event | None = None, endpoint: str | None = None,
             token: str | None = None) -> Path:
    """Download one catalog entry into ``models_dir``; returns the final path. Raises
    :class:`DownloadCancelled` (the partial file stays for resuming) or AnalogonError."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get

    progress = progress or (lambda stage, done, total: None)
    models_dir = Path(models_dir)
    final = models_dir / entry.filename
    if final.exists():
        progress("done", final.stat().st_size, final.stat().st_size)
        return final
    staging = models_dir / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    part = staging / (entry.filename + ".part")
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
    have = part.stat().st_size if part.exists() else 0
    if total and have > total:  # not the file we started (the hub's changed): start again
        part.unlink()
        have = 0
    if not total or have < total:
        with open(part, "ab") as f:
            try:
                http_get(meta.location or url, f, resume_size=have, expected_size=total or None,
                         headers={"authorization": f"Bearer {token}"} if token else None,
                         displayed_filename=entry.filename,
                         tqdm_class=_progress_class(progress, cancel, total))
            except DownloadCancelled:
                raise
            except Exception as e:
                raise AnalogonError("download_failed", f"The download of {entry.filename} stopped "
                                    f"({type(e).__name__}: {str(e)[:200]}); starting it again resumes it.",
                                    status=502) from None
    got = sha256_of(part, progress, cancel)
    if got != expected:
        part.unlink(missing_ok=True)
        raise AnalogonError("checksum_mismatch", f"{entry.filename} arrived damaged (SHA-256 {got[:12]}… "
                            f"instead of {expected[:12]}…) and was deleted; download it again.",
                            {"expected": expected, "got": got}, status=502)
    os.replace(part, final)
    try:
        staging.rmdir()
    except OSError:
        pass
    progress("done", total or final.stat().st_size, total or final.stat().st_size)
    return final


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
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.entry.id, "status": self.status, "stage": self.stage,
                "bytes": self.bytes, "total": self.total, "path": self.path, "error": self.error}


class Downloads:
    """Downloads in background threads, one per catalog entry at a time."""

    def __init__(self, models_dir: Path, endpoint: str | None = None):
        self.models_dir = Path(models_dir)
        self.endpoint = endpoint
        self._jobs: dict[str, DownloadJob] = {}
        self._lock = threading.Lock()

    def start(self, entry_id: str) -> DownloadJob:
        entry = find(entry_id)
        with self._lock:
            for job in self._jobs.values():
                if job.entry.id == entry_id and job.status in ("queued", "running"):
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

    def get(self, job_id: str) -> DownloadJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise AnalogonError("download_not_found", f"No download {job_id!r}.", status=404)
        return job

    def cancel(self, job_id: str) -> DownloadJob:
        job = self.get(job_id)
        job.cancel.set()
        return job

    def stop_all(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel.set()
