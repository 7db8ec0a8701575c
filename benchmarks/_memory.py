"""Process memory readings for the benchmarks (Linux /proc)."""

from __future__ import annotations


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
