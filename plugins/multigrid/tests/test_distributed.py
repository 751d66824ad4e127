"""multigrid with 2 processes under DeepSpeed ZeRO-2 on CPU (DDP runs in the conformance suite,
test_conformance.py): both ranks train the same shapes in the same order, at the same learning
rate, through two long-cycle loader rebuilds, on disjoint samples, and end with identical weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchkit.testing import run_two_ranks

pytestmark = pytest.mark.multiprocess

JOB = Path(__file__).parent / "multigrid_job.py"


def test_deepspeed_zero2_ranks_train_in_lockstep(tmp_path: Path) -> None:
    a, b = run_two_ranks(JOB, tmp_path, "--strategy", "deepspeed")
    # clips 8 x 16 x 16, b = 2, 48 per rank. Epoch 0: (2, 11, 11), β = 8, cycle 32 at 2x8x8, 16 at
    # 2x11x11 (x2): 32 + 16. Epoch 1: (4, 16, 16), β = 2, cycle 16, 8, 4 at 4x8x8, 4x11x11, 4x16x16:
    # 16 + 8 + 4 + 16. Epoch 2 (fine-tune at the base): 8, 4, 2 at 8x8x8, 8x11x11, 8x16x16: 3 cycles (6 left over).
    expected = ([[32, 1, 2, 8, 8], [16, 1, 2, 11, 11]]
                + [[16, 1, 4, 8, 8], [8, 1, 4, 11, 11], [4, 1, 4, 16, 16], [16, 1, 4, 8, 8]]
                + [[8, 1, 8, 8, 8], [4, 1, 8, 11, 11], [2, 1, 8, 16, 16]] * 3)
    assert a["shapes"] == b["shapes"] == expected
    assert a["epoch_lengths"] == b["epoch_lengths"] == [2, 4, 9]
    assert a["global_step"] == b["global_step"] == a["total_steps"] == b["total_steps"] == 15
    # LR 0.05 x β (8, 2, 1) with the module's decay at epoch 2
    assert a["lr_in_step"] == b["lr_in_step"] == pytest.approx([0.4] * 2 + [0.1] * 4 + [0.005] * 9)
    for step, (x, y) in enumerate(zip(a["seen"], b["seen"])):
        assert len(x) == len(y) and not set(x) & set(y), step
    assert a["weights"] == b["weights"]
