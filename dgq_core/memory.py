"""Peak resident memory of this process, as the calibration report and the benchmarks state it."""

from __future__ import annotations

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
