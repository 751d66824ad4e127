"""Per-example hard negatives: the score formula by hand, and the sampling's properties."""

from __future__ import annotations

import numpy as np
import pytest

from batchkit_contrastive_mining import MiningError, cluster_hard_negatives, hard_negative_scores


def test_scores_by_hand():
    ranks = np.zeros((8, 4), dtype=np.int64)
    ranks[0] = [2, 3, 4, 1]
    ranks[1] = [3, 4, 5, 0]
    # pooled multiset + members {0, 1}: 0:2 1:2 2:1 3:2 4:2 5:1
    # top-p (p=1) occurrences: 2 once, 3 once -> 2: 1-2 = -1, 3: 2-2 = 0
    # members zeroed -> positive scores: 4:2, 5:1
    ids, scores = hard_negative_scores([0, 1], ranks, p=1)
    assert ids.tolist() == [4, 5] and scores.tolist() == [2, 1]
    # p=0: nothing penalised -> 2:1 3:2 4:2 5:1
    ids, scores = hard_negative_scores([1, 0], ranks, p=0)
    assert ids.tolist() == [2, 3, 4, 5] and scores.tolist() == [1, 2, 2, 1]
    # p=2: 2, 3 and 4 each once in a top-2 -> 2:-1 3:0 4:0 -> only 5 remains
    ids, scores = hard_negative_scores([0, 1], ranks, p=2)
    assert ids.tolist() == [5] and scores.tolist() == [1]


def random_ranks(n, k, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.delete(np.arange(n), i))[:k] for i in range(n)])


def test_negatives_are_outside_the_cluster_distinct_and_from_the_positive_pool():
    n, K, p, k_hn = 64, 8, 3, 2
    ranks = random_ranks(n, 20, seed=0)
    clusters = np.random.default_rng(1).permutation(n).reshape(-1, K).tolist()
    stats = {}
    neg = cluster_hard_negatives(clusters, ranks, p, k_hn, seed=0, stats=stats)
    assert neg.shape == (n, k_hn) and neg.min() >= 0
    assert stats == {"repeated_pool": 0, "uniform_fallback": 0}
    for members in clusters:
        drawn = neg[members].ravel()
        assert not set(drawn) & set(members)
        assert len(set(drawn)) == len(drawn)  # without replacement
        pool, _ = hard_negative_scores(members, ranks, p)
        assert set(drawn) <= set(pool.tolist())  # score > 0 only: never a top-p-only id


def test_draws_are_seeded():
    ranks = random_ranks(64, 20, seed=0)
    clusters = np.arange(64).reshape(-1, 8).tolist()
    a = cluster_hard_negatives(clusters, ranks, 3, 4, seed=5)
    assert np.array_equal(a, cluster_hard_negatives(clusters, ranks, 3, 4, seed=5))
    assert not np.array_equal(a, cluster_hard_negatives(clusters, ranks, 3, 4, seed=6))


def test_a_single_draw_follows_the_scores():
    # One member, one negative: P(j) = score_j / sum(score).
    ranks = np.zeros((8, 4), dtype=np.int64)
    ranks[0] = [2, 3, 4, 1]
    ranks[1] = [3, 4, 5, 0]
    ranks[6] = [4, 4, 5, 7]
    # members {6}: 4:2 5:1 7:1 6:1 -> p=0 and 6 zeroed -> 4:2, 5:1, 7:1
    draws = [cluster_hard_negatives([[6]], ranks, 0, 1, seed=s)[6, 0] for s in range(3000)]
    freq = {j: draws.count(j) / len(draws) for j in (4, 5, 7)}
    assert sum(freq.values()) == 1
    assert freq[4] == pytest.approx(0.5, abs=0.04) and freq[5] == pytest.approx(0.25, abs=0.04)


def test_small_pool_is_repeated_so_every_member_gets_k_hn():
    # Members {0, 1}; positive pool {4: 2, 5: 1}; 2 members x 3 negatives = 6 draws from a pool of 2:
    # the pool is repeated 3 times and the 6 copies are all drawn, so 4 and 5 appear 3 times each.
    ranks = np.zeros((8, 4), dtype=np.int64)
    ranks[0] = [2, 3, 4, 1]
    ranks[1] = [3, 4, 5, 0]
    stats = {}
    neg = cluster_hard_negatives([[0, 1]], ranks, 1, 3, seed=0, stats=stats)
    assert sorted(neg[[0, 1]].ravel().tolist()) == [4, 4, 4, 5, 5, 5]
    assert (neg[2:] == -1).all()  # samples in no cluster get no negatives
    assert stats["repeated_pool"] == 1


def test_no_positive_score_falls_back_to_uniform_non_members():
    # p covers every rank: all scores <= 0, so draw uniformly from the non-members.
    ranks = random_ranks(16, 4, seed=2)
    clusters = np.arange(16).reshape(-1, 4).tolist()
    stats = {}
    neg = cluster_hard_negatives(clusters, ranks, 4, 2, seed=0, stats=stats)
    assert stats["uniform_fallback"] == 4
    for members in clusters:
        assert not set(neg[members].ravel()) & set(members)


def test_bad_options():
    ranks = random_ranks(16, 4, seed=2)
    with pytest.raises(MiningError, match="hard_negatives"):
        cluster_hard_negatives([[0, 1]], ranks, 1, 0)
    with pytest.raises(MiningError, match="every sample is in one cluster"):
        cluster_hard_negatives([list(range(16))], ranks, 4, 1)
