"""BatchKitCallback in a real single-process Lightning run: all five stages, hook order and
arguments, loggers, checkpoints and exact mid-epoch resume."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import IndexedDataset
from helpers import RecordingPlugin
from helpers import TinyModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl
from batchkit.lightning import BatchKitCallback
from batchkit.testing import FailAtStep
from batchkit.testing import make_trainer


class EvenBatchesOnly(Plugin):
    """Sampler stage: keeps every other batch, so len() halves."""

    name = "even_batches"

    class Sampler:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def set_epoch(self, epoch: int) -> None:
            self.inner.sampler.set_epoch(epoch)

        def __iter__(self):
            return (b for i, b in enumerate(self.inner) if i % 2 == 0)

        def __len__(self) -> int:
            return (len(self.inner) + 1) // 2

    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any) -> Any:
        return self.Sampler(batch_sampler)


class TagCollate(Plugin):
    """Collator stage: returns a tuple (the host makes it a list) and doubles x."""

    name = "tag_collate"

    @hookimpl
    def batchkit_wrap_collate(self, collate_fn: Any) -> Any:
        return DoubleX(collate_fn)


class DoubleX:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, samples: list) -> tuple:
        x, y, idx = self.inner(samples)
        return (2 * x, y, idx)


class KeepFirstHalf(Plugin):
    """Batch stage: keeps the first half of every batch."""

    name = "keep_half"

    @hookimpl
    def batchkit_transform_batch(self, batch: list) -> list:
        n = max(1, len(batch[0]) // 2)
        return [t[:n] for t in batch]


class AddConstantLoss(Plugin):
    """Loss stage: adds 10 (no gradient change) so the logged loss shows it."""

    name = "add_ten"

    def __init__(self) -> None:
        self.seen: list[float] = []

    @hookimpl
    def batchkit_transform_loss(self, loss: torch.Tensor) -> torch.Tensor:
        self.seen.append(float(loss.detach()))
        return loss + 10.0


class UseAdam(Plugin):
    """Optimizer stage: replaces the module's SGD with Adam at the same lr."""

    name = "use_adam"

    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer: torch.optim.Optimizer, module: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(module.parameters(), lr=optimizer.param_groups[0]["lr"])


def test_all_five_stages_apply_to_an_unmodified_module_and_loader(tmp_path: Path) -> None:
    recorder = RecordingPlugin()
    add_ten = AddConstantLoss()
    plugins = [recorder, EvenBatchesOnly(), TagCollate(), KeepFirstHalf(), add_ten, UseAdam()]
    module = TinyModule()

    class StepLosses(pl.Callback):
        """What Lightning took as the step's loss (after the loss stage)."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.losses.append(float(outputs["loss"]))

    step_losses = StepLosses()
    trainer = make_trainer(tmp_path, [BatchKitCallback(plugins), step_losses], max_epochs=1)
    trainer.fit(module, DataLoader(IndexedDataset(n=64), batch_size=8, shuffle=True))

    # sampler: 8 batches -> 4; batch stage: 8 samples -> 4
    assert [len(b) for b in module.seen] == [4, 4, 4, 4]
    # collate ran (x doubled) and the tuple it returned reached the batch stage as a list
    batch_events = recorder.hooks("transform_batch")
    assert all("list" in e["args"]["batch"] for e in batch_events)
    # loss stage: the returned loss (what Lightning back-propagated and the step output) is +10
    assert len(add_ten.seen) == 4 and all(0 < v < 5 for v in add_ten.seen)
    assert step_losses.losses == pytest.approx([v + 10.0 for v in add_ten.seen])
    # optimizer stage: Lightning stepped the replacement
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert trainer.optimizers[0].state  # Adam state exists: it was stepped
    # the module is restored after fit: methods are the class's again
    assert "training_step" not in vars(module) and "configure_optimizers" not in vars(module)


def test_collate_stage_doubles_inputs(tmp_path: Path) -> None:
    seen: list[torch.Tensor] = []

    class Spy(Plugin):
        name = "spy"

        @hookimpl
        def batchkit_transform_batch(self, batch: list) -> None:
            seen.append(batch[0].clone())

    ds = IndexedDataset(n=16)
    trainer = make_trainer(tmp_path, [BatchKitCallback([TagCollate(), Spy()])], max_epochs=1)
    trainer.fit(TinyModule(), DataLoader(ds, batch_size=16))
    assert torch.allclose(seen[0], 2 * ds.x)


def test_hooks_are_called_in_order_with_their_arguments_under_accumulation(tmp_path: Path) -> None:
    journal: list = []
    a, b = RecordingPlugin("a", journal, order=1), RecordingPlugin("b", journal, order=0)
    callback = BatchKitCallback([a, b])
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, accumulate_grad_batches=2)
    # 40 samples, batch 8: 5 batches per epoch -> steps after batches 1, 3 and 4 (last, partial)
    trainer.fit(TinyModule(), DataLoader(IndexedDataset(n=40), batch_size=8, shuffle=True))

    hooks = [h for tag, h in journal if tag == "b"]
    # setup first, then the optimizer (strategy setup), then the loader (built when the fit loop asks)
    assert hooks[:5] == ["setup", "wrap_optimizer", "wrap_collate", "wrap_batch_sampler", "epoch_start"]
    assert hooks[5:9] == ["transform_batch", "transform_loss", "transform_batch", "transform_loss"]  # micro-batches 0, 1
    assert hooks[9:11] == ["before_optimizer_step", "step_end"]
    assert hooks[-2:] == ["epoch_end", "teardown"]
    # chain order: b (order 0) is called before a (order 1) in every hook
    first_batch = [tag for tag, h in journal if h == "transform_batch"][:2]
    assert first_batch == ["b", "a"]
    steps = b.hooks("before_optimizer_step")
    assert [(e["epoch"], e["batch_idx"]) for e in steps] == [(0, 1), (0, 3), (0, 4), (1, 1), (1, 3), (1, 4)]
    assert all(e["last_micro"] for e in steps)
    assert [e["global_step"] for e in b.hooks("step_end")] == [1, 2, 3, 4, 5, 6]
    assert [e["args"]["epoch"] for e in b.hooks("epoch_start")] == [0, 1]
    assert [e["args"]["epoch"] for e in b.hooks("epoch_end")] == [0, 1]
    micro = [(e["batch_idx"], e["micro_step"], e["last_micro"]) for e in b.hooks("transform_batch")][:5]
    assert micro == [(0, 0, False), (1, 1, True), (2, 0, False), (3, 1, True), (4, 0, True)]
    losses = b.hooks("transform_loss")
    assert len(losses) == 10 and all(e["args"]["requires_grad"] for e in losses)
    assert b.hooks("teardown") and b.state["counter"] == 6


def test_each_epoch_covers_the_dataset_once_and_is_reshuffled(tmp_path: Path) -> None:
    module = TinyModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback([RecordingPlugin()])], max_epochs=3)
    trainer.fit(module, DataLoader(IndexedDataset(n=48), batch_size=8, shuffle=True))
    epochs = [sum(module.seen[i * 6:(i + 1) * 6], []) for i in range(3)]
    assert all(sorted(e) == list(range(48)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_unshuffled_loader_keeps_dataset_order(tmp_path: Path) -> None:
    module = TinyModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback([RecordingPlugin()])], max_epochs=1)
    trainer.fit(module, DataLoader(IndexedDataset(n=20), batch_size=8, shuffle=False))
    assert module.seen == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


class DataModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(IndexedDataset(n=32), batch_size=8, shuffle=True)


def test_datamodule_loaders_are_wrapped_and_restored(tmp_path: Path) -> None:
    module, dm = TinyModule(), DataModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback([EvenBatchesOnly()])], max_epochs=1)
    trainer.fit(module, datamodule=dm)
    assert len(module.seen) == 2
    assert "train_dataloader" not in vars(dm)


def test_custom_sampler_is_refused_with_a_fix(tmp_path: Path) -> None:
    ds = IndexedDataset(n=16)
    loader = DataLoader(ds, batch_size=4, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 16, 16))
    trainer = make_trainer(tmp_path, [BatchKitCallback([EvenBatchesOnly()])], max_epochs=1)
    with pytest.raises(PluginError, match=r"custom sampler \(WeightedRandomSampler\).*sampler-stage plugin"):
        trainer.fit(TinyModule(), loader)


def test_scheduler_follows_a_replaced_optimizer(tmp_path: Path) -> None:
    class WithScheduler(TinyModule):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    trainer = make_trainer(tmp_path, [BatchKitCallback([UseAdam()])], max_epochs=2)
    trainer.fit(WithScheduler(), DataLoader(IndexedDataset(n=16), batch_size=8))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.Adam)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


def test_plugin_metrics_reach_csv_and_wandb_loggers(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers import WandbLogger

    from batchkit_mixup import MixupPlugin

    class ThreeClassMixup(TinyModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch[0], batch[1]  # y: mixed class probabilities
            return torch.nn.functional.cross_entropy(self(x), y)

    class DropIndex(Plugin):
        name = "drop_index"
        order = -1

        def __init__(self) -> None:
            self.dropped = 0

        @hookimpl
        def batchkit_transform_batch(self, batch: list) -> list:
            self.dropped += 1
            return batch[:2]

        @hookimpl
        def batchkit_epoch_end(self) -> None:
            self.log("batches_this_epoch", self.dropped)

    csv_logger = CSVLogger(tmp_path / "csv")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="batchkit-test")
    callback = BatchKitCallback([DropIndex(), MixupPlugin(alpha=0.4, num_classes=3)])
    trainer = make_trainer(tmp_path, [callback], max_epochs=1, logger=[csv_logger, wandb_logger], log_every_n_steps=1)
    trainer.fit(ThreeClassMixup(), DataLoader(IndexedDataset(n=32), batch_size=8))
    wandb_logger.experiment.finish()

    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    lambdas = [float(r["batchkit/mixup/lambda"]) for r in rows if r.get("batchkit/mixup/lambda")]
    assert len(lambdas) == 4 and all(0 < v < 1 for v in lambdas)
    per_epoch = [float(r["batchkit/drop_index/batches_this_epoch"]) for r in rows if r.get("batchkit/drop_index/batches_this_epoch")]
    assert per_epoch == [4.0]  # a metric logged at epoch end lands once, per epoch
    run_files = list(Path(tmp_path, "wandb").glob("offline-run-*/run-*.wandb"))
    assert run_files
    # wandb's service writes the offline run file in the background, after finish() returns
    for _ in range(120):
        if b"batchkit/mixup/lambda" in run_files[0].read_bytes():
            break
        time.sleep(0.5)
    assert b"batchkit/mixup/lambda" in run_files[0].read_bytes()



def _resume_run(tmp_path: Path, plugins: list, **kwargs: Any) -> tuple[TinyModule, pl.Trainer]:
    pl.seed_everything(0)
    module = TinyModule(batch_norm=True)
    trainer = make_trainer(tmp_path, [BatchKitCallback(plugins), *kwargs.pop("callbacks", [])], max_epochs=3, **kwargs)
    return module, trainer


def test_mid_epoch_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    from batchkit_mixup import MixupPlugin

    class MixX(MixupPlugin):
        """mixup on inputs only (keeps labels and index), to exercise a stateful random plugin."""

        @hookimpl
        def batchkit_transform_batch(self, batch: list) -> list:
            lam = float(self.rng.beta(self.alpha, self.alpha))
            perm = torch.from_numpy(self.rng.permutation(len(batch[0])))
            return [lam * batch[0] + (1 - lam) * batch[0][perm], batch[1], batch[2]]

    recorders: list[RecordingPlugin] = []

    def plugins() -> list:
        recorders.append(RecordingPlugin())
        return [recorders[-1], MixX(alpha=0.4)]

    loader = lambda: DataLoader(IndexedDataset(n=56), batch_size=8, shuffle=True)  # noqa: E731 - 7 batches/epoch

    # uninterrupted: 3 epochs
    full, trainer = _resume_run(tmp_path / "full", plugins())
    trainer.fit(full, loader())

    # interrupted in the middle of epoch 1 (global step 10 = batch 3 of epoch 1), after a checkpoint at step 9
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=9, save_top_k=-1)
    part, trainer = _resume_run(tmp_path / "part", [*plugins(), FailAtStep(10)], callbacks=[ckpt], enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(part, loader())
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=1-step=9.ckpt"]  # the crash did not lose it

    resumed, trainer = _resume_run(tmp_path / "resumed", plugins())
    trainer.fit(resumed, loader(), ckpt_path=saved[0])
    assert part.seen[:9] + resumed.seen == full.seen  # the same samples in the same order
    # the context is where the uninterrupted run's was (epoch included, though Lightning skips
    # on_train_epoch_start when it resumes mid-epoch)
    where = lambda rec: [(e["epoch"], e["batch_idx"], e["global_step"]) for e in rec.hooks("step_end")]  # noqa: E731
    assert where(recorders[-1]) == where(recorders[0])[9:]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name  # bit-identical weights and BatchNorm statistics


def test_resume_with_a_different_plugin_list_is_refused(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    module, trainer = _resume_run(tmp_path / "a", [RecordingPlugin()], callbacks=[ckpt], enable_checkpointing=True)
    trainer.fit(module, DataLoader(IndexedDataset(n=16), batch_size=8))
    module, trainer = _resume_run(tmp_path / "b", [])
    with pytest.raises(PluginError, match=r"not registered: \['recorder'\]"):
        trainer.fit(module, DataLoader(IndexedDataset(n=16), batch_size=8), ckpt_path=sorted((tmp_path / "ckpt").glob("*.ckpt"))[0])


class OneOff(Plugin):
    """Logs a one-off value at step 3 and a per-step value on the steps the Trainer logs."""

    name = "one_off"

    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None:
        if ctx.global_step == 3:
            self.log("event", 7.0)
        if ctx.logs_this_step:
            self.log("every_logged_step", float(ctx.global_step))


def test_plugin_metrics_are_written_once_at_their_step_and_follow_the_logging_cadence(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path / "csv")
    trainer = make_trainer(tmp_path, [BatchKitCallback([OneOff()])], max_epochs=2, logger=logger, log_every_n_steps=2)
    trainer.fit(TinyModule(), DataLoader(IndexedDataset(n=40), batch_size=8))  # 5 steps per epoch
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    events = [(int(r["step"]), float(r["batchkit/one_off/event"])) for r in rows if r.get("batchkit/one_off/event")]
    # once, in the row of the step it belongs to: the third step, index 2 as Lightning counts rows
    # (it used to repeat on every logged step)
    assert events == [(2, 7.0)]
    cadence = [float(r["batchkit/one_off/every_logged_step"]) for r in rows if r.get("batchkit/one_off/every_logged_step")]
    assert cadence == [2.0, 4.0, 6.0, 8.0, 10.0]
