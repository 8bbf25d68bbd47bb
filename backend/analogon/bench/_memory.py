"""Peak memory of a block of work, for the benchmark tables.

On CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the block. On the
CPU: growth of the resident set size, sampled every millisecond (/proc on Linux, where reading
it is cheapest; psutil elsewhere) (torch's CPU tensors
are invisible to tracemalloc), plus tracemalloc's peak for Python/numpy allocations.
"""
from __future__ import annotations

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


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb`` (and ``m.py_peak_mb`` on CPU)."""

    def __init__(self, device, interval: float = 0.001):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.interval = interval
        self.peak_mb = 0.0
        self.py_peak_mb: float | None = None
        self._peak = 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss() - self._base)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        tracemalloc.start()
        self._base = _rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss() - self._base)
        _, py_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.peak_mb = self._peak / 2**20
        self.py_peak_mb = py_peak / 2**20

    def as_row(self) -> dict[str, float]:
        row = {"peak_mem_mb": self.peak_mb}
        if self.py_peak_mb is not None:
            row["py_peak_mb"] = self.py_peak_mb
        return row
