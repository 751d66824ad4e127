"""Exact resume across a long-cycle stage change: a run that crashed in epoch 1 is resumed from a
checkpoint written mid-epoch 0 (the resumed run must rebuild the loader at the change), after the
last batch of epoch 0 (the resumed run starts in the new stage: its first loader must already have
the new shapes) and at the end of epoch 0; each ends exactly like the uninterrupted run. And a
mid-epoch resume in epoch 1 with a DataLoader worker."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from batchkit.lightning import BatchKitCallback
from batchkit.testing import FailAtStep
from batchkit.testing import make_trainer
from batchkit_multigrid import MultigridPlugin
from batchkit_multigrid.testing import TinyShapeModule
from batchkit_multigrid.testing import image_loader

# 96 images, b = 4: epoch 0 at 11 x 11 (9 batches), epochs 1 and 2 at the base 16 x 16 (9 batches each)
STEPS_PER_EPOCH = 9


def run(root: Path, callbacks: list = (), extra: list = (), ckpt_path: str | None = None, num_workers: int = 0, **kwargs):
    pl.seed_everything(0)
    plugin = MultigridPlugin(2, [1])
    module = TinyShapeModule(milestones=[2], record=False)
    callback = BatchKitCallback([plugin, *extra])
    trainer = make_trainer(root, [callback, *callbacks], max_epochs=3, **kwargs)
    trainer.fit(module, image_loader(num_workers=num_workers), ckpt_path=ckpt_path)
    return module, trainer, plugin


def test_resume_across_a_long_cycle_stage_change(tmp_path: Path) -> None:
    full, full_trainer, full_plugin = run(tmp_path / "full")
    assert full_trainer.global_step == 3 * STEPS_PER_EPOCH
    every_4 = ModelCheckpoint(dirpath=tmp_path / "every4", every_n_train_steps=4, save_top_k=-1)
    last_batch = ModelCheckpoint(dirpath=tmp_path / "step9", every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
    epoch_end = ModelCheckpoint(dirpath=tmp_path / "epoch_end", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", [every_4, last_batch, epoch_end], [FailAtStep(12)], enable_checkpointing=True)
    checkpoints = {
        "mid epoch 0": (tmp_path / "every4" / "epoch=0-step=4.ckpt", 4),
        "last batch of epoch 0": (tmp_path / "step9" / "epoch=0-step=9.ckpt", 9),
        "end of epoch 0": (tmp_path / "epoch_end" / "epoch=0-step=9.ckpt", 9),
    }
    for what, (path, step) in checkpoints.items():
        state = torch.load(path, weights_only=False)["callbacks"]["BatchKitCallback"]["plugins"]["multigrid"]
        assert state["epoch"] == 0 and state["stage"] == 0 and state["lr_scale"] == 2.0
        assert state["loader_epoch"] == (0 if step == 4 else 1), what  # where the next loader starts
        resumed, trainer, plugin = run(tmp_path / f"resumed {step} {what}", ckpt_path=str(path))
        assert resumed.seen == full.seen[step:], what
        assert resumed.shapes == full.shapes[step:], what
        assert resumed.lr_in_step == pytest.approx(full.lr_in_step[step:], rel=0, abs=0), what
        assert trainer.global_step == full_trainer.global_step
        assert plugin.batchkit_state_dict() == full_plugin.batchkit_state_dict(), what
        for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
            assert torch.equal(a, b), f"{what}: {name}"


def test_resume_in_a_later_epoch_with_a_loader_worker(tmp_path: Path) -> None:
    """With a worker process the DataLoader draws batches as soon as Lightning creates its iterator,
    before Lightning sets the epoch, and a resumed run keeps that iterator: the plugin tells its
    chain the epoch it serves when it builds the sampler, so the resumed epoch 1 is epoch 1's order."""
    full, _, _ = run(tmp_path / "full", num_workers=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=13, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crashed", [ckpt], [FailAtStep(14)], num_workers=1, enable_checkpointing=True)
    resumed, _, _ = run(tmp_path / "resumed", ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=13.ckpt"), num_workers=1)
    assert resumed.seen == full.seen[13:]
    assert resumed.shapes == full.shapes[13:]
