"""Memory readings for the benchmarks: exact tensor allocations, and process RSS as a second opinion.

On the CPU the resident set moves by +-100 MiB with the allocator's reuse of freed pages, so the
primary figure counts tensor allocations instead: PyTorch's profiler reports every CPU
allocation and free with the running total of bytes allocated while profiling
(`tensor_peak_bytes`). On CUDA the caching allocator's `max_memory_allocated` is that figure.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable


def status_bytes(field: str) -> int:
    """A byte count from /proc/self/status (VmRSS: resident now, VmHWM: peak since reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM (Linux >= 4.0) so that a peak excludes the transients of loading inputs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tensor_peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, working set) of the CPU tensor memory allocated by `fn()`, from the profiler's
    allocation events. Peak: the most bytes live at once. Working set: the same, leaving out the
    allocations still live when `fn` returns (its outputs, e.g. gradient buffers), counted at
    every moment, so a forward-pass peak before those buffers exist is not hidden by them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [
                e["args"]
                for e in json.load(f)["traceEvents"]
                if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0
            ]
    finally:
        os.unlink(path)
    if not events:
        return 0, 0
    # "Total Allocated" counts the bytes allocated while profiling and not yet freed; the first
    # event's total before its own allocation is the baseline left by any earlier profiling.
    baseline = events[0]["Total Allocated"] - events[0]["Bytes"]
    freed, open_allocs = set(), {}
    for i, e in enumerate(events):
        if e["Bytes"] > 0:
            open_allocs[e["Addr"]] = i
        elif e["Addr"] in open_allocs:
            freed.add(open_allocs.pop(e["Addr"]))
    persistent = set(open_allocs.values())  # allocated during fn and still live at its end
    peak = working = persistent_live = 0
    for i, e in enumerate(events):
        if i in persistent:
            persistent_live += e["Bytes"]
        live = e["Total Allocated"] - baseline
        peak = max(peak, live)
        working = max(working, live - persistent_live)
    return peak, working
