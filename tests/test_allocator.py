"""Issue 24: `gemserve serve` sets glibc's mmap threshold per step and trims the heap when idle, so
freed tensors leave the RSS without a page fault per page of every step's tensors."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from server.allocator import (
    ENV_OVERRIDE,
    LONG_FORWARD_TOKENS,
    STEP_MMAP_THRESHOLD,
    configure_heap,
    heap_for_step,
)
from server.settings import Settings

# A heap shaped like a prefill's: a large block freed first (glibc's adaptive threshold rises to
# its size), then many tensor-sized blocks, a block above them, and the many freed; then the heap
# released as the server does when its batch goes idle. Prints the RSS rise (MiB) at the peak (64 MiB
# of blocks, less what the heap held free before them),
# after the free, and after the release.
PROBE = textwrap.dedent(
    """
    import os, sys
    from server.allocator import configure_heap, heap_for_step, release_free_heap
    configure_heap(int(sys.argv[1]))
    heap_for_step(int(sys.argv[2]))
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    first = b"x" * (8 << 20); del first
    base = rss()
    blocks = [b"x" * (2 << 20) for _ in range(32)]  # written, so resident (a calloc'd page may not be)
    pin = b"x" * (256 << 10)
    peak = rss()
    del blocks
    freed = rss()
    release_free_heap()
    print((peak - base) >> 20, (freed - base) >> 20, (rss() - base) >> 20)
    """
)
needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)


def rss_rise_mib(threshold: int, forward_tokens: int) -> tuple[int, int, int]:
    env = {key: value for key, value in os.environ.items() if key != ENV_OVERRIDE}
    command = [sys.executable, "-c", PROBE, str(threshold), str(forward_tokens)]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    peak, freed, released = map(int, out.stdout.split())
    return peak, freed, released


@needs_glibc
def test_a_long_forward_returns_freed_blocks_at_once() -> None:
    """Under the server's default, a forward of 4K+ prompt tokens: the RSS follows the live bytes."""
    peak, freed, released = rss_rise_mib(Settings().malloc_mmap_threshold, LONG_FORWARD_TOKENS)
    assert peak >= 48 and freed <= 4 and released <= 4, (peak, freed, released)


@needs_glibc
def test_other_steps_keep_freed_blocks_until_the_batch_is_idle() -> None:
    """2 MiB blocks (a decode step's float32 copy of an 8K cache layer is 6 MiB) stay in the heap when
    freed, so the next step reuses their pages without faulting; the release at idle returns them."""
    peak, freed, released = rss_rise_mib(Settings().malloc_mmap_threshold, LONG_FORWARD_TOKENS - 1)
    assert peak >= 48 and freed >= 48 and released <= 4, (peak, freed, released)


@needs_glibc
def test_glibc_adaptive_threshold_keeps_them_in_the_heap() -> None:
    """The reason for the low threshold: under glibc's adaptive one the same frees leave the RSS where
    it was, even in a long forward (the release at idle still returns them)."""
    peak, freed, released = rss_rise_mib(0, LONG_FORWARD_TOKENS)
    assert peak >= 48 and freed >= 48 and released <= 4, (peak, freed, released)


def test_steps_leave_an_unconfigured_heap_alone(monkeypatch) -> None:
    import server.allocator as allocator

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, option: int, value: int) -> int:
            calls.append((option, value))
            return 1

    monkeypatch.setattr(allocator, "_glibc", lambda: Libc())
    monkeypatch.delenv(ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(allocator._Heap, "long_forward", None)
    monkeypatch.setattr(allocator._Heap, "current", None)
    heap_for_step(10**6)
    assert calls == [], "a library user's heap is not touched"
    configure_heap(65536)
    assert calls[0] == (allocator.M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD)
    calls.clear()
    for tokens in (1, 10, LONG_FORWARD_TOKENS, LONG_FORWARD_TOKENS + 5, 64, 1):
        heap_for_step(tokens)
    assert calls == [(allocator.M_MMAP_THRESHOLD, 65536), (allocator.M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD)], (
        "set only when it changes"
    )


def test_the_batch_releases_the_heap_when_it_goes_idle(monkeypatch) -> None:
    """HFAsyncEngine's worker thread calls release_free_heap once per busy-to-idle turn, not per step
    nor while idle."""
    import server.engine.hf_async as hf_async

    calls: list[int] = []

    class Core:
        steps, idle_turns = 3, 0

        def has_work(self) -> bool:
            if self.steps == 0:
                self.idle_turns += 1
                if self.idle_turns == 3:  # idle for three turns: enough to see one release, not three
                    engine._stop.set()
            return self.steps > 0

        def step(self) -> None:
            self.steps -= 1

    engine = hf_async.HFAsyncEngine.__new__(hf_async.HFAsyncEngine)
    engine.core, engine.shadow, engine.intra_op_threads = Core(), None, None
    engine._wake, engine._stop = hf_async.threading.Event(), hf_async.threading.Event()
    engine._warmed, engine.warm_up_at_start = hf_async.threading.Event(), False
    engine._wake.set()  # no 0.1 s naps between the idle turns

    def release() -> bool:
        calls.append(engine.core.steps)
        return True

    monkeypatch.setattr(hf_async, "release_free_heap", release)
    engine._loop()
    assert calls == [0]


def test_what_the_heap_runs_with_is_said(monkeypatch) -> None:
    assert "adaptive" in configure_heap(0)
    monkeypatch.setenv(ENV_OVERRIDE, "65536")
    assert configure_heap(131072) == f"{ENV_OVERRIDE}=65536 from the environment"


@pytest.mark.parametrize("bad", [-1, 33 * 2**20])
def test_a_threshold_glibc_refuses_is_a_settings_error(bad: int) -> None:
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        Settings(malloc_mmap_threshold=bad)
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        configure_heap(bad)
