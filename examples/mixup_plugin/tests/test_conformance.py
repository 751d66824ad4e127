"""The host's conformance suite over the mixup example, as a third-party package would run it."""

from __future__ import annotations

from batchkit.testing.conformance import PluginConformance


class TestMixupConformance(PluginConformance):
    entries = {"mix": {"plugin": "mixup", "alpha": 0.4, "num_classes": 3}}
