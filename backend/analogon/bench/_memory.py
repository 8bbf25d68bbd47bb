"""Peak memory of a block of work, for the benchmark tables: what the process or the CUDA
allocator really reaches.

On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the block
(``peak_mem_mb``), and the allocator's whole peak (``peak_alloc_mb``: weights included).

On the CPU, torch's tensors are invisible to tracemalloc and freed memory usually stays in the
process (glibc keeps it for reuse), so "resident-set growth" alone hides a block that only reuses
memory freed earlier (`bench dia` once read 48 MB for a step whose true peak was 2 GB). Before
the block the heap's free memory is returned to the system (``malloc_trim``) and the kernel's
high-water mark of the resident set is reset (``/proc/self/clear_refs``); after it, the mark
(``VmHWM``) is read: ``peak_mem_mb`` = that peak above the resident set at the start (what the
block needed beyond the weights and everything else already there), ``peak_rss_mb`` = the process's
whole peak (weights included). Where the mark cannot be reset, a thread sampling the resident set
every millisecond stands in. tracemalloc's peak for Python/numpy allocations is ``py_peak_mb``.
"""
from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
import tracemalloc

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover
        return 0


def _hwm() -> int | None:
    """The resident set's high-water mark (VmHWM) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Garbage-collect and hand the C heap's free pages back to the system (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb`` (and ``m.rss_peak_mb`` /
    ``m.py_peak_mb`` on CPU, ``m.alloc_peak_mb`` on CUDA)."""

    def __init__(self, device, interval: float = 0.001, python: bool = True):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.interval = interval
        self.python = python
        self.peak_mb = 0.0
        self.rss_peak_mb: float | None = None
        self.alloc_peak_mb: float | None = None
        self.py_peak_mb: float | None = None
        self._peak = 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        release_free_memory()
        self._hwm_ok = _reset_hwm() and _hwm() is not None
        if self.python:
            tracemalloc.start()
        self._base = _rss()
        self._peak = self._base
        self._thread = None
        if not self._hwm_ok:  # the kernel's mark is exact and free; sampling only without it
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.peak_mb = (peak - self._base) / 2**20
            self.alloc_peak_mb = peak / 2**20
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = max(self._peak, _rss())
        if self._hwm_ok:
            peak = max(peak, _hwm() or 0)
        self.peak_mb = max(0, peak - self._base) / 2**20
        self.rss_peak_mb = peak / 2**20
        if self.python:
            _, py_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            self.py_peak_mb = py_peak / 2**20

    def as_row(self) -> dict[str, float]:
        row = {"peak_mem_mb": self.peak_mb}
        if self.rss_peak_mb is not None:
            row["peak_rss_mb"] = self.rss_peak_mb
        if self.alloc_peak_mb is not None:
            row["peak_alloc_mb"] = self.alloc_peak_mb
        if self.py_peak_mb is not None:
            row["py_peak_mb"] = self.py_peak_mb
        return row
