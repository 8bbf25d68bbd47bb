"""The job queue: one worker thread per device runs jobs in submission order.

Every job keeps its event history; subscribers (the SSE endpoint) get the history, then
live events, until a terminal event (done, error, cancelled). Cancel removes a queued job
at once and makes a running one stop at its next ``ctx.progress`` (once per denoising step).
A method that raises never stops the worker: AnalogonError becomes an ``error`` event with
its code, anything else ``internal_error`` with the exception's text.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .. import engine
from ..errors import AnalogonError, JobCancelled

log = logging.getLogger(__name__)

TERMINAL = ("done", "error", "cancelled")
PREVIEW_LONG_SIDE = 256


@dataclass
class Job:
    id: str
    prepared: engine.PreparedJob
    created: float = field(default_factory=time.time)
    status: str = "queued"
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    _seq: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    user_cancelled: bool = False
    _subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def method(self) -> str:
        return self.prepared.method.id

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def emit(self, kind: str, data: dict[str, Any]) -> bool:
        """Add an event; after a terminal event nothing more is added (returns False)."""
        with self._lock:
            if self.events and self.events[-1][1] in TERMINAL:
                return False
            self._seq += 1
            if kind == "preview":  # keep only the newest preview in the history
                self.events = [e for e in self.events if e[1] != "preview"]
            self.events.append((self._seq, kind, data))
            subs = list(self._subscribers)
        for loop, ev in subs:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # loop closed
                pass
        return True

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), ev))
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[1] is not ev]

    def events_after(self, seq: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Events with a sequence number above ``seq`` (numbers start at 1)."""
        with self._lock:
            return [e for e in self.events if e[0] > seq]

    def events_since(self, seq: int) -> list[tuple[int, str, dict[str, Any]]]:
        """What a subscriber that has read up to ``seq`` gets next: the events after it, or, when
        the job has ended and there are none, its terminal event again (so a stream resumed at or
        after the end ends at once)."""
        with self._lock:
            out = [e for e in self.events if e[0] > seq]
            if not out and self.events and self.events[-1][1] in TERMINAL:
                out = [self.events[-1]]
            return out

    def finish(self, status: str, kind: str, data: dict[str, Any]) -> bool:
        """End the job with a terminal event, unless it has ended already."""
        with self._lock:
            if self.events and self.events[-1][1] in TERMINAL:
                return False
            self.status = status
            if kind == "error":
                self.error = data
        return self.emit(kind, data)


def preview_png(rgb: np.ndarray) -> str:
    """A small base64 PNG: long side at most 256 pixels."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    im = Image.fromarray(np.ascontiguousarray(rgb))
    w, h = im.size
    s = min(1.0, PREVIEW_LONG_SIDE / max(w, h))
    if s < 1.0:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class JobQueue:
    """Jobs for one device. ``start()`` launches the worker thread; ``stop()`` ends it."""

    def __init__(self, store, models, cache, device_name: str = "cpu", keep_finished: int = 200):
        self.store = store
        self.models = models
        self.cache = cache
        self.device_name = device_name
        self.keep_finished = keep_finished
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"analogon-worker-{self.device_name}",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker. Every job that has not ended ends with an ``error`` event, code
        ``shutting_down`` (a running one is asked to stop at its next step first)."""
        with self._cond:
            self._stop = True
            running = self._running
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in queued:
            self._finish_shutdown(job)
        if running is not None:
            running.cancel_requested.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None
        for job in list(self.jobs.values()):
            if not job.finished:
                self._finish_shutdown(job)

    def _finish_shutdown(self, job: Job) -> None:
        job.finish("error", "error", {
            "code": "shutting_down", "detail": {"id": job.id},
            "message": "The backend stopped before the job finished; start it again and resubmit."})

    # -- queries ------------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise AnalogonError("job_not_found", "No job with this id (it may have been forgotten "
                                "after the server restarted).", {"id": job_id}, status=404)
        return job

    def position(self, job: Job) -> int | None:
        """How many jobs run before this one (0: it runs next); None when not queued."""
        with self._cond:
            if job.status != "queued":
                return None
            try:
                idx = self._queue.index(job)
            except ValueError:
                return None
            return idx + (1 if self._running is not None else 0)

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._running is not None else 0)

    def status_json(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {"id": job.id, "method": job.method, "status": job.status,
                               "model": job.prepared.model, "seed": job.prepared.seed}
        pos = self.position(job)
        if pos is not None:
            out["position"] = pos
        if job.result is not None:
            out["result"] = job.result
        if job.error is not None:
            out["error"] = job.error
        return out

    # -- commands -----------------------------------------------------------------------
    def submit(self, prepared: engine.PreparedJob) -> Job:
        job = Job(id=uuid.uuid4().hex, prepared=prepared)
        with self._cond:
            if self._stop:
                raise AnalogonError("shutting_down", "The backend is shutting down.", status=503)
            self.jobs[job.id] = job
            self._queue.append(job)
            position = len(self._queue) - 1 + (1 if self._running is not None else 0)
            job.emit("queued", {"id": job.id, "position": position})
            self._forget_old()
            self._cond.notify_all()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.user_cancelled = True
        with self._cond:
            if job.status == "queued" and job in self._queue:
                self._queue.remove(job)
                self._finish_cancelled(job)
                return job
        if job.status == "running":
            job.cancel_requested.set()
        return job

    def _finish_cancelled(self, job: Job) -> None:
        if self._stop and not job.user_cancelled:
            return self._finish_shutdown(job)
        job.finish("cancelled", "cancelled", {"id": job.id})

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished]
        for j in finished[: max(0, len(finished) - self.keep_finished)]:
            self.jobs.pop(j.id, None)

    # -- the worker ---------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                self._running = job
                job.status = "running"
            try:
                self._run(job)
            except BaseException:  # pragma: no cover - _run reports everything itself
                log.exception("worker: unexpected failure")
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        p = job.prepared
        job.emit("started", {"id": job.id, "model": p.model})
        last_preview = [0.0]

        def progress(stage: str, step: int | None, total: int | None) -> None:
            job.emit("progress", {"stage": stage, "step": step, "total": total})

        def preview(rgb: np.ndarray, step: int | None) -> None:
            now = time.perf_counter()
            if now - last_preview[0] < 0.2:  # at most five previews a second
                return
            last_preview[0] = now
            try:
                job.emit("preview", {"png": preview_png(rgb), "step": step})
            except Exception:  # a bad preview is not worth failing a job
                log.exception("preview failed")

        try:
            res = engine.execute(p, source=self.store, models=self.models, cache=self.cache,
                                 progress=progress, preview=preview,
                                 cancelled=job.cancel_requested.is_set)
            stored = []
            for i, img in enumerate(res.images):
                s = self.store.put_array(img.rgba)
                entry = {**s.to_json(), "label": img.label or f"{p.method.id} {res.seed}"
                         + (f" #{i + 1}" if len(res.images) > 1 else "")}
                if img.layer is not None:  # only the change: alpha 0 where nothing may change
                    entry["layer"] = self.store.put_array(img.layer).to_json()
                stored.append(entry)
            if job.cancel_requested.is_set():
                raise JobCancelled()
            job.result = {"images": stored, "seed": res.seed, "params": res.params,
                          "model": res.model, "info": res.info, "timings": res.timings}
            if not job.finish("done", "done", job.result):
                job.result = None  # ended meanwhile (the server is stopping)
        except JobCancelled:
            self._finish_cancelled(job)
        except AnalogonError as e:
            job.finish("error", "error", e.to_json())
        except Exception as e:  # MemoryError included
            oom = out_of_memory_error(e, self.device_name)
            if oom is not None:
                log.warning("job %s (%s) ran out of memory: %s", job.id, p.method.id, e)
                job.finish("error", "error", oom)
                return
            log.error("job %s (%s) failed:\n%s", job.id, p.method.id, traceback.format_exc())
            job.finish("error", "error", {
                "code": "internal_error", "detail": {"exception": type(e).__name__},
                "message": f"The {p.method.title} method failed: {type(e).__name__}: {e}"})
        finally:
            _free_accelerator_memory()


OUT_OF_MEMORY_MESSAGE = (
    "The GPU ran out of memory. In the docker's settings (\u2699 \u25b8 Memory), choose a smaller "
    "memory preset (\u2264 6 GB turns on CPU offload and VAE tiling) or a lower \u201cMax working "
    "pixels\u201d, and restart the backend; or use a smaller region, fewer exemplars or fewer steps. "
    "(Command line: analogon serve --memory-preset low, or --cpu-offload --vae-tiling --max-pixels N.)")


_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory",
              "defaultcpuallocator", "failed to allocate")


def out_of_memory_error(e: BaseException, device: str = "") -> dict[str, Any] | None:
    """The ``out_of_memory`` error for an allocation failure (CPU ``MemoryError``, CUDA or MPS
    out of memory, PyTorch's CPU allocator), else None."""
    text = str(e).lower()
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and any(t in text for t in _OOM_TEXTS))):
        return None
    where = "GPU" if (type(e).__name__ == "OutOfMemoryError" or "cuda" in text or "mps" in text) else "computer"
    return {"code": "out_of_memory", "detail": {"exception": type(e).__name__, "device": device or None},
            "message": OUT_OF_MEMORY_MESSAGE if where == "GPU" else
                       "The computer ran out of memory. Try a smaller region, fewer exemplars or fewer "
                       "steps, a lower \u201cMax working pixels\u201d in the docker's settings "
                       "(\u2699 \u25b8 Memory), or close other programs."}


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass
