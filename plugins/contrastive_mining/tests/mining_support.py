"""Small synthetic inputs shared by the mining tests."""

from __future__ import annotations

import numpy as np


def planted_groups(n_groups: int, size: int, dim: int = 32, noise: float = 0.05, seed: int = 0):
    """Embeddings of ``n_groups`` tight, well-separated groups of ``size``; ids shuffled.

    Returns (embeddings (n_groups * size, dim), group label per id).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(n_groups), size))
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    return x.astype(np.float32), labels


def assert_partition(clusters, n: int, K: int, dropped=()):
    """Every cluster has exactly K sorted ids and every id is in exactly one cluster or dropped."""
    assert all(len(c) == K for c in clusters), [len(c) for c in clusters]
    assert all(list(c) == sorted(c) for c in clusters)
    ids = [i for c in clusters for i in c] + list(dropped)
    assert sorted(ids) == list(range(n))
    assert [c[0] for c in clusters] == sorted(c[0] for c in clusters)
