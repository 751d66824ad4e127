"""Progress bars and step timers for the offline mining steps.

Mining runs once, before training, in the main process; a step that takes more than a moment shows
a rich progress bar (rich is a core batchkit dependency, and Lightning's RichProgressBar uses it
too). A bar never breaks mining: when another live display is already active (e.g. a Lightning
progress bar), the step runs without one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], *, total: int, description: str, enabled: bool) -> Iterator[T]:
    """Yield ``items``, showing a progress bar of ``total`` steps when ``enabled``."""
    if not enabled:
        yield from items
        return
    from rich.errors import LiveError
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    try:
        progress.start()
    except LiveError:  # another live display owns the terminal: run without a bar
        yield from items
        return
    try:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
    finally:
        progress.stop()


@contextlib.contextmanager
def status(description: str, *, enabled: bool) -> Iterator[None]:
    """A spinner for a step that is one library call (METIS), when ``enabled``."""
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.errors import LiveError

    try:
        spinner = Console(stderr=True).status(description)
        spinner.start()
    except LiveError:
        yield
        return
    try:
        yield
    finally:
        spinner.stop()


class StepTimer:
    """Wall-clock and CPU seconds per named step, in the order the steps ran.

    CPU seconds (all threads of this process) say how much work a step is on a shared machine,
    where wall-clock time depends on what else runs.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start
