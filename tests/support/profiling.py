"""The peak of what a call allocates, counted allocation by allocation (torch's CPU profiler).

The profiler records every allocation and free of torch's allocator in order, so the peak of
their running sum is the same number on every run (unlike resident memory)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch.profiler import ProfilerActivity, profile


def peak_allocated(fn: Callable[[], object]) -> int:
    """Bytes: the peak of the running sum of ``fn()``'s allocations and frees (skips the test
    when this torch build's profiler records no memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted(
        (
            e.time_range.start,
            e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage,
        )
        for e in prof.events()
    )
    total = peak = 0
    for _, change in changes:
        total += change
        peak = max(peak, total)
    if peak == 0:
        pytest.skip("this torch build's profiler records no memory events")
    return peak
