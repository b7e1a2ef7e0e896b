"""What a benchmark prints about the machine beside its figures (every row names its CPU)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """lscpu's 'Model name', read from /proc/cpuinfo; the platform's word where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
