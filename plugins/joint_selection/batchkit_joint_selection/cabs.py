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
       tgt[c] = base + 1 for the first T % C concepts in name order (only while base < max_freq;
                the clamp below makes that condition redundant)
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

**Greedy without a heap.** The released code keeps a lazy max-heap of (-gain, index) entries
(stale ones skipped on pop) and recomputes the gains of the examples that share a concept with each
pick. Taking the argmax of the current gains, ties to the lower index, picks the same examples;
here that argmax is one numpy operation over the N gains, and after each pick the gains of the
holders of its concepts are recomputed exactly (whole rows, a few numpy operations), which costs
less than Python heap operations at super-batch sizes (see benchmarks/joint_selection_algorithms.py).
A test checks the picks against a lazy-heap transcription on random tables. Two deviations from the
released code, both fixes: (a) it detects stale heap entries by comparing the float64 gain with its
float32 copy, which also rejects every valid entry whose gain is not exact in float32 (about 95% of
the initial gains on a Zipf concept table of 320 or 1280 examples), so the greedy stops early and
most of the batch comes from the random fill; (b) it returns fewer than the share when the pool runs
out, where we draw the remainder at random from the dropped examples (counted in ``over_cap``) so
that every rank keeps exactly its share (equal shapes under DDP).

Randomness (the fill only) comes from a caller's CPU ``torch.Generator``; given its state, the result is
deterministic. Concepts may be any mutually comparable hashables (strings, ints).
"""

from __future__ import annotations

from collections.abc import Hashable
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
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
        raise ValueError(
            f"concept_table: concept names must be mutually comparable (all str, or all int) to be put in name "
            f"order: {err}"
        ) from None
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
            raise ValueError(
                f"concept_entries: example {i} has concept {err.args[0]!r}, which is not in the concept table"
            ) from None
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def _check_caps(max_freq: int, min_per_concept: int) -> None:
    if max_freq < 1:
        raise ValueError(f"CABS-DM: max_freq (the per-GPU frequency cap) must be >= 1, got {max_freq}")
    if not 1 <= min_per_concept <= max_freq:
        raise ValueError(f"CABS-DM: min_per_concept must be in [1, max_freq = {max_freq}], got {min_per_concept}")


def _concept_terms(counts: np.ndarray, targets: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """g[c] for the given concepts (numpy; the same IEEE operations as the formula written out)."""
    balance = (targets - counts) / np.maximum(targets, 1)   # (tgt[c] - n[c]) / max(1, tgt[c])
    rarity = 1.0 / np.maximum(freq, 1.0)                    # 1 / max(1, F[c])
    return np.where(counts < targets, balance + rarity, -0.5)


def _gains(padded: np.ndarray, terms: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(1 / |C_i|) sum_{c in C_i} g[c]; -inf without concepts. ``terms`` has a last slot, 0.0, for the padding.

    The sum runs entry by entry in ascending concept order (cumsum adds sequentially; the padding
    adds 0.0), so an example's gain is the same floating-point number whatever the other rows are.
    """
    total = terms[padded].cumsum(axis=1)[:, -1] if padded.shape[1] else np.zeros(len(padded))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sizes > 0, total / np.maximum(sizes, 1), -np.inf)


def dm_gains(
    entries: torch.Tensor, counts: torch.Tensor, targets: torch.Tensor, freq: torch.Tensor, max_freq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """gain(i) for every example given the counts n[c]; returns (gains [N] float64, over_cap [N] bool).

    ``entries`` from :func:`concept_entries`; ``over_cap[i]``: some concept of i has n[c] >= max_freq
    (its gain is -inf and the greedy drops it). Examples without concepts have gain -inf, not over_cap.
    """
    n_concepts = targets.shape[0]
    ent = entries.numpy()
    padded = np.where(ent < 0, n_concepts, ent)
    sizes = (ent >= 0).sum(axis=1)
    n = counts.numpy()
    over_cap = np.append(n >= max_freq, False)[padded].any(axis=1)
    terms = np.append(_concept_terms(n, targets.numpy(), freq.numpy()), 0.0)
    gains = np.where(over_cap, -np.inf, _gains(padded, terms, sizes))
    return torch.from_numpy(gains), torch.from_numpy(over_cap)


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
            f"cabs_dm_rank: target must be in [1, {sum(len(c) for c in concepts_per_rank)}] (the global "
            f"super-batch) and each rank's share at most its super-batch; rank {rank} must keep {share} of "
            f"{len(local)} examples (target {target})"
        )
    table = concept_table(concepts_per_rank)
    targets = concept_targets(len(table.names), target, max_freq, min_per_concept)
    entries = concept_entries(local, table.names)

    n_concepts = len(table.names)
    ent = entries.numpy()
    padded = np.where(ent < 0, n_concepts, ent)                 # the padding points at slot C
    sizes = (ent >= 0).sum(axis=1)                              # |C_i|, repeats counted
    tgt = targets.numpy()
    freq = table.freq.numpy()
    counts = np.zeros(n_concepts, dtype=np.int64)               # n[c], this rank's
    terms = np.append(_concept_terms(counts, tgt, freq), 0.0)  # g[c], and 0.0 for the padding
    # holders of each concept (rows, sorted): holders[starts[c]:starts[c + 1]]
    entry_ids = ent[ent >= 0]
    by_concept = np.argsort(entry_ids, kind="stable")
    holders = np.repeat(np.arange(len(local)), sizes)[by_concept]
    starts = np.searchsorted(entry_ids[by_concept], np.arange(n_concepts + 1))
    gains = _gains(padded, terms, sizes)
    pool = np.ones(len(local), dtype=bool)                      # not picked, not dropped
    dropped = np.zeros(len(local), dtype=bool)
    picks: list[int] = []
    while len(picks) < share:
        candidates = np.where(pool, gains, -np.inf)
        best = int(candidates.argmax())                         # the first index of the max
        if candidates[best] == -np.inf:
            break                                               # no finite gain left
        picks.append(best)
        pool[best] = False
        ids = ent[best, : sizes[best]]
        np.add.at(counts, ids, 1)                               # n[c] += 1 per entry
        touched = np.unique(ids)
        terms[touched] = _concept_terms(counts[touched], tgt[touched], freq[touched])
        capped = touched[counts[touched] >= max_freq]
        if len(capped):                                         # drop every holder, for good
            at_cap = np.zeros(n_concepts + 1, dtype=bool)
            at_cap[capped] = True
            newly = at_cap[padded].any(axis=1) & pool
            dropped |= newly
            pool &= ~newly
        # only the holders of the pick's concepts have new gains; each row is recomputed whole
        if int((starts[touched + 1] - starts[touched]).sum()) >= len(local) // 2:
            gains = _gains(padded, terms, sizes)  # a frequent concept: all rows at once is cheaper
        else:
            rows = np.unique(np.concatenate([holders[starts[c]:starts[c + 1]] for c in touched]))
            gains[rows] = _gains(padded[rows], terms, sizes[rows])
    greedy = len(picks)
    fill = _draw(torch.from_numpy(pool), share - len(picks), generator)
    over_cap = _draw(torch.from_numpy(dropped), share - len(picks) - len(fill), generator)
    indices = torch.cat([torch.tensor(picks, dtype=torch.long), fill, over_cap])
    return DMSelection(indices, greedy, len(fill), len(over_cap))


def _draw(mask: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Up to n of the True positions of ``mask``, uniformly without replacement."""
    candidates = mask.nonzero().flatten()
    if n <= 0 or len(candidates) == 0:
        return torch.zeros(0, dtype=torch.long)
    return candidates[torch.randperm(len(candidates), generator=generator)[:n]]


def cabs_dm(
    concepts: Concepts, target: int, *, max_freq: int = 10, min_per_concept: int = 1, generator: torch.Generator
) -> DMSelection:
    """CABS-DM on one process: :func:`cabs_dm_rank` with a single rank."""
    return cabs_dm_rank([concepts], 0, target, max_freq=max_freq, min_per_concept=min_per_concept, generator=generator)
