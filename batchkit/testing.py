"""Helpers for testing plugins: importable by any plugin package's tests."""

from __future__ import annotations

from typing import Any

from batchkit.hookspecs import hookimpl
from batchkit.plugin import Plugin


class FailAtStep(Plugin):
    """Simulates a crash: raises ``RuntimeError("simulated crash")`` in the batch stage once
    ``ctx.global_step`` reaches ``step``. Put it in a run with a ``ModelCheckpoint`` to test that a
    plugin resumes exactly from the checkpoint written before the crash."""

    name = "fail_at_step"

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def batchkit_transform_batch(self, ctx: Any) -> None:
        if ctx.global_step >= self.step:
            raise RuntimeError("simulated crash")
