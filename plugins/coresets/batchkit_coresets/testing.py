"""A small model and data with a source field, for the conformance suite and the 2-process tests
(import paths the 2-process jobs can load): the host's :class:`~batchkit.testing.IndexedDataset`
as dict examples with a skewed source id, and :class:`~batchkit.testing.TinyModule` on them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from batchkit.testing import IndexedDataset
from batchkit.testing import TinyModule

#: the share of each source in :class:`SourceDataset` (source 3 is the small one)
SOURCE_SHARES = (0.45, 0.3, 0.2, 0.05)
SMALL_SOURCE = 3


class SourceDataset(IndexedDataset):
    """``{"x", "y", "index", "source"}`` examples: IndexedDataset's noisy linear problem, each example
    drawn from one of four sources with shares :data:`SOURCE_SHARES` (fixed by ``seed``); each source
    shifts the inputs differently, so the sources' gradients differ."""

    def __init__(self, n: int = 192, dim: int = 8, classes: int = 3, seed: int = 0, noise: float = 0.8) -> None:
        super().__init__(n=n, dim=dim, classes=classes, seed=seed, noise=noise)
        g = torch.Generator().manual_seed(seed + 1)
        self.source = torch.multinomial(torch.tensor(SOURCE_SHARES), n, replacement=True, generator=g)
        self.x = self.x + 0.5 * torch.randn(len(SOURCE_SHARES), dim, generator=g)[self.source]

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        return {"x": self.x[i], "y": self.y[i], "index": i, "source": self.source[i]}


class SourceModule(TinyModule):
    """TinyModule (a two-layer MLP, BatchNorm on by default) on :class:`SourceDataset`'s dict batches;
    it records the dataset indices and the loss of every step."""

    def __init__(self, batch_norm: bool = True, **kwargs: Any) -> None:
        super().__init__(batch_norm=batch_norm, **kwargs)

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().training_step((batch["x"], batch["y"], batch["index"]), batch_idx)


def source_loader(n: int = 192, batch_size: int = 8, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    """A shuffled loader over :class:`SourceDataset`."""
    return DataLoader(SourceDataset(n=n), batch_size=batch_size, shuffle=shuffle, **kwargs)
