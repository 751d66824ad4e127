"""Top-(p + m) neighbours: exact (chunked) and faiss IVF against a brute-force argsort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchkit_contrastive_mining import MiningError, top_neighbours
from batchkit_contrastive_mining.neighbours import resolve_knn_method


def brute(q, t, k, exclude_self):
    sim = q @ t.T
    if exclude_self:
        np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


@pytest.fixture
def emb():
    rng = np.random.default_rng(0)
    return rng.standard_normal((300, 16)).astype(np.float32), rng.standard_normal((300, 16)).astype(np.float32)


def test_exact_matches_brute_force_in_order_whatever_the_chunking(emb):
    q, t = emb
    expected = brute(q, q, 25, True)
    whole = top_neighbours(q, k=25, knn="exact")
    chunked = top_neighbours(torch.from_numpy(q), k=25, knn="exact", max_chunk_bytes=7 * 300 * 4)  # 7 rows a block
    assert np.array_equal(whole, expected) and np.array_equal(chunked, expected)
    assert not (whole == np.arange(300)[:, None]).any()


def test_exact_against_separate_targets(emb):
    q, t = emb
    assert np.array_equal(top_neighbours(q, t, k=10, knn="exact"), brute(q, t, 10, True))
    assert np.array_equal(top_neighbours(q, t, k=10, knn="exact", exclude_self=False), brute(q, t, 10, False))


def test_ivf_probing_every_list_is_exact(emb):
    q, t = emb
    for targets in (None, t):
        expected = brute(q, q if targets is None else t, 20, True)
        got = top_neighbours(q, targets, k=20, knn="ivf", ivf_nlist=8, ivf_nprobe=8)
        assert np.array_equal(np.sort(got, axis=1), np.sort(expected, axis=1))
        assert not (got == np.arange(300)[:, None]).any()


def test_auto_switch():
    assert resolve_knn_method("auto", 1000) == "exact"
    assert resolve_knn_method("auto", 10**6) == "ivf"
    with pytest.raises(MiningError, match="option `knn`"):
        resolve_knn_method("annoy", 10)


def test_bad_inputs(emb):
    q, t = emb
    with pytest.raises(MiningError, match=r"option `p \+ m`.*only 299 other targets"):
        top_neighbours(q, k=300)
    with pytest.raises(MiningError, match="dimension"):
        top_neighbours(q, t[:, :8], k=3)
    with pytest.raises(MiningError, match="target i to be query i's"):
        top_neighbours(q, t[:100], k=3)
    bad = q.copy()
    bad[3, 3] = np.nan
    with pytest.raises(MiningError, match="NaN"):
        top_neighbours(bad, k=3)
    with pytest.raises(MiningError, match="2-D float"):
        top_neighbours(np.arange(10), k=3)
