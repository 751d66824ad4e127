"""What every benchmark here shares."""

from __future__ import annotations

import fcntl
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The machine's CPU lock, shared by every benchmark: timing and memory measurements hold it
#: exclusively, training runs shared, so a timing never runs beside another engineer's training.
CPU_LOCK = "/tmp/bk-cpu.lock"

# glibc returns large freed allocations to the OS (mmap threshold, heap trimming), so code that
# allocates temporaries every step page-faults them in again each time, and how often depends on
# glibc's dynamic threshold: on this machine that made one configuration run in either ~2.1 or
# ~3.0 ms per step from one run to the next. Keeping freed memory in the heap measures the code
# rather than the page-fault path, identically for both sides of every comparison.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


@contextmanager
def cpu_lock(exclusive: bool) -> Iterator[None]:
    """Hold :data:`CPU_LOCK` (exclusively for timing, shared for training) for the block."""
    with open(CPU_LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
