"""Whole-parameter norms under DeepSpeed ZeRO-1/2/3 (and DeepSpeed's BF16 optimizer).

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


def is_stage3(origin: Sequence[Tensor]) -> bool:
    """ZeRO-3 marks every parameter it partitions with a ``ds_id``."""
    return any(hasattr(p, "ds_id") for p in origin)


def zero_layout(params: Sequence[Tensor], origin: Sequence[Tensor], owner: str) -> ZeroLayout | None:
    """Build the fragment layout of a flattened group (None: nothing of it steps now), or
    explain why we cannot."""
    if is_stage3(origin):
        return _stage3_layout(params, origin, owner)
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


def _rank_in(group: object | None) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _stage3_layout(params: Sequence[Tensor], origin: Sequence[Tensor], owner: str) -> ZeroLayout | None:
    """ZeRO-3: every parameter is cut into equal per-rank partitions (``ds_tensor``, the last
    one zero-padded) and a param group into sub-groups; DeepSpeed steps one sub-group at a time
    with ``params = [fp32 flat of this rank's partitions]`` (the other groups empty). The flat's
    ``ds_id`` "<first>_<last>" names the sub-group's first and last parameters; in between, its
    trainable parameters' partitions follow each other in order. The padding at the end of the
    last rank's partition is not zeroed in the fp32 flat: it is left out of the views, so it
    neither enters the norms nor gets updated."""
    if not params:
        return None  # another sub-group is stepping
    flat = params[0]
    ds_id = str(getattr(flat, "ds_id", ""))
    ids = [getattr(p, "ds_id", None) for p in origin]
    try:
        first, last = (int(x) for x in ds_id.split("_"))
        members = [i for i in range(ids.index(first), ids.index(last) + 1) if origin[i].requires_grad]
    except ValueError:
        members = None
    if len(params) != 1 or members is None:
        raise RuntimeError(
            f"{owner}: under DeepSpeed ZeRO stage 3 the optimizer was handed {len(params)} tensor(s) "
            f"(sub-group id {ds_id!r}) that do not map onto the parameters it was built with; trust "
            "ratios would be per shard. Build the optimizer over the model's parameters, or pass "
            "zero_aware=False to accept shard-level ratios."
        )
    process_group = getattr(origin[members[0]], "ds_process_group", None) if members else None
    rank = _rank_in(process_group)
    starts, numels = [], []
    offset = 0
    for i in members:
        part = int(origin[i].ds_tensor.ds_numel)  # every rank's partition size, padding included
        real = max(0, min(part, int(origin[i].ds_numel) - rank * part))  # the padding is not zeroed
        starts.append(offset)
        numels.append(real)
        offset += part
    if offset != flat.numel():
        raise RuntimeError(
            f"{owner}: ZeRO-3 sub-group {ds_id} holds {flat.numel()} elements but its parameters' "
            f"partitions add up to {offset}; this DeepSpeed version lays sub-groups out differently. "
            "Use ZeRO stage 1 or 2, or zero_aware=False."
        )
    keep = [k for k, n in enumerate(numels) if n > 0]
    return ZeroLayout(flat, [starts[k] for k in keep], [numels[k] for k in keep],
                      [members[k] for k in keep], len(origin), process_group)
