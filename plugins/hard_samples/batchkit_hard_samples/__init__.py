"""Hard-sample selection as batchkit plugins.

* ``hard_batches`` (:class:`HardBatchSelection`, sampler stage): after one ordinary epoch over a
  fixed partition into mini-batches, train only the top ``delta`` fraction of mini-batches by
  their last-seen loss, round after round (Sahayam, Zakkam and Jayaraman, arXiv 2304.03486).
* ``selective_backprop`` (:class:`SelectiveBackprop`, batch stage): score the samples of a batch
  with a no-grad forward and back-propagate only a ``keep`` fraction, chosen by rank-based
  probabilities or top-k (Jiang et al. 2019; Composer's SelectiveBackprop).

Both use the host's batch module (:mod:`batchkit.batch`): the per-sample loss protocol, the scoring pass and selection.
"""

from batchkit_hard_samples.hard_batches import HardBatchSampler
from batchkit_hard_samples.hard_batches import HardBatchSelection
from batchkit_hard_samples.hard_batches import top_delta_batches
from batchkit_hard_samples.selective_backprop import SelectiveBackprop
from batchkit_hard_samples.selective_backprop import rank_probabilities
from batchkit_hard_samples.selective_backprop import should_select


__all__ = [
    "HardBatchSampler",
    "HardBatchSelection",
    "SelectiveBackprop",
    "rank_probabilities",
    "should_select",
    "top_delta_batches",
]
