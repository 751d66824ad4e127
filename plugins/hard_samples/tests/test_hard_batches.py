"""hard_batches: the top-delta rule on hand-made loss tables, the round stream, and real Lightning
runs (baseline equivalence at delta=1, step budget, choices against the recorded losses, exact
mid-round resume, DataLoader workers, errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hard_samples_support import LABEL_NOISE
from hard_samples_support import RecordingNet
from hard_samples_support import batch_ids
from hard_samples_support import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import BatchSampler
from torch.utils.data import DataLoader
from torch.utils.data import SequentialSampler

from batchkit import ConfigError
from batchkit import PluginError
from batchkit.host import BatchKitContext
from batchkit.lightning import BatchKitCallback
from batchkit_hard_samples import HardBatchSelection
from batchkit_hard_samples import top_delta_batches
from batchkit.testing import FailAtStep
from batchkit.testing import IndexedDataset


# -- the rule on hand-made tables ---------------------------------------------------------------


def test_top_delta_selection_on_a_hand_made_loss_table() -> None:
    losses = [0.5, 2.0, 0.1, 1.5, 0.9, 1.5]
    assert top_delta_batches(losses, 3) == [1, 3, 5]  # 2.0, 1.5, 1.5, returned in index order
    assert top_delta_batches(losses, 2) == [1, 3]  # the tie 1.5/1.5 goes to the lower index
    assert top_delta_batches(losses, 1) == [1]
    assert top_delta_batches(losses, 6) == [0, 1, 2, 3, 4, 5]
    assert top_delta_batches([float("inf"), 3.0, float("inf")], 2) == [0, 2]  # never trained: first
    with pytest.raises(ValueError, match="k must be in"):
        top_delta_batches(losses, 0)


def _drive(plugin: HardBatchSelection, sampler: Any, epoch: int, loss: Any, partition: list) -> list[int]:
    """Iterate one epoch like a training loop with num_workers=0: draw a batch, then record its
    loss, ``loss(position, batch id)``."""
    ctx = BatchKitContext()
    sampler.set_epoch(epoch)
    trained = []
    for batch_idx, batch in enumerate(sampler):
        j = partition.index(batch)
        trained.append(j)
        ctx.batch_idx = batch_idx
        plugin.batchkit_transform_loss(torch.tensor(loss(epoch * len(sampler) + batch_idx, j)), ctx)
    return trained


def _scripted(num_samples: int, batch_size: int, delta: float) -> tuple[HardBatchSelection, Any, list]:
    plugin = HardBatchSelection(delta=delta)
    base = BatchSampler(SequentialSampler(range(num_samples)), batch_size, drop_last=False)
    partition = [list(b) for b in base]
    sampler = plugin.batchkit_wrap_batch_sampler(base, BatchKitContext())
    return plugin, sampler, partition


def test_rounds_follow_the_last_seen_losses_by_hand() -> None:
    plugin, sampler, partition = _scripted(12, 2, delta=0.5)  # M = 6, k = 3
    assert (plugin.num_batches, plugin.round_size, len(sampler)) == (6, 3, 6)
    warm_up = {0: 0.5, 1: 2.0, 2: 0.1, 3: 1.5, 4: 0.9, 5: 1.5}
    round_1 = {1: 0.2, 3: 1.0, 5: 0.05}  # what round 1's batches report when trained (positions 6-8)
    round_2 = {0: 0.3, 3: 0.15, 4: 0.35}  # and round 2's (positions 9-11)

    def loss(position: int, j: int) -> float:
        return warm_up[j] if position < 6 else round_1[j] if position < 9 else round_2[j]

    assert _drive(plugin, sampler, 0, loss, partition) == [0, 1, 2, 3, 4, 5]  # warm-up: every batch
    epoch1 = _drive(plugin, sampler, 1, loss, partition)
    # round 1 = top-3 of the warm-up losses {2.0: id 1, 1.5: id 3, 1.5: id 5 (tie, lower id first)}
    assert epoch1[:3] == [1, 3, 5]
    # round 2 = top-3 of [0.5, 0.2, 0.1, 1.0, 0.9, 0.05]: ids 0, 2, 4 keep their stale warm-up losses
    assert epoch1[3:] == [0, 3, 4]
    assert plugin.table.tolist() == pytest.approx([0.5, 0.2, 0.1, 1.0, 0.9, 0.05])
    # round 3 = top-3 of [0.3, 0.2, 0.1, 0.15, 0.35, 0.05] = {4, 0, 1}, chosen when its first batch is drawn
    sampler.set_epoch(2)
    first = next(iter(sampler))
    assert plugin.selections[3] == [0, 1, 4] and first == partition[0]
    assert plugin.table.tolist() == pytest.approx([0.3, 0.2, 0.1, 0.15, 0.35, 0.05])


def test_rounds_cross_epoch_boundaries_when_k_does_not_divide_m() -> None:
    plugin, sampler, partition = _scripted(14, 2, delta=0.5)  # M = 7, k = 3
    loss = lambda position, j: float(j)  # noqa: E731 - constant losses, higher id higher loss
    _drive(plugin, sampler, 0, loss, partition)
    epoch1 = _drive(plugin, sampler, 1, loss, partition)  # positions 7..13
    # every round picks {4, 5, 6}; round 3 starts at position 13, the last of epoch 1
    assert epoch1 == [4, 5, 6, 4, 5, 6, 4]
    epoch2 = _drive(plugin, sampler, 2, loss, partition)  # positions 14..20: round 3 goes on
    assert epoch2 == [5, 6, 4, 5, 6, 4, 5]
    assert sorted(plugin.selections) == [3, 4, 5]  # rounds that ended before epoch 2 were dropped


def test_bad_options_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"hard_batches: delta must be in \(0, 1\], got 0.*delta: 0.5"):
        HardBatchSelection(delta=0)
    with pytest.raises(ValueError, match="hard_batches: delta"):
        HardBatchSelection(delta=1.5)
    with pytest.raises(ValueError, match="hard_batches: lookahead must be >= 0"):
        HardBatchSelection(lookahead=-1)
    with pytest.raises(ConfigError, match="entry 'hard'.*delta must be in"):
        BatchKitCallback({"hard": {"plugin": "hard_batches", "delta": 2.0}})


# -- real Lightning runs ------------------------------------------------------------------------


def loader(n: int = 56, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    return DataLoader(IndexedDataset(n=n, noise=LABEL_NOISE), batch_size=8, shuffle=shuffle, **kwargs)  # n=56: M = 7


def fit(tmp_path: Path, plugins: list, data: DataLoader | None = None, **kwargs: Any) -> tuple[RecordingNet, pl.Trainer]:
    pl.seed_everything(0)
    module = RecordingNet()
    callbacks = [BatchKitCallback(plugins), *kwargs.pop("callbacks", [])]
    fit_kwargs = kwargs.pop("fit_kwargs", {})
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(module, data if data is not None else loader(), **fit_kwargs)
    return module, trainer


def test_delta_one_reproduces_the_baseline_exactly(tmp_path: Path) -> None:
    # The paper's baseline: a fixed partition (shuffle=False), every batch every epoch.
    base, _ = fit(tmp_path / "a", [], loader(shuffle=False))
    hard, _ = fit(tmp_path / "b", [HardBatchSelection(delta=1.0)], loader(shuffle=False))
    assert hard.seen == base.seen and len(base.seen) == 21
    for (name, a), (_, b) in zip(base.state_dict().items(), hard.state_dict().items()):
        assert torch.equal(a, b), name  # bit-identical weights and BatchNorm statistics


@pytest.mark.parametrize("delta", [0.25, 0.5])
def test_step_budget_equals_the_baselines_and_rounds_pick_the_highest_last_seen_losses(tmp_path: Path, delta: float) -> None:
    base, base_trainer = fit(tmp_path / "base", [], max_epochs=4)
    plugin = HardBatchSelection(delta=delta)
    hard, trainer = fit(tmp_path / "hard", [plugin], max_epochs=4)
    m, k = 7, max(1, int(delta * 7))
    assert trainer.global_step == base_trainer.global_step == 4 * m  # the same number of optimizer steps
    assert len(hard.seen) == len(base.seen) == 4 * m

    ids = batch_ids(hard.seen, plugin._partition)
    assert ids[:m] == list(range(m))  # warm-up: the fixed partition, once, in order
    # Replay the recorded (batch, loss) stream: each round must be the top-k of the last-seen
    # losses of all positions before it, trained in index order.
    last_seen = [float("inf")] * m
    for position, (j, loss) in enumerate(zip(ids, hard.losses)):
        if position >= m and (position - m) % k == 0:
            expected = top_delta_batches(last_seen, k)
            got = ids[position:position + k]
            assert got == expected[: len(got)], position
        last_seen[j] = loss
        if position + 1 == plugin.applied_upto:  # the table holds the positions before the last choice
            table_then = list(last_seen)
    assert plugin.table.tolist() == pytest.approx(table_then, rel=1e-6)


def test_gradient_accumulation_counts_loader_batches(tmp_path: Path) -> None:
    plugin = HardBatchSelection(delta=0.5)
    hard, trainer = fit(tmp_path, [plugin], max_epochs=3, accumulate_grad_batches=2)
    _, base_trainer = fit(tmp_path / "base", [], max_epochs=3, accumulate_grad_batches=2)
    assert trainer.global_step == base_trainer.global_step == 3 * 4  # ceil(7 / 2) steps per epoch
    assert len(hard.seen) == 21 and plugin.recorded_upto == 21  # every loader batch is a position



@pytest.mark.parametrize(
    ("every", "crash", "resume_step"),
    [
        (4, 10, 8),  # resume at position 8: mid round 1 (positions 7-9) and mid epoch 1
        (7, 15, 14),  # resume at position 14: epoch 2 starts inside round 3 (positions 13-15), chosen in epoch 1
    ],
)
def test_mid_round_resume_reproduces_the_uninterrupted_run(tmp_path: Path, every: int, crash: int, resume_step: int) -> None:
    full_plugin = HardBatchSelection(delta=0.5)
    full, _ = fit(tmp_path / "full", [full_plugin], max_epochs=4)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "part", [HardBatchSelection(delta=0.5), FailAtStep(crash)], max_epochs=4,
            callbacks=[ckpt], enable_checkpointing=True)
    (path,) = [p for p in (tmp_path / "ckpt").glob("*.ckpt") if p.stem.endswith(f"step={resume_step}")]

    resumed_plugin = HardBatchSelection(delta=0.5)
    resumed, _ = fit(tmp_path / "resumed", [resumed_plugin], max_epochs=4, fit_kwargs={"ckpt_path": path})
    assert full.seen[:resume_step] + resumed.seen == full.seen
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(full_plugin.table, resumed_plugin.table)


def test_resume_with_another_delta_is_refused(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=9, save_top_k=-1)
    fit(tmp_path / "a", [HardBatchSelection(delta=0.5)], max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    (path,) = (tmp_path / "ckpt").glob("*step=9.ckpt")
    with pytest.raises(PluginError, match="saved with delta=0.5.*Resume with delta: 0.5"):
        fit(tmp_path / "b", [HardBatchSelection(delta=0.25)], max_epochs=2, fit_kwargs={"ckpt_path": path})


def test_dataloader_workers_set_the_lookahead(tmp_path: Path) -> None:
    data = lambda: loader(num_workers=1, prefetch_factor=2)  # noqa: E731 - indices drawn 2 batches ahead
    # a lookahead set by hand below what the loader does is refused with the value to use
    with pytest.raises(PluginError, match="draws 2 batches ahead.*lookahead: 2"):
        fit(tmp_path / "a", [HardBatchSelection(delta=0.5, lookahead=0)], data())
    # unset, it follows the host's loader lookahead (num_workers * prefetch_factor)
    plugin = HardBatchSelection(delta=0.5)
    hard, trainer = fit(tmp_path / "b", [plugin], data())
    assert plugin.lookahead == 2
    assert trainer.global_step == 21
    # a round's choice uses the losses of the positions before its start minus the lookahead
    ids = batch_ids(hard.seen, plugin._partition)
    last_seen = [float("inf")] * 7
    for position in range(7, 21):
        if (position - 7) % 3 == 0:
            for p in range(position - 2):
                last_seen[ids[p]] = hard.losses[p]
            assert ids[position:position + 3] == top_delta_batches(last_seen, 3)[: len(ids[position:position + 3])]


class NoLossNet(RecordingNet):
    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append([0])
        return None

    def on_train_batch_end(self, *args: Any) -> None:  # keep Lightning's loop going without a loss
        pass


def test_a_training_step_without_loss_fails_at_the_first_step(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = NoLossNet()
    trainer = make_trainer(tmp_path, [BatchKitCallback([HardBatchSelection()])])
    with pytest.raises(PluginError, match="training_step must return the mini-batch loss"):
        trainer.fit(module, loader())
    assert len(module.seen) == 1
