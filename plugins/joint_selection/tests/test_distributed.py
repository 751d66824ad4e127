"""jest and cabs with 2 processes, DDP (gloo) and DeepSpeed ZeRO-2 on CPU: two launches in all.

jest (scope "global"): both ranks report the same global choice at every step, of world * b
distinct examples of the gathered super-batch; each rank trains b of them, the two disjoint, and
together exactly the chosen ones; the replicas end identical; under DDP a run resumed from a
mid-epoch checkpoint trains what the uninterrupted run trained and ends with the same weights.

cabs (CABS-DM, scope "global"): every step, replaying CABS-DM with *both* ranks' super-batch
concepts (one concept table and one set of targets for the global batch) and each rank's generator
gives exactly the examples that rank trained: so both ranks built the same table and targets, and
the union of their picks is the global selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchkit.testing import run_two_ranks
from batchkit_joint_selection import cabs_dm_rank
from batchkit_joint_selection._common import step_generator

pytestmark = pytest.mark.multiprocess

JOB = Path(__file__).parent / "joint_selection_job.py"
KEEP, SUPER, STEPS = 8, 40, 12


def check_jest(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["batches_per_epoch"] == b["batches_per_epoch"] == 6
    assert a["chosen"] == b["chosen"] and len(a["chosen"]) == STEPS  # the same global choice on both ranks
    for step, chosen in enumerate(a["chosen"]):
        assert len(chosen) == len(set(chosen)) == 2 * KEEP and all(0 <= i < 2 * SUPER for i in chosen)
        global_ids = a["super_ids"][step] + b["super_ids"][step]  # rank r's example i is r * n + i
        assert not set(a["trained"][step]) & set(b["trained"][step])
        assert sorted(a["trained"][step] + b["trained"][step]) == sorted(global_ids[i] for i in chosen)
        assert len(a["trained"][step]) == len(b["trained"][step]) == KEEP
    moved = sum(len(set(t) - set(s)) for t, s in zip(a["trained"] + b["trained"], a["super_ids"] + b["super_ids"]))
    assert moved > 0  # the global choice did move examples between ranks at some step
    assert a["params"] == b["params"]


def check_cabs(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == STEPS
    greedy = 0
    for step in range(STEPS):
        per_rank = [a["super_concepts"][step], b["super_concepts"][step]]
        g_step, micro = a["steps"][step]
        assert (g_step, micro) == tuple(b["steps"][step])
        for rank, record in enumerate((a, b)):
            want = cabs_dm_rank(per_rank, rank, 2 * KEEP, max_freq=3, generator=step_generator(0, g_step, micro, rank))
            kept = [record["super_ids"][step][i] for i in want.indices.tolist()]
            assert record["trained"][step] == kept, (step, rank)
            greedy += want.greedy
        assert not set(a["trained"][step]) & set(b["trained"][step])
    assert a["state"]["greedy"] + b["state"]["greedy"] == greedy > 0
    assert a["params"] == b["params"]


def test_ddp_ranks_agree_and_jest_resumes_exactly(tmp_path: Path) -> None:
    a, b = run_two_ranks(JOB, tmp_path, "--strategy", "ddp", "--resume")
    check_jest(a["jest"], b["jest"])
    check_cabs(a["cabs"], b["cabs"])
    for rank in (a, b):
        full, resumed = rank["jest"], rank["jest_resumed"]
        assert resumed["trained"] == full["trained"][8:] and resumed["chosen"] == full["chosen"][8:]
        assert resumed["params"] == full["params"]
        assert resumed["state"] == full["state"]


def test_deepspeed_zero2_ranks_agree(tmp_path: Path) -> None:
    a, b = run_two_ranks(JOB, tmp_path, "--strategy", "deepspeed")
    check_jest(a["jest"], b["jest"])
    check_cabs(a["cabs"], b["cabs"])
