"""The host's conformance suite (batchkit.testing.conformance) on b3, with the tiny text-pair task
of batchkit_contrastive_mining.testing (the cheap hashed teacher, hard negatives delivered): state
round trip, exact mid-epoch resume, and under 2-process DDP the same steps on every rank, disjoint
samples and, checked here on top, rank shards made of whole clusters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from batchkit.testing.conformance import PluginConformance

ENTRY = {"plugin": "b3", "queries": "texts", "targets": "target_texts",
         "teacher": "batchkit_contrastive_mining.testing:hashed_bag_teacher", "K": 4, "p": 2, "m": 12,
         "hard_negatives": 2, "hard_negative_fields": ["target"], "progress": False}


class TestB3Conformance(PluginConformance):
    entries = {"b3": ENTRY}
    module_factory = "batchkit_contrastive_mining.testing:TinyPairModule"
    module_kwargs = {}
    loader_factory = "batchkit_contrastive_mining.testing:pair_loader"
    index_field = "index"

    def test_ddp_ranks_agree(self, tmp_path: Path, artefact_cache: Path) -> None:
        super().test_ddp_ranks_agree(tmp_path)
        (artefact,) = artefact_cache.glob("b3-clusters-*.pt")  # built once, by rank 0, for both ranks
        clusters = {frozenset(c) for c in torch.load(artefact, weights_only=False)["clusters"].tolist()}
        a, b = (json.loads((tmp_path / f"rank{r}.json").read_text())["seen"] for r in (0, 1))
        for x, y in zip(a, b):  # 8 samples per rank: 2 whole clusters of 4 each
            for shard in (x, y):
                assert {frozenset(shard[:4]), frozenset(shard[4:])} <= clusters, shard
