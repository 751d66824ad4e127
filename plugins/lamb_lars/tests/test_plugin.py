"""The entry points, YAML construction, and the optimizer-stage hook of the lamb/lars plugins."""

from __future__ import annotations

import pytest
import torch

batchkit_config = pytest.importorskip("batchkit.config")

from batchkit_lamb_lars import Lamb, Lars
from batchkit_lamb_lars.plugin import LambPlugin, LarsPlugin


def test_entry_points_are_registered():
    plugins = batchkit_config.available_plugins()
    assert plugins["lamb"].value == "batchkit_lamb_lars.plugin:LambPlugin"
    assert plugins["lars"].value == "batchkit_lamb_lars.plugin:LarsPlugin"
    assert batchkit_config.load_plugin_factory("lamb") is LambPlugin


def test_yaml_builds_plugins_with_checked_options():
    cfg = batchkit_config.load_config({"batchkit": {"plugins": {
        "opt": {"plugin": "lamb", "betas": [0.9, 0.99], "max_grad_norm": 1.0, "trust_clamp": [0.0, 1.0]},
    }}})
    (plugin,) = batchkit_config.build_plugins(batchkit_config.plugin_entries(cfg))
    assert isinstance(plugin, LambPlugin) and plugin.options["betas"] == (0.9, 0.99)


def test_yaml_bad_option_is_a_config_error():
    cfg = batchkit_config.load_config({"batchkit": {"plugins": {"opt": {"plugin": "lamb", "eps": 0.0}}}})
    with pytest.raises(Exception, match="eps=0.0"):
        batchkit_config.build_plugins(batchkit_config.plugin_entries(cfg))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 2)


def test_lamb_plugin_replaces_optimizer_keeping_lr_and_excluding_norms():
    net = Net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.05, weight_decay=0.02)
    new = LambPlugin(max_grad_norm=1.0).batchkit_wrap_optimizer(sgd, net)
    assert isinstance(new, Lamb)
    adapted, excluded = new.param_groups
    assert {id(p) for p in adapted["params"]} == {id(net.fc.weight), id(net.head.weight)}
    assert adapted["lr"] == excluded["lr"] == 0.05
    assert adapted["weight_decay"] == 0.02 and excluded["weight_decay"] == 0.0
    assert adapted["adapt"] and not excluded["adapt"]
    assert new.defaults["max_grad_norm"] == 1.0


def test_lars_plugin_takes_momentum_from_sgd_and_can_keep_groups():
    net = Net()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.8)
    new = LarsPlugin(exclude=False).batchkit_wrap_optimizer(sgd, net)
    assert isinstance(new, Lars) and len(new.param_groups) == 1
    assert new.param_groups[0]["momentum"] == 0.8 and new.param_groups[0]["lr"] == 0.1


def test_yaml_lars_options_reach_the_optimizer_and_bad_ones_are_refused():
    cfg = batchkit_config.load_config({"batchkit": {"plugins": {
        "opt": {"plugin": "lars", "momentum_form": "paper", "trust_clip": True, "lr": 2.0},
    }}})
    (plugin,) = batchkit_config.build_plugins(batchkit_config.plugin_entries(cfg))
    new = plugin.batchkit_wrap_optimizer(torch.optim.SGD(Net().parameters(), lr=0.1), Net())
    assert all(g["momentum_form"] == "paper" and g["trust_clip"] and g["lr"] == 2.0 for g in new.param_groups)
    cfg = batchkit_config.load_config({"batchkit": {"plugins": {"opt": {"plugin": "lars", "momentum": 1.5}}}})
    with pytest.raises(Exception, match=r"momentum=1.5 is invalid; it must be a number in \[0, 1\)"):
        batchkit_config.build_plugins(batchkit_config.plugin_entries(cfg))


def test_plugins_declare_their_conflict():
    assert "lars" in LambPlugin.conflicts and "lamb" in LarsPlugin.conflicts
