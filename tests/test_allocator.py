"""Issue 24: `gemserve serve` fixes glibc's mmap threshold so freed tensors leave the RSS."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from server.allocator import ENV_OVERRIDE, fix_mmap_threshold
from server.settings import Settings

# A heap shaped like a prefill's: a large block freed first (glibc's adaptive threshold rises to
# its size), then many tensor-sized blocks, a block above them, and the many freed. Prints the
# RSS rise (MiB) at the peak and after the free.
PROBE = textwrap.dedent(
    """
    import os, sys
    from server.allocator import fix_mmap_threshold
    fix_mmap_threshold(int(sys.argv[1]))
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    first = bytearray(8 << 20); del first
    base = rss()
    blocks = [bytearray(2 << 20) for _ in range(32)]
    pin = bytearray(256 << 10)
    peak = rss()
    del blocks
    print((peak - base) >> 20, (rss() - base) >> 20)
    """
)
needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)


def rss_rise_mib(threshold: int) -> tuple[int, int]:
    env = {key: value for key, value in os.environ.items() if key != ENV_OVERRIDE}
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    peak, after = map(int, out.stdout.split())
    return peak, after


@needs_glibc
def test_the_server_default_returns_freed_blocks_to_the_os() -> None:
    peak, after = rss_rise_mib(Settings().malloc_mmap_threshold)
    assert peak >= 60 and after <= 4, (peak, after)


@needs_glibc
def test_glibc_adaptive_threshold_keeps_them_in_the_heap() -> None:
    """The reason for the default: without it the same frees leave the RSS where it was."""
    peak, after = rss_rise_mib(0)
    assert peak >= 60 and after >= 60, (peak, after)


def test_what_the_heap_runs_with_is_said(monkeypatch) -> None:
    assert "adaptive" in fix_mmap_threshold(0)
    monkeypatch.setenv(ENV_OVERRIDE, "65536")
    assert fix_mmap_threshold(131072) == f"{ENV_OVERRIDE}=65536 from the environment"


@pytest.mark.parametrize("bad", [-1, 33 * 2**20])
def test_a_threshold_glibc_refuses_is_a_settings_error(bad: int) -> None:
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        Settings(malloc_mmap_threshold=bad)
    with pytest.raises(ValueError, match="malloc_mmap_threshold"):
        fix_mmap_threshold(bad)
