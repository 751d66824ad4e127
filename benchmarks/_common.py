"""What every benchmark here shares."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

# glibc returns large freed allocations to the OS (mmap threshold, heap trimming), so code that
# allocates temporaries every step page-faults them in again each time, and how often depends on
# glibc's dynamic threshold: on this machine that made one configuration run in either ~2.1 or
# ~3.0 ms per step from one run to the next. Keeping freed memory in the heap measures the code
# rather than the page-fault path, identically for both sides of every comparison.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def reexec_with_stable_malloc() -> None:
    """Restart this script with MALLOC_ENV set (glibc reads it at process start only)."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on, for its results JSON."""
    import torch

    def first(path: str, key: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    mem = first("/proc/meminfo", "MemTotal")
    return {"cpu": first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "memory": f"{int(mem.split()[0]) / 2**20:.1f} GiB" if mem else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_average_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
