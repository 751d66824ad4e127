"""Selecting samples from a super-batch, on one rank or over the global super-batch of all ranks.

Selection methods that compare samples with each other (JEST's joint selection, CoLM's coreset)
should choose from the *global* super-batch: every rank's samples. :func:`select_across_ranks` does
the plumbing once for all of them:

1. every rank computes per-sample features of its own super-batch (scores, embeddings, source ids);
2. the features are gathered in rank order, so sample ``i`` of rank ``r`` has global index
   ``r * n + i`` (n: samples per rank, the same on every rank);
3. ``choose(features, k)`` picks ``k = world_size * keep`` global indices; it runs on rank 0 and its
   answer is broadcast, so every rank agrees whatever the numerics;
4. every rank keeps its own chosen samples first (no data moves for them) and the surplus of ranks
   that were chosen more than ``keep`` times fills the ranks chosen less, in a fixed order; the data
   of those samples is gathered from their ranks. Every rank ends with exactly ``keep`` samples.

With ``scope="rank"`` the same ``choose`` runs on this rank's features alone and picks ``keep``
samples (no collective at all): the cheaper approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from typing import Callable
from typing import Literal
from typing import Mapping

import torch

from batchkit import dist
from batchkit.batch import BatchSpec
from batchkit.errors import PluginError

Scope = Literal["global", "rank"]
Chooser = Callable[[dict[str, torch.Tensor], int], torch.Tensor]


@dataclass
class Selection:
    """What :func:`select_across_ranks` returns."""

    #: this rank's selected batch (``keep`` samples)
    batch: Any
    #: the chosen global indices (rank r's sample i is ``r * n + i``), in the order ``choose`` gave
    chosen: torch.Tensor
    #: the global indices this rank trains, in the order of ``batch``
    assigned: torch.Tensor


def assign_to_ranks(chosen: torch.Tensor, per_rank: int, world_size: int, keep: int) -> list[list[int]]:
    """Split the chosen global indices into ``world_size`` lists of ``keep``: each rank's own chosen
    samples first (ascending), then the surplus of over-chosen ranks, in rank then index order."""
    if chosen.numel() != world_size * keep:
        raise PluginError(f"batchkit: choose() returned {chosen.numel()} indices; it must return exactly {world_size * keep}")
    ids = sorted(int(i) for i in chosen.tolist())
    if len(set(ids)) != len(ids) or (ids and (ids[0] < 0 or ids[-1] >= world_size * per_rank)):
        raise PluginError(
            f"batchkit: choose() must return distinct indices in [0, {world_size * per_rank}); got duplicates or indices out of range"
        )
    own = [[i for i in ids if i // per_rank == r] for r in range(world_size)]
    surplus = [i for r in range(world_size) for i in own[r][keep:]]
    assigned = []
    for r in range(world_size):
        mine = own[r][:keep]
        need = keep - len(mine)
        mine, surplus = mine + surplus[:need], surplus[need:]
        assigned.append(mine)
    return assigned


def select_across_ranks(
    batch: Any,
    features: Mapping[str, torch.Tensor],
    choose: Chooser,
    keep: int,
    *,
    scope: Scope = "global",
    spec: BatchSpec | None = None,
) -> Selection:
    """Keep ``keep`` samples of this rank's super-batch ``batch``, chosen over every rank's samples.

    :param batch: this rank's super-batch (n samples; the same n on every rank).
    :param features: per-sample tensors ``[n, ...]`` that ``choose`` needs (same shapes on every rank).
    :param choose: ``choose(features, k) -> LongTensor [k]`` of distinct indices into the gathered
        features (``[world * n, ...]`` in rank order), deterministic given its inputs.
    :param keep: samples each rank trains.
    :param scope: ``"global"`` (gather, choose once, share out) or ``"rank"`` (choose locally).
    :param spec: how the batch is counted and selected (the host's ``ctx.batch_spec``).
    """
    spec = spec or BatchSpec()
    n = spec.num_samples(batch)
    for name, value in features.items():
        if value.shape[0] != n:
            raise PluginError(f"batchkit: feature {name!r} has {value.shape[0]} rows but the batch has {n} samples")
    if not 0 < keep <= n:
        raise PluginError(f"batchkit: cannot keep {keep} of a super-batch of {n} samples")
    world = dist.get_world_size()
    if scope == "rank" or world == 1:
        chosen = _checked(choose(dict(features), keep), keep)
        order = torch.as_tensor(assign_to_ranks(chosen.cpu(), n, 1, keep)[0], dtype=torch.long)
        if scope == "rank" and world > 1:  # report global ids of this rank's own samples
            return Selection(spec.select(batch, order), chosen + dist.get_rank() * n, order + dist.get_rank() * n)
        return Selection(spec.select(batch, order), chosen, order)
    if scope != "global":
        raise PluginError(f"batchkit: scope must be 'global' or 'rank', got {scope!r}")
    gathered = {name: dist.all_gather(value.contiguous()).flatten(0, 1) for name, value in features.items()}
    k = world * keep
    device = next(iter(gathered.values())).device if gathered else torch.device("cpu")
    chosen = torch.empty(k, dtype=torch.long, device=device)
    if dist.get_rank() == 0:
        chosen.copy_(_checked(choose(gathered, k), k))
    dist.broadcast(chosen)
    assignment = assign_to_ranks(chosen.cpu(), n, world, keep)
    rank = dist.get_rank()
    mine = torch.as_tensor(assignment[rank], dtype=torch.long)
    if all(i // n == r for r, ids in enumerate(assignment) for i in ids):
        local = spec.select(batch, mine - rank * n)  # nobody needs another rank's data
    else:
        local = spec.select(gather_batch(batch, spec), mine)
    return Selection(local, chosen, mine)


def gather_batch(batch: Any, spec: BatchSpec | None = None) -> Any:
    """Every rank's batch joined in rank order (per-sample tensors must have the same shape on every
    rank; per-sample lists travel as objects; other fields are this rank's)."""
    spec = spec or BatchSpec()
    if not dist.is_distributed():
        return batch
    n = spec.num_samples(batch)

    def gather_field(path: str, value: Any) -> Any:
        if not spec._is_per_sample(path, value, n):
            return value
        if isinstance(value, torch.Tensor):
            shapes = dist.all_gather_object(tuple(value.shape))
            if len(set(shapes)) > 1:
                raise PluginError(
                    f"batchkit: field {path!r} has shapes {shapes} on the ranks; global selection needs the same shape "
                    "on every rank (pad per-sample tensors to a fixed length)"
                )
            return dist.all_gather(value.contiguous()).flatten(0, 1)
        joined = [x for part in dist.all_gather_object(list(value)) for x in part]
        return joined if isinstance(value, list) else tuple(joined)

    return spec._rebuild(batch, gather_field)


def _checked(chosen: Any, k: int) -> torch.Tensor:
    chosen = torch.as_tensor(chosen, dtype=torch.long).flatten()
    if chosen.numel() != k:
        raise PluginError(f"batchkit: choose() returned {chosen.numel()} indices; it must return exactly {k}")
    return chosen
