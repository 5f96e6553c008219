"""Peak memory of a block of work: resident set size sampled by a thread, and CUDA peak allocation.

``ru_maxrss`` is the peak of the whole process so far and never goes down, so it cannot tell one
stage from the next; :class:`PeakMemory` samples ``/proc/self/statm`` instead (every ``interval_s``)
and, on CUDA, resets and reads ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import os
import resource
import threading
from types import TracebackType

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB = 1 << 20


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_rss`` (bytes) and ``m.peak_cuda`` (bytes or None)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_cuda: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss = max(self.peak_rss, current_rss_bytes())

    def __enter__(self) -> PeakMemory:
        self.peak_rss = current_rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss = max(self.peak_rss, current_rss_bytes())
        if torch.cuda.is_available():
            self.peak_cuda = int(torch.cuda.max_memory_allocated())

    def as_timings(self) -> dict[str, float]:
        """``{"peak_rss_mib": ..., ["peak_cuda_mib": ...]}`` for a stage manifest."""
        out = {"peak_rss_mib": self.peak_rss / MIB}
        if self.peak_cuda is not None:
            out["peak_cuda_mib"] = self.peak_cuda / MIB
        return out
