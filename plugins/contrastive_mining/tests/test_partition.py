"""METIS partition and the rebalance to exactly K per cluster, on adversarial labellings."""

from __future__ import annotations

import numpy as np
import pytest
from mining_support import assert_partition

from batchkit_contrastive_mining import MiningError, check_cluster_size, metis_partition, mutual_graph, rebalance
from batchkit_contrastive_mining.graph import MutualGraph


def graph_from_edges(n, edges) -> MutualGraph:
    adj = [set() for _ in range(n)]
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    xadj = np.cumsum([0] + [len(s) for s in adj])
    return MutualGraph(xadj=np.asarray(xadj, dtype=np.int64),
                       adjncy=np.asarray([j for s in adj for j in sorted(s)], dtype=np.int64))


def triangles(k):
    return [(3 * t + a, 3 * t + b) for t in range(k) for a, b in ((0, 1), (0, 2), (1, 2))]


ADVERSARIAL = {
    "one part": lambda n, rng: np.zeros(n, dtype=np.int64),
    "all singletons": lambda n, rng: np.arange(n),
    "singletons, odd label values": lambda n, rng: -7 * np.arange(n) + 10**9,
    "two parts only": lambda n, rng: (np.arange(n) >= n // 3).astype(np.int64),
    "random skewed": lambda n, rng: rng.zipf(1.5, n) % 50,
    "more parts than clusters": lambda n, rng: rng.integers(0, 3 * n // 8, n),
    "one huge part and dust": lambda n, rng: np.where(rng.random(n) < 0.8, 0, rng.integers(1, 1000, n)),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("with_graph", [False, True])
def test_rebalance_gives_exactly_k_and_every_id_once(case, with_graph):
    rng = np.random.default_rng(0)
    n, K = 192, 8
    labels = ADVERSARIAL[case](n, rng)
    graph = None
    if with_graph:
        ranks = np.stack([rng.permutation(np.delete(np.arange(n), i))[:12] for i in range(n)])
        graph = mutual_graph(ranks, p=2, m=10)
    clusters, dropped = rebalance(labels, K, graph)
    assert dropped == []
    assert len(clusters) == n // K
    assert_partition(clusters, n, K)


def test_balanced_labels_are_kept_as_they_are():
    labels = np.array([2, 0, 1, 2, 0, 1, 1, 0, 2])
    clusters, _ = rebalance(labels, 3)
    assert clusters == [[0, 3, 8], [1, 4, 7], [2, 5, 6]]


def test_misplaced_samples_go_where_their_neighbours_are():
    # Three triangles {0,1,2} {3,4,5} {6,7,8}; the labelling puts 0 with the second triangle and
    # 6 with the first, leaving the third part with two members.
    g = graph_from_edges(9, triangles(3))
    labels = np.array([1, 0, 0, 1, 1, 1, 0, 2, 2])
    # part 0 = {1, 2, 6}: size 3, so 6 stays (no spare seat); part 1 = {0, 3, 4, 5}: 0 has no edge
    # inside, so it is the one popped, and it joins the only cluster with a free seat.
    clusters, _ = rebalance(labels, 3, g)
    assert clusters == [[0, 7, 8], [1, 2, 6], [3, 4, 5]]
    # part 0 = {0, 1, 2, 6}, part 1 = {3, 4, 5, 7}, part 2 = {8}: the outsiders 6 and 7 are popped
    # (no edge inside their part) and both join 8, their triangle.
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1, 2])
    clusters, _ = rebalance(labels, 3, g)
    assert clusters == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    # Without the graph, who leaves is decided by id only: the highest ids of each oversized part.
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 2, 2])  # part 0 = {3, 4, 5, 6}: 6 leaves either way
    assert rebalance(labels, 3)[0] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_pool_prefers_the_cluster_with_most_neighbours():
    # Parts A = {0, 1} (2 free seats), B = {4, 5, 6} (1 free), C = {2, 3, 7, 8, 9, 10, 11} (3 over).
    # C keeps 3, 9, 10, 11 (its only inside edges) and pools 8 (degree 3), 2 (2), 7 (0), in that
    # order. 8 has 1 neighbour in A and 2 in B: it takes B's last seat although A has more free
    # seats and a lower index. 2 then joins A (both its neighbours), and 7 (no edges) the last seat.
    edges = [(0, 1), (4, 5), (5, 6), (4, 6), (9, 10), (10, 11), (3, 9), (3, 11), (8, 0), (8, 4), (8, 5), (2, 0),
             (2, 1)]
    g = graph_from_edges(12, edges)
    labels = np.array([0, 0, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2])
    clusters, _ = rebalance(labels, 4, g)
    assert clusters == [[0, 1, 2, 7], [3, 9, 10, 11], [4, 5, 6, 8]]


def test_n_not_divisible_is_an_error_naming_the_option_and_fix():
    with pytest.raises(MiningError) as err:
        rebalance(np.zeros(100, dtype=np.int64), 32)
    msg = str(err.value)
    assert msg.startswith("b3: option `K`") and "remainder='drop'" in msg and "96" in msg and "4 left over" in msg
    with pytest.raises(MiningError, match="larger than the dataset"):
        check_cluster_size(10, 32)
    with pytest.raises(MiningError, match="positive integer"):
        check_cluster_size(10, 0)
    with pytest.raises(MiningError, match="unknown policy"):
        check_cluster_size(64, 32, remainder="pad")


def test_remainder_drop_leaves_out_the_least_connected():
    # 4 triangles + 2 isolated samples (ids 12, 13), K=3: the isolated ones are dropped.
    g = graph_from_edges(14, triangles(4))
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 1])
    clusters, dropped = rebalance(labels, 3, g, remainder="drop")
    assert dropped == [12, 13]
    assert clusters == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert_partition(clusters, 14, 3, dropped)


def test_metis_recovers_planted_cliques_exactly():
    rng = np.random.default_rng(1)
    n, K = 96, 16
    groups = rng.permutation(np.repeat(np.arange(n // K), K))
    edges = [(a, b) for a in range(n) for b in range(a + 1, n) if groups[a] == groups[b]]
    # a sparse sprinkle of cross edges
    edges += [(int(a), int(b)) for a, b in rng.integers(0, n, (20, 2)) if a != b and groups[a] != groups[b]]
    g = graph_from_edges(n, edges)
    labels, cut = metis_partition(g, n // K, seed=0)
    clusters, _ = rebalance(labels, K, g)
    assert_partition(clusters, n, K)
    assert sorted(sorted(np.flatnonzero(groups == c).tolist()) for c in range(n // K)) == clusters
    assert metis_partition(g, n // K, seed=0)[0].tolist() == labels.tolist()  # seeded
