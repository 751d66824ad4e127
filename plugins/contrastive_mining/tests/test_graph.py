"""The mutual-edge graph: hand-made rank tables and brute-force cross-checks."""

from __future__ import annotations

import numpy as np
import pytest

from batchkit_contrastive_mining import MiningError, metis_partition, mutual_graph

# Row i: the other ids ranked by similarity to i, best first (self excluded).
RANKS_6 = np.array([
    [1, 2, 3],  # 0
    [0, 2, 4],  # 1
    [3, 0, 1],  # 2
    [2, 4, 0],  # 3
    [5, 3, 1],  # 4
    [4, 0, 1],  # 5
])


def test_six_node_table_skipping_the_top_rank():
    # p=1, m=2: directed edges from columns 1..2 only:
    #   0->2 0->3 | 1->2 1->4 | 2->0 2->1 | 3->4 3->0 | 4->3 4->1 | 5->0 5->1
    # mutual: 0-2, 0-3, 1-2, 1-4, 3-4. Not 0-1 nor 2-3 (mutual only inside the skipped top rank),
    # nor 5-0, 5-1 (one way only).
    g = mutual_graph(RANKS_6, p=1, m=2)
    assert g.adjacency_list() == [[2, 3], [2, 4], [0, 1], [0, 4], [1, 3], []]
    assert g.n_edges == 5
    assert g.xadj.tolist() == [0, 2, 4, 6, 8, 10, 10]


def test_six_node_table_with_every_rank():
    # p=0, m=3: add 0-1, 2-3 (top ranks now count) and 4-5 (4->5 at rank 0, 5->4 at rank 0).
    g = mutual_graph(RANKS_6, p=0, m=3)
    assert g.adjacency_list() == [[1, 2, 3], [0, 2, 4], [0, 1, 3], [0, 2, 4], [1, 3, 5], [4]]


def test_self_and_repeated_ids_make_no_loops_or_duplicate_edges():
    ranks = np.array([
        [0, 1, 1],  # self and a repeat
        [0, 0, 1],
        [0, 1, 2],
    ])
    g = mutual_graph(ranks, p=0, m=3)
    assert g.adjacency_list() == [[1], [0], []]
    assert g.n_edges == 1


def brute_force(ranks, p, m):
    n = len(ranks)
    directed = {(i, int(j)) for i in range(n) for j in ranks[i, p:p + m] if j != i}
    return [sorted({j for (a, j) in directed if a == i and (j, i) in directed}) for i in range(n)]


@pytest.mark.parametrize("p,m", [(0, 5), (3, 7), (10, 20)])
def test_random_table_matches_brute_force_and_is_a_simple_graph(p, m):
    rng = np.random.default_rng(p + m)
    n = 60
    ranks = np.stack([rng.permutation(np.delete(np.arange(n), i))[:p + m] for i in range(n)])
    g = mutual_graph(ranks, p=p, m=m)
    assert g.adjacency_list() == brute_force(ranks, p, m)
    pairs = [(i, j) for i in range(n) for j in g.neighbours(i).tolist()]
    assert len(pairs) == len(set(pairs)) == 2 * g.n_edges  # no duplicate edges, both directions stored
    assert all((j, i) in set(pairs) and i != j for i, j in pairs)


def test_graph_feeds_metis():
    # Two 4-cliques joined by one edge: METIS cuts that edge.
    ranks = np.array([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [5, 6, 7], [4, 6, 7], [4, 5, 7], [4, 5, 6]])
    g = mutual_graph(ranks, p=0, m=3)
    labels, cut = metis_partition(g, 2, seed=0)
    assert cut == 0
    assert len(set(labels[:4])) == 1 and len(set(labels[4:])) == 1 and labels[0] != labels[4]


def test_bad_rank_tables_are_refused():
    with pytest.raises(MiningError, match="p \\+ m"):
        mutual_graph(RANKS_6, p=1, m=5)
    with pytest.raises(MiningError, match=r"ids must lie in \[0, 6\)"):
        mutual_graph(RANKS_6 - 1, p=0, m=3)
    with pytest.raises(MiningError, match="integer rank table"):
        mutual_graph(RANKS_6.astype(float), p=0, m=3)
