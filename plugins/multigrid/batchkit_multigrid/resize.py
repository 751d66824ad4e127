"""The shape change of multigrid training, as pure functions for the collate stage.

A mini-batch shape reaches the DataLoader worker as a target size, ``(T, H, W)`` for clips or
``(H, W)`` for images; the worker makes every input that size before the batch leaves it, so the
smaller shapes also save the transfer to the device (the point of doing it in the worker):

* T by **temporal striding**: keep every k-th frame, k = T_in / T (T must divide T_in). As in the
  paper, a shorter clip covers the same time span at a lower frame rate (SlowFast widens its
  sampling stride by T0 / T for the same reason).
* H, W by **spatial resizing**: bilinear interpolation with antialiasing (``F.interpolate``), so a
  downsized clip looks like a lower-resolution crop of the same view, not an aliased one.

Inputs are ``(..., C, T, H, W)`` clips or ``(..., C, H, W)`` images with any leading dimensions:
one sample or a collated batch. Integer inputs (e.g. uint8 frames) are resized in float32 and
rounded back. Everything runs on the CPU tensors the dataset returned.
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset
from torch.utils.data import default_collate


__all__ = ["collate_at_size", "input_size", "resize_batch", "resize_input", "resize_samples", "stride_frames"]

_PREFIX = "multigrid"


def stride_frames(x: torch.Tensor, frames: int, offset: int | None = None) -> torch.Tensor:
    """Keep ``frames`` of the T_in frames on dim -3, every k-th with k = T_in / frames.

    ``offset`` (0 .. k-1) is the first frame kept; ``None`` centres the kept frames in their
    groups of k, ``(k - 1) // 2``. Returns a view.
    """
    t_in = x.shape[-3]
    if frames < 1 or t_in % frames:
        raise ValueError(f"{_PREFIX}: cannot make {frames} frames from a clip of {t_in} by striding: the target T "
                         f"must divide the clip's T; use a temporal factor 1/k with k dividing {t_in}")
    stride = t_in // frames
    start = (stride - 1) // 2 if offset is None else offset
    if not 0 <= start < stride:
        raise ValueError(f"{_PREFIX}: temporal offset {offset} is outside 0 .. {stride - 1} for stride {stride}")
    return x[..., start::stride, :, :]


def resize_input(x: torch.Tensor, size: Sequence[int], *, mode: str = "bilinear", offset: int | None = None) -> torch.Tensor:
    """Make ``x`` (``(..., C, T, H, W)`` when ``size`` is (T, H, W), ``(..., C, H, W)`` when it is
    (H, W)) that size: stride T, resize H and W. Returns ``x`` itself when it already has the size."""
    size = tuple(int(v) for v in size)
    if len(size) not in (2, 3):
        raise ValueError(f"{_PREFIX}: a target size is (T, H, W) or (H, W), got {size}")
    if x.dim() < len(size) + 1:
        kind = "clip (C, T, H, W)" if len(size) == 3 else "image (C, H, W)"
        raise ValueError(f"{_PREFIX}: the target size {size} needs a {kind} input, got a tensor of shape "
                         f"{tuple(x.shape)}; return inputs with a channel dimension")
    if tuple(x.shape[-len(size):]) == size:
        return x
    if len(size) == 3:
        x = stride_frames(x, size[0], offset)
    h, w = size[-2:]
    if tuple(x.shape[-2:]) == (h, w):
        return x.contiguous()
    lead = x.shape[:-2]
    flat = x.reshape(1, -1, *x.shape[-2:])  # interpolate resizes every leading slice independently
    floating = flat.is_floating_point()
    if not floating:
        flat = flat.float()
    antialias = mode in ("bilinear", "bicubic")
    out = F.interpolate(flat, size=(h, w), mode=mode, antialias=antialias,
                        **({"align_corners": False} if mode in ("bilinear", "bicubic") else {}))
    if not floating:
        info = torch.iinfo(x.dtype)
        out = out.round_().clamp_(info.min, info.max).to(x.dtype)
    return out.reshape(*lead, h, w)


def _get_input(item: Any, key: int | str) -> Any:
    """The input of a sample: ``item`` if it is a tensor, else ``item[key]``."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, tuple) and hasattr(item, "_fields") and isinstance(key, str):
        return getattr(item, key)
    return item[key]


def _replace_input(item: Any, key: int | str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``item`` with its input (``item[key]``, or ``item`` itself if it is a tensor) mapped by ``fn``."""
    if isinstance(item, torch.Tensor):
        return fn(item)
    if isinstance(item, dict):
        return {**item, key: fn(item[key])}
    if isinstance(item, tuple) and hasattr(item, "_fields"):  # a NamedTuple
        field = item._fields[key] if isinstance(key, int) else key
        return item._replace(**{field: fn(getattr(item, field))})
    if isinstance(item, (tuple, list)):
        out = list(item)
        out[key] = fn(out[key])
        return type(item)(out) if isinstance(item, tuple) else out
    raise TypeError(f"{_PREFIX}: cannot find the input in a sample of type {type(item).__name__}; samples must be a "
                    "tensor, a tuple/list (input at input_key, default 0) or a dict (input at input_key)")


def resize_samples(samples: Sequence[Any], size: Sequence[int], *, input_key: int | str = 0, **kw: Any) -> list[Any]:
    """Every sample (tensor, tuple/list or dict) with its input resized to ``size``; the rest untouched."""
    return [_replace_input(s, input_key, lambda x: resize_input(x, size, **kw)) for s in samples]


def resize_batch(batch: Any, size: Sequence[int], *, input_key: int | str = 0, **kw: Any) -> Any:
    """A collated batch with its input (``(N, C, T, H, W)`` or ``(N, C, H, W)``) resized to ``size``."""
    return _replace_input(batch, input_key, lambda x: resize_input(x, size, **kw))


def collate_at_size(samples: Sequence[Any], size: Sequence[int] | None, collate_fn: Callable[[list], Any] = default_collate,
                    *, input_key: int | str = 0, offset: int | None = None, **kw: Any) -> Any:
    """Collate ``samples`` with ``collate_fn`` and make the batch's input ``size`` (``None``: as is).

    Frames are strided per sample first (views: the collate then copies only the frames kept), and
    the collated batch is resized in one call (cheaper than one interpolation per sample)."""
    samples = list(samples)
    if size is None:
        return collate_fn(samples)
    if len(size) == 3:
        samples = [_replace_input(s, input_key, lambda x: stride_frames(x, size[0], offset)) for s in samples]
    return resize_batch(collate_fn(samples), size, input_key=input_key, offset=offset, **kw)


def input_size(dataset: Any, *, input_key: int | str = 0) -> tuple[int, ...]:
    """The size multigrid scales, read from the dataset's first sample: ``(T, H, W)`` of a
    ``(C, T, H, W)`` clip or ``(H, W)`` of a ``(C, H, W)`` image."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise ValueError(f"{_PREFIX}: the dataset ({type(dataset).__name__}) cannot be indexed, so it has no clip or "
                         "image shape to read; use a map-style dataset, or pass base_size=(T, H, W) / (H, W) explicitly")
    try:
        if len(dataset) == 0:
            raise ValueError(f"{_PREFIX}: the dataset is empty, so it has no clip or image shape to read")
    except TypeError:
        pass
    sample = dataset[0]
    try:
        x = _get_input(sample, input_key)
    except (TypeError, KeyError, IndexError, AttributeError):
        x = sample
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{_PREFIX}: the dataset's samples have no clip or image shape: their input (input_key="
                         f"{input_key!r}) is {shape}, but multigrid needs a tensor clip (C, T, H, W) or image (C, H, W); "
                         "return such tensors, set input_key to where the input is, or pass base_size explicitly")
    return tuple(int(v) for v in x.shape[1:])
