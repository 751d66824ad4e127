"""The plugin host: registers plugins, orders them, checks conflicts, calls transform chains and
notifications, times every hook call, and gathers plugin state and metrics.

The host knows nothing of Lightning; :mod:`batchkit.lightning` drives it from a Trainer.
"""

from __future__ import annotations

import time
import operator
from dataclasses import dataclass
from typing import Any
from typing import Callable
from typing import Iterable

import pluggy

from batchkit import hookspecs
from batchkit.errors import PluginConflictError
from batchkit.errors import PluginError
from batchkit.plugin import Plugin


#: Hooks whose implementations form a chain: each receives the previous one's result.
CHAIN_HOOKS: dict[str, str] = {
    # hook name -> the argument that carries the value along the chain
    "batchkit_wrap_batch_sampler": "batch_sampler",
    "batchkit_wrap_collate": "collate_fn",
    "batchkit_transform_batch": "batch",
    "batchkit_transform_loss": "loss",
    "batchkit_wrap_optimizer": "optimizer",
}

STAGE_OF_HOOK: dict[str, str] = {
    "batchkit_wrap_batch_sampler": "sampler",
    "batchkit_wrap_collate": "collator",
    "batchkit_transform_batch": "batch",
    "batchkit_transform_loss": "loss",
    "batchkit_wrap_optimizer": "optimizer",
}


@dataclass
class BatchKitContext:
    """Where training stands, handed to hooks as ``ctx``. The host updates it in place."""

    trainer: Any = None
    module: Any = None
    stage: str = "fit"
    epoch: int = 0
    #: index of the current batch within the epoch (micro-batch under accumulation)
    batch_idx: int = 0
    #: optimizer steps taken so far
    global_step: int = 0
    accumulate_grad_batches: int = 1
    #: 0-based index of the current micro-batch within its optimizer step
    micro_step: int = 0
    #: true when the current micro-batch ends an optimizer step
    is_last_micro_batch: bool = True
    rank: int = 0
    world_size: int = 1
    #: optimizer steps the whole run will take (``None`` if unknown)
    total_steps: int | None = None

    @property
    def progress(self) -> float:
        """Elapsed fraction of training in optimizer steps, in [0, 1] (0 if the total is unknown)."""
        if not self.total_steps:
            return 0.0
        return min(1.0, self.global_step / self.total_steps)


class _Impl:
    """One plugin's implementation of one hook, prepared for fast repeated calls.

    Hooks run on every training step, so the call is specialised once: the arguments the
    implementation takes are picked out of the hook's keyword arguments by a prebuilt getter and
    passed positionally (pluggy's argnames are in signature order).
    """

    __slots__ = ("plugin_name", "argnames", "call", "calls", "ns")

    def __init__(self, plugin_name: str, function: Callable[..., Any], argnames: tuple[str, ...]) -> None:
        self.plugin_name = plugin_name
        self.argnames = argnames
        self.calls = 0
        self.ns = 0  # total time in this implementation
        if not argnames:
            self.call: Callable[[dict[str, Any]], Any] = lambda kwargs: function()
        elif len(argnames) == 1:
            (name,) = argnames
            self.call = lambda kwargs: function(kwargs[name])
        else:
            pick = operator.itemgetter(*argnames)
            self.call = lambda kwargs: function(*pick(kwargs))


class PluginHost:
    """Holds the registered plugins and calls their hooks.

    >>> host = PluginHost([MyPlugin()])
    >>> loader_batch_sampler = host.chain("batchkit_wrap_batch_sampler", base, dataset=ds, ctx=host.ctx)
    """

    def __init__(self, plugins: Iterable[object] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.ctx = BatchKitContext()
        self._plugins: dict[str, object] = {}
        self._impls: dict[str, list[_Impl]] = {}
        self._metrics: dict[str, float] = {}
        for plugin in plugins:
            self.register(plugin)

    # -- registration -------------------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> object:
        """Register a plugin object under ``name`` (default: its ``instance_name`` / ``name``).

        Checks its hook implementations against the hook contract and raises
        :class:`~batchkit.errors.PluginError` for a misspelt hook, an argument the hook does not
        offer, a pluggy wrapper on a chain hook, or a duplicate name.
        """
        if isinstance(plugin, type):
            raise PluginError(
                f"batchkit: register() got the class {plugin.__name__}, not an instance; "
                f"register {plugin.__name__}(...) instead"
            )
        if name is None:
            name = plugin.instance_name if isinstance(plugin, Plugin) else type(plugin).__name__.lower()
        if name in self._plugins:
            raise PluginError(
                f"batchkit: a plugin named {name!r} is already registered; give the second instance "
                "another name (a different YAML entry key, or register(plugin, name=...))"
            )
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"batchkit: plugin {name!r} is invalid: " + str(exc).replace("\n", "; ")) from None
        try:
            self.pm.check_pending()  # a decorated method whose name is not a hook (a typo)
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(
                f"batchkit: plugin {name!r}: {exc}. The hooks are: {', '.join(self._hook_names())}"
            ) from None
        undecorated = [
            h for h in self._hook_names()
            if callable(getattr(plugin, h, None)) and self.pm.parse_hookimpl_opts(plugin, h) is None
        ]
        if undecorated:
            self.pm.unregister(plugin)
            raise PluginError(
                f"batchkit: plugin {name!r} defines {undecorated} without @batchkit.hookimpl, so the "
                "host would never call them; decorate them with @hookimpl"
            )
        for hook_name in CHAIN_HOOKS:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    self.pm.unregister(plugin)
                    raise PluginError(
                        f"batchkit: plugin {name!r} declares {hook_name} as a pluggy wrapper; chain hooks "
                        "take plain implementations (use tryfirst/trylast or the plugin's order to position it)"
                    )
        if isinstance(plugin, Plugin):
            plugin._host = self
            plugin._instance_name = name
        self._plugins[name] = plugin
        self._impls.clear()
        return plugin

    def unregister(self, name: str) -> None:
        plugin = self._plugins.pop(name)
        self.pm.unregister(plugin)
        if isinstance(plugin, Plugin):
            plugin._host = None
        self._impls.clear()

    @property
    def plugins(self) -> dict[str, object]:
        """Registered plugins by instance name, in registration order."""
        return dict(self._plugins)

    def validate(self) -> None:
        """Refuse declared conflicts. Called by the Lightning callback at setup."""
        names_by_kind: dict[str, list[str]] = {}
        for inst, plugin in self._plugins.items():
            names_by_kind.setdefault(_kind(plugin), []).append(inst)
        for inst, plugin in self._plugins.items():
            for other_kind in getattr(plugin, "conflicts", ()):
                for other in names_by_kind.get(other_kind, []):
                    if other != inst:
                        raise PluginConflictError(
                            f"batchkit: plugin {inst!r} ({_kind(plugin)}) declares a conflict with {other!r} "
                            f"({other_kind}); they cannot run together. Remove one of the two entries from "
                            "the plugin list."
                        )

    # -- ordering -----------------------------------------------------------------------------

    def _hook_names(self) -> list[str]:
        return [n for n in dir(hookspecs) if n.startswith("batchkit_")]

    def _prepared(self, hook_name: str) -> list[_Impl]:
        impls = self._impls.get(hook_name)
        if impls is not None:
            return impls
        registration = {name: i for i, name in enumerate(self._plugins)}
        raw = getattr(self.pm.hook, hook_name).get_hookimpls()

        def key(impl: pluggy.HookImpl) -> tuple[int, int, int]:
            tier = 0 if impl.tryfirst else (2 if impl.trylast else 1)
            return (tier, int(getattr(impl.plugin, "order", 0)), registration[impl.plugin_name])

        impls = [_Impl(impl.plugin_name, impl.function, tuple(impl.argnames)) for impl in sorted(raw, key=key)]
        self._impls[hook_name] = impls
        return impls

    def chain_order(self, hook_name: str) -> list[str]:
        """Instance names of the plugins implementing ``hook_name``, in the order they are called."""
        return [impl.plugin_name for impl in self._prepared(hook_name)]

    def describe(self) -> dict[str, list[str]]:
        """Chain order for every hook some plugin implements (what ``batchkit plugins`` shows)."""
        return {h: order for h in self._hook_names() if (order := self.chain_order(h))}

    # -- calling ------------------------------------------------------------------------------

    def has_impls(self, hook_name: str) -> bool:
        return bool(self._prepared(hook_name))

    def chain(self, hook_name: str, value: Any, **kwargs: Any) -> Any:
        """Run the transform chain ``hook_name`` starting from ``value``; return the final value."""
        carrier = CHAIN_HOOKS[hook_name]
        impls = self._impls.get(hook_name)
        for impl in impls if impls is not None else self._prepared(hook_name):
            kwargs[carrier] = value
            start = time.perf_counter_ns()
            try:
                result = impl.call(kwargs)
            except Exception as exc:
                _add_note(exc, f"batchkit: raised by plugin {impl.plugin_name!r} in {hook_name}")
                raise
            impl.ns += time.perf_counter_ns() - start
            impl.calls += 1
            if result is not None:
                value = result
        return value

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of the notification hook ``hook_name``."""
        impls = self._impls.get(hook_name)
        for impl in impls if impls is not None else self._prepared(hook_name):
            start = time.perf_counter_ns()
            try:
                impl.call(kwargs)
            except Exception as exc:
                _add_note(exc, f"batchkit: raised by plugin {impl.plugin_name!r} in {hook_name}")
                raise
            impl.ns += time.perf_counter_ns() - start
            impl.calls += 1

    # -- timing -------------------------------------------------------------------------------

    def timings(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per plugin and hook: ``{"calls": n, "total_s": seconds, "mean_us": microseconds}``.

        Collate hooks run in DataLoader workers when ``num_workers > 0`` and are timed only
        in-process (``num_workers=0``).
        """
        out: dict[str, dict[str, dict[str, float]]] = {}
        for hook_name, impls in self._impls.items():
            for impl in impls:
                calls, ns = impl.calls, impl.ns
                if calls:
                    out.setdefault(impl.plugin_name, {})[hook_name] = {
                        "calls": calls,
                        "total_s": ns / 1e9,
                        "mean_us": ns / calls / 1e3,
                    }
        return out

    def total_seconds(self) -> dict[str, float]:
        """Total time spent in each plugin's hooks."""
        return {p: sum(h["total_s"] for h in hooks.values()) for p, hooks in self.timings().items()}

    def reset_timings(self) -> None:
        for impls in self._impls.values():
            for impl in impls:
                impl.calls = impl.ns = 0

    # -- metrics ------------------------------------------------------------------------------

    def log(self, key: str, value: float) -> None:
        """Buffer a metric; :meth:`pop_metrics` hands them to the logger."""
        self._metrics[key] = float(value)

    def pop_metrics(self) -> dict[str, float]:
        if not self._metrics:
            return {}
        metrics, self._metrics = self._metrics, {}
        return metrics

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every plugin's state, keyed by instance name."""
        state: dict[str, Any] = {}
        for impl in self._prepared("batchkit_state_dict"):
            state[impl.plugin_name] = impl.call({})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each plugin back its state. A plugin with state in ``state`` that is no longer
        registered, or a stateful plugin missing from it, is an error: resuming would not be exact."""
        stateful = {impl.plugin_name: impl for impl in self._prepared("batchkit_load_state_dict")}
        missing = [name for name in stateful if name not in state]
        extra = [name for name in state if name not in stateful]
        if missing or extra:
            raise PluginError(
                "batchkit: the checkpoint's plugin state does not match the registered plugins "
                f"(in the checkpoint but not registered: {extra}; registered but not in the checkpoint: "
                f"{missing}). Resume with the same plugin list the checkpoint was saved with."
            )
        for name, impl in stateful.items():
            impl.call({"state": state[name]})


def _kind(plugin: object) -> str:
    return getattr(plugin, "name", "") or type(plugin).__name__.lower()


def _add_note(exc: BaseException, note: str) -> None:
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
