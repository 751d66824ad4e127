"""Joint example selection and concept-aware batch sampling for batchkit.

* :mod:`batchkit_joint_selection.jest`: JEST (Evans et al. 2024). Pairwise sigmoid losses of a
  learner and a reference model, the learnability matrix S, and blocked joint sampling of b
  examples from a super-batch of B by the conditional logits of the paper; independent top-k for
  comparison.
* :mod:`batchkit_joint_selection.cabs`: CABS (Ghosh et al. 2026). CABS-FM (most concepts) and
  CABS-DM (greedy concept balance with targets and a per-GPU frequency cap), on concept labels only.

The plugins that run them on the host's super-batches (entry points ``jest`` and ``cabs``):

* :class:`~batchkit_joint_selection.jest_plugin.JESTSelection` (``jest``);
* :class:`~batchkit_joint_selection.cabs_plugin.CABSSelection` (``cabs``).

:mod:`batchkit_joint_selection.testing` has a tiny synthetic two-tower task that offers what both need.
"""

from batchkit_joint_selection.cabs import ConceptTable
from batchkit_joint_selection.cabs import DMSelection
from batchkit_joint_selection.cabs import cabs_dm
from batchkit_joint_selection.cabs import cabs_dm_rank
from batchkit_joint_selection.cabs import cabs_fm
from batchkit_joint_selection.cabs import concept_entries
from batchkit_joint_selection.cabs import concept_table
from batchkit_joint_selection.cabs import concept_targets
from batchkit_joint_selection.cabs import dm_gains
from batchkit_joint_selection.cabs import rank_shares
from batchkit_joint_selection.cabs_plugin import CABSSelection
from batchkit_joint_selection.jest import VARIANTS
from batchkit_joint_selection.jest import conditional_logits
from batchkit_joint_selection.jest import gumbel_noise
from batchkit_joint_selection.jest import gumbel_topk
from batchkit_joint_selection.jest import independent_scores
from batchkit_joint_selection.jest import independent_topk
from batchkit_joint_selection.jest import joint_sample
from batchkit_joint_selection.jest import learnability_matrix
from batchkit_joint_selection.jest import siglip_pair_losses
from batchkit_joint_selection.jest_plugin import JESTSelection


__all__ = [
    "VARIANTS",
    "CABSSelection",
    "ConceptTable",
    "DMSelection",
    "JESTSelection",
    "cabs_dm",
    "cabs_dm_rank",
    "cabs_fm",
    "concept_entries",
    "concept_table",
    "concept_targets",
    "conditional_logits",
    "dm_gains",
    "gumbel_noise",
    "gumbel_topk",
    "independent_scores",
    "independent_topk",
    "joint_sample",
    "learnability_matrix",
    "rank_shares",
    "siglip_pair_losses",
]
