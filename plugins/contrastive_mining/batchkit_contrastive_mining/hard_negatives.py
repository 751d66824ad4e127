"""Optional step 6 of B3 mining: K_hn per-example hard negatives from each cluster's pooled ranks.

B3's "HNPS" configurations (K_hn = 5) give every example extra negatives drawn from the ranks of
its whole cluster. For a cluster c with members M and rank table R (row i best first, self
excluded, p + m ranks; the paper's code uses p + 100)::

    score[j] = #{ (i, r) : i in M, R[i, r] = j }          occurrences in the members' rank lists
             + [j in M]                                    plus the members themselves
             - 2 #{ (i, r) : i in M, r < p, R[i, r] = j }  minus 2 per occurrence in a member's top-p
    score[M] = 0                                           never a member of the same cluster
    draw |M| * K_hn ids without replacement, P(j) proportional to score[j], over {j : score[j] > 0}
      (if fewer than |M| * K_hn ids qualify, each is repeated r times, r the smallest that suffices)
    member number t of the sorted members gets draws t*K_hn .. (t+1)*K_hn - 1

An id that a member ranks in its top-p (a likely false negative) scores 1 - 2 = -1 from that
occurrence, so it is drawn only if other members rank it lower often enough. If no id scores above
zero (tiny datasets only), the draw is uniform over the non-members; this departs from the paper's
code, which loops forever there.
"""

from __future__ import annotations

import math

import numpy as np

from ._progress import track
from .errors import MiningError
from .graph import check_ranks


def hard_negative_scores(cluster, ranks, p: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids with a positive B3 hard-negative score for ``cluster``, and their scores.

    Args:
        cluster: member ids.
        ranks: (N, k) rank table (row i best first, self excluded), k >= p.
        p: the top ranks that count as likely false negatives.

    Returns:
        ``(ids, scores)``: sorted ids with score > 0 and their integer scores.
    """
    members = np.asarray(cluster, dtype=np.int64)
    member_ranks = ranks[members]
    ids, scores = np.unique(np.concatenate([member_ranks.ravel(), members]), return_counts=True)
    top_ids, top_counts = np.unique(member_ranks[:, :p].ravel(), return_counts=True)
    scores[np.searchsorted(ids, top_ids)] -= 2 * top_counts
    scores[np.isin(ids, members)] = 0
    positive = scores > 0
    return ids[positive], scores[positive]


def cluster_hard_negatives(clusters, ranks, p: int, k_hn: int = 5, *, seed: int = 0, progress: bool = False,
                           stats: dict | None = None) -> np.ndarray:
    """K_hn hard negatives for every clustered sample, drawn as in B3 (see the module docstring).

    Args:
        clusters: lists of member ids (the rebalanced clusters).
        ranks: (N, p + m) rank table, row i best first, self excluded.
        p: top ranks penalised as likely false negatives.
        k_hn: negatives per example (the paper: 5).
        seed: the draws are a function of (seed, clusters, ranks).
        progress: show a progress bar.
        stats: if given, gets ``repeated_pool`` (clusters whose pool was repeated) and
            ``uniform_fallback`` (clusters with no positive score).

    Returns:
        (N, k_hn) int64: row i holds sample i's negatives (ids, never in i's cluster; may repeat
        within a row only when the pool was repeated); -1 rows for samples in no cluster.
    """
    r = check_ranks(ranks)
    n = r.shape[0]
    if not isinstance(k_hn, (int, np.integer)) or k_hn < 1:
        raise MiningError("hard_negatives", f"must be a positive number of negatives per example, got {k_hn!r}",
                          "use e.g. hard_negatives=5, or 0 for none")
    if not 0 <= p <= r.shape[1]:
        raise MiningError("p", f"p={p} is outside the rank table's {r.shape[1]} ranks", "use 0 <= p <= p + m")
    rng = np.random.default_rng(seed)
    out = np.full((n, k_hn), -1, dtype=np.int64)
    repeated = uniform = 0
    for cluster in track(clusters, total=len(clusters), description="b3: hard negatives", enabled=progress):
        members = np.sort(np.asarray(cluster, dtype=np.int64))
        pool, weights = hard_negative_scores(members, r, p)
        if len(pool) == 0:
            pool = np.setdiff1d(np.arange(n, dtype=np.int64), members)
            weights = np.ones(len(pool), dtype=np.int64)
            uniform += 1
            if len(pool) == 0:
                raise MiningError("hard_negatives", "every sample is in one cluster, so none can be a negative",
                                  "use hard_negatives=0, or a K smaller than the dataset")
        size = len(members) * k_hn
        times = math.ceil(size / len(pool))
        if times > 1:
            pool, weights = np.repeat(pool, times), np.repeat(weights, times)
            repeated += 1
        draws = rng.choice(pool, size=size, replace=False, p=weights / weights.sum())
        out[members] = draws.reshape(len(members), k_hn)
    if stats is not None:
        stats.update(repeated_pool=repeated, uniform_fallback=uniform)
    return out
