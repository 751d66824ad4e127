"""Classes the `batchkit` command tests name in their YAML (``class_path: cli_support....``; the
tests directory is on ``sys.path``): a classifier that brings its own data, and a plugin whose
setup check fails, registered as a third-party plugin by the ``refuser_installed`` fixture."""

from __future__ import annotations

from typing import Any
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl


class ClassifierModule(pl.LightningModule):
    """A linear classifier on 32 random samples (4 batches of 8), with the per-sample loss protocol;
    ``scheduler=True`` returns AdamW with a decay and a no-decay group plus a LambdaLR."""

    def __init__(self, dim: int = 4, classes: int = 3, lr: float = 0.1, scheduler: bool = False, per_sample: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, classes))
        if not per_sample:
            self.per_sample_loss = None  # type: ignore[assignment]
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, dim, generator=g), torch.randint(0, classes, (32,), generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)  # y: class ids, or class probabilities after mixup

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)

    def configure_optimizers(self) -> Any:
        if not self.hparams.scheduler:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=self.hparams.lr, betas=(0.9, 0.95))
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))}


class SetupRefuser(Plugin):
    """A third-party plugin whose setup check fails: with a plain ``ValueError`` (``how:
    value_error``), or with a :class:`PluginError` wrapped in another exception (``how: wrapped``)."""

    name = "setup_refuser"

    def __init__(self, how: Literal["value_error", "wrapped"] = "value_error") -> None:
        self.how = how

    @hookimpl
    def batchkit_setup(self, module: Any) -> None:
        if self.how == "value_error":
            raise ValueError(f"setup_refuser: {type(module).__name__} has no frobnicator; add one")
        try:
            raise PluginError("setup_refuser: the wrapped refusal")
        except PluginError as exc:
            raise RuntimeError("a wrapper around the plugin's error") from exc


class RefusingModule(ClassifierModule):
    """A module whose constructor refuses with a :class:`PluginError`: jsonargparse hands it on as
    the cause of its own ``ValueError`` when LightningCLI instantiates the model."""

    def __init__(self) -> None:
        super().__init__()
        raise PluginError("refusing_module: refused in __init__")


class CountingMiner(Plugin):
    """A third-party plugin with a prepare-data step: builds an artefact through the host's cache
    and counts the builds (``BUILDS``), for the ``batchkit prepare`` tests."""

    name = "counting_miner"
    BUILDS: list[int] = []

    def __init__(self, k: int = 3) -> None:
        self.k = k
        self.artefact: Any = None

    @hookimpl
    def batchkit_prepare_data(self, dataset: Any, cache: Any) -> None:
        x = dataset.tensors[0]
        self.artefact = cache.get_or_create(cache.key("counting_miner", x, {"k": self.k}), lambda: self._build(x))

    def _build(self, x: torch.Tensor) -> torch.Tensor:
        CountingMiner.BUILDS.append(self.k)
        return x.norm(dim=1).topk(self.k).indices
