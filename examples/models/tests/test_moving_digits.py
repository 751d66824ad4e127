"""Moving-digit clips: determinism, the label (the class of the moving digit), the motion, the data
module, and a short real training run of the 3D CNN."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from batchkit_examples.moving_digits import MovingDigits
from batchkit_examples.moving_digits import MovingDigitsCNN
from batchkit_examples.moving_digits import MovingDigitsDataModule
from batchkit_examples.moving_digits import moving_digit_clip


def block_pool() -> tuple[np.ndarray, np.ndarray]:
    """Ten 'digits': solid 28x28 blocks of brightness 20·(k+1) for class k, so every pixel says
    which digit it belongs to (the brighter one where they overlap)."""
    images = np.stack([np.full((28, 28), 20 * (k + 1), dtype=np.uint8) for k in range(10)])
    return images, np.arange(10)


def centroid(frame: np.ndarray, value: int) -> np.ndarray | None:
    """Centre of the block of that brightness, when it is fully visible (not under the other)."""
    ys, xs = np.nonzero(frame == value)
    return None if len(ys) < 28 * 28 else np.array([ys.mean(), xs.mean()])


def test_clips_are_deterministic_and_distinct():
    images, labels = block_pool()
    data = MovingDigits(images, labels, 50, data_seed=3)
    again = MovingDigits(images, labels, 50, data_seed=3)
    x, y = data[7]
    assert x.shape == (1, 16, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, again[7][0]) and int(y) == int(again[7][1])
    assert not torch.equal(x, data[8][0])
    assert not torch.equal(x, MovingDigits(images, labels, 50, data_seed=4)[7][0])
    with pytest.raises(IndexError):
        data[50]


def test_the_label_is_the_class_of_the_moving_digit():
    images, labels = block_pool()
    moved = 0
    for i in range(40):
        clip, label = moving_digit_clip(images, labels, np.random.default_rng((0, i)))
        assert clip.shape == (16, 64, 64)
        values = set(np.unique(clip).tolist()) - {0}
        assert 20 * (label + 1) in values and len(values) == 2  # two digits of different classes
        other = (values - {20 * (label + 1)}).pop()
        path = [centroid(f, 20 * (label + 1)) for f in clip]
        still = [centroid(f, other) for f in clip]
        # the labelled digit moves 1.5 to 3 px per frame (up to rounding, and less at a bounce) ...
        steps = [np.linalg.norm(b - a) for a, b in zip(path, path[1:]) if a is not None and b is not None]
        if len(steps) > 5:
            moved += 1
            assert np.median(steps) > 0.9 and max(steps) <= 3 + 2**0.5  # rounding: up to 1/2 px per axis at each end
        # ... and the other one never moves (compare frames where it is not occluded at all)
        whole = [c for c in still if c is not None]
        assert all(np.allclose(c, whole[0]) for c in whole)
    assert moved >= 15  # solid blocks overlap often; real digits are mostly background


def test_data_module_uses_real_mnist_digits_split_by_handwriting():
    dm = MovingDigitsDataModule(batch_size=8, train_clips=40, val_clips=20, seed=1)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 16, 64, 64) and y.shape == (8,)
    assert len(dm.val_set) == 20 and len(dm.train_dataloader()) == 5
    # validation clips are drawn from held-out digits, training clips from the training digits
    assert dm.train_set.images.shape[0] == 4000 and dm.val_set.images.shape[0] == 1000
    train_pixels = {dm.train_set.images[i].tobytes() for i in range(len(dm.train_set.images))}
    assert not any(dm.val_set.images[i].tobytes() in train_pixels for i in range(100))
    # the seed orders the training clips, not which clips exist
    other = MovingDigitsDataModule(batch_size=8, train_clips=40, val_clips=20, seed=2)
    other.setup("fit")
    assert torch.equal(dm.train_set[3][0], other.train_set[3][0])
    order = lambda m: torch.cat([yb for _, yb in m.train_dataloader()]).tolist()  # noqa: E731
    assert order(dm) != order(other)


@pytest.mark.parametrize("size", [(16, 64, 64), (4, 45, 45), (8, 32, 32), (4, 32, 32), (2, 23, 23), (16, 90, 90)])
def test_model_accepts_other_clip_shapes(size):
    model = MovingDigitsCNN()
    assert model(torch.rand(3, 1, *size)).shape == (3, 10)


def test_a_short_training_run_learns(tmp_path):
    """Lightning fit on 64 clips: the model fits its training clips (loss falls well below ln 10)."""
    pl.seed_everything(0, workers=True)
    torch.set_num_threads(1)
    dm = MovingDigitsDataModule(batch_size=16, train_clips=64, val_clips=32, val_batch_size=32)
    model = MovingDigitsCNN(channels=8, lr=0.05, lr_milestones=[15])
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(max_epochs=20, check_val_every_n_epoch=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                         default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert "val/acc" in trainer.callback_metrics
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert first > 2.0 and last < 0.6 * first, (first, last)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.005)
