"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this is importable)."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak RSS of this process. VmHWM belongs to the process's own address space; ru_maxrss would also carry
    the parent's RSS at fork time across exec on Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
