"""hard_batches with 2 processes: DDP (gloo) and DeepSpeed ZeRO-2 on CPU. Both ranks must train
the same mini-batch ids in the same order and take the same number of steps, with each round the
top-k of the rank-averaged last-seen losses; under DDP a mid-round resume reproduces the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchkit.testing import run_two_ranks
from batchkit_hard_samples import top_delta_batches

pytestmark = pytest.mark.multiprocess

JOB = Path(__file__).parent / "hard_batches_job.py"
M, K, EPOCHS = 8, 4, 3


def run_job(tmp_path: Path, *args: str) -> list[dict]:
    return run_two_ranks(JOB, tmp_path, *args)


def check_identical_selection(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["global_step"] == b["global_step"] == EPOCHS * M
    assert len(a["ids"]) == len(b["ids"]) == EPOCHS * M
    assert a["ids"] == b["ids"]  # the same global mini-batches, in the same order
    assert not set(a["shard"]) & set(b["shard"])  # ... made of each rank's own samples
    assert a["losses"] != b["losses"]  # local losses differ: agreement comes from the all-reduce
    assert a["table"] == b["table"]
    # Replay: every round is the top-k of the mean over ranks of the last-seen losses
    ids = a["ids"]
    assert ids[:M] == list(range(M))
    last_seen = [float("inf")] * M
    rounds = 0
    for position, j in enumerate(ids):
        if position >= M and (position - M) % K == 0:
            assert ids[position:position + K] == top_delta_batches(last_seen, K), position
            rounds += 1
        last_seen[j] = (a["losses"][position] + b["losses"][position]) / 2
    assert rounds == (EPOCHS - 1) * M // K


def test_ddp_ranks_select_identical_batches_and_resume_exactly(tmp_path: Path) -> None:
    ranks = run_job(tmp_path, "--strategy", "ddp", "--resume")
    check_identical_selection([r["full"] for r in ranks])
    weights = lambda r: {k: v for k, v in r["full"]["params"].items() if "running" not in k and "batches" not in k}  # noqa: E731
    assert weights(ranks[0]) == weights(ranks[1])  # DDP keeps the weights equal (BatchNorm buffers are per rank)
    for r in ranks:
        full, resumed = r["full"], r["resumed"]
        assert resumed["seen"] == full["seen"][10:]  # each rank: the same samples after the restart
        assert resumed["table"] == full["table"]
        assert resumed["params"] == full["params"]


def test_deepspeed_zero2_ranks_select_identical_batches(tmp_path: Path) -> None:
    ranks = run_job(tmp_path, "--strategy", "deepspeed")
    check_identical_selection([r["full"] for r in ranks])
