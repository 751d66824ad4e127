"""The CoLM coreset of one large batch: which k of its n examples to train on.

Given the gradient estimates g_i (``[n, d]``, :mod:`.gradients`) and source ids s_i of the large
batch, :func:`select_coreset` does what the reference code does on rank 0 at each step::

    K = {i : s_i is small}                    kept whole (gradient matching would miss them)
    R = the rest;  k_R = k − |K|
    u_i, m_i, v_i = Adam-normalise(g_i), i ∈ R             (AdamNormalizer, tracked moments)
    k_s = proportional budget of k_R over R's sources      (proportional_budget)
    for each source s of R, with its examples R_s:
        D_s = top-`dims` coordinates of |mean_{i ∈ R_s} u_i|   (top_dims)
        A_s = greedy facility location on l1_similarity(u[R_s][:, D_s]), budget k_s
    m_prev, v_prev ← means of m_i, v_i over ∪ A_s           (AdamNormalizer.update)
    coreset = K ∪ A_1 ∪ ... ∪ A_S

Small sources are named explicitly (``small_sources``, the reference's ``keep_sources``) or by their
count in the large batch (``small_threshold``). If K alone exceeds k, the first k of K in batch
order are kept (as the reference does) and nothing is selected from R.
"""

from __future__ import annotations

from typing import Collection
from typing import Sequence

import torch

from .adam import AdamNormalizer
from .facility_location import greedy_facility_location
from .facility_location import l1_similarity

#: the reference's ``zo_dim``: coordinates kept per source (0.8% of Phi-2's v_proj LoRA-B)
DEFAULT_DIMS = 2560


def proportional_budget(counts: Sequence[int], k: int) -> list[int]:
    """Split a budget of k over sources of sizes n_s in proportion to their size::

        k_s = floor(n_s / |R| · k),   |R| = Σ n_s
        then +1 to the sources in increasing order of k_s (ties: in the given order),
        one each, until Σ k_s = k

    (the reference's ``per_class_start='floor'`` with ``increase_array_to_threshold``). Each floor
    loses less than 1, so fewer than len(counts) sources get a +1, and for k < |R| no k_s exceeds
    n_s. Computed in integers, so exact multiples are not lost to float rounding.
    """
    counts = [int(n) for n in counts]
    total = sum(counts)
    if any(n < 0 for n in counts):
        raise ValueError(f"colm: source sizes must be non-negative, got {counts}")
    if not 0 <= k <= total:
        raise ValueError(f"colm: cannot select {k} examples from {total}")
    budget = [n * k // total for n in counts] if total else [0] * len(counts)   # floor(n_s / |R| · k)
    order = sorted(range(len(counts)), key=lambda s: budget[s])                 # stable: ties in given order
    for s in order[: k - sum(budget)]:
        budget[s] += 1
    return budget


def top_dims(u: torch.Tensor, dims: int | None) -> torch.Tensor:
    """D_s: the ``dims`` coordinates with the largest |mean_i u_i| over the rows of ``u`` (one
    source's examples), in increasing coordinate order; ties at the cut go to the lower coordinates.
    All coordinates when ``dims`` is None or at least d."""
    d = u.shape[1]
    if dims is None or dims >= d:
        return torch.arange(d, device=u.device)
    if dims < 1:
        raise ValueError(f"colm: option `dims` must be a positive number of coordinates, got {dims}")
    score = u.float().mean(dim=0).abs()                                 # |mean_{i∈s} u_i|
    cut = torch.kthvalue(score, d - dims + 1).values                    # the dims-th largest score
    above = score > cut
    ties = (score == cut).nonzero().flatten()[: dims - int(above.sum())]
    return above.index_fill_(0, ties, True).nonzero().flatten()         # a selection, not a sort: O(d)


def small_source_mask(sources: torch.Tensor, small_sources: Collection[int] = (),
                      small_threshold: int | None = None) -> torch.Tensor:
    """Which examples belong to a small source: listed in ``small_sources``, or with at most
    ``small_threshold`` examples in this large batch."""
    small = torch.zeros(len(sources), dtype=torch.bool, device=sources.device)
    if len(small_sources):
        listed = torch.as_tensor(sorted(int(s) for s in small_sources), dtype=sources.dtype, device=sources.device)
        small |= torch.isin(sources, listed)
    if small_threshold is not None:
        ids, inverse, counts = torch.unique(sources, return_inverse=True, return_counts=True)
        small |= counts[inverse] <= small_threshold
    return small


def select_coreset(grads: torch.Tensor, sources: torch.Tensor | Sequence[int], k: int, *,
                   small_sources: Collection[int] = (), small_threshold: int | None = None,
                   normalizer: AdamNormalizer | None = None, dims: int | None = DEFAULT_DIMS) -> torch.Tensor:
    """The k examples of the large batch to train on: sorted indices ``[k]`` (int64).

    :param grads: g_i, ``[n, d]``, one row per example of the large batch.
    :param sources: s_i, ``[n]`` integer source ids.
    :param k: coreset size (the small batch b), ``1 <= k <= n``.
    :param small_sources: ids of sources kept whole.
    :param small_threshold: also keep whole every source with at most this many examples in the batch.
    :param normalizer: the tracked Adam moments; normalised, then updated with the selection. None:
        select on the raw estimates (no Adam normalisation).
    :param dims: coordinates kept per source (top-k of |mean u|); None keeps all.

    Deterministic given its inputs (and the normaliser's state). The only side effect is the
    normaliser's update, made when at least one large-source example was selected.
    """
    sources = torch.as_tensor(sources, dtype=torch.long, device=grads.device)
    n = grads.shape[0] if grads.dim() == 2 else -1
    if grads.dim() != 2 or sources.shape != (n,):
        raise ValueError(f"colm: need gradient estimates [n, d] and source ids [n], got shapes "
                         f"{tuple(grads.shape)} and {tuple(sources.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"colm: the coreset size k={k} must lie in [1, n={n}] (the large batch)")
    bad = ~grads.sum(dim=1).isfinite()                                 # NaN and ±inf survive the sum
    if bad.any():
        raise ValueError(f"colm: the gradient estimates of examples {bad.nonzero().flatten().tolist()[:10]} are not "
                         f"finite (their loss is NaN or inf): fix the training (learning rate, precision) first")

    small = small_source_mask(sources, small_sources, small_threshold)
    kept = small.nonzero().flatten()                                   # K, in batch order
    if len(kept) >= k:
        return kept[:k]
    rest = (~small).nonzero().flatten()                                # R
    k_rest = k - len(kept)                                             # k_R

    u_rest = grads[rest].float()
    if normalizer is not None:
        u_rest, m_rest, v_rest = normalizer.normalize(u_rest)  # the copy of g[R] is freed here
    rest_sources = sources[rest]
    ids, counts = torch.unique(rest_sources, return_counts=True)      # sorted source ids
    chosen = []                                                        # positions in R
    for source, k_s in zip(ids.tolist(), proportional_budget(counts.tolist(), k_rest)):
        if k_s == 0:
            continue
        members = (rest_sources == source).nonzero().flatten()         # R_s
        if k_s == len(members):
            chosen.append(members)
            continue
        u_s = u_rest[members]
        u_s = u_s[:, top_dims(u_s, dims)]                              # sparsify to D_s
        picks = greedy_facility_location(l1_similarity(u_s), k_s)     # A_s
        chosen.append(members[picks])
    chosen = torch.cat(chosen)
    if normalizer is not None:
        normalizer.update(m_rest[chosen], v_rest[chosen])
    return torch.cat([kept, rest[chosen]]).sort().values
