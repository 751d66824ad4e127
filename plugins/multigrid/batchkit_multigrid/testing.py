"""Small image and clip data and models for multigrid's tests (importable by path, so the
conformance suite's 2-process job can build them).

* :class:`IndexedImages` / :class:`IndexedClips`: ``(input, label, index)`` samples of
  :class:`batchkit.testing.IndexedDataset`'s classification problem, its 16 features laid out as a
  4 x 4 image (upsampled to 16 x 16) or a 2 x 2 x 4 clip (upsampled to 8 x 16 x 16), so a model that
  pools adaptively back to that grid sees the features at the base size and a blurred version of
  them at smaller sizes;
* :class:`TinyShapeModule`: :class:`batchkit.testing.TinyModule` behind an adaptive average pool
  (any input size), recording the input shape and the learning rate of every step, and writing them
  to ``<default_root_dir>/multigrid_steps_rank<r>.json`` at the end of the fit;
* :class:`FixedSizeModule`: the same model behind a ``Flatten``, which only takes the base size;
* :func:`image_loader` and :func:`clip_loader`: their DataLoaders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

from batchkit.testing import IndexedDataset
from batchkit.testing import TinyModule


FEATURES = 16
IMAGE_GRID = (4, 4)
CLIP_GRID = (2, 2, 4)


class IndexedImages(Dataset):
    """``(image (1, 16, 16) float32, label, index)``: IndexedDataset's 16 features as a 4 x 4 image
    upsampled 4x (nearest)."""

    grid = IMAGE_GRID
    scale = (4, 4)

    def __init__(self, n: int = 96, noise: float = 0.8, classes: int = 3, seed: int = 0) -> None:
        self.base = IndexedDataset(n=n, dim=FEATURES, classes=classes, seed=seed, noise=noise)
        x = self.base.x.reshape(n, 1, *self.grid)
        for dim, factor in enumerate(self.scale):
            x = x.repeat_interleave(factor, dim=2 + dim)
        self.x = x.contiguous()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.base.y[i], i


class IndexedClips(IndexedImages):
    """``(clip (1, 8, 16, 16) float32, label, index)``: the 16 features as a 2 x 2 x 4 clip upsampled
    (4, 8, 4)x."""

    grid = CLIP_GRID
    scale = (4, 8, 4)


class TinyShapeModule(TinyModule):
    """TinyModule on images or clips of any size: adaptive average pooling to the data's grid, then
    the MLP. Records ``shapes`` (the input shape of every training step) and ``lr_in_step`` (the
    first group's learning rate inside every ``optimizer.step()``)."""

    def __init__(self, clips: bool = False, classes: int = 3, lr: float = 0.05, batch_norm: bool = True,
                 milestones: list[int] | None = None, gamma: float = 0.1, record: bool = True) -> None:
        super().__init__(dim=FEATURES, classes=classes, lr=lr, batch_norm=batch_norm)
        self.grid = CLIP_GRID if clips else IMAGE_GRID
        self.milestones = milestones
        self.gamma = gamma
        self.record = record
        self.shapes: list[list[int]] = []
        self.lr_in_step: list[float] = []
        self.lr_between_steps: list[float] = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.adaptive_avg_pool3d if len(self.grid) == 3 else F.adaptive_avg_pool2d
        return pool(x, self.grid).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.shapes.append(list(batch[0].shape))
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if not self.milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(self.milestones), gamma=self.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_start(self) -> None:
        optimizer = self.trainer.optimizers[0]
        while not isinstance(optimizer, torch.optim.Optimizer):  # DeepSpeed's ZeRO optimizer wraps the SGD
            optimizer = optimizer.optimizer
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.lr_in_step.append(opt.param_groups[0]["lr"]))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.lr_between_steps.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_fit_end(self) -> None:
        if self.record and self.trainer.default_root_dir:
            out = Path(self.trainer.default_root_dir) / f"multigrid_steps_rank{self.global_rank}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"shapes": self.shapes, "lr_in_step": self.lr_in_step, "seen": self.seen}))


class FixedSizeModule(TinyShapeModule):
    """The same MLP behind a Flatten of the whole 16 x 16 image: it takes the base size only."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.head = nn.Linear(16 * 16, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.head(x.flatten(1)))


def image_loader(n: int = 96, batch_size: int = 4, shuffle: bool = True, noise: float = 0.8, **kwargs: Any) -> DataLoader:
    return DataLoader(IndexedImages(n=n, noise=noise), batch_size=batch_size, shuffle=shuffle, **kwargs)


def clip_loader(n: int = 96, batch_size: int = 4, shuffle: bool = True, noise: float = 0.8, **kwargs: Any) -> DataLoader:
    return DataLoader(IndexedClips(n=n, noise=noise), batch_size=batch_size, shuffle=shuffle, **kwargs)


__all__ = ["FixedSizeModule", "IndexedClips", "IndexedImages", "TinyShapeModule", "clip_loader", "image_loader"]
