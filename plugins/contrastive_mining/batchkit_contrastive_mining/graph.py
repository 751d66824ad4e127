"""Step 3 of B3 mining: the sparse graph of MUTUAL hard-negative edges.

For the rank table R (row i: target ids ranked by teacher similarity to query i, self excluded)::

    E = {(i, j) : j in R[i, p : p + m], j != i}          directed: j is a hard negative of i
    i -- j  iff  (i, j) in E and (j, i) in E             undirected, unweighted, mutual only

The top-p ranks are skipped: they are likely false negatives (near-duplicates, other positives).
The result is in METIS's CSR form: the neighbours of i are ``adjncy[xadj[i]:xadj[i + 1]]``, sorted,
each undirected edge stored once per direction, no self-loops and no duplicates (the reference
code appends each mutual edge twice, a multigraph; this does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MiningError


@dataclass(frozen=True)
class MutualGraph:
    """An undirected graph in CSR form (what ``pymetis`` takes)."""

    xadj: np.ndarray  #: (N + 1,) int64 offsets
    adjncy: np.ndarray  #: (2 * n_edges,) int64 neighbour ids

    @property
    def n_nodes(self) -> int:
        return len(self.xadj) - 1

    @property
    def n_edges(self) -> int:
        """Undirected edges (each stored twice in ``adjncy``)."""
        return len(self.adjncy) // 2

    def degrees(self) -> np.ndarray:
        return np.diff(self.xadj)

    def neighbours(self, i: int) -> np.ndarray:
        return self.adjncy[self.xadj[i]:self.xadj[i + 1]]

    def adjacency_list(self) -> list[list[int]]:
        return [self.neighbours(i).tolist() for i in range(self.n_nodes)]


def check_ranks(ranks, name: str = "ranks") -> np.ndarray:
    """``ranks`` as an (N, k) int64 array of ids in [0, N), or a MiningError."""
    r = np.asarray(ranks)
    if r.ndim != 2 or not np.issubdtype(r.dtype, np.integer):
        raise MiningError(name, f"expected an (N, k) integer rank table, got shape {r.shape} dtype {r.dtype}",
                          "pass the output of top_neighbours")
    r = r.astype(np.int64, copy=False)
    if r.size and (r.min() < 0 or r.max() >= r.shape[0]):
        raise MiningError(name, f"ids must lie in [0, {r.shape[0]}); found {r.min()}..{r.max()}",
                          "rank targets paired one-to-one with the queries")
    return r


def mutual_graph(ranks, p: int = 30, m: int = 100) -> MutualGraph:
    """The graph of mutual edges from ranks [p, p + m) of the rank table.

    Args:
        ranks: (N, >= p + m) int rank table, row i best first, ids in [0, N).
        p: ranks skipped at the top (B3's START_POINT, default 30).
        m: ranks used after them (B3's nmax, default 100).
    """
    r = check_ranks(ranks)
    n = r.shape[0]
    if p < 0 or m < 1:
        raise MiningError("p, m", f"need p >= 0 and m >= 1, got p={p}, m={m}", "use the defaults p=30, m=100")
    if r.shape[1] < p + m:
        raise MiningError("p + m", f"the rank table has {r.shape[1]} ranks per row, fewer than p + m = {p + m}",
                          "compute top_neighbours with k = p + m")
    src = np.repeat(np.arange(n, dtype=np.int64), m)
    dst = r[:, p:p + m].reshape(-1)
    keys = np.unique(src[src != dst] * n + dst[src != dst])  # directed edges, deduplicated, sorted
    reverse = (keys % n) * n + keys // n
    mutual = keys[np.isin(keys, reverse, assume_unique=True)]  # symmetric: (i, j) kept iff (j, i) kept
    rows, cols = mutual // n, mutual % n  # sorted by row, then column
    xadj = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=xadj[1:])
    return MutualGraph(xadj=xadj, adjncy=cols.astype(np.int64))
