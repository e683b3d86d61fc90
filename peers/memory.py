"""This process's resident memory and its peak since a reset (Linux /proc); None where it cannot be read."""

from __future__ import annotations

import ctypes


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


def trim() -> bool:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim); False where there is no such call.

    Gradients are freed after the inner loop so that the outer step has their 4 bytes per parameter to itself, but
    glibc keeps freed blocks of moderate size in its heap, and the process would stay as large as before. Trimming
    makes the freeing real; the next inner loop faults the pages in again (well under a second per GB)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
