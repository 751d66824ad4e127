"""Helpers for testing plugins: importable by any plugin package's tests."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

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


class IndexedDataset(Dataset):
    """``(x, y, index)`` samples of a fixed random linear-classification problem: the index lets a
    test see which samples each step trained on. ``noise`` > 0 adds label noise, so per-sample
    losses keep differing as training goes on (what loss-based selection needs)."""

    def __init__(self, n: int = 96, dim: int = 8, classes: int = 3, seed: int = 0, noise: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        logits = self.x @ torch.randn(dim, classes, generator=g)
        if noise:
            logits = logits + noise * torch.randn(n, classes, generator=g)
        self.y = logits.argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i
