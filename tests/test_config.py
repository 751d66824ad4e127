"""YAML plugin lists: every config error is one clear message naming the entry, before training."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from batchkit import ConfigError
from batchkit import PluginError
from batchkit.config import available_plugins
from batchkit.config import build_plugins
from batchkit.config import load_config
from batchkit.config import plugin_entries


def test_yaml_entries_build_plugins_with_checked_options(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("batchkit:\n  plugins:\n    mix: {plugin: mixup, alpha: 0.4, num_classes: 5, order: 3}\n")
    (plugin,) = build_plugins(plugin_entries(load_config(path)))
    assert type(plugin).__name__ == "MixupPlugin"
    assert (plugin.alpha, plugin.num_classes, plugin.order, plugin.instance_name) == (0.4, 5, 3, "mix")


def test_dotlist_override_changes_one_entry_and_can_disable_it(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("batchkit:\n  plugins:\n    mix: {plugin: mixup, alpha: 0.4}\n    mix2: {plugin: mixup}\n")
    plugins = build_plugins(plugin_entries(load_config(path, ["batchkit.plugins.mix.alpha=0.9"])))
    assert [p.alpha for p in plugins] == [0.9, 0.2]
    assert len(build_plugins(plugin_entries(load_config(path, ["batchkit.plugins.mix2.enabled=false"])))) == 1
    assert len(build_plugins(plugin_entries(load_config(path, ["batchkit.plugins.mix2=null"])))) == 1


def test_unknown_plugin_suggests_close_names_and_lists_installed() -> None:
    with pytest.raises(ConfigError) as info:
        build_plugins({"aug": {"plugin": "mixpu"}})
    msg = str(info.value)
    assert "entry 'aug'" in msg and "unknown plugin 'mixpu'" in msg
    assert "Did you mean 'mixup'" in msg and "Installed plugins:" in msg and "mixup" in msg


def test_import_paths_cannot_be_instantiated_from_yaml() -> None:
    with pytest.raises(ConfigError, match=r"unknown plugin 'os:system'"):
        build_plugins({"evil": {"plugin": "os:system", "command": "true"}})


def test_unknown_option_names_the_entry_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        build_plugins({"mix": {"plugin": "mixup", "alhpa": 0.3}})
    msg = str(info.value)
    assert "entry 'mix' (plugin 'mixup')" in msg
    assert "unknown option 'alhpa' (did you mean 'alpha'?)" in msg
    assert "alpha, num_classes, seed" in msg


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"alpha": "lots"}, r"wrong type.*alpha.*float.*lots"),
        ({"num_classes": 2.5}, r"wrong type.*num_classes.*int"),
    ],
)
def test_wrong_type_names_entry_option_and_expected_type(options: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"entry 'mix' \(plugin 'mixup'\): " + pattern):
        build_plugins({"mix": {"plugin": "mixup", **options}})


def test_value_the_plugin_rejects_is_reported_with_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"entry 'mix' \(plugin 'mixup'\): mixup: alpha must be > 0"):
        build_plugins({"mix": {"plugin": "mixup", "alpha": -1.0}})


def test_missing_required_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchkit import config

    class NeedsDelta:
        def __init__(self, delta: float, keep: float = 0.5) -> None:
            self.delta = delta

    monkeypatch.setattr(config, "load_plugin_factory", lambda name, entry=None: NeedsDelta)
    with pytest.raises(ConfigError, match=r"entry 'hard' \(plugin 'hard'\): missing required option 'delta'"):
        build_plugins({"hard": {"plugin": "hard"}})


def test_all_bad_entries_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        build_plugins({"a": {"plugin": "nope"}, "b": {"plugin": "mixup", "beta": 1}, "c": "mixup"})
    msg = str(info.value)
    assert "entry 'a'" in msg and "entry 'b'" in msg and "entry 'c' must be a mapping" in msg


def test_missing_plugin_key_and_bad_section() -> None:
    with pytest.raises(ConfigError, match=r"entry 'x' has no `plugin:` key"):
        build_plugins({"x": {"alpha": 1}})
    with pytest.raises(ConfigError, match=r"mapping of named entries"):
        plugin_entries({"batchkit": {"plugins": ["mixup"]}})


@pytest.fixture()
def broken_distribution(tmp_path: Path):
    """An installed distribution whose plugin entry point fails on import."""
    info = tmp_path / "broken_batchkit_plugin-9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-batchkit-plugin\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text("[batchkit.plugins]\nbroken = broken_batchkit_mod:Plugin\n")
    (tmp_path / "broken_batchkit_mod.py").write_text("import not_a_real_module_xyz\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.path.remove(str(tmp_path))
    importlib.invalidate_caches()


def test_broken_entry_point_names_the_distribution(broken_distribution: None) -> None:
    info = available_plugins()["broken"]
    assert (info.distribution, info.version) == ("broken-batchkit-plugin", "9.9")
    with pytest.raises(PluginError) as exc:
        build_plugins({"b": {"plugin": "broken"}})
    msg = str(exc.value)
    assert "broken-batchkit-plugin 9.9" in msg and "ModuleNotFoundError" in msg and "not_a_real_module_xyz" in msg
    assert exc.value.__cause__ is None  # one clear error, not a traceback from deep inside


# -- reserved keys: type-checked, misspellings caught --------------------------------------------


@pytest.mark.parametrize(
    ("value", "on"),
    [(False, False), (True, True), ("false", False), ("False", False), ("off", False), ("no", False), ("true", True), ("yes", True)],
)
def test_enabled_takes_booleans_and_the_strings_yaml_reads_as_booleans(value: object, on: bool) -> None:
    assert len(build_plugins({"mix": {"plugin": "mixup", "enabled": value}})) == int(on)


def test_enabled_from_an_environment_variable_switches_the_entry_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("batchkit:\n  plugins:\n    mix: {plugin: mixup, enabled: '${oc.env:MIX_ON}'}\n")
    monkeypatch.setenv("MIX_ON", "false")  # environment variables are strings
    assert build_plugins(plugin_entries(load_config(path))) == []
    monkeypatch.setenv("MIX_ON", "true")
    assert len(build_plugins(plugin_entries(load_config(path)))) == 1
    monkeypatch.delenv("MIX_ON")
    with pytest.raises(ConfigError, match=r"batchkit: the plugin list cannot be read: .*MIX_ON"):
        plugin_entries(load_config(path))


@pytest.mark.parametrize("value", ["flase", "0", 0, 1, None, [True]])
def test_enabled_refuses_anything_else(value: object) -> None:
    with pytest.raises(ConfigError, match=r"entry 'mix': `enabled` must be true or false, got .*oc\.env:VAR"):
        build_plugins({"mix": {"plugin": "mixup", "enabled": value}})


def test_order_takes_integers_and_strings_of_one() -> None:
    (plugin,) = build_plugins({"mix": {"plugin": "mixup", "order": " -100 "}})
    assert plugin.order == -100
    for value in (1.5, True, "first", [1]):
        with pytest.raises(ConfigError, match=r"entry 'mix': `order` must be an integer"):
            build_plugins({"mix": {"plugin": "mixup", "order": value}})


def test_plugin_must_be_a_name() -> None:
    with pytest.raises(ConfigError, match=r"entry 'mix': `plugin` must be the name of an installed plugin \(a string\), got 5"):
        build_plugins({"mix": {"plugin": 5}})


@pytest.mark.parametrize(("key", "reserved"), [("enable", "enabled"), ("Enabled", "enabled"), ("ordr", "order"), ("orders", "order")])
def test_a_misspelt_reserved_key_gets_a_did_you_mean(key: str, reserved: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown option '{key}' \(did you mean the reserved key '{reserved}'\?\)"):
        build_plugins({"mix": {"plugin": "mixup", key: False}})


def test_a_misspelt_reserved_key_is_refused_even_by_a_plugin_taking_any_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchkit import config

    class TakesAnything:
        def __init__(self, **options: object) -> None:
            self.options = options

    monkeypatch.setattr(config, "load_plugin_factory", lambda name, entry=None: TakesAnything)
    (plugin,) = build_plugins({"x": {"plugin": "any", "colour": "red"}})
    assert plugin.options == {"colour": "red"}
    with pytest.raises(ConfigError, match=r"unknown option 'enable' \(did you mean the reserved key 'enabled'\?\)"):
        build_plugins({"x": {"plugin": "any", "enable": False}})


def test_a_misspelt_plugin_key_and_section_key() -> None:
    with pytest.raises(ConfigError, match=r"entry 'x' has no `plugin:` key naming the plugin to use \(did you mean `plugin:` instead of 'plugn'\?\)"):
        build_plugins({"x": {"plugn": "mixup"}})
    with pytest.raises(ConfigError, match=r"unknown key 'plugin' \(did you mean 'plugins'\?\) in the `batchkit` section"):
        plugin_entries(load_config({"batchkit": {"plugins": {}}}, ["batchkit.plugin.mix.alpha=0.4"]))
