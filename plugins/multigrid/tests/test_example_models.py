"""The example models take every shape a default schedule asks for, resized by the collate functions:
the 3D CNN on moving-digit clips (C, T, H, W) and the MNIST SmallCNN on images (C, H, W)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from batchkit_examples.mnist import SmallCNN
from batchkit_examples.moving_digits import MovingDigits
from batchkit_examples.moving_digits import MovingDigitsCNN
from batchkit_multigrid import MultigridSchedule
from batchkit_multigrid import collate_at_size
from batchkit_multigrid import input_size


def all_sizes(schedule: MultigridSchedule) -> set[tuple[int, ...]]:
    return {schedule.batch_shape(s.start_epoch, i).size for s in schedule.stages for i in range(3)}


def test_moving_digit_clips_at_every_schedule_shape():
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    data = MovingDigits(images, np.arange(20) % 10, 8)
    schedule = MultigridSchedule(input_size(data), 12, [8, 11], base_batch_size=2)
    sizes = all_sizes(schedule)
    assert sizes == {(4, 32, 32), (4, 45, 45), (8, 32, 32), (8, 45, 45), (8, 64, 64), (16, 32, 32), (16, 45, 45),
                     (16, 64, 64)}
    model = MovingDigitsCNN().eval()
    for size in sizes:
        x, y = collate_at_size([data[i] for i in range(4)], size)
        assert x.shape == (4, 1, *size)
        assert model(x).shape == (4, 10)


def test_mnist_images_at_every_schedule_shape():
    """SmallCNN pools adaptively (AdaptiveAvgPool2d(4)), so it takes 14x14 and 20x20 MNIST digits."""
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in SmallCNN().modules())
    images = [(torch.rand(1, 28, 28), torch.tensor(3)) for _ in range(4)]
    schedule = MultigridSchedule(input_size(images), 10, [8], base_batch_size=16)
    sizes = all_sizes(schedule)
    assert sizes == {(14, 14), (20, 20), (28, 28)}
    model = SmallCNN().eval()
    for size in sizes:
        x, _ = collate_at_size(images, size)
        assert model(x).shape == (4, 10)


def test_a_model_without_adaptive_pooling_fails_at_other_shapes():
    """What phase 2 must turn into a clear error at setup: a fixed-size head breaks at other shapes."""
    fixed = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 64 * 64, 10))
    fixed(torch.rand(1, 1, 16, 64, 64))
    with pytest.raises(RuntimeError):
        fixed(torch.rand(1, 1, 4, 32, 32))
