"""Test helpers: a recording plugin (the dataset, module and trainer come from batchkit.testing).

Importable both from pytest and from the standalone multi-process job (tests/dist_job.py).
"""

from __future__ import annotations

from typing import Any

import torch

from batchkit import Plugin
from batchkit import hookimpl
from batchkit.testing import IndexedDataset  # noqa: F401 - re-exported for the tests
from batchkit.testing import TinyModule  # noqa: F401 - re-exported for the tests



def summarize(value: Any) -> Any:
    """A JSON-friendly description of a hook argument."""
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape)}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [summarize(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {k: summarize(v) for k, v in value.items()}}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return type(value).__name__


class RecordingPlugin(Plugin):
    """Implements every hook as a pass-through and records what it received, on which rank, in
    which order (into ``events``; a shared ``journal`` list records the order across plugins)."""

    name = "recorder"
    allow_multiple = True

    def __init__(self, tag: str = "recorder", journal: list | None = None, order: int = 0) -> None:
        self.tag = tag
        self._instance_name = tag  # registered under its tag, so several can run side by side
        self.order = order
        self.events: list[dict[str, Any]] = []
        self.journal = journal if journal is not None else []
        self.state = {"counter": 0}

    def _record(self, hook: str, ctx: Any = None, **args: Any) -> None:
        event = {"hook": hook, "args": {k: summarize(v) for k, v in args.items()}}
        if ctx is not None:
            event.update(rank=ctx.rank, epoch=ctx.epoch, batch_idx=ctx.batch_idx, global_step=ctx.global_step,
                         micro_step=ctx.micro_step, last_micro=ctx.is_last_micro_batch)
        self.events.append(event)
        self.journal.append((self.tag, hook))

    @hookimpl
    def batchkit_setup(self, host: Any, trainer: Any, module: Any, stage: str) -> None:
        self._record("setup", stage=stage, module=module)

    @hookimpl
    def batchkit_epoch_start(self, epoch: int, ctx: Any) -> None:
        self._record("epoch_start", ctx, epoch=epoch)

    @hookimpl
    def batchkit_epoch_end(self, epoch: int, ctx: Any) -> None:
        self._record("epoch_end", ctx, epoch=epoch)

    @hookimpl
    def batchkit_before_optimizer_step(self, optimizer: Any, ctx: Any) -> None:
        self._record("before_optimizer_step", ctx, optimizer=optimizer)

    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None:
        self.state["counter"] += 1
        self._record("step_end", ctx)

    @hookimpl
    def batchkit_teardown(self, ctx: Any) -> None:
        self._record("teardown", ctx)

    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any, dataset: Any, ctx: Any) -> Any:
        self._record("wrap_batch_sampler", ctx, batch_sampler=batch_sampler, n=len(batch_sampler))
        return None

    @hookimpl
    def batchkit_wrap_collate(self, collate_fn: Any, ctx: Any) -> Any:
        self._record("wrap_collate", ctx, collate_fn=collate_fn)
        return None

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, module: Any, ctx: Any) -> Any:
        self._record("transform_batch", ctx, batch=batch, index=[int(i) for i in batch[2]] if isinstance(batch, list) and len(batch) == 3 else None)
        return None

    @hookimpl
    def batchkit_transform_loss(self, loss: Any, outputs: Any, batch: Any, ctx: Any) -> Any:
        self._record("transform_loss", ctx, loss=float(loss.detach()), requires_grad=bool(loss.requires_grad))
        return None

    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer: Any, module: Any, ctx: Any) -> Any:
        self._record("wrap_optimizer", ctx, optimizer=optimizer)
        return None

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)

    def hooks(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["hook"] == name]
