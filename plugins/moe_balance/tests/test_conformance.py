"""The host's conformance suite (batchkit.testing.conformance) on moe_lbl, in both modes, on the test
kit's MoE module: state round trip (the step's counts and the logged figures), exact mid-epoch
resume, DDP agreement (global mode all-reduces the counts inside the step)."""

from __future__ import annotations

from batchkit.testing.conformance import PluginConformance


class TestMoELoadBalancingGlobalConformance(PluginConformance):
    entries = {"lbl": {"plugin": "moe_lbl", "coefficient": 0.1, "mode": "global"}}
    module_factory = "batchkit.testing:TinyMoEModule"
    module_kwargs = {}


class TestMoELoadBalancingMicroConformance(PluginConformance):
    entries = {"lbl": {"plugin": "moe_lbl", "coefficient": 0.1, "mode": "micro"}}
    module_factory = "batchkit.testing:TinyMoEModule"
    module_kwargs = {}


def test_a_checkpoint_of_other_routers_is_refused() -> None:
    import pytest
    import torch

    from batchkit import PluginError
    from batchkit.testing import TinyMoEModule
    from batchkit_moe_balance import MoELoadBalancing

    plugin = MoELoadBalancing(coefficient=0.1, mode="global", router_type="TinyRouter")
    plugin.attach(TinyMoEModule())
    state = plugin.batchkit_state_dict()
    assert state["router_names"] == ["router"]
    plugin.batchkit_load_state_dict(state)  # the same routers: accepted
    other = dict(state, router_names=["blocks.0.router", "blocks.1.router"], step_counts=torch.zeros(2, 5))
    with pytest.raises(PluginError, match=r"belong to the routers \['blocks.0.router', 'blocks.1.router'\].*same model"):
        plugin.batchkit_load_state_dict(other)
