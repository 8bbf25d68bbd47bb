"""One measured run for the benchmark tables: wall and CPU time, true peak memory, model calls.

``measure(bundle, fn)`` runs ``fn()`` once and returns a row:

- ``wall_s`` and ``cpu_s`` (this process's CPU seconds: steadier than wall time when other work
  shares the machine; with one torch thread per arm, CPU-time ratios are the figures to compare);
- peak memory (``core``: see ``_memory.PeakMemory``): on CUDA the allocator's peak above what was
  allocated before (``peak_mem_mb``) and the peak of everything allocated (``peak_alloc_mb``,
  weights included); on CPU the resident set's high-water mark above the start (``peak_mem_mb``,
  after returning freed heap to the system so that reused memory is not hidden) and the process's
  whole peak (``peak_rss_mb``, weights included);
- previews: how many the job sent (``previews``), the seconds they took (``preview_s``: the
  projection and the listener's PNG) and their share of the job's wall time (``preview_pct``);
- model calls made by the measured block's own thread (a background preview fit's are not the
  job's): ``unet_calls`` / ``unet_elems`` (batch elements through the UNet), ``vae_enc`` /
  ``vae_dec`` (calls; elements in ``vae_enc_elems`` / ``vae_dec_elems``), and the seconds spent
  inside each (``unet_s``, ``vae_enc_s``, ``vae_dec_s``; CPU seconds on CPU, wall on CUDA);
- the machine's load: the 1-minute load average when the run started and ended (``load_1m``, their
  mean): a ratio measured while the machine was busy says so beside it.

:func:`interleaved` runs several cases A B A B … (medians per case, :func:`summary`), so that a
change of the machine's load during the measurement hits every case alike.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable

from ._memory import PeakMemory


class Calls:
    """Counts (and times) calls of the bundle's UNet forward and VAE encode/decode while active,
    made by the thread that entered it (other threads' calls, e.g. a preview fit, are not its)."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.cuda = bundle.device.type == "cuda"
        self.thread = threading.get_ident()
        self.n = {"unet_calls": 0, "unet_elems": 0, "vae_enc": 0, "vae_enc_elems": 0,
                  "vae_dec": 0, "vae_dec_elems": 0}
        self.s = {"unet_s": 0.0, "vae_enc_s": 0.0, "vae_dec_s": 0.0}
        self._undo: list[Callable[[], None]] = []
        self._depth = 0

    def _clock(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()

    def __enter__(self) -> "Calls":
        unet, vae = self.bundle.unet, self.bundle.vae
        stamp: list[float] = []

        def pre(_m, args, kwargs):
            if threading.get_ident() != self.thread:
                return
            x = args[0] if args else kwargs.get("sample")
            self.n["unet_calls"] += 1
            self.n["unet_elems"] += int(x.shape[0]) if x is not None else 0
            stamp.append(self._clock())

        def post(_m, _args, _kwargs, _out):
            if stamp and threading.get_ident() == self.thread:
                self.s["unet_s"] += self._clock() - stamp.pop()

        h1 = unet.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = unet.register_forward_hook(post, with_kwargs=True)
        self._undo += [h1.remove, h2.remove]
        for name, key in (("encode", "vae_enc"), ("decode", "vae_dec")):
            orig = getattr(vae, name)

            def wrapped(x, *a, _orig=orig, _key=key, **kw):
                if threading.get_ident() != self.thread:
                    return _orig(x, *a, **kw)
                self.n[_key] += 1
                self.n[_key + "_elems"] += int(x.shape[0])
                t = self._clock()
                try:
                    return _orig(x, *a, **kw)
                finally:
                    self.s[_key + "_s"] += self._clock() - t

            setattr(vae, name, wrapped)
            self._undo.append(lambda name=name: vae.__dict__.pop(name, None))
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def row(self) -> dict[str, Any]:
        return {**self.n, **{k: round(v, 3) for k, v in self.s.items()}}


@contextmanager
def counting(bundle):
    with Calls(bundle) as c:
        yield c


def measure(bundle, fn: Callable[[], Any], memory: bool = True) -> tuple[dict[str, Any], Any]:
    """Run ``fn`` once; (row, its return value)."""
    import torch

    def sync():
        if bundle.device.type == "cuda":
            torch.cuda.synchronize()

    mem = PeakMemory(bundle.device, python=False) if memory else None
    load0 = load_average()
    with Calls(bundle) as calls, preview_cost() as pc:
        if mem is not None:
            mem.__enter__()
        try:
            sync()
            t, c = time.perf_counter(), time.process_time()
            out = fn()
            sync()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
        finally:
            if mem is not None:
                mem.__exit__(None, None, None)
    row: dict[str, Any] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
    if load0 is not None:
        row["load_1m"] = round((load0 + (load_average() or load0)) / 2, 2)
    if mem is not None:
        row.update({k: round(v, 1) for k, v in mem.as_row().items()})
    row.update(calls.row())
    row.update(previews=pc["previews"], preview_s=pc["preview_s"],
               preview_pct=round(100 * pc["preview_s"] / wall, 3) if wall > 0 else None)
    return row, out


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def interleaved(cases: list[tuple[str, Callable[[], Any]]], repeat: int, run_one,
                warmup: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Each case ``repeat`` times, interleaved (A B A B …) after one warm-up round: case name ->
    its rows, ``run_one(fn)`` measuring one run (e.g. ``lambda fn: measure(bundle, fn)[0]``)."""
    if warmup:
        for _, fn in cases:
            fn()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cases}
    for _ in range(max(1, repeat)):
        for name, fn in cases:
            runs[name].append(run_one(fn))
    return runs


def summary(rows: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the rows that have it."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def load_columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The machine's load over a case's runs: ``load_1m`` (median) and ``load_max``."""
    vals = [r["load_1m"] for r in rows if r.get("load_1m") is not None]
    return {"load_1m": round(statistics.median(vals), 2), "load_max": round(max(vals), 2)} if vals else {}


def ratios(rows: list[dict[str, Any]], base: dict[str, Any], keys=("cpu_s", "wall_s")) -> None:
    """Add ``<key>_ratio`` (row / base) to every row, in place."""
    for r in rows:
        for k in keys:
            if r.get(k) is not None and base.get(k):
                r[k.replace("_s", "") + "_ratio"] = round(r[k] / base[k], 3)


def listener(rgb, step) -> None:
    """A preview listener that does what the server does with each preview (a PNG for the
    event stream), so that a bench job pays what a served job pays."""
    from ..server.jobs import preview_png

    preview_png(rgb)


def resident(bundle) -> None:
    """Read every weight once. Folders load memory-mapped: a weight enters the resident set when
    first touched, so without this the first measured run would count the model's pages
    (gigabytes at full size) as its own peak."""
    import torch

    with torch.no_grad():
        for m in (bundle.unet, bundle.vae, bundle.text_encoder, bundle.text_encoder_2):
            if m is not None:
                for t in list(m.parameters()) + list(m.buffers()):
                    t.sum()


def fit_previews(bundle) -> dict[str, Any]:
    """At model load: the weights made resident (:func:`resident`), and the latent preview fitted
    once for the bundle's VAE; the fit's cost and error."""
    from ..core import previews as P
    from ..server import jobs  # noqa: F401  (imported once here, not inside the first preview)

    resident(bundle)
    c = time.process_time()
    p = P.previewer(bundle)
    return {"preview_fit_cpu_s": round(time.process_time() - c, 3),
            "preview_fit_error": round(p.error, 2), "preview_const_error": round(p.baseline_error, 2)}


@contextmanager
def preview_cost():
    """``with preview_cost() as pc:`` then ``pc["previews"]``, ``pc["preview_s"]``: the previews
    made inside the block and the seconds they took (projection + listener)."""
    from ..core import previews as P

    n0, s0 = P.STATS["previews"], P.STATS["seconds"]
    box: dict[str, Any] = {}
    try:
        yield box
    finally:
        box["previews"] = P.STATS["previews"] - n0
        box["preview_s"] = round(P.STATS["seconds"] - s0, 4)
