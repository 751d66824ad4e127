"""The shape change in the collate stage: temporal striding, spatial resizing, samples and batches,
in a real DataLoader worker, and the error for a dataset without a clip or image shape."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data import IterableDataset
from torch.utils.data import TensorDataset
from torch.utils.data import default_collate

from batchkit_multigrid import MultigridSchedule
from batchkit_multigrid import collate_at_size
from batchkit_multigrid import input_size
from batchkit_multigrid import resize_batch
from batchkit_multigrid import resize_input
from batchkit_multigrid import resize_samples
from batchkit_multigrid import stride_frames


def frame_clip(t: int = 16, side: int = 8, channels: int = 2) -> torch.Tensor:
    """A (C, T, H, W) clip whose frame f is filled with the value f."""
    return torch.arange(t, dtype=torch.float32).view(1, t, 1, 1).expand(channels, t, side, side).clone()


def test_stride_frames_keeps_every_kth_frame():
    clip = frame_clip(16)
    assert stride_frames(clip, 4)[0, :, 0, 0].tolist() == [1, 5, 9, 13]  # stride 4, centred offset (4-1)//2 = 1
    assert stride_frames(clip, 4, offset=0)[0, :, 0, 0].tolist() == [0, 4, 8, 12]
    assert stride_frames(clip, 8)[0, :, 0, 0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]  # stride 2, offset 0
    assert stride_frames(clip, 16) is not None and stride_frames(clip, 16).shape == clip.shape
    with pytest.raises(ValueError, match="must divide the clip's T"):
        stride_frames(clip, 5)
    with pytest.raises(ValueError, match="must divide the clip's T"):
        stride_frames(clip, 32)
    with pytest.raises(ValueError, match="outside 0 .. 3"):
        stride_frames(clip, 4, offset=4)


def test_spatial_resize_preserves_a_linear_ramp():
    """Bilinear antialiased downsizing by 2 is a symmetric filter around input coordinate 2i + 0.5,
    so a ramp f(y) = y becomes 2i + 0.5 away from the borders."""
    ramp = torch.arange(64, dtype=torch.float32).view(1, 64, 1).expand(1, 64, 64)
    out = resize_input(ramp, (32, 32))
    assert out.shape == (1, 32, 32)
    interior = out[0, 1:31, 16]
    assert torch.allclose(interior, torch.arange(1, 31, dtype=torch.float32) * 2 + 0.5, atol=1e-4)


def test_spatial_resize_antialiases():
    """A one-pixel checkerboard averages to grey when downsized, instead of aliasing to black or white."""
    board = ((torch.arange(64).view(64, 1) + torch.arange(64).view(1, 64)) % 2).float().view(1, 64, 64)
    out = resize_input(board, (16, 16))
    assert out[0, 2:-2, 2:-2].sub(0.5).abs().max() < 0.05
    nearest = resize_input(board, (16, 16), mode="nearest")
    assert nearest.std() < 1e-6 or nearest.sub(0.5).abs().min() > 0.4  # nearest picks one colour: aliasing


def test_clip_resize_strides_then_resizes_each_frame():
    clip = torch.rand(3, 16, 64, 64)
    out = resize_input(clip, (4, 45, 45))
    assert out.shape == (3, 4, 45, 45) and out.is_contiguous()
    for f, source in enumerate([1, 5, 9, 13]):
        assert torch.allclose(out[:, f], resize_input(clip[:, source], (45, 45)), atol=1e-6)
    # only T changes: the strided frames are copied exactly
    assert torch.equal(resize_input(clip, (8, 64, 64)), clip[:, 0::2])
    # nothing changes: the same tensor back
    assert resize_input(clip, (16, 64, 64)) is clip


def test_batch_and_samples_agree():
    clips = [torch.rand(1, 16, 32, 32) for _ in range(5)]
    labels = list(range(5))
    samples = list(zip(clips, labels))
    per_sample = default_collate(resize_samples(samples, (8, 20, 20)))
    batched = collate_at_size(samples, (8, 20, 20))
    assert batched[0].shape == (5, 1, 8, 20, 20)
    assert torch.allclose(per_sample[0], batched[0], atol=1e-6) and torch.equal(per_sample[1], batched[1])
    assert torch.equal(collate_at_size(samples, None)[0], torch.stack(clips))


def test_images_dicts_namedtuples_and_uint8():
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    out = resize_input(image, (14, 14))
    assert out.dtype == torch.uint8 and out.shape == (1, 14, 14)
    assert (out.float() - resize_input(image.float(), (14, 14))).abs().max() <= 0.5
    d = resize_samples([{"x": image, "y": 3}], (20, 20), input_key="x")[0]
    assert d["x"].shape == (1, 20, 20) and d["y"] == 3
    Pair = namedtuple("Pair", "image label")
    p = resize_batch(Pair(image.unsqueeze(0).float(), torch.tensor([3])), (7, 7))
    assert isinstance(p, Pair) and p.image.shape == (1, 1, 7, 7)
    with pytest.raises(ValueError, match="needs a clip"):
        resize_input(torch.rand(28, 28), (4, 14, 14))
    with pytest.raises(TypeError, match="cannot find the input"):
        resize_samples([object()], (14, 14))


def test_input_size_reads_clips_and_images_and_refuses_the_rest():
    assert input_size(TensorDataset(torch.rand(4, 1, 16, 64, 64), torch.zeros(4))) == (16, 64, 64)
    assert input_size(TensorDataset(torch.rand(4, 1, 28, 28), torch.zeros(4))) == (28, 28)
    assert input_size([{"clip": torch.rand(3, 8, 32, 32)}], input_key="clip") == (8, 32, 32)
    with pytest.raises(ValueError, match="no clip or image shape.*\\(C, T, H, W\\)"):
        input_size(TensorDataset(torch.rand(4, 10), torch.zeros(4)))

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.rand(1, 8, 8, 8)

    with pytest.raises(ValueError, match="cannot be indexed.*base_size"):
        input_size(Stream())
    with pytest.raises(ValueError, match="empty"):
        input_size(TensorDataset(torch.rand(0, 1, 8, 8)))
    with pytest.raises(ValueError, match="no clip or image shape"):
        input_size([("text", 1)])


class WithSize(torch.utils.data.Dataset):
    """What phase 2's sampler metadata amounts to: the index carries the batch's size to the worker
    (SlowFast passes ``(index, short_cycle_idx)`` the same way)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, item):
        index, size = item
        return self.data[index], size


def collate_pairs(items):
    sizes = {size for _, size in items}
    assert len(sizes) == 1
    return collate_at_size([sample for sample, _ in items], sizes.pop())


def test_short_cycle_batches_through_dataloader_workers():
    """The schedule's sizes, made in a DataLoader worker process, arrive at the right shapes."""
    data = TensorDataset(torch.rand(128, 1, 16, 32, 32), torch.arange(128))
    schedule = MultigridSchedule(input_size(data), 10, [8], base_batch_size=2)
    batches, start = [], 0
    for iteration in range(6):
        b, size, _ = schedule.batch_shape(0, iteration)
        batches.append([(i, size) for i in range(start, start + b)])
        start += b
    loader = DataLoader(WithSize(data), batch_sampler=batches, num_workers=1, collate_fn=collate_pairs,
                        multiprocessing_context="fork")
    got = [(tuple(x.shape), y.tolist()) for x, y in loader]
    # (4, 23, 23) at β = round(16·1024 / (4·529)) = 8; short cycle 16x16 (x2) and 23x23 (x1)
    sizes = [(32, 1, 4, 16, 16), (16, 1, 4, 23, 23), (16, 1, 4, 23, 23)] * 2
    assert [g[0] for g in got] == sizes
    assert [v for g in got for v in g[1]] == list(range(128))
