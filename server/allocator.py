"""The C heap the server runs on: RSS that follows the tensors alive, without a page fault per page
of every step's tensors.

glibc serves a large block from its own mapping (returned to the OS on ``free``) only above its
mmap threshold, and that threshold is adaptive: it rises to the size of the largest block freed so
far (up to 32 MiB on 64-bit). After a prefill frees its first per-layer tensors, later tensors of
that size land in the heap, and the heap keeps the pages when they are freed, so the process RSS
(what a container limit and ``/metrics`` see) stays above the bytes alive: a KV method that prunes
each layer during a long prefill holds far fewer bytes than ``none``, yet its RSS peak showed it
only by chance (issue 24).

Issue 24 fixed the threshold at 128 KiB for everything. That made every tensor-sized block its own
mapping, and so a page fault per page of it, every time: measured on SmolLM2 bfloat16, 2 cores
(docs/benchmarks.md, "Continuous batching"), a decode step at an 8K context took 2.8-3.5x as
long (92k faults a step), four decodes 1.8x, a 512-token prefill 1.4-1.8x, against 1.08x for an
8K-token prefill, whose attention dwarfs the faults. Hence a threshold per step
(:func:`heap_for_step`, called by the hf engine core before each step and by the vllm backend's
filter passes at each turn, one computing at a time):

- a forward of at least ``LONG_FORWARD_TOKENS`` prompt tokens (a long prefill, or a filter pass,
  in one piece) runs with the configured threshold (``--malloc-mmap-threshold``, 128 KiB): its
  per-layer tensors go back to the OS as they are freed, so the RSS peak follows the live bytes;
- every other step (decodes, short prefills, chunks) runs with 32 MiB, glibc's largest: its
  tensors reuse heap pages without faulting; glibc keeps up to twice that free at the top of the
  heap (``M_TRIM_THRESHOLD``, what its adaptive rule would set) rather than trim and regrow it;
- when the batch goes idle (or the last filter pass ends), every free heap page goes back to the
  OS (:func:`release_free_heap`, ``malloc_trim``): at rest the RSS follows the tensors alive.

Python has no binding for ``mallopt`` or ``malloc_trim``, hence ctypes. :func:`configure_heap` runs
once at start-up, before the model loads; where it did not run (tests, a library user), the steps
leave the heap alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys
import threading

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's HEAP_MAX/2 on 64-bit: mallopt refuses more
DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, for long forwards
STEP_MMAP_THRESHOLD = MAX_MMAP_THRESHOLD  # for every other step
# Prompt tokens in one forward from which it runs with the low threshold: SmolLM2's whole cache at
# 4K tokens is ~90 MiB in bfloat16, where the RSS starts to matter and the faults cost a few percent.
LONG_FORWARD_TOKENS = 4096
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc reads it at process start; an operator's choice wins
TRIM_ENV_OVERRIDE = "MALLOC_TRIM_THRESHOLD_"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc on Linux (the only heap these knobs exist on), else None."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


class _Heap:
    """The thresholds :func:`configure_heap` chose (None: it did not run, or left glibc alone)."""

    lock = threading.Lock()
    long_forward: int | None = None
    current: int | None = None


def configure_heap(threshold: int) -> str:
    """Set the heap up as the module doc says, ``threshold`` bytes for long forwards (0: leave
    glibc's adaptive default everywhere); returns what the heap runs with, for the startup log."""
    if threshold == 0:
        return "glibc's adaptive mmap threshold (--malloc-mmap-threshold 0)"
    if not 0 < threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"malloc_mmap_threshold must be 0 or in 1..{MAX_MMAP_THRESHOLD} bytes, got {threshold}")
    if ENV_OVERRIDE in os.environ:
        return f"{ENV_OVERRIDE}={os.environ[ENV_OVERRIDE]} from the environment"
    libc = _glibc()
    if libc is None:
        return f"the platform's allocator ({platform.libc_ver()[0] or sys.platform}): no glibc mmap threshold to set"
    if libc.mallopt(M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; glibc keeps its adaptive threshold", STEP_MMAP_THRESHOLD)
        return "glibc's adaptive mmap threshold (mallopt failed)"
    if TRIM_ENV_OVERRIDE not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, 2 * STEP_MMAP_THRESHOLD)
    with _Heap.lock:
        _Heap.long_forward, _Heap.current = threshold, STEP_MMAP_THRESHOLD
    return (
        f"glibc mmap threshold {threshold} bytes for forwards of {LONG_FORWARD_TOKENS}+ prompt tokens (freed "
        f"blocks return to the OS at once), {STEP_MMAP_THRESHOLD} for other steps; free heap pages return when "
        "the batch goes idle"
    )


def heap_for_step(forward_tokens: int) -> None:
    """Before a step whose largest forward feeds ``forward_tokens`` prompt tokens: the threshold for
    it (a no-op unless :func:`configure_heap` set one, and when it is already set)."""
    with _Heap.lock:
        if _Heap.long_forward is None:
            return
        wanted = _Heap.long_forward if forward_tokens >= LONG_FORWARD_TOKENS else STEP_MMAP_THRESHOLD
        if wanted == _Heap.current:
            return
        libc = _glibc()
        if libc is not None and libc.mallopt(M_MMAP_THRESHOLD, wanted) == 1:
            _Heap.current = wanted


def release_free_heap() -> bool:
    """Give every free page of the C heap back to the OS (``malloc_trim(0)``: the top of each arena,
    and ``madvise`` on the free chunks inside it). Called when the batch goes idle: cheap next to a
    step, and the pages fault in again only when a later step needs them. False where there is no
    glibc (nothing to do)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
