"""b3 with 2 processes under DeepSpeed ZeRO-2 on CPU (DDP runs in the conformance suite): rank
shards are whole, disjoint clusters, every rank takes the same steps, no id repeats in an epoch, the
artefact is built once (by rank 0) for both ranks, and the hard negatives reach each rank's batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchkit.testing import run_two_ranks

pytestmark = pytest.mark.multiprocess

JOB = Path(__file__).parent / "b3_job.py"
N, K, PER_RANK, EPOCHS = 96, 4, 8, 2


def check_whole_cluster_shards(a: dict, b: dict) -> None:
    clusters = [frozenset(c) for c in a["clusters"]]
    assert a["clusters"] == b["clusters"] and len(clusters) == N // K
    of = {i: c for c in clusters for i in c}
    steps_per_epoch = N // (2 * PER_RANK)
    assert a["global_step"] == b["global_step"] == EPOCHS * steps_per_epoch
    assert a["batches_per_epoch"] == b["batches_per_epoch"] == steps_per_epoch
    assert len(a["seen"]) == len(b["seen"]) == EPOCHS * steps_per_epoch
    for x, y in zip(a["seen"], b["seen"]):
        assert len(x) == len(y) == PER_RANK
        assert not set(x) & set(y), "ranks trained the same sample"
        for shard in (x, y):  # each rank's slice: PER_RANK / K whole clusters, members contiguous
            parts = [frozenset(shard[i:i + K]) for i in range(0, PER_RANK, K)]
            assert all(p in clusters for p in parts), shard
    for epoch in range(EPOCHS):
        ids = [i for s in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
               for i in a["seen"][s] + b["seen"][s]]
        assert sorted(ids) == list(range(N)), "an epoch must train every sample exactly once (24 clusters / 4 per step)"
    first, second = ([a["seen"][s] for s in range(e * steps_per_epoch, (e + 1) * steps_per_epoch)] for e in range(2))
    assert first != second, "the cluster order must be reshuffled each epoch"
    for record in (a, b):  # hard negatives: K_hn = 2 per sample, never from its own cluster, fields delivered
        assert record["hard_negative_steps"] == record["global_step"] and record["fields_match"]
        for ids, negatives in zip(record["seen"], record["negatives"]):
            assert len(negatives) == len(ids) and all(len(row) == 2 for row in negatives)
            assert all(not set(row) & of[i] for i, row in zip(ids, negatives))


def test_deepspeed_shards_are_whole_disjoint_clusters_mined_once(tmp_path: Path) -> None:
    a, b = run_two_ranks(JOB, tmp_path, "--strategy", "deepspeed")
    check_whole_cluster_shards(a, b)
    assert a["keys"] == b["keys"] and a["keys"]["clusters"].startswith("b3-clusters-")
    # rank 0 embedded the 96 queries and 96 targets once; rank 1 loaded the artefacts
    assert a["teacher_texts"] == 2 * N and a["built"] == {"embeddings": True, "clusters": True}
    assert b["teacher_texts"] == 0 and b["built"] == {"embeddings": False, "clusters": False}
