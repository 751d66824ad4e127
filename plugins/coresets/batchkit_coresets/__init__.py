"""CoLM mini-batch coresets for data mixtures (Nguyen et al., "Mini-batch Coresets for Memory-efficient
Language Model Training on Data Mixtures", ICLR 2025).

Phase 1: the algorithm, as pure functions and small stateful objects, each readable against the
paper. The ``colm`` batch-stage plugin that runs it on the host's super-batches comes with the host
API it needs (issue 11).
"""

from .adam import AdamNormalizer
from .coreset import DEFAULT_DIMS
from .coreset import proportional_budget
from .coreset import select_coreset
from .coreset import small_source_mask
from .coreset import top_dims
from .facility_location import facility_location_value
from .facility_location import greedy_facility_location
from .facility_location import l1_similarity
from .gradients import DEFAULT_EPS
from .gradients import RandomDirection
from .gradients import directional_derivatives
from .gradients import eval_mode
from .gradients import exact
from .gradients import zeroth_order
from .parameter import linear_weight_names
from .parameter import resolve_parameter

__all__ = [
    "AdamNormalizer", "DEFAULT_DIMS", "DEFAULT_EPS", "RandomDirection", "directional_derivatives", "eval_mode",
    "exact", "facility_location_value", "greedy_facility_location", "l1_similarity", "linear_weight_names",
    "proportional_budget", "resolve_parameter", "select_coreset", "small_source_mask", "top_dims", "zeroth_order",
]
