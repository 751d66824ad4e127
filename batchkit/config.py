"""Plugin discovery (entry points) and YAML plugin lists (OmegaConf) turned into plugin instances.

A plugin list is a mapping of *named entries*, so one entry can be overridden or switched off from
the command line (``batchkit.plugins.mix.alpha=0.5``, ``batchkit.plugins.mix.enabled=false``)::

    batchkit:
      plugins:
        mix: {plugin: mixup, alpha: 0.2}
        hard: {plugin: hard_batches, delta: 0.5, order: -10}

Reserved keys in an entry: ``plugin`` (the registered name, required), ``enabled`` (default true)
and ``order`` (overrides the plugin's declared order). They are type-checked: ``enabled`` takes a
boolean or one of the strings YAML reads as one (``'true'``/``'false'``, ``'yes'``/``'no'``,
``'on'``/``'off'``, any case: what ``${oc.env:VAR}`` gives), ``order`` an integer (or a string of
one), ``plugin`` a name; anything else is refused, and a key close to a reserved one (``enable``) gets
a "did you mean". Every other key is a constructor option, checked against the plugin's signature
and type annotations before training starts. YAML can only name plugins registered in the
``batchkit.plugins`` entry-point group, never an import path.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Mapping

from omegaconf import DictConfig
from omegaconf import OmegaConf

from batchkit.errors import ConfigError
from batchkit.errors import PluginError


ENTRY_POINT_GROUP = "batchkit.plugins"
RESERVED_KEYS = ("plugin", "enabled", "order")
#: Keys of the ``batchkit`` section itself (``batch_spec``: see :mod:`batchkit.batch`).
SECTION_KEYS = ("plugins", "batch_spec")
#: Strings read as booleans in ``enabled`` (the YAML 1.1 spellings jsonargparse also reads for
#: boolean plugin options), compared in lower case.
_TRUE_STRINGS = ("true", "yes", "on")
_FALSE_STRINGS = ("false", "no", "off")


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin as advertised by its distribution's entry point."""

    name: str
    value: str  # "module:attr"
    distribution: str
    version: str
    entry_point: EntryPoint

    def load(self) -> Callable[..., object]:
        """Import the plugin class or factory, turning any import-time failure into one clear error."""
        try:
            factory = self.entry_point.load()
        except Exception as exc:  # noqa: BLE001 - anything a broken package raises on import
            raise PluginError(
                f"batchkit: plugin {self.name!r} from distribution {self.distribution} {self.version} "
                f"(entry point '{self.name} = {self.value}' in group {ENTRY_POINT_GROUP}) failed to load: "
                f"{type(exc).__name__}: {exc}. Reinstall or upgrade {self.distribution}, or uninstall it."
            ) from None
        if not callable(factory):
            raise PluginError(
                f"batchkit: entry point '{self.name} = {self.value}' of {self.distribution} {self.version} "
                f"points at a {type(factory).__name__}, not a plugin class or factory"
            )
        return factory


def available_plugins() -> dict[str, PluginInfo]:
    """Installed plugins by name, read from the ``batchkit.plugins`` entry-point group.

    Nothing is imported. Two distributions registering the same name is an error.
    """
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            value=ep.value,
            distribution=dist.metadata["Name"] if dist else "<unknown>",
            version=dist.version if dist else "?",
            entry_point=ep,
        )
        previous = found.get(ep.name)
        if previous is not None and previous.distribution != info.distribution:
            raise PluginError(
                f"batchkit: two installed distributions register a plugin named {ep.name!r}: "
                f"{previous.distribution} ({previous.value}) and {info.distribution} ({info.value}); "
                "uninstall one of them"
            )
        found[ep.name] = info
    return found


def load_plugin_factory(name: str, entry: str | None = None) -> Callable[..., object]:
    """The class or factory of the installed plugin ``name``; a clear error if there is none."""
    installed = available_plugins()
    if name not in installed:
        where = f"entry {entry!r}: " if entry else ""
        close = difflib.get_close_matches(name, list(installed), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"batchkit: {where}unknown plugin {name!r}.{hint} Installed plugins: "
            f"{', '.join(sorted(installed)) or '(none)'}. Install the package that provides it; "
            "`batchkit plugins` lists what is installed."
        )
    return installed[name].load()


def load_config(source: str | Path | Mapping[str, Any] | DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """Read a YAML file (or a mapping) and apply ``key=value`` dotlist overrides."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"batchkit: config file {str(path)!r} does not exist")
        cfg = OmegaConf.load(path)
    else:
        cfg = OmegaConf.create(dict(source) if not isinstance(source, DictConfig) else source)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg  # type: ignore[return-value]


def apply_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Merge OmegaConf dotlist overrides (``batchkit.plugins.mix.alpha=0.4``) into ``cfg``.

    Values are read as YAML (``0.4``, ``false``, ``[0.9, 0.95]``, ``{plugin: mixup}``, ``null``);
    interpolations such as ``${oc.env:VAR}`` are kept for the plugin list to resolve.
    """
    for override in overrides:
        if "=" not in override:
            raise ConfigError(
                f"batchkit: override {override!r} has no value; write KEY=VALUE, e.g. batchkit.plugins.mix.alpha=0.4"
            )
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))  # type: ignore[assignment]
        except Exception as exc:  # omegaconf's errors: a value that cannot go where the key points
            detail = " ".join(str(exc).split())
            raise ConfigError(f"batchkit: cannot apply the override {override!r}: {detail}") from None
    return cfg


def plugin_entries(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The ``batchkit.plugins`` mapping of a loaded config, as plain Python containers."""
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except Exception as exc:  # an interpolation that cannot be resolved (an unset ${oc.env:VAR})
            detail = " ".join(str(exc).split())
            raise ConfigError(f"batchkit: the plugin list cannot be read: {detail}") from None
    section = cfg.get("batchkit", {}) if isinstance(cfg, Mapping) else {}
    if section is None:
        return {}
    if not isinstance(section, Mapping) or not isinstance(section.get("plugins", {}), (Mapping, type(None))):
        raise ConfigError(
            "batchkit: `batchkit.plugins` must be a mapping of named entries, e.g.\n"
            "batchkit:\n  plugins:\n    mix: {plugin: mixup, alpha: 0.2}"
        )
    unknown = [k for k in section if k not in SECTION_KEYS]
    if unknown:
        hints = [f"{k!r}{_did_you_mean(str(k), SECTION_KEYS)}" for k in unknown]
        raise ConfigError(
            f"batchkit: unknown key {', '.join(hints)} in the `batchkit` section; it holds "
            f"{' and '.join(f'`{k}`' for k in SECTION_KEYS)} (e.g. batchkit.plugins.mix.alpha=0.4)"
        )
    return dict(section.get("plugins") or {})


def build_plugins(entries: Mapping[str, Any]) -> list[object]:
    """Instantiate every enabled entry of a plugin mapping, checking all of them first.

    Errors from all entries are collected and raised together as one :class:`ConfigError`, so a
    user fixes a config in one pass.
    """
    plugins: list[object] = []
    errors: list[str] = []
    for entry, spec in entries.items():
        if spec is None:
            continue  # `batchkit.plugins.x=null` switches an entry off
        try:
            plugin = build_plugin(entry, spec)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if plugin is not None:
            plugins.append(plugin)
    if errors:
        raise ConfigError("\n".join(errors))
    return plugins


def build_plugin(entry: str, spec: Any) -> object | None:
    """Instantiate one YAML entry; ``None`` if it is disabled."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"batchkit: entry {entry!r} must be a mapping like {{plugin: NAME, option: value}}, got {spec!r}"
        )
    spec = dict(spec)
    if "plugin" not in spec:
        misspelt = [k for k in spec if _did_you_mean(str(k), ("plugin",))]
        hint = f" (did you mean `plugin:` instead of {misspelt[0]!r}?)" if misspelt else ""
        raise ConfigError(f"batchkit: entry {entry!r} has no `plugin:` key naming the plugin to use{hint}")
    name = _reserved_plugin(entry, spec.pop("plugin"))
    enabled = _reserved_enabled(entry, spec.pop("enabled", True))
    order = _reserved_order(entry, spec.pop("order", None))
    if not enabled:
        return None
    factory = load_plugin_factory(name, entry)
    options = check_options(entry, name, factory, spec)
    try:
        plugin = factory(**options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"batchkit: entry {entry!r} (plugin {name!r}): {exc}") from None
    if order is not None:
        plugin.order = order  # type: ignore[attr-defined]
    if hasattr(plugin, "_instance_name"):
        plugin._instance_name = entry  # type: ignore[attr-defined]
    return plugin


def _did_you_mean(key: str, candidates: tuple[str, ...] | list[str], cutoff: float = 0.75) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(key.lower(), list(candidates), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close and close[0] != key else ""


def _reserved_plugin(entry: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"batchkit: entry {entry!r}: `plugin` must be the name of an installed plugin (a string), got "
            f"{value!r}; `batchkit plugins` lists the names"
        )
    return value


def _reserved_enabled(entry: str, value: Any) -> bool:
    """``enabled`` as a bool: booleans as they are; the strings YAML reads as booleans converted
    (a value from ``${oc.env:VAR}`` is always a string); everything else refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS + _FALSE_STRINGS:
        return value.strip().lower() in _TRUE_STRINGS
    raise ConfigError(
        f"batchkit: entry {entry!r}: `enabled` must be true or false, got {value!r} ({type(value).__name__}). "
        "Strings are read as YAML reads booleans ('true'/'false', 'yes'/'no', 'on'/'off'), so "
        f"enabled: ${{oc.env:VAR}} works with VAR=false. (To remove the entry instead: batchkit.plugins.{entry}=null.)"
    )


def _reserved_order(entry: str, value: Any) -> int | None:
    """``order`` as an int (a string of digits, e.g. from ``${oc.env:VAR}``, is converted)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(
        f"batchkit: entry {entry!r}: `order` must be an integer (lower runs first within its tier), got "
        f"{value!r} ({type(value).__name__}); e.g. order: -10"
    )


def check_options(entry: str, name: str, factory: Callable[..., object], options: dict[str, Any]) -> dict[str, Any]:
    """Check ``options`` against ``factory``'s signature and annotations; return them converted
    (for example lists to tuples where a tuple is declared)."""
    sig = inspect.signature(factory)
    params = {p.name: p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    where = f"batchkit: entry {entry!r} (plugin {name!r})"
    unknown = [k for k in options if k not in params]
    # A misspelt reserved key (`enable: false`) must never pass silently, not even to **kwargs.
    misspelt_reserved = [k for k in unknown if _did_you_mean(str(k), RESERVED_KEYS)]
    if unknown and (misspelt_reserved or not takes_any):
        hints = []
        for key in unknown:
            reserved = difflib.get_close_matches(str(key).lower(), RESERVED_KEYS, n=1, cutoff=0.75)
            close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.5)
            if reserved:
                hints.append(f"{key!r} (did you mean the reserved key {reserved[0]!r}?)")
            else:
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"{where}: unknown option {', '.join(hints)}. Options of {name!r}: "
            f"{', '.join(params) or '(none)'}; reserved keys: {', '.join(RESERVED_KEYS)}"
        )
    missing = [k for k, p in params.items() if p.default is p.empty and k not in options]
    if missing:
        raise ConfigError(f"{where}: missing required option {', '.join(repr(m) for m in missing)}")
    parser = _options_parser(factory)
    if parser is None:
        return options
    try:
        ns = parser.parse_object({k: v for k, v in options.items() if k in params})
    except Exception as exc:  # jsonargparse.ArgumentError
        detail = " ".join(str(exc).split())
        raise ConfigError(f"{where}: wrong type: {detail}") from None
    checked = {k: getattr(ns, k) for k in options if k in params}
    checked.update({k: v for k, v in options.items() if k not in params})
    return checked


@lru_cache(maxsize=None)
def _options_parser(factory: Callable[..., object]) -> Any:
    """A jsonargparse parser that type-checks the factory's keyword options (cached per factory)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        if inspect.isclass(factory):
            parser.add_class_arguments(factory, as_group=False, fail_untyped=False)
        else:
            parser.add_function_arguments(factory, as_group=False, fail_untyped=False)
    except Exception:  # a signature jsonargparse cannot express: names are still checked above
        return None
    return parser


def batch_spec_entry(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any] | None:
    """The optional ``batchkit.batch_spec`` mapping of a loaded config (see :mod:`batchkit.batch`)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    section = cfg.get("batchkit") if isinstance(cfg, Mapping) else None
    spec = section.get("batch_spec") if isinstance(section, Mapping) else None
    if spec is not None and not isinstance(spec, Mapping):
        raise ConfigError(
            "batchkit: `batchkit.batch_spec` must be a mapping, e.g. {per_sample: [x, y], shared: [class_weights]}"
        )
    return dict(spec) if spec is not None else None
