"""The job queue: one worker thread per device, all drawing from one queue.

Each job has an owner (a painter's name, or None for the backend's own token). The next job
is picked round-robin between owners: the owners with queued jobs take turns, each in the
order it submitted, so a painter with five queued jobs makes another painter's single job
wait behind one of them at most, not all five. With one owner this is submission order.
Several workers (``--devices cuda:0,cuda:1``) each keep their own models (one ModelManager
per device: no module is shared between devices) and take the next job when they are free.

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
from typing import Any, Callable

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
    owner: str | None = None  # the painter who submitted it; None: the backend's own token
    created: float = field(default_factory=time.time)
    worker: int | None = None  # the worker that took it, once it started
    device: str | None = None
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

    def image_ids(self) -> set[str]:
        """The images the job reads."""
        return {r.sha for v in self.prepared.refs.values() for r in (v if isinstance(v, list) else [v])}

    def result_ids(self) -> set[str]:
        out: set[str] = set()
        for im in (self.result or {}).get("images", []):
            out.add(im.get("sha"))
            if isinstance(im.get("layer"), dict):
                out.add(im["layer"].get("sha"))
        out.discard(None)
        return out

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


ANYONE = object()  # get/list as the backend's own token: every owner's jobs


class Worker:
    """One worker thread: a device and the models loaded on it."""

    def __init__(self, index: int, device: str, models):
        self.index = index
        self.device = device
        self.models = models
        self.thread: threading.Thread | None = None
        self.running: Job | None = None
        self.jobs_run = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.index, "device": self.device, "busy": self.running is not None,
                "jobs_run": self.jobs_run}


class JobQueue:
    """Jobs for one or more devices. ``start()`` launches the workers; ``stop()`` ends them.

    ``workers``: ``[(device name, ModelManager), ...]``; absent: one worker on ``device_name``
    with ``models``. ``is_active(owner)`` says whether an owner's jobs may still run (a revoked
    painter's queued jobs end with ``token_revoked`` when their turn comes)."""

    def __init__(self, store, models, cache, device_name: str = "cpu", keep_finished: int = 200,
                 workers: list[tuple[str, Any]] | None = None,
                 is_active: Callable[[str | None], bool] | None = None):
        self.store = store
        self.cache = cache
        self.workers = [Worker(i, str(d), m) for i, (d, m) in enumerate(workers or [(device_name, models)])]
        self.models = self.workers[0].models
        self.device_name = self.workers[0].device
        self.keep_finished = keep_finished
        self.is_active = is_active
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        # owner -> its queued jobs; the order of the owners is the order of their turns
        self._queues: OrderedDict[str | None, deque[Job]] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if len(self.workers) > 1 and any(w.thread is None for w in self.workers):
            from .workers import preimport

            preimport()  # before several threads first reach the libraries' lazy imports
        for w in self.workers:
            if w.thread is None:
                w.thread = threading.Thread(target=self._work, args=(w,), daemon=True,
                                            name=f"analogon-worker-{w.index}-{w.device}")
                w.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers. Every job that has not ended ends with an ``error`` event, code
        ``shutting_down`` (a running one is asked to stop at its next step first)."""
        with self._cond:
            self._stop = True
            running = [w.running for w in self.workers if w.running is not None]
            queued = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._cond.notify_all()
        for job in queued:
            self._finish_shutdown(job)
        for job in running:
            job.cancel_requested.set()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))
                if not w.thread.is_alive():
                    w.thread = None
        for job in list(self.jobs.values()):
            if not job.finished:
                self._finish_shutdown(job)

    def _finish_shutdown(self, job: Job) -> None:
        job.finish("error", "error", {
            "code": "shutting_down", "detail": {"id": job.id},
            "message": "The backend stopped before the job finished; start it again and resubmit."})

    # -- queries ------------------------------------------------------------------------
    def get(self, job_id: str, owner: Any = ANYONE) -> Job:
        """The job, if ``owner`` may see it (ANYONE: the backend's own token sees every job); a
        job of another owner answers exactly as an unknown id."""
        job = self.jobs.get(job_id)
        if job is None or (owner is not ANYONE and job.owner != owner):
            raise AnalogonError("job_not_found", "No job with this id (it may have been forgotten "
                                "after the server restarted).", {"id": job_id}, status=404)
        return job

    def list(self, owner: Any = ANYONE) -> list[Job]:
        """The remembered jobs ``owner`` may see, oldest first."""
        with self._cond:
            return [j for j in self.jobs.values() if owner is ANYONE or j.owner == owner]

    def _running_count(self) -> int:
        return sum(1 for w in self.workers if w.running is not None)

    def _pick_order(self) -> list[Job]:
        """The queued jobs in the order the workers will take them (call with the lock held):
        round by round, each owner's next job in the order of the owners' turns."""
        queues = [list(q) for q in self._queues.values()]
        order, depth = [], 0
        while True:
            row = [q[depth] for q in queues if len(q) > depth]
            if not row:
                return order
            order.extend(row)
            depth += 1

    def position(self, job: Job) -> int | None:
        """How many jobs run before this one (those running, and those queued that will be
        taken first; 0: it runs next); None when not queued."""
        with self._cond:
            if job.status != "queued":
                return None
            q = self._queues.get(job.owner)
            if q is None or job not in q:
                return None
            return self._pick_order().index(job) + self._running_count()

    def queue_length(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values()) + self._running_count()

    def active_count(self, owner: str | None) -> int:
        """``owner``'s jobs that are queued or running."""
        with self._cond:
            return len(self._queues.get(owner, ())) + sum(
                1 for w in self.workers if w.running is not None and w.running.owner == owner)

    def pinned_images(self) -> set[str]:
        """The images that queued or running jobs read."""
        with self._cond:
            jobs = [j for q in self._queues.values() for j in q]
            jobs += [w.running for w in self.workers if w.running is not None]
        out: set[str] = set()
        for j in jobs:
            out |= j.image_ids()
        return out

    def results_visible_to(self, owner: str | None, sha: str) -> bool:
        """Whether ``sha`` is a result of one of ``owner``'s remembered jobs."""
        with self._cond:
            jobs = [j for j in self.jobs.values() if j.owner == owner and j.result is not None]
        return any(sha in j.result_ids() for j in jobs)

    def workers_json(self) -> list[dict[str, Any]]:
        with self._cond:
            return [w.to_json() for w in self.workers]

    def status_json(self, job: Job) -> dict[str, Any]:
        out: dict[str, Any] = {"id": job.id, "method": job.method, "status": job.status,
                               "model": job.prepared.model, "seed": job.prepared.seed, "owner": job.owner}
        pos = self.position(job)
        if pos is not None:
            out["position"] = pos
        if job.worker is not None:
            out["worker"] = job.worker
            out["device"] = job.device
        if job.result is not None:
            out["result"] = job.result
        if job.error is not None:
            out["error"] = job.error
        return out

    # -- commands -----------------------------------------------------------------------
    def submit(self, prepared: engine.PreparedJob, owner: str | None = None,
               max_active: int | None = None) -> Job:
        """Queue a job for ``owner``; ``429 too_many_jobs`` when ``owner`` already has
        ``max_active`` jobs queued or running."""
        job = Job(id=uuid.uuid4().hex, prepared=prepared, owner=owner)
        with self._cond:
            if self._stop:
                raise AnalogonError("shutting_down", "The backend is shutting down.", status=503)
            if max_active is not None:
                active = len(self._queues.get(owner, ())) + sum(
                    1 for w in self.workers if w.running is not None and w.running.owner == owner)
                if active >= max_active:
                    raise AnalogonError(
                        "too_many_jobs", f"You have {active} jobs queued or running on this server, the most "
                        f"you may have ({max_active}). Wait for one to finish, or cancel one, then submit "
                        "again.", {"active": active, "max_queued": max_active}, status=429)
            self.jobs[job.id] = job
            q = self._queues.get(owner)
            if q is None:  # an owner with nothing queued takes its turn after those waiting
                q = self._queues[owner] = deque()
            q.append(job)
            position = self._pick_order().index(job) + self._running_count()
            job.emit("queued", {"id": job.id, "position": position})
            self._forget_old()
            self._cond.notify()
        return job

    def cancel(self, job_id: str, owner: Any = ANYONE) -> Job:
        job = self.get(job_id, owner)
        job.user_cancelled = True
        with self._cond:
            q = self._queues.get(job.owner)
            if job.status == "queued" and q is not None and job in q:
                q.remove(job)
                if not q:
                    del self._queues[job.owner]
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

    # -- the workers --------------------------------------------------------------------
    def _take(self) -> Job:
        """The next job, round-robin between owners (call with the lock held, queues not empty)."""
        owner, q = next(iter(self._queues.items()))
        job = q.popleft()
        if q:
            self._queues.move_to_end(owner)  # its next job waits for the others' turns
        else:
            del self._queues[owner]
        return job

    def _work(self, w: Worker) -> None:
        _use_device(w.device)
        while True:
            with self._cond:
                while not self._queues and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._take()
                if self.is_active is not None and not self.is_active(job.owner):
                    job.finish("error", "error", {
                        "code": "token_revoked", "detail": {"id": job.id, "owner": job.owner},
                        "message": "The token of the painter who queued this job was revoked before "
                                   "it ran; it was not run."})
                    continue
                w.running = job
                job.status = "running"
                job.worker = w.index
                job.device = w.device
            try:
                self._run(job, w)
            except BaseException:  # pragma: no cover - _run reports everything itself
                log.exception("worker: unexpected failure")
            finally:
                with self._cond:
                    w.running = None
                    w.jobs_run += 1

    def _run(self, job: Job, worker: Worker | None = None) -> None:
        worker = worker or self.workers[0]
        p = job.prepared
        job.emit("started", {"id": job.id, "model": p.model, "worker": worker.index, "device": worker.device})
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
            res = engine.execute(p, source=self.store, models=worker.models, cache=self.cache,
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
            oom = out_of_memory_error(e, worker.device)
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


def _use_device(device: str) -> None:
    """A worker thread on ``cuda:N`` makes it its current device (what a method allocates
    without naming a device lands there)."""
    try:
        import torch

        d = torch.device(device)
        if d.type == "cuda" and d.index is not None and torch.cuda.is_available():
            torch.cuda.set_device(d)
    except Exception:  # pragma: no cover
        log.exception("cannot make %s the worker's device", device)
