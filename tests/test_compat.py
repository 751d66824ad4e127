"""Contract tests for batchkit._compat: each private or implicit Lightning behaviour batchkit relies
on, checked against the installed Lightning, so an upgrade that changes one fails here by name."""

from __future__ import annotations

from pathlib import Path

import lightning
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.utils.data import DataLoader

from batchkit import _compat
from batchkit.testing import IndexedDataset
from batchkit.testing import TinyModule
from batchkit.testing import make_trainer


def test_the_fit_loop_keeps_loaders_given_to_fit_in_its_data_source(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [], max_epochs=1, limit_train_batches=1)
    loader = DataLoader(IndexedDataset(n=8), batch_size=4)
    trainer.fit(TinyModule(), loader)
    source = _compat.train_data_source(trainer)
    assert source.instance is loader
    assert source.dataloader() is loader  # what the fit loop calls on every (re)load


def test_the_fit_loop_reloads_the_train_loader_when_the_reload_setting_is_due(tmp_path: Path) -> None:
    requests: list[int] = []

    class Counting(TinyModule):
        def train_dataloader(self) -> DataLoader:
            requests.append(self.current_epoch)
            if self.current_epoch == 0 and len(requests) == 1:
                self._previous = _compat.reload_train_loader_before_next_epoch(self.trainer)
            return DataLoader(IndexedDataset(n=8), batch_size=4)

        def on_train_epoch_start(self) -> None:
            if self.current_epoch == 1:
                _compat.restore_reload_setting(self.trainer, self._previous)

    trainer = make_trainer(tmp_path, [], max_epochs=3)
    trainer.fit(Counting())
    assert requests == [0, 1]  # rebuilt once, at the start of epoch 1, and not again after the restore
    assert trainer.reload_dataloaders_every_n_epochs == 0


def test_deepspeed_strategy_exposes_the_engine_and_optimizers_nest() -> None:
    assert isinstance(DeepSpeedStrategy.deepspeed_engine, property)

    class Wrapped:  # what DeepSpeed's ZeRO optimizers look like: the torch optimizer inside
        def __init__(self, inner: torch.optim.Optimizer) -> None:
            self.optimizer = inner

    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    class Trainer:
        optimizers = [Wrapped(inner)]

    assert _compat.torch_optimizers(Trainer()) == [inner]


def test_lightning_version_is_one_batchkit_was_tested_with() -> None:
    major, minor = (int(p) for p in lightning.__version__.split(".")[:2])
    assert (2, 4) <= (major, minor) < (2, 7), f"batchkit._compat was checked against Lightning 2.4-2.6, not {lightning.__version__}"


def test_callback_metrics_is_the_dict_lightning_updates_in_place(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [], max_epochs=1, limit_train_batches=1)
    trainer.fit(TinyModule(), DataLoader(IndexedDataset(n=8), batch_size=4))
    _compat.publish_callback_metrics(trainer, {"batchkit/x/y": 2.5})
    assert float(trainer.callback_metrics["batchkit/x/y"]) == 2.5 and "train_loss" in trainer.callback_metrics
