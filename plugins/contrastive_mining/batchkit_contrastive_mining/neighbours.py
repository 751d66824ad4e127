"""Step 2 of B3 mining: the teacher's top-k neighbours of every query.

B3 ranks, for each query i, the training *targets* by teacher similarity (the reference stores
about p + m = 130 ranks per row). Target i is query i's own positive (or query i itself when
queries and targets are the same texts), so it is excluded: row i of the result never holds i.

Two ways to compute it, both on inner products of the embeddings given (normalise them for
cosine similarity; `mine` does):

- ``exact``: chunked ``Q_chunk @ T.T`` plus ``topk`` in torch. Memory is bounded by
  ``max_chunk_bytes`` for the similarity block, whatever N is. Cost O(N^2 d).
- ``ivf``: a faiss-cpu inverted-file index (``IndexIVFFlat``, 4 sqrt(N) lists, 32 probed),
  approximate, about nprobe/nlist of the exact search cost plus a k-means build, for N where the
  exact N^2 pass stops fitting the budget. Missed neighbours shift which ids fall in ranks
  [p, p + m); a larger ``ivf_nprobe`` buys recall with time.

``auto`` switches from exact to ivf above :data:`EXACT_MAX_N` = 30k targets. Measured on this
2-core machine at d = 384, k = 130 (``benchmarks/b3_knn_switch.py``, synthetic clustered vectors,
shared machine): exact 4.3 / 11.6 / 37 / 183 s at N = 8k / 16k / 32k / 64k, IVF 2.7 / 5.5 / 20 /
50 s with recall 0.90 / 0.86 / 0.76 / 0.65 of the exact 130. Up to 30k the exact pass costs at most
about 35 s (a fraction of the 2-minute mining budget, and exact); beyond, it grows as N^2 past the
budget. faiss's HNSW was measured too and was slower than the exact pass below 50k (its index
build dominates at d = 384), so it is not offered.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._progress import track
from .errors import MiningError

#: ``knn="auto"`` uses the exact path up to this many targets, faiss IVF above (measured: see above).
EXACT_MAX_N = 30_000
#: default bound on one similarity block of the exact path (float32 rows x targets)
MAX_CHUNK_BYTES = 128 * 2**20

KNN_METHODS = ("auto", "exact", "ivf")


def resolve_knn_method(knn: str, n_targets: int) -> str:
    """The method ``knn`` stands for with ``n_targets`` targets: ``exact`` or ``ivf``."""
    if knn not in KNN_METHODS:
        raise MiningError("knn", f"unknown method {knn!r}", f"use one of {', '.join(KNN_METHODS)}")
    if knn == "auto":
        return "exact" if n_targets <= EXACT_MAX_N else "ivf"
    return knn


def _as_float_matrix(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or not t.is_floating_point():
        raise MiningError(name, f"expected a 2-D float array (N, d) of embeddings, got shape {tuple(t.shape)} "
                          f"dtype {t.dtype}", "pass one embedding row per sample")
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise MiningError(name, "the embeddings hold NaN or inf", "check the teacher's output")
    return t


def top_neighbours(
    queries,
    targets=None,
    k: int = 130,
    *,
    knn: str = "auto",
    exclude_self: bool = True,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    ivf_nlist: int | None = None,
    ivf_nprobe: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """The ``k`` targets with the highest inner product with each query, best first.

    Args:
        queries: (N, d) float embeddings (numpy or torch).
        targets: (N_t, d) float embeddings; ``None`` means the queries themselves.
        k: neighbours per query (B3: p + m).
        knn: ``"exact"``, ``"ivf"`` (faiss, approximate) or ``"auto"`` (see :data:`EXACT_MAX_N`).
        exclude_self: drop target i from query i's list (needs N_t == N: target i pairs with query i).
        max_chunk_bytes: bound on one (rows x N_t) float32 similarity block of the exact path.
        ivf_nlist: faiss IVF lists (default 4 sqrt(N_t)).
        ivf_nprobe: lists searched per query (nprobe = nlist is an exhaustive, exact search).
        progress: show a progress bar.

    Returns:
        (N, k) int64 array; row i holds target ids ranked by similarity to query i.
    """
    q = _as_float_matrix(queries, "queries")
    t = q if targets is None else _as_float_matrix(targets, "targets")
    if q.shape[1] != t.shape[1]:
        raise MiningError("targets", f"queries have dimension {q.shape[1]} and targets {t.shape[1]}",
                          "embed both with the same teacher")
    n, n_t = q.shape[0], t.shape[0]
    if exclude_self and n != n_t:
        raise MiningError("targets", f"{n} queries but {n_t} targets; excluding self needs target i to be query i's "
                          "pair", "pass one target per query")
    available = n_t - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise MiningError("p + m", f"{k} neighbours asked of each query, but only {available} other targets exist",
                          "lower p and m, or mine a larger dataset")
    method = resolve_knn_method(knn, n_t)
    if method == "exact":
        return _exact(q, t, k, exclude_self, max_chunk_bytes, progress)
    return _ivf(q, t, k, exclude_self, ivf_nlist, ivf_nprobe, progress)


def _exact(q: torch.Tensor, t: torch.Tensor, k: int, exclude_self: bool, max_chunk_bytes: int,
           progress: bool) -> np.ndarray:
    n, n_t = q.shape[0], t.shape[0]
    rows = max(1, min(n, max_chunk_bytes // (4 * n_t)))
    out = np.empty((n, k), dtype=np.int64)
    starts = range(0, n, rows)
    with torch.inference_mode():
        for start in track(starts, total=len(starts), description="b3: exact top-k neighbours", enabled=progress):
            stop = min(n, start + rows)
            sim = q[start:stop] @ t.T
            if exclude_self:
                local = torch.arange(stop - start)
                sim[local, local + start] = -math.inf
            out[start:stop] = sim.topk(k, dim=1, sorted=True).indices.numpy()
    return out


def _ivf(q: torch.Tensor, t: torch.Tensor, k: int, exclude_self: bool, nlist: int | None, nprobe: int,
         progress: bool) -> np.ndarray:
    import faiss

    n, n_t = q.shape[0], t.shape[0]
    want = k + (1 if exclude_self else 0)
    nlist = nlist or max(1, int(4 * math.sqrt(n_t)))
    t_np, q_np = t.numpy(), q.numpy()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(t.shape[1]), t.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    # k-means on a fixed sample (faiss asks for ~39 points per list); seeded for reproducible lists.
    index.cp.seed = 1234
    sample = np.random.default_rng(0).permutation(n_t)[: min(n_t, 64 * nlist)]
    index.train(t_np[sample])
    index.add(t_np)
    index.nprobe = min(nprobe, nlist)
    found = np.empty((n, want), dtype=np.int64)
    rows = 4096
    searches = range(0, n, rows)
    for start in track(searches, total=len(searches), description="b3: faiss IVF top-k search", enabled=progress):
        found[start:start + rows] = index.search(q_np[start:start + rows], want)[1]
    if (found < 0).any():
        raise MiningError("knn", f"faiss IVF found fewer than {want} neighbours for some queries with "
                          f"nprobe={index.nprobe} of nlist={nlist} lists", "raise ivf_nprobe, or use knn='exact'")
    if not exclude_self:
        return found
    # Drop self where it was found, else the last (worst) neighbour: k remain in every row.
    keep = found != np.arange(n)[:, None]
    keep[keep.all(axis=1), -1] = False
    return found[keep].reshape(n, k)
