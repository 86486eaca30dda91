"""The C heap the server runs on: freed tensors go back to the OS, so RSS follows the bytes alive.

glibc serves a large block from its own mapping (returned to the OS on ``free``) only above its
mmap threshold, and that threshold is adaptive: it rises to the size of the largest block freed so
far (up to 32 MiB on 64-bit). After a prefill frees its first per-layer tensors, later tensors of
that size land in the heap, and the heap keeps the pages when they are freed. A KV method that
prunes each layer during the prefill holds far fewer bytes alive than ``none``, yet the process RSS
(what a container limit and ``/metrics`` see) barely shows it (docs/benchmarks.md, issue 24).

Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the adaptation off) makes
every tensor-sized block its own mapping. The cost is a page fault per page of each new tensor;
bench/prefill_memory.py measures it against glibc's defaults. Python has no binding for
``mallopt``, hence ctypes. Set once at start-up, before the model loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
DEFAULT_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's HEAP_MAX/2 on 64-bit: mallopt refuses more
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"  # glibc reads it at process start; an operator's choice wins


def fix_mmap_threshold(threshold: int) -> str:
    """Fix glibc's mmap threshold at ``threshold`` bytes (0: leave glibc's adaptive default); returns
    what the heap runs with, for the startup log."""
    if threshold == 0:
        return "glibc's adaptive mmap threshold (--malloc-mmap-threshold 0)"
    if not 0 < threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"malloc_mmap_threshold must be 0 or in 1..{MAX_MMAP_THRESHOLD} bytes, got {threshold}")
    if ENV_OVERRIDE in os.environ:
        return f"{ENV_OVERRIDE}={os.environ[ENV_OVERRIDE]} from the environment"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return f"the platform's allocator ({platform.libc_ver()[0] or sys.platform}): no glibc mmap threshold to set"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        logger.warning("mallopt(M_MMAP_THRESHOLD, %d) failed; glibc keeps its adaptive threshold", threshold)
        return "glibc's adaptive mmap threshold (mallopt failed)"
    return f"glibc mmap threshold fixed at {threshold} bytes: freed tensors return to the OS"
