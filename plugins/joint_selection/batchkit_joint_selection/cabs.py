"""CABS: concept-aware batch sampling (Ghosh, Udandarao, Nguyen, Farina, Cherti, Jitsev, Oh, Ricci,
Schmidt, Bethge, "Concept-Aware Batch Sampling Improves Language-Image Pretraining", CVPR 2026).

Pure functions on concept labels: each example of a super-batch carries the list of concepts found
in it (DataConcept's ``classes``); no model is involved. Lists in, LongTensors of indices out.

**CABS-FM** (frequency maximisation, the retrieval-oriented variant) keeps the ``target`` examples
with the most concepts: score_i = |C_i|, sorted descending, ties to the lower index.

**CABS-DM** (diversity maximisation) fills the batch greedily so that concepts are balanced:

1. Over the *global* super-batch (all ranks), the C distinct concepts sorted by name, and
   F[c] = the number of examples that contain c.
2. Targets for a global batch of T examples::

       base   = min(T // C, max_freq)
       tgt[c] = base + 1 for the first T % C concepts in name order (only while base < max_freq)
       tgt[c] = clamp(tgt[c], min_per_concept, max_freq)
       if sum(tgt) > T:  tgt[c] = max(1, min(floor(tgt[c] T / sum(tgt)), max_freq))

3. Each rank picks its share of T (T // W, one more for ranks below T % W) from its own examples,
   with its own counts n[c] (starting at 0), one example at a time, the example of highest gain::

       gain(i) = -inf                                  if C_i is empty
               = -inf, and i is dropped for good       if n[c] >= max_freq for some c in C_i
               = (1 / |C_i|) sum_{c in C_i} g[c]
       g[c]    = (tgt[c] - n[c]) / max(1, tgt[c]) + 1 / max(1, F[c])   if n[c] < tgt[c]   (balance + rarity)
               = -0.5                                                  otherwise          (over target)

   then n[c] += 1 for each concept of the pick. ``max_freq`` (the paper's per-GPU frequency,
   default 10) caps the *local* counts: once a concept reaches it, every example containing it is
   dropped. When no example with a finite gain is left, the rest of the share is drawn at random
   from the examples still in the pool (not picked, not dropped, including those without concepts).

**Repeated concepts: multiset semantics**, as in the released code. DataConcept's ``classes`` has
one entry per detected box (aligned with ``bounding_boxes`` and ``scores``), so "dog" appears once
per dog. FM's score counts every entry; DM averages g over the entries and adds each entry to n.
F[c] counts examples (an example with two dogs adds 1). Callers that want set semantics pass
de-duplicated lists (a ``set`` works too).

**Greedy without a heap.** The released code keeps a lazy max-heap of gains (stale entries skipped
on pop) so that a pick costs O(log N) plus the recomputation of neighbours' gains. A greedy that
takes the argmax of the current gains, ties to the lower index, picks the same examples (the heap
orders (-gain, index) tuples); here the gains of all N examples are recomputed exactly after each
pick with a handful of tensor operations, which is faster than Python heap operations at super-batch
sizes (N in the thousands). A test checks against a lazy-heap transcription. Two deviations from the
released code, both fixes: it compared a float64 gain with its float32 copy to detect stale heap
entries, which discards most valid entries (their gains are not exact in float32) and sends much of
the batch to the random fill; and it returns fewer than the share when the pool runs out, where we
then draw the remainder at random from the dropped examples (counted in ``over_cap``) so that every
rank keeps exactly its share (equal shapes under DDP).

Randomness (the fill only) comes from a caller's ``torch.Generator``; given its state, the result is
deterministic. Concepts may be any mutually comparable hashables (strings, ints).
"""

from __future__ import annotations

from collections.abc import Hashable
from collections.abc import Sequence
from typing import NamedTuple

import torch


__all__ = [
    "ConceptTable",
    "DMSelection",
    "cabs_dm",
    "cabs_dm_rank",
    "cabs_fm",
    "concept_entries",
    "concept_table",
    "concept_targets",
    "dm_gains",
    "rank_shares",
]

Concepts = Sequence[Sequence[Hashable]]  # one collection of concepts per example


def _check_concepts(name: str, concepts: Concepts) -> None:
    for i, sample in enumerate(concepts):
        if isinstance(sample, (str, bytes)) or not isinstance(sample, (Sequence, set, frozenset)):
            raise ValueError(
                f"{name}: the concepts of example {i} must be a list (or tuple or set) of concept names, got "
                f"{type(sample).__name__} {sample!r}; wrap a single concept as [{sample!r}]"
            )


def cabs_fm(concepts: Concepts, target: int) -> torch.Tensor:
    """CABS-FM: the ``target`` examples with the most concept entries, most first, ties to the lower index."""
    _check_concepts("cabs_fm", concepts)
    if not 1 <= target <= len(concepts):
        raise ValueError(f"cabs_fm: target must be in [1, {len(concepts)}] (the super-batch size), got {target}")
    score = torch.tensor([len(c) for c in concepts], dtype=torch.long)  # |C_i|, repeats counted
    return torch.sort(score, descending=True, stable=True).indices[:target]


class ConceptTable(NamedTuple):
    """The global super-batch's concepts: ``names`` sorted (C of them) and ``freq`` F[c] (float64, [C])."""

    names: list[Hashable]
    freq: torch.Tensor


def concept_table(concepts_per_rank: Sequence[Concepts]) -> ConceptTable:
    """Step 1: the distinct concepts of all ranks' examples in sorted order, and how many examples hold each."""
    holders: dict[Hashable, int] = {}
    for rank, concepts in enumerate(concepts_per_rank):
        _check_concepts(f"concept_table (rank {rank})", concepts)
        for sample in concepts:
            for c in set(sample):  # F[c] counts examples, not entries
                holders[c] = holders.get(c, 0) + 1
    try:
        names = sorted(holders)
    except TypeError as err:
        raise ValueError(f"concept_table: concept names must be mutually comparable (all str, or all int) to be put in name order: {err}") from None
    return ConceptTable(names, torch.tensor([holders[c] for c in names], dtype=torch.float64))


def concept_targets(n_concepts: int, target: int, max_freq: int = 10, min_per_concept: int = 1) -> torch.Tensor:
    """Step 2: tgt[c] for the C = ``n_concepts`` concepts in name order and a global batch of ``target``."""
    _check_caps(max_freq, min_per_concept)
    if n_concepts == 0:
        return torch.zeros(0, dtype=torch.long)
    base = min(target // n_concepts, max_freq)
    tgt = torch.full((n_concepts,), base, dtype=torch.long)
    if base < max_freq:
        tgt[: target % n_concepts] += 1  # the first T % C concepts in name order
    tgt = tgt.clamp(min_per_concept, max_freq)
    total = int(tgt.sum())
    if total > target:  # scale down, floor (exact integer arithmetic), keep in [1, max_freq]
        tgt = (tgt * target // total).clamp(1, max_freq)
    return tgt


def rank_shares(target: int, world_size: int) -> list[int]:
    """Each rank's share of a global batch of ``target``: T // W, plus one for the ranks below T % W."""
    return [target // world_size + (1 if r < target % world_size else 0) for r in range(world_size)]


def concept_entries(concepts: Concepts, names: Sequence[Hashable]) -> torch.Tensor:
    """The examples' concepts as ids into ``names`` ([N, K] long, one row per example, repeats kept,
    ids ascending within a row, padded with -1 to the longest row)."""
    _check_concepts("concept_entries", concepts)
    concept_id = {c: i for i, c in enumerate(names)}
    rows = []
    for i, sample in enumerate(concepts):
        try:
            rows.append(sorted(concept_id[c] for c in sample))
        except KeyError as err:
            raise ValueError(f"concept_entries: example {i} has concept {err.args[0]!r}, which is not in the concept table") from None
    width = max((len(r) for r in rows), default=0)
    entries = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        entries[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return entries


def _check_caps(max_freq: int, min_per_concept: int) -> None:
    if max_freq < 1:
        raise ValueError(f"CABS-DM: max_freq (the per-GPU frequency cap) must be >= 1, got {max_freq}")
    if not 1 <= min_per_concept <= max_freq:
        raise ValueError(f"CABS-DM: min_per_concept must be in [1, max_freq = {max_freq}], got {min_per_concept}")


def _concept_terms(counts: torch.Tensor, targets: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """g[c], with one more slot (index C, the padding) worth 0."""
    tgt = targets.to(torch.float64)
    n = counts.to(torch.float64)
    balance = (tgt - n) / tgt.clamp(min=1.0)   # (tgt[c] - n[c]) / max(1, tgt[c])
    rarity = 1.0 / freq.clamp(min=1.0)         # 1 / max(1, F[c])
    g = torch.where(counts < targets, balance + rarity, torch.full_like(tgt, -0.5))
    return torch.cat([g, g.new_zeros(1)])


def _gains(entries: torch.Tensor, terms: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    # sum_{c in C_i} g[c], accumulated entry by entry in ascending concept order (padding adds 0.0),
    # so an example's gain does not depend on which other examples share the tensor
    total = torch.zeros(entries.shape[0], dtype=torch.float64)
    for k in range(entries.shape[1]):
        total += terms[entries[:, k]]
    return torch.where(sizes > 0, total / sizes.clamp(min=1), torch.full_like(total, float("-inf")))


def dm_gains(entries: torch.Tensor, counts: torch.Tensor, targets: torch.Tensor, freq: torch.Tensor, max_freq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gain(i) for every example given the counts n[c]; returns (gains [N] float64, over_cap [N] bool).

    ``entries`` from :func:`concept_entries`; ``over_cap[i]``: some concept of i has n[c] >= max_freq
    (its gain is -inf and the greedy drops it). Examples without concepts have gain -inf, not over_cap.
    """
    n_concepts = targets.shape[0]
    padded = entries.masked_fill(entries < 0, n_concepts)
    sizes = (entries >= 0).sum(dim=1).to(torch.float64)                       # |C_i|, repeats counted
    at_cap = torch.cat([counts >= max_freq, torch.zeros(1, dtype=torch.bool)])
    over_cap = at_cap[padded].any(dim=1)
    gains = _gains(padded, _concept_terms(counts, targets, freq), sizes).masked_fill(over_cap, float("-inf"))
    return gains, over_cap


class DMSelection(NamedTuple):
    """One rank's CABS-DM pick: ``indices`` (local, in pick order) and how they were chosen."""

    indices: torch.Tensor  # LongTensor [share]
    greedy: int            # picked by gain
    random_fill: int       # drawn at random from the pool after the gains ran out
    over_cap: int          # drawn at random from examples dropped by the cap (the pool was too small)


def cabs_dm_rank(
    concepts_per_rank: Sequence[Concepts],
    rank: int,
    target: int,
    *,
    max_freq: int = 10,
    min_per_concept: int = 1,
    generator: torch.Generator,
) -> DMSelection:
    """CABS-DM for one rank of a data-parallel group.

    ``concepts_per_rank[r]`` lists the concepts of rank r's super-batch (every rank has all of them
    after an all_gather_object, so every rank builds the same table and targets); ``target`` is the
    global batch size T. Returns ``rank``'s share, as indices into its own super-batch.
    """
    world_size = len(concepts_per_rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"cabs_dm_rank: rank {rank} is outside the {world_size} ranks given")
    _check_caps(max_freq, min_per_concept)
    share = rank_shares(target, world_size)[rank]
    local = concepts_per_rank[rank]
    if target < 1 or share > len(local):
        raise ValueError(
            f"cabs_dm_rank: target must be in [1, {sum(len(c) for c in concepts_per_rank)}] (the global super-batch) and each "
            f"rank's share at most its super-batch; rank {rank} must keep {share} of {len(local)} examples (target {target})"
        )
    table = concept_table(concepts_per_rank)
    targets = concept_targets(len(table.names), target, max_freq, min_per_concept)
    entries = concept_entries(local, table.names)

    n_concepts = len(table.names)
    padded = entries.masked_fill(entries < 0, n_concepts)
    sizes = (entries >= 0).sum(dim=1).to(torch.float64)
    counts = torch.zeros(n_concepts, dtype=torch.long)                       # n[c], this rank's
    pool = torch.ones(len(local), dtype=torch.bool)                          # not picked, not dropped
    dropped = torch.zeros(len(local), dtype=torch.bool)
    picks: list[int] = []
    gains = _gains(padded, _concept_terms(counts, targets, table.freq), sizes)
    while len(picks) < share:
        candidates = gains.masked_fill(~pool, float("-inf"))
        best = int(torch.argmax(candidates))                                 # first index of the max
        if candidates[best] == float("-inf"):
            break                                                            # no finite gain left
        picks.append(best)
        pool[best] = False
        ids = entries[best][entries[best] >= 0]
        counts.index_add_(0, ids, torch.ones_like(ids))                      # n[c] += 1 per entry
        capped = counts[ids] >= max_freq
        if bool(capped.any()):                                               # drop every holder, for good
            at_cap = torch.zeros(n_concepts + 1, dtype=torch.bool)
            at_cap[ids[capped]] = True
            newly = at_cap[padded].any(dim=1) & pool
            dropped |= newly
            pool &= ~newly
        gains = _gains(padded, _concept_terms(counts, targets, table.freq), sizes)
    greedy = len(picks)
    fill = _draw(pool, share - len(picks), generator)
    over_cap = _draw(dropped, share - len(picks) - len(fill), generator)
    indices = torch.cat([torch.tensor(picks, dtype=torch.long), fill, over_cap])
    return DMSelection(indices, greedy, len(fill), len(over_cap))


def _draw(mask: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Up to n of the True positions of ``mask``, uniformly without replacement."""
    candidates = mask.nonzero().flatten()
    if n <= 0 or len(candidates) == 0:
        return torch.zeros(0, dtype=torch.long)
    return candidates[torch.randperm(len(candidates), generator=generator)[:n]]


def cabs_dm(concepts: Concepts, target: int, *, max_freq: int = 10, min_per_concept: int = 1, generator: torch.Generator) -> DMSelection:
    """CABS-DM on one process: :func:`cabs_dm_rank` with a single rank."""
    return cabs_dm_rank([concepts], 0, target, max_freq=max_freq, min_per_concept=min_per_concept, generator=generator)
