"""colm with 2 processes: DDP (gloo) and DeepSpeed ZeRO-2 on CPU. Every rank agrees on the choice
over the global large batch, which is exactly select_coreset on the gathered estimates (replayed
here from the records), and trains its own part of it; the Adam moments are the same on every
rank; a mid-epoch resume under DDP reproduces the run; scope "rank" and the exact estimator too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from colm_job import BATCH
from colm_job import EPOCHS
from colm_job import N
from colm_job import OPTIONS
from colm_job import SAVE_AT
from colm_support import replay_global
from colm_support import replay_per_rank

from batchkit.testing import run_two_ranks
from batchkit_coresets.testing import SourceDataset

pytestmark = pytest.mark.multiprocess

JOB = Path(__file__).parent / "colm_job.py"
STEPS_PER_EPOCH = N // 2 // (2 * BATCH)  # per rank: 64 samples in large batches of 2b = 8
SOURCES = SourceDataset(n=N).source.tolist()
SMALL = tuple(OPTIONS["small_sources"])


def weights(run: dict[str, Any]) -> dict[str, list[float]]:
    """The trained weights (BatchNorm's running statistics are per rank under DDP)."""
    return {k: v for k, v in run["params"].items() if "running" not in k and "num_batches" not in k}


def check_agreement(a: dict[str, Any], b: dict[str, Any], *, exact: bool = False) -> None:
    """Both ranks: the same steps, the same global choice at every step (that of select_coreset on
    the gathered estimates), every small-source example of the global large batch kept, each rank
    trains b distinct chosen samples (its own first), together exactly the chosen ones."""
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert a["batches_per_epoch"] == b["batches_per_epoch"] == STEPS_PER_EPOCH  # Lightning's accounting: B per step
    assert a["loader_batch_size"] == b["loader_batch_size"] == BATCH  # what training_step receives
    ra, rb = a["records"], b["records"]
    assert len(ra) == len(rb) == EPOCHS * STEPS_PER_EPOCH
    shape = None if exact else tuple(a["param_shape"])
    replayed, normalizer = replay_global([ra, rb], BATCH, shape, seed=OPTIONS["seed"], small_sources=SMALL,
                                         dims=OPTIONS["dims"])
    for step, (x, y, expected) in enumerate(zip(ra, rb, replayed)):
        assert x["chosen"] == y["chosen"] == expected, f"step {step}: the ranks' choice is not the replayed one"
        assert x["features"] != y["features"]  # each rank estimated its own large batch
        super_ids = x["super_ids"] + y["super_ids"]  # the global large batch in rank order
        assert len(set(super_ids)) == 4 * BATCH  # disjoint shards
        chosen_ids = {super_ids[i] for i in expected}
        small = {i for i in super_ids if SOURCES[i] in SMALL}
        assert small <= chosen_ids, f"step {step}: a small-source example was dropped"
        for rec in (x, y):
            assert len(rec["trained_ids"]) == len(set(rec["trained_ids"])) == BATCH
            assert rec["trained_ids"] == [super_ids[i] for i in rec["assigned"]]
        assert set(x["trained_ids"]) | set(y["trained_ids"]) == chosen_ids
        own = [sum(i // (2 * BATCH) == r for i in rec["assigned"]) for r, rec in enumerate((x, y))]
        chosen_per_rank = [sum(i // (2 * BATCH) == r for i in expected) for r in (0, 1)]
        assert own == [min(c, BATCH) for c in chosen_per_rank]  # a rank trains its own chosen samples first
    assert a["seen"] == [r["trained_ids"] for r in ra] and b["seen"] == [r["trained_ids"] for r in rb]
    assert a["moments"] == b["moments"]  # the same Adam moments on every rank ...
    assert a["moments"]["t"] == normalizer.t
    assert a["moments"]["m"] == normalizer.m_prev.tolist()  # ... namely the replayed ones
    assert a["moments"]["v"] == normalizer.v_prev.tolist()
    assert weights(a) == weights(b)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_two_ranks(JOB, tmp_path_factory.mktemp("colm_ddp"), "--strategy", "ddp")


def test_ddp_ranks_agree_on_the_global_coreset_and_train_their_part(ddp: list[dict[str, Any]]) -> None:
    check_agreement(ddp[0]["global"], ddp[1]["global"])


def test_ddp_mid_epoch_resume_is_exact(ddp: list[dict[str, Any]]) -> None:
    for rank in ddp:
        full, resumed = rank["global"], rank["resumed"]
        assert SAVE_AT % STEPS_PER_EPOCH  # mid-epoch
        assert resumed["records"] == full["records"][SAVE_AT:]  # same large batches, estimates and choices
        assert resumed["seen"] == full["seen"][SAVE_AT:]
        assert resumed["moments"] == full["moments"]
        assert resumed["params"] == full["params"]


def test_ddp_scope_rank_selects_locally_with_shared_moments(ddp: list[dict[str, Any]]) -> None:
    a, b = ddp[0]["rank"], ddp[1]["rank"]
    replayed, normalizer = replay_per_rank([a["records"], b["records"]], BATCH, tuple(a["param_shape"]),
                                           seed=OPTIONS["seed"], small_sources=SMALL, dims=OPTIONS["dims"])
    for step, (x, y, (pick_a, pick_b)) in enumerate(zip(a["records"], b["records"], replayed)):
        # each rank chose from its own large batch; reported as global indices
        assert x["chosen"] == pick_a and y["chosen"] == [2 * BATCH + i for i in pick_b], step
        assert x["trained_ids"] == [x["super_ids"][i] for i in pick_a]
    assert a["moments"] == b["moments"]
    assert a["moments"]["m"] == normalizer.m_prev.tolist() and a["moments"]["t"] == normalizer.t
    assert weights(a) == weights(b)


def test_ddp_exact_estimator_agrees_across_ranks(ddp: list[dict[str, Any]]) -> None:
    check_agreement(ddp[0]["exact"], ddp[1]["exact"], exact=True)


def test_deepspeed_zero2_ranks_agree_on_the_global_coreset(tmp_path: Path) -> None:
    a, b = run_two_ranks(JOB, tmp_path, "--strategy", "deepspeed")
    check_agreement(a["global"], b["global"])
