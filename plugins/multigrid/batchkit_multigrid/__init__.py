"""Multigrid training (Wu, Girshick, He, Feichtenhofer and Krähenbühl, CVPR 2020) for batchkit.

* :mod:`batchkit_multigrid.schedule`: the schedule of mini-batch shapes, long cycle (per epoch
  range) and short cycle (per iteration), batch factors, epochs and learning rates, reproducing
  SlowFast's ``MultigridSchedule`` and ``ShortCycleBatchSampler``.
* :mod:`batchkit_multigrid.resize`: the shape change in the DataLoader worker (temporal striding,
  spatial resizing) for clips (C, T, H, W) and images (C, H, W).

* :mod:`batchkit_multigrid.plugin`: :class:`MultigridPlugin` (entry point ``multigrid``), which wires
  them into the host: the sampler stage regroups each rank's samples into the schedule's batch sizes,
  the collate stage resizes in the workers, the long cycle rebuilds the loader and scales the LR.
* :mod:`batchkit_multigrid.testing`: small image/clip datasets and modules for tests.
"""

from batchkit_multigrid.plugin import MultigridBatchSampler
from batchkit_multigrid.plugin import MultigridCollate
from batchkit_multigrid.plugin import MultigridPlugin
from batchkit_multigrid.resize import collate_at_size
from batchkit_multigrid.resize import input_size
from batchkit_multigrid.resize import resize_batch
from batchkit_multigrid.resize import resize_input
from batchkit_multigrid.resize import resize_samples
from batchkit_multigrid.resize import stride_frames
from batchkit_multigrid.schedule import EPOCH_FACTOR
from batchkit_multigrid.schedule import EVAL_FREQ
from batchkit_multigrid.schedule import GAMMA
from batchkit_multigrid.schedule import IMAGE_LONG_CYCLE_FACTORS
from batchkit_multigrid.schedule import LONG_CYCLE_FACTORS
from batchkit_multigrid.schedule import SHORT_CYCLE_FACTORS
from batchkit_multigrid.schedule import BatchShape
from batchkit_multigrid.schedule import GridShape
from batchkit_multigrid.schedule import MultigridSchedule
from batchkit_multigrid.schedule import Stage
from batchkit_multigrid.schedule import short_cycle_batches


__all__ = [
    "EPOCH_FACTOR",
    "EVAL_FREQ",
    "GAMMA",
    "IMAGE_LONG_CYCLE_FACTORS",
    "LONG_CYCLE_FACTORS",
    "SHORT_CYCLE_FACTORS",
    "BatchShape",
    "GridShape",
    "MultigridBatchSampler",
    "MultigridCollate",
    "MultigridPlugin",
    "MultigridSchedule",
    "Stage",
    "collate_at_size",
    "input_size",
    "resize_batch",
    "resize_input",
    "resize_samples",
    "short_cycle_batches",
    "stride_frames",
]
