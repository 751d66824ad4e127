"""Whole-parameter norms under DeepSpeed ZeRO-1/2 (and DeepSpeed's BF16 optimizer).

Those wrappers replace each ``param_group['params']`` with ONE flat fp32 shard per rank, cut
at equal offsets regardless of tensor boundaries. A layer-wise optimizer that trusts
``param_groups`` then computes one trust ratio per shard. Here we rebuild the per-parameter
view instead: every model parameter that has a fragment on this rank carries
``_hp_mapping.hp_fragment_address`` (offset and length inside the flat shard), so

1. the optimizer updates narrow views of the shard, one per fragment;
2. pass 1 yields partial squared norms per fragment; they are summed into a
   ``[num_params_in_group, 2]`` vector at each fragment's parameter index;
3. ONE all-reduce over the data-parallel group per ``step()`` call gives whole-parameter
   norms on every rank (a few KB, latency only); pass 2 applies the ratios.

The padding at the tail of a shard belongs to no parameter and is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._dist import all_reduce_sum


@dataclass
class ZeroLayout:
    """The fragments of one param group that live in this rank's flat shard."""

    flat: Tensor
    starts: list[int]
    numels: list[int]
    param_index: list[int]  # position of each fragment's parameter in the group
    n_params: int
    process_group: object | None

    def views(self, tensor: Tensor) -> list[Tensor]:
        """Per-fragment views of a tensor shaped like the flat shard (param, grad, moments)."""
        flat = tensor.view(-1)
        return [flat.narrow(0, s, n) for s, n in zip(self.starts, self.numels)]

    def reducer(self):
        """Maps per-fragment squared norms [n_frag, 2] to whole-parameter ones [n_frag, 2]."""
        index = torch.tensor(self.param_index, dtype=torch.long, device=self.flat.device)

        def reduce(sq: Tensor) -> Tensor:
            total = torch.zeros(self.n_params, 2, dtype=torch.float32, device=sq.device)
            total.index_add_(0, index, sq)
            all_reduce_sum(total, self.process_group)
            return total.index_select(0, index)

        return reduce


def is_flattened(params: Sequence[Tensor], origin: Sequence[Tensor]) -> bool:
    """True when a wrapper swapped the group's params for tensors we were not built with."""
    return {id(p) for p in params} != {id(p) for p in origin}


def zero_layout(params: Sequence[Tensor], origin: Sequence[Tensor], owner: str) -> ZeroLayout:
    """Build the fragment layout of a flattened group, or explain why we cannot."""
    if any(hasattr(p, "ds_id") for p in origin):
        raise NotImplementedError(
            f"{owner}: DeepSpeed ZeRO stage 3 partitions every parameter and steps sub-groups; "
            "whole-parameter trust ratios are implemented for ZeRO stages 1 and 2 only. "
            "Use zero_optimization.stage 1 or 2 with this optimizer."
        )
    if len(params) != 1 or not any(hasattr(p, "_hp_mapping") for p in origin):
        raise RuntimeError(
            f"{owner}: param_groups[...]['params'] were replaced by tensors this optimizer was not "
            "built with, and they carry no DeepSpeed fragment mapping (_hp_mapping). Trust ratios "
            "would be computed per shard, which is wrong. Build the optimizer over the model's "
            "parameters and let DeepSpeed ZeRO-1/2 wrap it, or pass zero_aware=False to accept "
            "shard-level ratios."
        )
    flat = params[0]
    starts, numels, index = [], [], []
    process_group = None
    for i, p in enumerate(origin):
        process_group = getattr(p, "_dp_group", process_group)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            continue  # no fragment of this parameter on this rank
        address = mapping.get_hp_fragment_address()
        if address.numel == 0:
            continue
        starts.append(int(address.start))
        numels.append(int(address.numel))
        index.append(i)
    return ZeroLayout(flat, starts, numels, index, len(origin), process_group)
