"""Two processes on gloo: DDP, and DeepSpeed ZeRO-2 through batchkit's CPU strategy.

Each test runs tests/dist_job.py (Lightning re-launches it for rank 1) and checks what the
recording plugin saw on each rank: disjoint shards, the same number of batches, reshuffling per
epoch, and optimizer-step boundaries under gradient accumulation.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from batchkit.testing import launch as launch_job
from batchkit.testing import run_two_ranks

pytestmark = pytest.mark.multiprocess

JOB = Path(__file__).parent / "dist_job.py"


def launch(tmp_path: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return launch_job(JOB, tmp_path, *args, timeout=timeout)


def run_job(tmp_path: Path, *args: str) -> list[dict]:
    return run_two_ranks(JOB, tmp_path, *args)


def check_shards(ranks: list[dict], n: int = 90, batches_per_epoch: int = 6, epochs: int = 2) -> None:
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    for r in ranks:
        assert len(r["seen"]) == batches_per_epoch * epochs
        assert r["total_batches_all_ranks"] == 2 * batches_per_epoch * epochs
    for e in range(epochs):
        shards = [set(sum(r["seen"][e * batches_per_epoch:(e + 1) * batches_per_epoch], [])) for r in ranks]
        # 45 samples per rank, disjoint; DistributedSampler pads 90 -> 90, so together they cover all
        assert len(shards[0]) == len(shards[1]) == n // 2
        assert not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(range(n))
    for r in ranks:  # set_epoch reshuffles
        assert r["seen"][:batches_per_epoch] != r["seen"][batches_per_epoch:]
    # batchkit.dist collectives, after fit, under this strategy's process group
    for r in ranks:
        c = r["collectives"]
        assert (c["mean"], c["max"]) == (0.5, 1.0)
        assert c["gather"] == [[0, 0], [1, 10]]
        assert c["gather_object"] == [{"rank": 0}, {"rank": 1}]
        assert c["broadcast"] == "from rank 1"
        assert c["rank_world"] == [r["rank"], 2, True]
    # every hook saw the right rank
    for r in ranks:
        assert {e["rank"] for e in r["events"] if "rank" in e} == {r["rank"]}


def test_ddp_two_processes(tmp_path: Path) -> None:
    ranks = run_job(tmp_path, "--strategy", "ddp")
    check_shards(ranks)
    for r in ranks:
        steps = [e for e in r["events"] if e["hook"] == "before_optimizer_step"]
        assert len(steps) == 12 and all(e["last_micro"] for e in steps)
    # DDP keeps replicas identical: same final weights on both ranks
    assert ranks[0]["params"] == ranks[1]["params"]


def test_deepspeed_zero2_two_processes_with_accumulation(tmp_path: Path) -> None:
    ranks = run_job(tmp_path, "--strategy", "deepspeed", "--accumulate", "2")
    check_shards(ranks)
    for r in ranks:
        # Lightning calls on_before_optimizer_step on every micro-batch under DeepSpeed; the host
        # passes on only the 3 real steps per epoch (after batches 1, 3, 5).
        steps = [(e["epoch"], e["batch_idx"]) for e in r["events"] if e["hook"] == "before_optimizer_step"]
        assert steps == [(0, 1), (0, 3), (0, 5), (1, 1), (1, 3), (1, 5)]
        ends = [e["global_step"] for e in r["events"] if e["hook"] == "step_end"]
        assert ends == [1, 2, 3, 4, 5, 6]
        wrapped = [e for e in r["events"] if e["hook"] == "wrap_optimizer"]
        assert len(wrapped) == 1


@pytest.mark.parametrize("failing_rank", [1])
def test_a_plugin_failure_on_one_rank_ends_every_rank(tmp_path: Path, failing_rank: int) -> None:
    # Rank 1 is the process Lightning launched; if its failure left rank 0 waiting in a collective,
    # this would run into the timeout instead of exiting with the plugin's error.
    proc = launch(tmp_path, "--strategy", "ddp", "--fail-on-rank", str(failing_rank), timeout=240)
    assert proc.returncode != 0
    assert f"plugin failure on rank {failing_rank}" in proc.stderr
    assert "raised by plugin 'fail_on_rank' in batchkit_transform_batch" in proc.stderr
    assert not list(tmp_path.glob("rank*.json"))  # no rank reached the end of training


def test_a_sampler_chain_with_different_lengths_per_rank_is_refused_at_start(tmp_path: Path) -> None:
    proc = launch(tmp_path, "--strategy", "ddp", "--uneven", timeout=240)
    assert proc.returncode != 0
    assert "ranks would run different numbers of batches per epoch ([6, 5])" in proc.stderr
    assert "['recorder', 'drop_on_rank1']" in proc.stderr


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_global_batches_metadata_and_global_selection_on_two_ranks(tmp_path: Path, strategy: str) -> None:
    a, b = run_two_ranks(Path(__file__).parent / "host_api_job.py", tmp_path, "--strategy", strategy)
    # the unsharded base sampler: one global batch of 16 per step, the same number on both ranks
    # built at the start and rebuilt once on request, in lockstep
    assert a["sampler_lengths"] == b["sampler_lengths"] == [4, 4] and a["global_step"] == b["global_step"] == 8
    # the prepare-data artefact: rank 0 built it once, both ranks loaded it
    assert (tmp_path / "builds.txt").read_text() == "0\n" and a["artefact_n"] == b["artefact_n"] == 64
    # the lr scale (3 from epoch 1) inside every step() only, under DDP and inside DeepSpeed's optimizer
    for r in (a, b):
        assert r["lr_in_step"] == pytest.approx([0.05] * 4 + [0.15] * 4) and r["lr_after"] == pytest.approx(0.05)
    assert a["train_batch_size"] == b["train_batch_size"] == 4
    for step, (mine, theirs) in enumerate(zip(a["super_ids"], b["super_ids"])):
        # the host split each global batch: disjoint halves of 8 ...
        assert len(mine) == len(theirs) == 8 and not set(mine) & set(theirs)
        # ... selection over the global super-batch: both ranks agree, and together they train its 8 lowest ids
        assert a["chosen"][step] == b["chosen"][step]
        trained = a["seen"][step] + b["seen"][step]
        assert len(a["seen"][step]) == len(b["seen"][step]) == 4
        assert sorted(trained) == sorted(mine + theirs)[:8]
        # the metadata the sampler attached to the global batch reached both ranks' batch stage
        assert a["ctx_meta"][step] == b["ctx_meta"][step] and a["ctx_meta"][step]["position"] == step % 4
        assert a["ctx_meta"][step]["first"] in mine + theirs
