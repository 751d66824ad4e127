"""Collectives for plugins: no-ops in one process, real under DDP (gloo, nccl) and DeepSpeed.

DeepSpeed initialises ``torch.distributed`` itself (``deepspeed.init_distributed``), so the plain
``torch.distributed`` calls below cover it too; nothing here imports deepspeed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as torch_dist

ReduceOp = Literal["sum", "mean", "max", "min"]

_OPS = {
    "sum": torch_dist.ReduceOp.SUM,
    "mean": torch_dist.ReduceOp.SUM,  # divided by the world size afterwards: gloo has no AVG
    "max": torch_dist.ReduceOp.MAX,
    "min": torch_dist.ReduceOp.MIN,
}


def is_distributed() -> bool:
    """True when a process group with more than one rank is up."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def get_rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def all_reduce(tensor: torch.Tensor, op: ReduceOp = "sum", group: object | None = None) -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks and return it.

    ``op="mean"`` is computed as a sum divided by the group size, because gloo lacks ``AVG``.
    Single-process it returns ``tensor`` untouched.
    """
    if op not in _OPS:
        raise ValueError(f"batchkit.dist.all_reduce: op={op!r} is not one of {sorted(_OPS)}")
    if not is_distributed():
        return tensor
    torch_dist.all_reduce(tensor, op=_OPS[op], group=group)
    if op == "mean":
        tensor.div_(torch_dist.get_world_size(group))
    return tensor


def all_gather(tensor: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """Stack ``tensor`` from every rank along a new leading dimension (shape ``[world, *shape]``).

    All ranks must pass tensors of the same shape and dtype. Single-process the result is
    ``tensor.unsqueeze(0)``.
    """
    if not is_distributed():
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(torch_dist.get_world_size(group))]
    torch_dist.all_gather(out, tensor.contiguous(), group=group)
    return torch.stack(out)


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order; ``[obj]`` single-process. Works on any backend."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank ``src`` to every rank; returns it unchanged single-process."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place, and return it (every rank
    passes a tensor of the same shape and dtype). Single-process it returns ``tensor`` untouched."""
    if is_distributed():
        torch_dist.broadcast(tensor, src=src)
    return tensor


def is_main_process() -> bool:
    """True on rank 0 (and single-process)."""
    return get_rank() == 0


def shard_range(n: int) -> range:
    """This rank's contiguous share of ``range(n)``, for splitting offline work over ranks (the
    first ``n % world`` ranks take one more); all_gather_object the pieces back in rank order."""
    world, rank = get_world_size(), get_rank()
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
