"""The one place that measures a request: timers and peak memory, each named by its source.

CUDA: ``torch.cuda.max_memory_allocated`` after a per-request reset (allocator truth).
CPU: there is no allocator counter for host tensors, so a thread samples the process's
resident set size from ``/proc/self/statm`` every ``interval_s`` during the request and keeps
the maximum; ``memory_source`` says exactly that. Short spikes between samples can be missed.

Requests that share a batch share the process: :class:`SharedPeakMeter` gives each one the peak
of the whole process over its own lifetime (one sampler thread for all; on CUDA the allocator's
peak per scheduler step), and its ``memory_source`` says that it is the whole process's.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")


def process_rss_bytes() -> int:
    """Resident set size of this process right now (Linux ``/proc``; 0 where unavailable)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def elapsed_ms(start: float, end: float | None = None) -> float:
    return ((time.perf_counter() if end is None else end) - start) * 1000.0


class PeakMemoryMeter:
    """Context manager: peak memory over the block, from the allocator or an RSS sampler."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        if self.device.type == "cuda":
            return "cuda:max_memory_allocated"
        return f"cpu:process_rss_peak_sampled_{self.interval_s * 1000:g}ms"

    def __enter__(self) -> PeakMemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self.baseline_bytes = self.peak_bytes = process_rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, process_rss_bytes())

    def sample_now(self) -> None:
        """Take one reading at a known high point (e.g. right after prefill)."""
        if self.device.type != "cuda":
            self.peak_bytes = max(self.peak_bytes, process_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self.sample_now()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class PeakWatch:
    """The peak one request saw, from a :class:`SharedPeakMeter`; ``shared_with``: the most other
    requests that were open at the same time."""

    def __init__(self, baseline_bytes: int) -> None:
        self.baseline_bytes = self.peak_bytes = baseline_bytes
        self.shared_with = 0

    def see(self, value: int, others: int) -> None:
        self.peak_bytes = max(self.peak_bytes, value)
        self.shared_with = max(self.shared_with, others)


class SharedPeakMeter:
    """Peak memory for requests that overlap (a continuous batch): every open watch takes the
    process-wide readings made while it is open. CPU: RSS sampled every ``interval_s`` by one thread
    while any watch is open, plus a reading per :meth:`sample_now`. CUDA: at each
    :meth:`sample_now` (once per scheduler step), the allocator's peak since the previous one."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self._watches: list[PeakWatch] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        if self.device.type == "cuda":
            return "cuda:max_memory_allocated_per_step"
        return f"cpu:process_rss_peak_sampled_{self.interval_s * 1000:g}ms"

    def source_for(self, watch: PeakWatch) -> str:
        """Names what the peak measures; a request that shared the engine is told so."""
        if watch.shared_with:
            return f"{self.source}:whole_process_shared_with_up_to_{watch.shared_with}_other_requests"
        return self.source

    def open(self) -> PeakWatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            now = torch.cuda.memory_allocated(self.device)
        else:
            now = process_rss_bytes()
        watch = PeakWatch(now)
        with self._lock:
            self._watches.append(watch)
            others = len(self._watches) - 1
            for other in self._watches:
                other.see(now, others)
        if self.device.type != "cuda":
            self._ensure_sampler()
        return watch

    def close(self, watch: PeakWatch) -> None:
        self.sample_now()
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)

    def sample_now(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            value = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            value = process_rss_bytes()
        self._see(value)

    def _see(self, value: int) -> None:
        with self._lock:
            others = len(self._watches) - 1
            for watch in self._watches:
                watch.see(value, others)

    def _ensure_sampler(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while True:
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
            time.sleep(self.interval_s)
            self._see(process_rss_bytes())


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a timer measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
