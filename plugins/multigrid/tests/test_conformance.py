"""The host's conformance suite (batchkit.testing.conformance) for multigrid, on 16 x 16 images.

96 images in batches of 4 (48 per rank under DDP): epoch 0 at the long-cycle shape 11 x 11, then
the base 16 x 16, so the suite's resume (at step 17, mid-epoch 1) and its 2-process run both cross
a long-cycle stage change. ``allow_early_stop`` lets the suite's shorter runs (1 and 2 epochs of
the schedule's 3) start. The DDP check also reads the input shape of every step each rank trained
(written by :class:`~batchkit_multigrid.testing.TinyShapeModule`): the ranks are in lockstep.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchkit.testing.conformance import PluginConformance


class TestMultigridConformance(PluginConformance):
    entries = {"mg": {"plugin": "multigrid", "baseline_epochs": 2, "baseline_lr_milestones": [1], "allow_early_stop": True}}
    module_factory = "batchkit_multigrid.testing:TinyShapeModule"
    module_kwargs = {}
    loader_factory = "batchkit_multigrid.testing:image_loader"
    loader_kwargs = {"n": 96, "batch_size": 4}
    index_field = "2"
    max_epochs = 3

    @pytest.mark.multiprocess
    def test_ddp_ranks_agree(self, tmp_path: Path) -> None:
        super().test_ddp_ranks_agree(tmp_path)
        a, b = (json.loads((tmp_path / f"multigrid_steps_rank{r}.json").read_text()) for r in (0, 1))
        # 48 samples per rank: epoch 0 cycles (16, 8, 8) at 8x8, 11x11, 11x11 -> 16, 8, 8, 16;
        # epoch 1 (16, 8, 4) at 8x8, 11x11, 16x16 -> 16, 8, 4, 16 (4 left over)
        expected = [[16, 1, 8, 8], [8, 1, 11, 11], [8, 1, 11, 11], [16, 1, 8, 8],
                    [16, 1, 8, 8], [8, 1, 11, 11], [4, 1, 16, 16], [16, 1, 8, 8]]
        assert a["shapes"] == b["shapes"] == expected
        assert a["lr_in_step"] == b["lr_in_step"] == pytest.approx([0.1] * 4 + [0.05] * 4)
