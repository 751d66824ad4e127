"""Steps 4 and 5 of B3 mining: a METIS partition, rebalanced to clusters of exactly K.

METIS (balanced k-way partitioning, through ``pymetis``) cuts the mutual-edge graph into
C = N // K parts with few edges between parts, so each part is a set of mutually-hard examples.
Its parts are balanced only up to a tolerance (and can be empty), so they are rebalanced to
exactly K members each, every sample in exactly one cluster:

1. The C largest parts keep their seat (ties: the part with the smaller lowest id); parts beyond C
   (only from a hand-made labelling; METIS makes at most C) are dissolved into the pool; missing
   seats start empty.
2. A part over K keeps its K best-connected members (most edges inside the part; ties: lower id);
   the others join the pool.
3. Pool samples (most-connected first; ties: lower id) each take a free seat in the non-full
   cluster where they have the most neighbours already; with none, the cluster with the most free
   seats (ties: lower index).

Unlike the reference code, a leftover is never filled with ``randrange(len(cluster))`` (a position
used as a sample id, which duplicated ids 0..31): only pool samples fill seats, so the result is a
permutation of the ids. Clusters come out in order of their lowest id, members sorted.

When K does not divide N the default is an error naming the option and the fix;
``remainder="drop"`` instead leaves the N mod K least-connected samples out (returned separately).
"""

from __future__ import annotations

import heapq

import numpy as np

from .errors import MiningError
from .graph import MutualGraph

REMAINDER_POLICIES = ("error", "drop")


def check_cluster_size(n: int, K: int, remainder: str = "error") -> int:
    """The number of clusters C = N // K, or a MiningError for a K that does not fit N."""
    if remainder not in REMAINDER_POLICIES:
        raise MiningError("remainder", f"unknown policy {remainder!r}", f"use one of {', '.join(REMAINDER_POLICIES)}")
    if not isinstance(K, (int, np.integer)) or K < 1:
        raise MiningError("K", f"the cluster size must be a positive integer, got {K!r}", "use e.g. K=32")
    if n < K:
        raise MiningError("K", f"cluster size K={K} is larger than the dataset (N={n})", f"use K <= {n}")
    if n % K and remainder == "error":
        raise MiningError("K", f"N={n} samples do not divide into clusters of K={K} ({n % K} left over)",
                          f"choose a K that divides {n}, trim the dataset to {n - n % K} samples, or pass "
                          f"remainder='drop' to leave the {n % K} least-connected samples out")
    return n // K


def metis_partition(graph: MutualGraph, n_parts: int, *, seed: int = 0) -> tuple[np.ndarray, int]:
    """METIS k-way partition of ``graph`` into ``n_parts``: (part label per node, edges cut)."""
    import pymetis

    if n_parts < 1:
        raise MiningError("K", f"{n_parts} clusters asked for", "use a K no larger than the dataset")
    if n_parts == 1:
        return np.zeros(graph.n_nodes, dtype=np.int64), 0
    options = pymetis.Options(seed=int(seed))
    result = pymetis.part_graph(int(n_parts), pymetis.CSRAdjacency(graph.xadj, graph.adjncy), options=options)
    return np.asarray(result.vertex_part, dtype=np.int64), int(result.edge_cuts)


def _in_part_degree(labels: np.ndarray, graph: MutualGraph | None) -> np.ndarray:
    n = len(labels)
    if graph is None:
        return np.zeros(n, dtype=np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), graph.degrees())
    same = labels[rows] == labels[graph.adjncy]
    return np.bincount(rows[same], minlength=n)


def rebalance(labels, K: int, graph: MutualGraph | None = None, *,
              remainder: str = "error") -> tuple[list[list[int]], list[int]]:
    """Clusters of exactly ``K`` ids from any labelling (see the module docstring).

    Args:
        labels: (N,) integer part label of each sample (any values: METIS's, or hand-made).
        K: cluster size.
        graph: the mutual-edge graph; it decides who stays and where pool samples go (without it:
            by id).
        remainder: ``"error"`` (N must be a multiple of K) or ``"drop"``.

    Returns:
        ``(clusters, dropped)``: N // K lists of K sorted ids, in order of their lowest id, and the
        sorted ids left out (empty unless ``remainder="drop"`` and K does not divide N).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise MiningError("labels", f"expected an (N,) integer array, got shape {labels.shape} dtype {labels.dtype}",
                          "pass one part label per sample")
    n = len(labels)
    if graph is not None and graph.n_nodes != n:
        raise MiningError("graph", f"{graph.n_nodes} nodes for {n} labels", "pass the graph the labels came from")
    n_clusters = check_cluster_size(n, K, remainder)
    in_deg = _in_part_degree(labels, graph)
    degree = graph.degrees() if graph is not None else np.zeros(n, dtype=np.int64)

    # 1. seats: the n_clusters largest parts (ties: smaller lowest id)
    parts, part_of = np.unique(labels, return_inverse=True)
    by_part = np.argsort(part_of, kind="stable")  # ids ascending within each part
    members = [m.tolist() for m in np.split(by_part, np.cumsum(np.bincount(part_of))[:-1])]
    seats = sorted(range(len(parts)), key=lambda c: (-len(members[c]), members[c][0]))[:n_clusters]
    clusters: list[list[int]] = [[] for _ in range(n_clusters)]
    pool: list[int] = []
    seated = np.zeros(len(parts), dtype=bool)
    for slot, c in enumerate(seats):
        seated[c] = True
        # 2. keep the K best-connected members
        ranked = sorted(members[c], key=lambda i: (-in_deg[i], i))
        clusters[slot], extra = ranked[:K], ranked[K:]
        pool.extend(extra)
    for c in np.flatnonzero(~seated):
        pool.extend(members[c])

    # 3. pool samples take free seats, most-connected first
    pool.sort(key=lambda i: (-degree[i], i))
    free_seats = n_clusters * K - sum(len(c) for c in clusters)
    dropped = sorted(pool[free_seats:])  # "drop": the least-connected leftovers
    pool = pool[:free_seats]
    cluster_of = np.full(n, -1, dtype=np.int64)
    for slot, c in enumerate(clusters):
        cluster_of[c] = slot
    free = K - np.array([len(c) for c in clusters], dtype=np.int64)
    # max-heap of free seats (ties: lower index), one entry per cluster, refreshed lazily: seats only
    # ever fill, so a stale entry overstates and is fixed when it reaches the top.
    by_free = [(-int(free[s]), s) for s in range(n_clusters)]
    heapq.heapify(by_free)

    def most_free() -> int:
        while True:
            recorded, s = by_free[0]
            if -recorded == free[s]:
                return s
            if free[s]:
                heapq.heapreplace(by_free, (-int(free[s]), s))
            else:
                heapq.heappop(by_free)

    for i in pool:
        best = -1
        if graph is not None:
            near = cluster_of[graph.neighbours(i)]
            near = near[near >= 0]
            near = near[free[near] > 0]
            if len(near):
                slots, links = np.unique(near, return_counts=True)
                best = int(slots[np.argmax(links)])  # most neighbours; ties: lower index
        if best < 0:
            best = most_free()
        clusters[best].append(i)
        cluster_of[i] = best
        free[best] -= 1

    out = sorted((sorted(c) for c in clusters), key=lambda c: c[0])
    assert all(len(c) == K for c in out) and sum(map(len, out)) + len(dropped) == n
    return out, dropped
