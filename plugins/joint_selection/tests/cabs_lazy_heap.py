"""An independent CABS-DM greedy for the tests: the lazy max-heap of the paper's released code,
written from the algorithm's description in plain Python (dicts, floats, heapq), one example at a
time. batchkit_joint_selection.cabs must pick exactly what this picks."""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from collections.abc import Sequence

import torch


def lazy_heap_dm(
    concepts: Sequence[Sequence[Hashable]],
    names: list[Hashable],
    freq: list[float],
    targets: list[int],
    share: int,
    max_freq: int,
    generator: torch.Generator,
) -> tuple[list[int], int, int, int]:
    """Returns (indices, greedy, random_fill, over_cap) like cabs_dm_rank for one rank."""
    cid = {c: i for i, c in enumerate(names)}
    entries = [sorted(cid[c] for c in sample) for sample in concepts]
    holders: dict[int, list[int]] = {}
    for i, row in enumerate(entries):
        for c in set(row):
            holders.setdefault(c, []).append(i)
    counts = [0] * len(names)

    def gain(i: int) -> tuple[float, bool]:  # (gain, over the cap)
        if not entries[i]:
            return float("-inf"), False
        total = 0
        for c in entries[i]:
            if counts[c] >= max_freq:
                return float("-inf"), True
            if counts[c] < targets[c]:
                total += (targets[c] - counts[c]) / max(1, targets[c]) + 1 / max(1.0, freq[c])
            else:
                total += -0.5
        return total / len(entries[i]), False

    alive = [True] * len(entries)     # not picked, not dropped
    dropped = [False] * len(entries)
    version = [0] * len(entries)
    heap = []
    for i in range(len(entries)):
        g, _ = gain(i)
        if g > float("-inf"):
            heap.append((-g, i, 0))
    heapq.heapify(heap)
    picks: list[int] = []
    while len(picks) < share and heap:
        neg, i, v = heapq.heappop(heap)
        if not alive[i] or v != version[i]:
            continue  # stale
        picks.append(i)
        alive[i] = False
        for c in entries[i]:
            counts[c] += 1
        touched = {j for c in set(entries[i]) for j in holders[c] if alive[j]}
        for j in sorted(touched):
            g, over = gain(j)
            if over:
                alive[j] = False
                dropped[j] = True
            elif g > float("-inf"):
                version[j] += 1
                heapq.heappush(heap, (-g, j, version[j]))
    greedy = len(picks)
    fill = _draw([j for j in range(len(entries)) if alive[j]], share - len(picks), generator)
    over = _draw([j for j in range(len(entries)) if dropped[j]], share - len(picks) - len(fill), generator)
    return picks + fill + over, greedy, len(fill), len(over)


def _draw(candidates: list[int], n: int, generator: torch.Generator) -> list[int]:
    if n <= 0 or not candidates:
        return []
    return [candidates[k] for k in torch.randperm(len(candidates), generator=generator)[:n].tolist()]
