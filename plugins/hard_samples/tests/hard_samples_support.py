"""Test support shared by the hard-samples tests and their 2-process job: an indexed dataset, a
small module that records what it trained on, and a Trainer factory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn



#: label noise for the tests' datasets, so mini-batch losses keep differing as training goes on
LABEL_NOISE = 0.8


class RecordingNet(pl.LightningModule):
    """A small MLP (optionally with BatchNorm) that records, per training step, the sample indices
    and the loss it returned; implements the per-sample loss protocol."""

    def __init__(self, dim: int = 8, classes: int = 3, lr: float = 0.05, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim, 16)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.ReLU(), nn.Linear(16, classes)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self.seen.append([int(i) for i in idx])
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_trainer(root: Path | None, callbacks: list, **kwargs: Any) -> pl.Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def batch_ids(seen: list[list[int]], partition: list[list[int]]) -> list[int]:
    """The mini-batch id of every trained batch, from the indices it held."""
    by_first = {tuple(b): j for j, b in enumerate(partition)}
    return [by_first[tuple(s)] for s in seen]
