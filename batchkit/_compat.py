"""Every place batchkit relies on Lightning behaviour that is private or only implicit, one function
each, so a Lightning release that changes one of them breaks here, in one place, and in the contract
test beside it (``tests/test_compat.py``). Public Lightning API is used directly elsewhere. The
correction of Lightning + DeepSpeed's double loss division under gradient accumulation lives in
:mod:`batchkit.deepspeed_compat`, with its own tests.
"""

from __future__ import annotations

from typing import Any
from typing import Callable

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy


def train_data_source(trainer: Any) -> Any:
    """Where the fit loop keeps the train loaders (``.instance``: a LightningModule, a DataModule, or
    the loaders given to ``fit(train_dataloaders=...)``), and asks for them (``.dataloader()``, on
    every (re)load). Private: ``fit_loop._data_source``; there is no public way to reach loaders
    passed straight to ``fit``."""
    return trainer.fit_loop._data_source


def reload_train_loader_before_next_epoch(trainer: Any) -> int:
    """Make the fit loop rebuild the train loader when the next epoch starts; returns the previous
    ``reload_dataloaders_every_n_epochs`` for :func:`restore_reload_setting`. Implicit: the fit loop
    rebuilds at the start of an epoch when ``current_epoch - last reload epoch >= n``."""
    previous = int(trainer.reload_dataloaders_every_n_epochs)
    trainer.reload_dataloaders_every_n_epochs = 1
    return previous


def restore_reload_setting(trainer: Any, previous: int) -> None:
    trainer.reload_dataloaders_every_n_epochs = previous


def optimizer_step_rule(trainer: Any) -> Callable[[int], bool]:
    """``ends_step(batch_idx)``: whether the optimizer steps after micro-batch ``batch_idx``.
    Lightning's rule (every ``accumulate_grad_batches`` and at the epoch's last batch), or, under
    DeepSpeed, which counts micro-steps over the whole run, the engine's own answer. Prepared once
    per fit (it runs every batch); both numbers are read at each call, since a
    ``GradientAccumulationScheduler`` or a loader rebuild may change them."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        boundary = strategy.deepspeed_engine.is_gradient_accumulation_boundary
        return lambda batch_idx: bool(boundary())
    fit_loop = trainer.fit_loop
    return lambda batch_idx: (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == fit_loop.max_batches


def torch_optimizers(trainer: Any) -> list[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` objects that actually update parameters: ``trainer.optimizers``,
    or, where a strategy wrapped them (DeepSpeed's ZeRO optimizers), the optimizer inside."""
    found = []
    for optimizer in trainer.optimizers:
        inner = optimizer
        for _ in range(4):  # DeepSpeed nests at most a couple of levels (ZeRO -> user optimizer)
            if isinstance(inner, torch.optim.Optimizer):
                break
            inner = getattr(inner, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            found.append(inner)
    return found


def publish_callback_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Make metrics visible where callbacks (ModelCheckpoint's and EarlyStopping's ``monitor``, the
    progress bar) and users read them: ``trainer.callback_metrics``. Implicit: that property returns
    the logger connector's own dict, which Lightning updates in place as it logs."""
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
