"""The host's conformance suite (batchkit.testing.conformance) over both hard-samples plugins."""

from __future__ import annotations

from batchkit.testing.conformance import PluginConformance


class TestHardBatchesConformance(PluginConformance):
    entries = {"hard": {"plugin": "hard_batches", "delta": 0.5}}


class TestSelectiveBackpropConformance(PluginConformance):
    entries = {"sb": {"plugin": "selective_backprop", "keep": 0.5, "start": 0.2, "end": 0.9}}
