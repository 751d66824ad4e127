"""The ``batchkit`` command.

``batchkit fit --config FILE.yaml [OVERRIDE ...]``
    Lightning's CLI (LightningCLI / jsonargparse): ``trainer``, ``model`` and ``data`` come from the
    YAML as usual, and its ``batchkit: plugins:`` section becomes a :class:`BatchKitCallback`.
    Overrides of that section come in two equivalent forms, OmegaConf's dotlist
    ``batchkit.plugins.NAME.OPTION=VALUE`` and LightningCLI's flag ``--batchkit.plugins.NAME.OPTION=VALUE``
    (or ``... OPTION VALUE``). Both are merged into the section *while the arguments are parsed*, so
    ``--print_config`` and the ``config.yaml`` Lightning saves show the section the run used, and a
    run can be repeated or resumed from its own saved config. Every other subcommand and flag of
    LightningCLI works unchanged.

``batchkit prepare --config FILE.yaml [OVERRIDE ...]`` (also ``batchkit mine``)
    Every plugin's prepare-data step (offline mining, teacher embeddings) on the config's training
    data, once, into the artefact cache, without training; ``fit`` then loads the artefacts.

``batchkit plugins [--config FILE.yaml [OVERRIDE ...]]``
    The installed plugins: name, version, distribution, hooks implemented and declared order. With
    ``--config``, a dry run of that config: the overrides (and any LightningCLI flag) applied, every
    plugin built, conflicts checked, and, when the file has a ``model``, the model, data and Trainer
    instantiated as ``fit`` would and every plugin's setup check run against them, then the
    optimizer chain run on the module's ``configure_optimizers``; then the chain order of every hook
    with its tryfirst / ordinary / trylast tiers.

Every batchkit error (a :class:`~batchkit.errors.BatchKitError`, also when it arrives as the cause
of another exception) is printed as ``error: MESSAGE`` on stderr, without a traceback, and the
command exits with status 2 (the status jsonargparse uses for bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any
from typing import Iterator

from batchkit.config import apply_overrides
from batchkit.config import available_plugins
from batchkit.config import batch_spec_entry
from batchkit.config import build_plugins
from batchkit.config import load_config
from batchkit.config import plugin_entries
from batchkit.errors import BatchKitError
from batchkit.errors import ConfigError
from batchkit.hookspecs import PROJECT
from batchkit.plugin import kind_of


#: Exit status of every batchkit error (and of jsonargparse's argument errors).
EXIT_ERROR = 2

#: The hidden parser argument each override is handed to (``--batchkit.…`` itself cannot be an
#: argument: jsonargparse reads ``--batchkit.plugins.mix.alpha`` as a one-level dict item of
#: ``--batchkit`` and replaces the whole ``plugins`` mapping with it).
_OVERRIDE_ARG = "--batchkit_override"

_DESCRIPTION = (
    "batchkit: Lightning's CLI with a batchkit plugin list. Commands: fit, validate, test, predict "
    "(LightningCLI; `batchkit fit --help`), `batchkit prepare --config FILE` (alias `mine`: run the plugins' "
    "offline prepare-data steps into the artefact cache, no training), and "
    "`batchkit plugins [--config FILE [OVERRIDES]]`: the "
    "installed plugins, and with --config a dry run of that config (overrides applied, plugins built, "
    "conflicts and setup checks run, chain order shown with its tryfirst/ordinary/trylast tiers). "
    "Override the plugin list with batchkit.plugins.ENTRY.OPTION=VALUE or "
    "--batchkit.plugins.ENTRY.OPTION=VALUE."
)

_PLUGINS_USAGE = """usage: batchkit plugins [--config FILE.yaml [OVERRIDE ...]]

Without --config: the installed plugins (name, version, distribution, hooks, declared order).

With --config: a dry run of FILE, everything that can be checked before training:
  * OVERRIDEs applied: batchkit.plugins.ENTRY.OPTION=VALUE or --batchkit.plugins.ENTRY.OPTION=VALUE,
    and, for a `batchkit fit` config, any LightningCLI flag (--trainer.max_epochs=2);
  * every entry built (options and reserved keys checked), declared conflicts refused;
  * if FILE has a `model`: model, data and Trainer instantiated as `batchkit fit` would, every
    plugin's setup check run against them, and the optimizer chain run on configure_optimizers();
  * the chain order of every hook, with its tryfirst / ordinary / trylast tier and order.
Errors are printed as `error: ...` and the command exits with status 2.
"""


# -- overrides ----------------------------------------------------------------------------------


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate overrides of the ``batchkit`` section from the other arguments.

    Accepted forms, all returned as OmegaConf dotlist items ``batchkit.KEY=VALUE``::

        batchkit.plugins.mix.alpha=0.4          OmegaConf dotlist
        --batchkit.plugins.mix.alpha=0.4        LightningCLI-style flag
        --batchkit.plugins.mix.alpha 0.4        the same, value as the next argument

    ``--batchkit '{plugins: ...}'`` (the whole section) is left to the parser.
    """
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("batchkit.") and "=" in arg:
            overrides.append(arg)
        elif arg.startswith("--batchkit."):
            body = arg[2:]
            if "=" not in body:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"batchkit: {arg} needs a value: {arg}=VALUE (or {arg} VALUE)")
                i += 1
                body = f"{body}={argv[i]}"
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


class _MergeOverride(argparse.Action):
    """Merges one ``batchkit.KEY=VALUE`` override into the ``batchkit`` value parsed so far.

    The overrides are placed after every other argument, so they apply on top of all config files,
    and ``--print_config`` (printed once everything is parsed) and the saved config include them.
    """

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        from omegaconf import OmegaConf

        current = namespace.get("batchkit") if hasattr(namespace, "get") else getattr(namespace, "batchkit", None)
        cfg = apply_overrides(OmegaConf.create({"batchkit": dict(current or {})}), [str(values)])
        # resolve=False: interpolations such as ${oc.env:VAR} stay for the plugin list to resolve
        namespace["batchkit"] = OmegaConf.to_container(cfg, resolve=False)["batchkit"]


def _overrides_as_arguments(argv: list[str]) -> list[str]:
    rest, overrides = split_overrides(argv)
    return rest + [item for override in overrides for item in (_OVERRIDE_ARG, override)]


# -- fit (LightningCLI) -------------------------------------------------------------------------


def _cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    from batchkit.lightning import BatchKitCallback

    class BatchKitCLI(LightningCLI):
        """LightningCLI plus the ``batchkit`` section; ``dry_run=True`` stops after the setup checks."""

        def __init__(self, *args: Any, dry_run: bool = False, prepare: bool = False, **kwargs: Any) -> None:
            self.dry_run = dry_run or prepare
            self.prepare = prepare
            self.dry_run_report: list[str] = []
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--batchkit",
                type=dict,
                default={},
                help="batchkit section: {plugins: {ENTRY: {plugin: NAME, OPTION: VALUE}}}. Override one "
                "value with --batchkit.plugins.ENTRY.OPTION=VALUE or batchkit.plugins.ENTRY.OPTION=VALUE "
                "(merged into the section, other entries kept).",
            )
            parser.add_argument(_OVERRIDE_ARG, action=_MergeOverride, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

        def parse_arguments(self, parser: Any, args: Any) -> None:
            # Always explicit arguments: the overrides are rewritten into the hidden argument above.
            self.config = parser.parse_args(_overrides_as_arguments(list(args)))

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            section = self._get(self.config, "batchkit", default={}) or {}
            from omegaconf import OmegaConf

            cfg = OmegaConf.create({"batchkit": dict(section)})
            callback = BatchKitCallback(plugin_entries(cfg), print_summary=not self.dry_run, batch_spec=batch_spec_entry(cfg))
            trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
            callbacks = list(trainer_cfg.get("callbacks") or []) + [callback]
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

        def after_instantiate_classes(self) -> None:
            if self.prepare:
                self.dry_run_report = _prepare_data(self.trainer, self.model, self.datamodule)
                self.subcommand = None
            elif self.dry_run:
                self.dry_run_report = _setup_checks(self.trainer, self.model)
                self.subcommand = None  # LightningCLI runs the subcommand only when one is set

    return BatchKitCLI


def run_fit_cli(argv: list[str], dry_run: bool = False, prepare: bool = False) -> Any:
    """Run LightningCLI with the batchkit section; return the CLI object."""
    kwargs: dict[str, Any] = {"parser_kwargs": {"description": _DESCRIPTION}}
    if dry_run or prepare:
        kwargs["save_config_callback"] = None
    else:
        kwargs["save_config_kwargs"] = {"overwrite": True}
    return _cli_class()(args=list(argv), dry_run=dry_run, prepare=prepare, **kwargs)


# -- batchkit prepare ---------------------------------------------------------------------------


def _prepare_data(trainer: Any, module: Any, datamodule: Any) -> list[str]:
    """Run every plugin's prepare-data step on the config's training data, filling the artefact
    cache, without training (what ``fit`` does before building its first train loader)."""
    import time

    from lightning_utilities.core.apply_func import apply_to_collection
    from torch.utils.data import DataLoader

    from batchkit.lightning import BatchKitCallback

    callback = next(cb for cb in trainer.callbacks if isinstance(cb, BatchKitCallback))
    host = callback.host
    callback.setup(trainer, module, "fit")
    try:
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
            loaders = datamodule.train_dataloader()
        else:
            loaders = module.train_dataloader()
        datasets: list[Any] = []
        apply_to_collection(loaders, DataLoader, lambda loader: datasets.append(loader.dataset))
        host.ctx.device = module.device
        report = []
        for dataset in datasets:
            started = time.perf_counter()
            host.notify("batchkit_prepare_data", dataset=dataset, cache=callback.cache, ctx=host.ctx)
            report.append(f"prepared {type(dataset).__name__} ({len(dataset)} samples) in {time.perf_counter() - started:.1f} s")
        if not host.has_impls("batchkit_prepare_data"):
            report.append("no plugin in the list has a prepare-data step: nothing to do")
        cached = sorted(p.name for p in callback.cache.root.glob("*.pt")) if callback.cache.root.is_dir() else []
        report.append(f"artefact cache {callback.cache.root}: {len(cached)} artefact(s)")
        return report
    finally:
        callback.teardown(trainer, module, "fit")


def prepare_command(argv: list[str]) -> list[str]:
    """``batchkit prepare --config FILE [ARGS...]`` (also ``batchkit mine``)."""
    if any(a in ("-h", "--help") for a in argv) or not argv:
        return [_PREPARE_USAGE]
    with _quiet_lightning():
        cli = run_fit_cli(["fit", *argv], prepare=True)
    return cli.dry_run_report


_PREPARE_USAGE = """usage: batchkit prepare --config FILE.yaml [OVERRIDE ...]     (also: batchkit mine ...)

Runs every plugin's prepare-data step (offline mining, teacher embeddings, indexes) on the config's
training data once, filling the artefact cache ($BATCHKIT_CACHE_DIR, else ~/.cache/batchkit), and
trains nothing. A `batchkit fit` of the same config then loads the artefacts instead of building
them. Overrides and LightningCLI flags are accepted as for `batchkit fit`."""


# -- the dry run --------------------------------------------------------------------------------


def _setup_checks(trainer: Any, module: Any) -> list[str]:
    """Run what ``fit`` checks at setup, without training: the callback's setup (conflicts, every
    plugin's ``batchkit_setup`` against the module and Trainer) and the optimizer chain."""
    import torch
    from lightning_utilities.core.apply_func import apply_to_collection

    from batchkit.lightning import BatchKitCallback

    callback = next(cb for cb in trainer.callbacks if isinstance(cb, BatchKitCallback))
    host = callback.host
    what = type(module).__name__
    report: list[str] = []
    failed = True
    try:
        callback.setup(trainer, module, "fit")
        report.append(f"setup checks of {len(host.plugins)} plugin(s) passed against {what} and the Trainer")
        if host.has_impls("batchkit_wrap_optimizer"):
            try:
                result = module.configure_optimizers()
            except BatchKitError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. it reads trainer state that only fit sets up
                report.append(
                    f"optimizer chain not checked: {what}.configure_optimizers() needs a running fit "
                    f"({type(exc).__name__}: {exc})"
                )
            else:
                optimizers: list[Any] = []
                schedulers: list[Any] = []
                apply_to_collection(result, torch.optim.Optimizer, optimizers.append)
                apply_to_collection(result, torch.optim.lr_scheduler.LRScheduler, schedulers.append)
                described = ", ".join(f"{type(o).__name__} ({len(o.param_groups)} groups)" for o in optimizers)
                rebound = f"; {', '.join(type(s).__name__ for s in schedulers)} re-pointed" if schedulers else ""
                report.append(f"optimizer chain {host.chain_order('batchkit_wrap_optimizer')} gives {described}{rebound}")
        failed = False
    finally:
        try:
            callback.teardown(trainer, module, "fit")
        except Exception:  # noqa: BLE001 - the error that stopped the dry run is the one to report
            if not failed:
                raise
    return report


def chain_table(host: Any, title: str) -> Any:
    """The chain order of every hook as a rich table: one row per implementation, with its tier
    (tryfirst / ordinary / trylast) and its order (which sorts only within the tier)."""
    from rich.table import Table

    table = Table(
        title=title,
        caption=(
            "A chain runs every tryfirst implementation, then the ordinary ones, then the trylast ones. "
            "`order` (lower first; an entry's `order:` overrides the plugin's) sorts only within a tier, "
            "then the list order breaks ties: no order moves a plugin into another tier."
        ),
    )
    for column in ("hook", "tier", "order", "entry (plugin)"):
        table.add_column(column)
    plugins = host.plugins
    for hook in host.describe():
        chain = host.chain_tiers(hook)
        for i, (name, tier, order) in enumerate(chain):
            kind = kind_of(plugins.get(name))
            table.add_row(
                hook.removeprefix("batchkit_") if i == 0 else "",
                tier,
                str(order),
                name if kind == name else f"{name} ({kind})",
                end_section=i == len(chain) - 1,
            )
    return table


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notes ("Seed set", "GPU available") are noise in a dry run's report."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def dry_run(config: str, args: list[str]) -> tuple[Any, list[str]]:
    """Check ``config`` (with ``args``: overrides, and LightningCLI flags for a fit config) as far as
    possible without training. Returns the plugin host and a report; raises the first error."""
    from batchkit.host import PluginHost
    from batchkit.lightning import BatchKitCallback

    cfg = load_config(config)  # a clear error for a missing file
    if "model" in cfg:
        with _quiet_lightning():
            cli = run_fit_cli(["fit", "--config", config, *args], dry_run=True)
        callback = next(cb for cb in cli.trainer.callbacks if isinstance(cb, BatchKitCallback))
        report = [f"{len(callback.host.plugins)} plugin(s) built, no declared conflicts", *cli.dry_run_report]
        return callback.host, report
    rest, overrides = split_overrides(args)
    if rest:
        raise ConfigError(
            f"batchkit plugins: {config} has no `model`, so only batchkit overrides apply to it; "
            f"got {' '.join(rest)}"
        )
    host = PluginHost(build_plugins(plugin_entries(apply_overrides(cfg, overrides))))
    host.validate()
    report = [
        f"{len(host.plugins)} plugin(s) built, no declared conflicts",
        f"not checked: {config} has no `model` section, so no setup checks against a module ran",
    ]
    return host, report


# -- batchkit plugins ---------------------------------------------------------------------------


def _hooks_of(factory: Any) -> list[str]:
    cls = factory if inspect.isclass(factory) else None
    if cls is None:
        return ["(factory)"]
    return sorted(
        name for name, member in inspect.getmembers(cls) if name.startswith("batchkit_") and hasattr(member, f"{PROJECT}_impl")
    )


def list_plugins(config: str | None = None, args: list[str] | tuple[str, ...] = ()) -> str:
    """The installed plugins as a table; with ``config``, the dry run of that config and its chains."""
    from rich.console import Console
    from rich.table import Table

    host, report = dry_run(config, list(args)) if config is not None else (None, [])
    console = Console(record=True, width=140)
    installed = available_plugins()
    table = Table(title=f"installed batchkit plugins (entry-point group {PROJECT}.plugins)")
    for col in ("name", "version", "distribution", "hooks", "order"):
        table.add_column(col)
    for name, info in sorted(installed.items()):
        try:
            factory = info.load()
            hook_list = ", ".join(h.removeprefix("batchkit_") for h in _hooks_of(factory))
            order = str(getattr(factory, "order", 0))
        except BatchKitError as exc:
            hook_list, order = f"[red]failed to load: {exc}[/red]", "-"
        table.add_row(name, info.version, info.distribution, hook_list, order)
    with console.capture() as capture:
        console.print(table)
        if host is not None:
            console.print(chain_table(host, f"chain order for {config} (first called first)"))
            console.print(f"dry run of {config}:", markup=False)
            for line in report:
                console.print(f"  - {line}", markup=False)
            console.print(
                "  - checked only when training runs: the sampler and collate chains (they need the data) "
                "and what plugins check at the first steps",
                markup=False,
            )
    return capture.get()


def plugins_command(argv: list[str]) -> str:
    """``batchkit plugins [--config FILE [ARGS...]]``."""
    if any(a in ("-h", "--help") for a in argv):
        return _PLUGINS_USAGE
    config: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value or (value.startswith("-") and "=" not in arg):
                raise ConfigError(
                    "batchkit plugins: --config needs a file: batchkit plugins --config FILE.yaml [OVERRIDE ...]"
                )
            if config is not None:
                raise ConfigError("batchkit plugins: give one --config file")
            config = value
            i += 1 if "=" in arg else 2
            continue
        rest.append(arg)
        i += 1
    if config is None and rest:
        raise ConfigError(
            f"batchkit plugins: {' '.join(rest)} needs a config to apply to: "
            "batchkit plugins --config FILE.yaml [OVERRIDE ...]"
        )
    if config is not None and not Path(config).is_file():
        raise ConfigError(f"batchkit plugins: config file {config!r} does not exist")
    return list_plugins(config, rest)


# -- entry point --------------------------------------------------------------------------------


def batchkit_error_in(exc: BaseException) -> BatchKitError | None:
    """The :class:`BatchKitError` ``exc`` is or was raised from (its ``__cause__`` / ``__context__``
    chain), if any: errors raised inside Lightning's fit or jsonargparse can arrive wrapped."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BatchKitError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "plugins":
            print(plugins_command(argv[1:]))
            return 0
        if argv and argv[0] in ("prepare", "mine"):
            print("\n".join(prepare_command(argv[1:])))
            return 0
        run_fit_cli(argv)
    except Exception as exc:
        error = batchkit_error_in(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
