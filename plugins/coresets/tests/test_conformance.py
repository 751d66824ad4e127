"""The host's conformance suite (batchkit.testing.conformance) on colm: state round trip, exact
mid-epoch resume (the direction stream and the Adam moments included), DDP agreement."""

from __future__ import annotations

from batchkit.testing.conformance import PluginConformance


class TestCoLMConformance(PluginConformance):
    entries = {"colm": {"plugin": "colm", "small_sources": [3], "dims": 32}}
    module_factory = "batchkit_coresets.testing:SourceModule"
    module_kwargs = {}
    loader_factory = "batchkit_coresets.testing:source_loader"
    # 192 samples in large batches of 2 x 8: 12 steps per epoch; the resume at step 17 is mid epoch 1
    loader_kwargs = {"n": 192, "batch_size": 8}
    index_field = "index"
