"""The host's conformance suite over the optimizer plugins: their optimizers' state travels in
Lightning's own optimizer checkpoint, so the checks are that a mid-epoch resume is exact and that
DDP replicas stay identical with the replaced optimizer."""

from __future__ import annotations

from batchkit.testing.conformance import PluginConformance


class TestLambConformance(PluginConformance):
    entries = {"opt": {"plugin": "lamb", "lr": 0.01}}
    stateful = False


class TestLarsConformance(PluginConformance):
    entries = {"opt": {"plugin": "lars", "lr": 0.1}}
    stateful = False
