"""Test support shared by the plugin tests and their 2-process job."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from batchkit import Plugin
from batchkit import hookimpl
from batchkit.lightning import BatchKitCallback
from batchkit.testing import make_trainer
from batchkit_joint_selection.testing import TinyTwoTower
from batchkit_joint_selection.testing import pair_loader

REFERENCE = "batchkit_joint_selection.testing:reference_model"


class SuperBatchRecorder(Plugin):
    """First in the batch chain: records every super-batch as the selection plugins receive it
    (dataset indices, concepts, and the learner's state at that moment through ``on_batch``)."""

    name = "super_batch_recorder"
    order = -1000

    def __init__(self, on_batch: Any = None) -> None:
        self.ids: list[list[int]] = []
        self.concepts: list[list[list[str]]] = []
        self.steps: list[tuple[int, int]] = []
        self.on_batch = on_batch

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, module: Any, ctx: Any) -> None:
        self.ids.append(batch["index"].tolist())
        self.concepts.append([list(c) for c in batch["concepts"]])
        self.steps.append((ctx.global_step, ctx.micro_step))
        if self.on_batch is not None:
            self.on_batch(batch, module, ctx)


class BeforeForward(Plugin):
    """Calls ``on_batch(batch, module, ctx)`` with the batch training_step is about to receive
    (after every batch-stage plugin)."""

    name = "before_forward_probe"

    def __init__(self, on_batch: Any) -> None:
        self.on_batch = on_batch

    @hookimpl
    def batchkit_before_forward(self, batch: Any, module: Any, ctx: Any) -> None:
        self.on_batch(batch, module, ctx)


def fit(tmp_path: Any, plugins: list, epochs: int = 2, n: int = 480, batch_size: int = 8, noise: float = 0.3,
        module: Any = None, **trainer_kwargs: Any) -> tuple[Any, Any]:
    """A short single-process run on the synthetic pairs; returns (module, trainer)."""
    pl.seed_everything(0, verbose=False)
    module = module or TinyTwoTower()
    trainer = make_trainer(tmp_path, [BatchKitCallback(plugins)], max_epochs=epochs, **trainer_kwargs)
    trainer.fit(module, pair_loader(n=n, batch_size=batch_size, noise=noise))
    return module, trainer


def noisy_share(module: TinyTwoTower) -> float:
    flags = [f for step in module.noisy_seen for f in step]
    return sum(flags) / len(flags)
