"""What every benchmark here shares."""

from __future__ import annotations

import fcntl
import os
import platform
import sys
import time
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
def cpu_lock(exclusive: bool, wait_s: float | None = None) -> Iterator[bool]:
    """Hold :data:`CPU_LOCK` (exclusively for timing, shared for training) for the block; yields
    whether it was acquired. With ``wait_s`` the block runs without it after that many seconds
    (other jobs may hold the lock for hours); without, it waits as long as it takes."""
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    with open(CPU_LOCK, "a") as handle:
        acquired = False
        if wait_s is None:
            fcntl.flock(handle, mode)
            acquired = True
        else:
            deadline = time.monotonic() + wait_s
            while not acquired:
                try:
                    fcntl.flock(handle, mode | fcntl.LOCK_NB)
                    acquired = True
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(2.0)
        try:
            yield acquired
        finally:
            if acquired:
                fcntl.flock(handle, fcntl.LOCK_UN)


def retrieval_probe(metrics: tuple[str, ...] = ("r1", "r10")) -> Any:
    """A Lightning callback for the retrieval benchmarks: each training batch's wall and thread-CPU
    time from its start to its end (``wall``, ``cpu``, ``train_s``; loading and evaluation
    excluded) and, at every validation, the named ``val/<metric>`` figures with the step (``curve``)."""
    import lightning.pytorch as pl  # only the benchmarks that train import Lightning

    class RetrievalProbe(pl.Callback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.curve: list[dict[str, float]] = []

        @property
        def train_s(self) -> float:
            return sum(self.wall)

        def on_train_batch_start(self, *args: Any) -> None:
            self._t = (time.perf_counter(), time.thread_time())

        def on_train_batch_end(self, *args: Any) -> None:
            self.wall.append(time.perf_counter() - self._t[0])
            self.cpu.append(time.thread_time() - self._t[1])

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if not trainer.sanity_checking:
                m = trainer.callback_metrics
                self.curve.append({"step": trainer.global_step, **{k: float(m[f"val/{k}"]) for k in metrics}})

    return RetrievalProbe()


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
