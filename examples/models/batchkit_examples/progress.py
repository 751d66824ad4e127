"""A progress bar for runs that end at ``max_steps`` with gradient accumulation."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Lightning's bar counts micro-batches, but takes its total from ``max_steps``, which counts
    optimizer steps: with 8 accumulated micro-batches it reads ``320/40`` forty steps in. This one
    counts micro-batches against ``max_steps x accumulate_grad_batches`` (``320/2400``) and shows the
    optimizer step next to the metrics (``step 40/300``)."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            total = min(total, (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches)
        return total

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            metrics["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        return metrics
