"""Peak memory on the CPU from the kernel's own high-water mark (server/measure.py): a spike that
comes and goes between two scheduler steps is in the peak, without a sampler thread."""

from __future__ import annotations

import mmap
import threading

import pytest
import torch

from server.measure import SharedPeakMeter, kernel_peak_rss_bytes, process_rss_bytes, reset_kernel_peak_rss

SPIKE = 256 * 2**20


def spike() -> None:
    """Touch ``SPIKE`` bytes of fresh pages, then give them back before anyone samples (an anonymous
    mapping of its own: the allocator's free lists, warm from earlier tests, cannot serve it)."""
    pages = mmap.mmap(-1, SPIKE)
    for offset in range(0, SPIKE, mmap.PAGESIZE):
        pages[offset] = 1
    pages.close()


@pytest.fixture()
def meter() -> SharedPeakMeter:
    meter = SharedPeakMeter(torch.device("cpu"))
    if not meter.kernel_peak:
        pytest.skip("this kernel or sandbox does not let a process reset its VmHWM (/proc/self/clear_refs)")
    return meter


def test_a_spike_between_steps_is_in_the_peak_and_no_thread_samples(meter: SharedPeakMeter) -> None:
    threads = threading.active_count()
    watch = meter.open()
    spike()
    assert threading.active_count() == threads  # no sampler thread
    meter.close(watch)
    assert watch.peak_bytes - watch.baseline_bytes >= 0.9 * SPIKE
    assert meter.source == "cpu:process_peak_rss_vmhwm_per_step"


def test_a_request_opened_after_a_spike_does_not_inherit_it(meter: SharedPeakMeter) -> None:
    first = meter.open()
    spike()
    second = meter.open()  # the spike so far is the first request's
    meter.close(second)
    meter.close(first)
    assert first.peak_bytes - first.baseline_bytes >= 0.9 * SPIKE
    assert second.peak_bytes - second.baseline_bytes < 0.5 * SPIKE
    assert first.shared_with == second.shared_with == 1


def test_reset_brings_the_high_water_mark_down_to_the_current_rss() -> None:
    spike()
    if not reset_kernel_peak_rss():
        pytest.skip("VmHWM cannot be reset here")
    peak = kernel_peak_rss_bytes()
    assert peak is not None and peak < process_rss_bytes() + SPIKE // 2
