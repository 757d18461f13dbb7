"""A worker process's resident memory: its peak, and the peak since its models were built."""

from __future__ import annotations


def reset_peak_rss() -> bool:
    """Restart the process's peak resident set (Linux: VmHWM, reset through
    /proc/self/clear_refs); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> float:
    """Bytes: the largest resident set since `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")
