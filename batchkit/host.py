"""The plugin host: registers plugins, orders them, checks conflicts, calls transform chains and
notifications, times every hook call, and gathers plugin state and metrics. It also owns what the
plugins share: the context (:class:`BatchKitContext`), where training stands
(:class:`TrainProgress`), the super-batch plan (:class:`SuperBatchPlan`), the learning-rate scale
and loader-rebuild requests.

The host knows nothing of Lightning; :mod:`batchkit.lightning` drives it from a Trainer.
"""

from __future__ import annotations

import linecache
import math
import time
import zlib
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Mapping

import pluggy

from batchkit import hookspecs
from batchkit.batch import BatchSpec
from batchkit.errors import PluginConflictError
from batchkit.errors import PluginError
from batchkit.plugin import Plugin
from batchkit.plugin import kind_of

# a module-level name: hooks run on every step and, when timed, read the clock once per implementation
_clock = time.perf_counter_ns


#: Every declared hook and what its declaration says (kind, stage, carrier).
HOOKS: dict[str, hookspecs.HookKind] = hookspecs.hook_kinds()
#: Transform chains: hook name -> the argument that carries the value along the chain.
CHAIN_HOOKS: dict[str, str] = {name: h.carrier for name, h in HOOKS.items() if h.kind == "chain"}  # type: ignore[misc]

TIERS = ("tryfirst", "ordinary", "trylast")


@dataclass
class TrainProgress:
    """Where training stands: the one record of it, owned by the host and saved once in checkpoints.

    Counts are this rank's. ``samples_trained`` counts the samples the user's ``training_step``
    received (after the batch stage), ``samples_loaded`` those the DataLoader produced; they differ
    under selection. ``batch_size`` is the size of the micro-batch being trained. ``lookahead`` is
    how many batches the DataLoader may have drawn from the sampler beyond the one being trained
    (``num_workers * prefetch_factor`` with worker processes, else 0).
    """

    epoch: int = 0
    #: index of the micro-batch being trained within the epoch
    batch_idx: int = 0
    #: micro-batches of the current epoch already trained
    batches_done: int = 0
    #: optimizer steps taken
    global_step: int = 0
    samples_trained: int = 0
    samples_loaded: int = 0
    #: samples in the micro-batch being trained, after the batch stage and as loaded
    batch_size: int = 0
    loaded_batch_size: int = 0
    lookahead: int = 0
    #: batches the outermost sampler has yielded in the current epoch
    yielded: int = 0

    _SAVED = ("epoch", "batches_done", "global_step", "samples_trained", "samples_loaded")

    def state_dict(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self._SAVED}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for k in self._SAVED:
            if k in state:
                setattr(self, k, int(state[k]))


@dataclass(frozen=True)
class SuperBatchPlan:
    """How many samples a micro-batch loads and how many each super-batch plugin keeps.

    Batch-stage plugins with a ``load_factor`` r > 1 ask for super-batches: the DataLoader loads
    ``load_size`` = b * r_1 * ... * r_n samples per micro-batch (b: the user's batch size,
    ``train_size``), and the i-th such plugin in chain order keeps ``keep_size(plugin)`` of the
    ``input_size(plugin)`` samples it receives, so the last one hands ``train_size`` samples on.
    """

    train_size: int
    load_size: int
    #: plugin instance name -> (input size, kept size), in chain order
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def build(cls, train_size: int, factors: list[tuple[str, float]]) -> SuperBatchPlan:
        sizes: dict[str, tuple[int, int]] = {}
        keep = train_size
        for name, factor in reversed(factors):
            load = int(round(keep * factor))
            if load <= keep:
                raise PluginError(
                    f"batchkit: plugin {name!r} has load_factor={factor}, which at a batch size of {keep} loads "
                    f"{load} samples, no more than it keeps; use a load_factor that gives at least one more sample "
                    "(or a larger batch size)"
                )
            sizes[name] = (load, keep)
            keep = load
        return cls(train_size=train_size, load_size=keep, sizes=dict(reversed(list(sizes.items()))))

    @property
    def active(self) -> bool:
        return bool(self.sizes)

    def keep_size(self, plugin: object | str) -> int:
        """How many samples ``plugin`` must return."""
        return self.sizes[_name_of(plugin)][1]

    def input_size(self, plugin: object | str) -> int:
        """How many samples ``plugin`` receives."""
        return self.sizes[_name_of(plugin)][0]


class BatchKitContext:
    """Where training stands, handed to hooks as ``ctx``. The host updates it in place."""

    def __init__(self, **fields: Any) -> None:
        self.trainer: Any = None
        self.module: Any = None
        #: Lightning's trainer function: ``"fit"``, ``"validate"``, ...
        self.stage: str = "fit"
        self.rank: int = 0
        self.world_size: int = 1
        #: where the model lives (set before ``batchkit_fit_start``)
        self.device: Any = None
        self.accumulate_grad_batches: int = 1
        #: 0-based index of the current micro-batch within its optimizer step
        self.micro_step: int = 0
        #: true when the current micro-batch ends an optimizer step
        self.is_last_micro_batch: bool = True
        #: optimizer steps the whole run will take (``None`` if unknown); see batchkit_plan_total_steps
        self.total_steps: int | None = None
        #: the Trainer's limits and logging cadence (-1 / None when not set)
        self.max_steps: int = -1
        self.max_epochs: int | None = None
        self.log_every_n_steps: int = 50
        #: whether the Trainer logs the optimizer step in progress (from the batch stage to
        #: ``batchkit_step_end``): plugins that produce a figure every step log it only then
        self.logs_this_step: bool = False
        self.train_progress = TrainProgress()
        #: how many samples a micro-batch loads and keeps (``None`` before the loader is built)
        self.super_batch: SuperBatchPlan | None = None
        #: how plugins count, select and split this run's batches
        self.batch_spec: BatchSpec = BatchSpec()
        #: the metadata the batch sampler attached to the batch being trained (empty for plain lists)
        self.batch_meta: Mapping[str, Any] = {}
        for name, value in fields.items():  # BatchKitContext(rank=1, global_step=5, ...) for tests and tools
            if not hasattr(self, name):
                raise TypeError(f"BatchKitContext has no field {name!r}")
            setattr(self, name, value)

    # The common counters are views of train_progress, so there is one record of each.
    @property
    def epoch(self) -> int:
        return self.train_progress.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.train_progress.epoch = value

    @property
    def batch_idx(self) -> int:
        """Index of the current micro-batch within the epoch."""
        return self.train_progress.batch_idx

    @batch_idx.setter
    def batch_idx(self, value: int) -> None:
        self.train_progress.batch_idx = value

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self.train_progress.global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.train_progress.global_step = value

    @property
    def progress(self) -> float:
        """Elapsed fraction of training in optimizer steps, in [0, 1] (0 if the total is unknown)."""
        if not self.total_steps:
            return 0.0
        return min(1.0, self.global_step / self.total_steps)

    def __repr__(self) -> str:
        return (f"BatchKitContext(rank={self.rank}/{self.world_size}, epoch={self.epoch}, batch_idx={self.batch_idx}, "
                f"global_step={self.global_step}, total_steps={self.total_steps})")


class _Impl:
    """One plugin's implementation of one hook, in call order. Chains and notifications run it
    through a prepared caller (:func:`_compile_dispatcher`); the per-plugin state hooks through
    :meth:`call`."""

    __slots__ = ("plugin_name", "plugin", "function", "tier", "argnames", "calls", "ns")

    def __init__(self, impl: pluggy.HookImpl) -> None:
        self.plugin_name: str = impl.plugin_name
        self.plugin = impl.plugin
        self.function = impl.function
        self.tier = TIERS[0] if impl.tryfirst else (TIERS[2] if impl.trylast else TIERS[1])
        self.argnames = tuple(impl.argnames)  # in signature order
        self.calls = 0
        self.ns = 0  # total time in this implementation

    def call(self, kwargs: dict[str, Any]) -> Any:
        """Call with the arguments it declares, taken from the hook's ``kwargs``."""
        return self.function(*(kwargs[name] for name in self.argnames))


def _compile_dispatcher(
    hook_name: str, params: tuple[str, ...], carrier: str | None, impls: list[_Impl], timed: bool
) -> Callable[..., Any]:
    """One function that calls every implementation of ``hook_name`` in order, written out in full.

    The per-step hooks run a few times per training step for every plugin, and a generic loop
    (pick each implementation's arguments out of a dict, call it through a small adaptor) costs
    about twice what the calls themselves do. So the host writes, once per hook and plugin list,
    the straight-line code a person would write by hand: each implementation called directly with
    the arguments it declares (and, with ``timed``, one clock reading between consecutive calls,
    charged to the implementation in between). The function takes the hook's arguments by name (a
    chain also ``after``, see :meth:`PluginHost.chain`) and returns the chain's final value
    (``None`` for a notification). Its source is kept in ``linecache``, so tracebacks through it
    show the line that called the plugin.
    """
    lines = [f"def {hook_name}({', '.join(params)}{', after=None' if carrier else ''}):"]
    if impls:
        lines += ["    k = 0", "    try:"] + (["        start = clock()"] if timed else [])
        for k, impl in enumerate(impls):
            call = f"f{k}({', '.join(impl.argnames)})"
            if k:
                lines.append(f"        k = {k}")
            lines.append(f"        result = {call}" if carrier else f"        {call}")
            if timed:
                lines += ["        end = clock()", f"        i{k}.ns += end - start", f"        i{k}.calls += 1", "        start = end"]
            if carrier:
                lines += [
                    "        if result is not None:", f"            {carrier} = result",
                    "        if after is not None:", f"            after(i{k}.plugin_name, {carrier})",
                ] + (["            start = clock()"] if timed else [])
        lines += ["    except Exception as exc:", "        failed(exc, k)", "        raise"]
    lines.append(f"    return {carrier}" if carrier else "    return None")
    source = "\n".join(lines) + "\n"

    def failed(exc: BaseException, k: int) -> None:
        _add_note(exc, f"batchkit: raised by plugin {impls[k].plugin_name!r} in {hook_name}", impls[k].plugin_name)

    namespace: dict[str, Any] = {"clock": _clock, "failed": failed}
    for k, impl in enumerate(impls):
        namespace[f"f{k}"], namespace[f"i{k}"] = impl.function, impl
    # named by its text, so the same code shares one linecache entry however many hosts build it
    filename = f"<batchkit {hook_name} {zlib.crc32(source.encode()):08x}: {', '.join(i.plugin_name for i in impls) or 'no plugin'}>"
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - source built above from hook and argument names only
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return namespace[hook_name]


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
        self._callers: dict[str, Callable[..., Any]] = {}
        self._time_hooks = False
        self._metrics: dict[str, tuple[Any, str | None]] = {}
        self._lr_scales: dict[str, float] = {}
        self.lr_scale = 1.0
        self._rebuild_reasons: list[str] = []
        for plugin in plugins:
            self.register(plugin)

    # -- registration -------------------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> object:
        """Register a plugin object under ``name`` (default: its ``instance_name`` / ``name``).

        Checks its hook implementations against the hook contract and raises
        :class:`~batchkit.errors.PluginError` for a misspelt hook, an argument the hook does not
        offer, a pluggy wrapper or historic option on any hook, or a duplicate name.
        """
        if isinstance(plugin, type):
            raise PluginError(
                f"batchkit: register() got the class {plugin.__name__}, not an instance; "
                f"register {plugin.__name__}(...) instead"
            )
        if name is None:
            name = plugin.instance_name if isinstance(plugin, Plugin) else kind_of(plugin)
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
                f"batchkit: plugin {name!r}: {exc}. The hooks are: {', '.join(HOOKS)}"
            ) from None
        undecorated = [
            h for h in HOOKS if callable(getattr(plugin, h, None)) and self.pm.parse_hookimpl_opts(plugin, h) is None
        ]
        if undecorated:
            self.pm.unregister(plugin)
            raise PluginError(
                f"batchkit: plugin {name!r} defines {undecorated} without @batchkit.hookimpl, so the "
                "host would never call them; decorate them with @hookimpl"
            )
        for hook_name in HOOKS:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    self.pm.unregister(plugin)
                    raise PluginError(
                        f"batchkit: plugin {name!r} declares {hook_name} as a pluggy wrapper; batchkit calls hook "
                        "implementations itself and never runs wrappers. Use a plain @hookimpl, positioned with "
                        "tryfirst/trylast or the plugin's order"
                    )
        if isinstance(plugin, Plugin):
            plugin._host = self
            plugin._instance_name = name
        self._plugins[name] = plugin
        self._impls.clear()
        self._callers.clear()
        return plugin

    def unregister(self, name: str) -> None:
        plugin = self._plugins.pop(name)
        self.pm.unregister(plugin)
        if isinstance(plugin, Plugin):
            plugin._host = None
        self._lr_scales.pop(name, None)
        self._impls.clear()
        self._callers.clear()

    @property
    def plugins(self) -> dict[str, object]:
        """Registered plugins by instance name, in registration order."""
        return dict(self._plugins)

    def validate(self) -> None:
        """Refuse declared conflicts and plugins listed twice that do not allow it. Called by the
        Lightning callback at setup and by ``batchkit plugins --config``."""
        names_by_kind: dict[str, list[str]] = {}
        for inst, plugin in self._plugins.items():
            names_by_kind.setdefault(kind_of(plugin), []).append(inst)
        for kind, instances in names_by_kind.items():
            plugin = self._plugins[instances[0]]
            if len(instances) > 1 and not getattr(plugin, "allow_multiple", False):
                raise PluginConflictError(
                    f"batchkit: plugin {kind!r} is listed {len(instances)} times (entries {instances}), but it can run "
                    "only once per Trainer (its instances would act on the same batches, optimizer or state). Keep one "
                    "entry and put all its options there."
                )
        for inst, plugin in self._plugins.items():
            for other_kind in getattr(plugin, "conflicts", ()):
                for other in names_by_kind.get(other_kind, []):
                    if other != inst:
                        raise PluginConflictError(
                            f"batchkit: plugin {inst!r} ({kind_of(plugin)}) declares a conflict with {other!r} "
                            f"({other_kind}); they cannot run together. Remove one of the two entries from "
                            "the plugin list."
                        )

    # -- ordering -----------------------------------------------------------------------------

    def _prepared(self, hook_name: str) -> list[_Impl]:
        impls = self._impls.get(hook_name)
        if impls is not None:
            return impls
        registration = {name: i for i, name in enumerate(self._plugins)}
        raw = getattr(self.pm.hook, hook_name).get_hookimpls()

        def key(impl: pluggy.HookImpl) -> tuple[int, int, int]:
            tier = 0 if impl.tryfirst else (2 if impl.trylast else 1)
            return (tier, int(getattr(impl.plugin, "order", 0)), registration[impl.plugin_name])

        impls = [_Impl(impl) for impl in sorted(raw, key=key)]
        self._impls[hook_name] = impls
        return impls

    def chain_order(self, hook_name: str) -> list[str]:
        """Instance names of the plugins implementing ``hook_name``, in the order they are called."""
        return [impl.plugin_name for impl in self._prepared(hook_name)]

    def chain_tiers(self, hook_name: str) -> list[tuple[str, str, int]]:
        """``(instance name, tier, order)`` for every implementation of ``hook_name``, in call order:
        what ``batchkit plugins --config`` shows, since ``order`` never moves a plugin across tiers."""
        return [(i.plugin_name, i.tier, int(getattr(i.plugin, "order", 0))) for i in self._prepared(hook_name)]

    def describe(self) -> dict[str, list[str]]:
        """Chain order for every hook some plugin implements (what ``batchkit plugins`` shows)."""
        return {h: order for h in HOOKS if (order := self.chain_order(h))}

    def implementers(self, hook_name: str) -> list[object]:
        """The plugin objects implementing ``hook_name``, in call order."""
        return [impl.plugin for impl in self._prepared(hook_name)]

    # -- calling ------------------------------------------------------------------------------

    def has_impls(self, hook_name: str) -> bool:
        return bool(self._prepared(hook_name))

    def caller(self, hook_name: str, positional: tuple[str, ...] | None = None) -> Callable[..., Any]:
        """The prepared function that runs hook ``hook_name`` (chain or notification) for the
        plugins registered now; call it with the hook's arguments by name, e.g.
        ``host.caller("batchkit_step_end")(ctx=ctx)``. Code that calls a hook on every step fetches
        it once (the plugin list is fixed during a fit) and saves the lookups of :meth:`chain`
        and :meth:`notify`, which use the same function.

        ``positional``: the argument names in the order the caller will pass them positionally (a
        chain's ``after`` may follow); checked here against the hook's declaration, so a per-step
        call site can skip keyword matching, e.g.
        ``host.caller("batchkit_step_end", positional=("ctx",))(ctx)``."""
        caller = self._callers.get(hook_name)
        if caller is None:
            kind = HOOKS[hook_name]
            if kind.kind == "per_plugin":
                raise PluginError(f"batchkit: {hook_name} is called per plugin by the host (state_dict / load_state_dict), not as a chain")
            caller = _compile_dispatcher(hook_name, self._params(hook_name), CHAIN_HOOKS.get(hook_name), self._prepared(hook_name), self._time_hooks)
            self._callers[hook_name] = caller
        if positional is not None and tuple(positional) != self._params(hook_name):
            raise TypeError(f"{hook_name} takes ({', '.join(self._params(hook_name))}), not ({', '.join(positional)})")
        return caller

    def _params(self, hook_name: str) -> tuple[str, ...]:
        return tuple(getattr(self.pm.hook, hook_name).spec.argnames)

    def chain(self, hook_name: str, value: Any, after: Callable[[str, Any], None] | None = None, **kwargs: Any) -> Any:
        """Run the transform chain ``hook_name`` starting from ``value``; return the final value.
        ``kwargs`` are the hook's other arguments, all of them.

        ``after(plugin_name, value)``, if given, is called after each implementation with the value
        so far (the host checks super-batch sizes this way).
        """
        kwargs[CHAIN_HOOKS[hook_name]] = value
        return self.caller(hook_name)(after=after, **kwargs)

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation of the notification hook ``hook_name`` with ``kwargs``, the
        hook's arguments, all of them."""
        self.caller(hook_name)(**kwargs)

    # -- super-batches ------------------------------------------------------------------------

    def super_batch_plan(self, train_size: int) -> SuperBatchPlan:
        """The plan for a user batch size of ``train_size``: the load factors of the batch-stage
        plugins, multiplied in chain order (see :class:`SuperBatchPlan`)."""
        factors = []
        for impl in self._prepared("batchkit_transform_batch"):
            factor = getattr(impl.plugin, "load_factor", None)
            if factor is None or factor == 1:
                continue
            if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
                raise PluginError(
                    f"batchkit: plugin {impl.plugin_name!r} has load_factor={factor!r}; it must be a number > 1 "
                    "(samples loaded per sample kept), or None / 1 for no super-batch"
                )
            factors.append((impl.plugin_name, float(factor)))
        return SuperBatchPlan.build(train_size, factors)

    # -- learning-rate scale and loader rebuilds ----------------------------------------------

    def set_lr_scale(self, plugin: object | str, scale: float) -> None:
        """Ask for every parameter group's learning rate to be multiplied by ``scale`` during each
        optimizer step from now on (1 to stop). Scales of several plugins multiply. The host applies
        it around ``optimizer.step()`` only, so LR schedulers keep their own values."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise PluginError(f"batchkit: plugin {_name_of(plugin)!r} asked for an lr scale of {scale!r}; it must be a number > 0")
        owner = self._plugins.get(_name_of(plugin))
        if owner is None or not getattr(owner, "scales_lr", False):
            raise PluginError(
                f"batchkit: plugin {_name_of(plugin)!r} called set_lr_scale but does not declare scales_lr = True; "
                "set that class attribute, so that the host installs the optimizer step hooks that apply the scale"
            )
        self._lr_scales[_name_of(plugin)] = float(scale)
        self.lr_scale = math.prod(self._lr_scales.values())

    @property
    def scales_lr(self) -> bool:
        """Whether a registered plugin declares ``scales_lr`` (the lr-scale step hooks are needed)."""
        return any(getattr(p, "scales_lr", False) for p in self._plugins.values())

    def request_loader_rebuild(self, reason: str) -> None:
        """Ask for the train DataLoader to be rebuilt before the next epoch (the sampler and collate
        chains run again); ``reason`` is logged."""
        self._rebuild_reasons.append(reason)

    def pop_rebuild_request(self) -> list[str]:
        reasons, self._rebuild_reasons = self._rebuild_reasons, []
        return reasons

    # -- timing -------------------------------------------------------------------------------

    @property
    def time_hooks(self) -> bool:
        """Whether every hook call is timed per plugin (:meth:`timings`). Off by default: like a
        Lightning profiler, it is asked for (``BatchKitCallback(time_hooks=True)`` or
        ``print_summary=True``), since the clock readings cost more than the calls of a plugin
        that does little. Set it before the fit; calls made before it was set are not counted."""
        return self._time_hooks

    @time_hooks.setter
    def time_hooks(self, value: bool) -> None:
        self._time_hooks = bool(value)
        self._callers.clear()

    def timings(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per plugin and hook: ``{"calls": n, "total_s": seconds, "mean_us": microseconds}``, for
        the calls made while :attr:`time_hooks` was on (empty otherwise).

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

    def log(self, key: str, value: Any, reduce: str | None = None) -> None:
        """Buffer a metric; :meth:`pop_metrics` hands them to the logger. ``reduce`` (``"mean"``,
        ``"sum"``, ``"max"``, ``"min"``) says how the ranks' values combine; ``None`` keeps each
        rank's own."""
        if reduce not in (None, "mean", "sum", "max", "min"):
            raise PluginError(f"batchkit: metric {key!r}: reduce must be None, 'mean', 'sum', 'max' or 'min', got {reduce!r}")
        self._metrics[key] = (value, reduce)

    @property
    def has_metrics(self) -> bool:
        """Whether a metric was logged since the last :meth:`pop_metrics`."""
        return bool(self._metrics)

    def pop_metrics(self) -> dict[str, tuple[Any, str | None]]:
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
            try:
                impl.call({"state": state[name]})
            except Exception as exc:
                _add_note(exc, f"batchkit: raised by plugin {name!r} while loading its state from the checkpoint")
                raise


def _name_of(plugin: object | str) -> str:
    if isinstance(plugin, str):
        return plugin
    return plugin.instance_name if isinstance(plugin, Plugin) else kind_of(plugin)


def _add_note(exc: BaseException, note: str, plugin: str | None = None) -> None:
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)
    if plugin is not None and not hasattr(exc, "batchkit_plugin"):
        exc.batchkit_plugin = plugin  # type: ignore[attr-defined]  # the innermost plugin that raised
