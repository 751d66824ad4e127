"""B3 contrastive batch mining (Thirukovalluru et al., "Breaking the Batch Barrier", NeurIPS 2025).

The ``b3`` plugin (:class:`B3Plugin`, in :mod:`.plugin`) mines in the host's prepare-data stage,
through its artefact cache, and makes every global batch of whole clusters. The offline pipeline
is a set of pure functions, each step its own module:

- :mod:`.teacher` -- teacher embeddings (the packaged MiniLM, offline, or any callable)
- :mod:`.neighbours` -- top (p + m) neighbours of every query (exact, or faiss IVF for large N)
- :mod:`.graph` -- the graph of mutual edges from ranks [p, p + m)
- :mod:`.partition` -- METIS into N // K parts, rebalanced to exactly K per cluster
- :mod:`.hard_negatives` -- per-example hard negatives from the pooled cluster ranks
- :mod:`.mine` -- :func:`mine`, all of them composed, with a per-step timing breakdown
"""

from .errors import MiningError
from .graph import MutualGraph, mutual_graph
from .hard_negatives import cluster_hard_negatives, hard_negative_scores
from .mine import ALGORITHM_VERSION, MiningOptions, MiningResult, mine
from .neighbours import EXACT_MAX_N, top_neighbours
from .partition import check_cluster_size, metis_partition, rebalance
from .plugin import B3Plugin, ClusterBatchSampler, HardNegativeCollate
from .teacher import DEFAULT_TEACHER, SentenceTeacher, embed_texts, load_teacher

__all__ = [
    "ALGORITHM_VERSION",
    "B3Plugin",
    "ClusterBatchSampler",
    "DEFAULT_TEACHER",
    "EXACT_MAX_N",
    "HardNegativeCollate",
    "MiningError",
    "MiningOptions",
    "MiningResult",
    "MutualGraph",
    "SentenceTeacher",
    "check_cluster_size",
    "cluster_hard_negatives",
    "embed_texts",
    "hard_negative_scores",
    "load_teacher",
    "metis_partition",
    "mine",
    "mutual_graph",
    "rebalance",
    "top_neighbours",
]
