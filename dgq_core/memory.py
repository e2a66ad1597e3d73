"""Peak resident memory of this process, as the calibration report, the benchmarks and the service's memory
measurements state it."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's address space so far.

    Linux's VmHWM belongs to the address space, so a process started by a large parent (a benchmark's fresh child
    per variant) reports its own peak; `getrusage`'s ru_maxrss survives exec and would report the parent's.
    Falls back to ru_maxrss where /proc is absent.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Start the peak `peak_rss_bytes` reports over from the current resident size, so that the peak of the next
    piece of work can be read on its own (Linux: /proc/self/clear_refs).

    Returns:
        `bool`: whether it was reset; False where the kernel offers no reset (the peak then covers all of the
        process's life, which overstates the next piece of work's).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def trim_heap() -> None:
    """Hand the heap memory malloc keeps free back to the system (glibc's `malloc_trim`; nothing elsewhere), so that
    the resident size counts what is in use: freed memory kept resident would otherwise hide the next piece of
    work's own memory, which reuses it."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)
