"""What every benchmark here shares."""

from __future__ import annotations

import os
import sys

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
