"""This process's resident memory and its peak since a reset (Linux /proc); None where it cannot be read."""

from __future__ import annotations


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def rss_bytes() -> int | None:
    return _status("VmRSS")


def reset_peak() -> bool:
    """Start measuring the peak afresh (writing 5 to clear_refs resets VmHWM); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    return _status("VmHWM")
