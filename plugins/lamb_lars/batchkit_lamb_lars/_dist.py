"""The one collective the optimizers need, through batchkit.dist when the host is installed."""

from __future__ import annotations

import torch

try:  # the host's helpers: no-ops single-process, gloo/nccl/DeepSpeed otherwise
    from batchkit.dist import all_reduce as _host_all_reduce
except ImportError:  # the optimizers stay usable as plain torch optimizers without the host
    _host_all_reduce = None


def all_reduce_sum(tensor: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group`` (the default group if None); no-op single-process."""
    if _host_all_reduce is not None:
        return _host_all_reduce(tensor, op="sum", group=group)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
