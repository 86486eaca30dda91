"""The one place that measures a request: timers and peak memory, each named by its source.

CUDA: ``torch.cuda.max_memory_allocated`` after a per-request reset (allocator truth).
CPU: there is no allocator counter for host tensors. Linux keeps the process's peak resident set
size itself (``VmHWM`` in ``/proc/self/status``, reset by writing 5 to ``/proc/self/clear_refs``),
so the batch's meter reads and resets it once per scheduler step: the exact peak, at no cost
between readings. Where that is not allowed, a thread samples ``/proc/self/statm`` every
``interval_s`` instead (short spikes between samples can be missed; that sampler took ~10% of a
core and slowed a filter pass ~5% on 2 cores, issue 23). ``memory_source`` says which.

Requests that share a batch share the process: :class:`SharedPeakMeter` gives each one the peak
of the whole process over its own lifetime (on CUDA and with the kernel's peak, per scheduler
step), and its ``memory_source`` says that it is the whole process's.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_STATM = Path("/proc/self/statm")


def process_rss_bytes(pid: int | None = None) -> int:
    """Resident set size of this process (or ``pid``) right now (Linux ``/proc``; 0 where unavailable
    or the process is gone)."""
    try:
        with open(_STATM if pid is None else f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def kernel_peak_rss_bytes() -> int | None:
    """The kernel's peak RSS of this process since its last reset (``VmHWM``), or None if unreadable."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_kernel_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel or the sandbox does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


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
    process-wide readings made while it is open. At each :meth:`sample_now` (once per scheduler
    step): CUDA, the allocator's peak since the previous one; CPU, the kernel's peak RSS since the
    previous one (``VmHWM``, then reset). CPU without that: RSS sampled every ``interval_s`` by one
    thread while any watch is open, plus a reading per :meth:`sample_now`. One meter per process:
    two would reset each other's kernel peak."""

    def __init__(self, device: torch.device, interval_s: float = 0.002) -> None:
        self.device = device
        self.interval_s = interval_s
        self._watches: list[PeakWatch] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.kernel_peak = device.type != "cuda" and kernel_peak_rss_bytes() is not None and reset_kernel_peak_rss()

    @property
    def source(self) -> str:
        if self.device.type == "cuda":
            return "cuda:max_memory_allocated_per_step"
        if self.kernel_peak:
            return "cpu:process_peak_rss_vmhwm_per_step"
        return f"cpu:process_rss_peak_sampled_{self.interval_s * 1000:g}ms"

    def source_for(self, watch: PeakWatch) -> str:
        """Names what the peak measures; a request that shared the engine is told so."""
        if watch.shared_with:
            return f"{self.source}:whole_process_shared_with_up_to_{watch.shared_with}_other_requests"
        return self.source

    def open(self) -> PeakWatch:
        if self.kernel_peak:
            self.sample_now()  # the peak so far belongs to the requests already open, not this one
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
        if self.device.type != "cuda" and not self.kernel_peak:
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
        elif self.kernel_peak:
            value = max(kernel_peak_rss_bytes() or 0, process_rss_bytes())
            reset_kernel_peak_rss()
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
