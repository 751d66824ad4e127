"""CoLM mini-batch coresets for data mixtures (Nguyen et al., "Mini-batch Coresets for Memory-efficient
Language Model Training on Data Mixtures", ICLR 2025).

The algorithm as pure functions and small stateful objects, each readable against the paper, and
the ``colm`` batch-stage plugin (:class:`CoLM`) that runs it on the host's super-batches.
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
from .gradients import exact
from .gradients import zeroth_order
from .parameter import linear_weight_names
from .parameter import resolve_parameter
from .plugin import CoLM

__all__ = [
    "AdamNormalizer", "CoLM", "DEFAULT_DIMS", "DEFAULT_EPS", "RandomDirection", "directional_derivatives",
    "exact", "facility_location_value", "greedy_facility_location", "l1_similarity", "linear_weight_names",
    "proportional_budget", "resolve_parameter", "select_coreset", "small_source_mask", "top_dims", "zeroth_order",
]
