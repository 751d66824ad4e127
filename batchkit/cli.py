"""The ``batchkit`` command.

``batchkit fit --config FILE.yaml [batchkit.plugins.NAME.OPTION=VALUE ...]``
    Lightning's CLI (LightningCLI / jsonargparse): ``trainer``, ``model`` and ``data`` come from the
    YAML as usual, and its ``batchkit: plugins:`` section becomes a :class:`BatchKitCallback`.
    Arguments of the form ``batchkit.…=value`` are OmegaConf dotlist overrides of that section.
    Every other subcommand and flag of LightningCLI works unchanged.

``batchkit plugins [--config FILE.yaml]``
    The installed plugins: name, version, distribution, hooks implemented and declared order; with
    ``--config``, the chain order of every hook for that plugin list.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from batchkit.config import available_plugins
from batchkit.config import build_plugins
from batchkit.config import load_config
from batchkit.config import plugin_entries
from batchkit.errors import BatchKitError
from batchkit.hookspecs import PROJECT


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``batchkit.…=value`` dotlist overrides from the arguments LightningCLI parses."""
    overrides = [a for a in argv if a.startswith("batchkit.") and "=" in a]
    return [a for a in argv if a not in overrides], overrides


def run_fit_cli(argv: list[str]) -> Any:
    from lightning.pytorch.cli import LightningCLI
    from omegaconf import OmegaConf

    from batchkit.lightning import BatchKitCallback

    args, overrides = _split_overrides(argv)

    class BatchKitCLI(LightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            parser.add_argument(
                "--batchkit",
                type=dict,
                default={},
                help="batchkit section: {plugins: {ENTRY: {plugin: NAME, OPTION: VALUE}}}",
            )

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            section = self._get(self.config, "batchkit", default={}) or {}
            cfg = OmegaConf.create({"batchkit": dict(section)})
            if overrides:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
            callback = BatchKitCallback(plugin_entries(cfg), print_summary=True)
            trainer_cfg = self._get(self.config_init, "trainer", default={}) or {}
            callbacks = list(trainer_cfg.get("callbacks") or []) + [callback]
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    # args=None lets LightningCLI read sys.argv itself (it warns when given both).
    cli_args = None if args == sys.argv[1:] else args
    return BatchKitCLI(args=cli_args, save_config_kwargs={"overwrite": True})


def _hooks_of(factory: Any) -> list[str]:
    cls = factory if inspect.isclass(factory) else None
    if cls is None:
        return ["(factory)"]
    return sorted(
        name for name, member in inspect.getmembers(cls) if name.startswith("batchkit_") and hasattr(member, f"{PROJECT}_impl")
    )


def list_plugins(config: str | None = None) -> str:
    from rich.console import Console
    from rich.table import Table

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
        if config is not None:
            from batchkit.host import PluginHost

            host = PluginHost(build_plugins(plugin_entries(load_config(config))))
            host.validate()
            chains = Table(title=f"chain order for {config} (first called first)")
            chains.add_column("hook")
            chains.add_column("plugins, in order")
            for hook, chain in host.describe().items():
                chains.add_row(hook.removeprefix("batchkit_"), " -> ".join(chain))
            console.print(chains)
    return capture.get()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "plugins":
            config = None
            if "--config" in argv:
                config = argv[argv.index("--config") + 1]
            print(list_plugins(config))
            return 0
        run_fit_cli(argv)
    except BatchKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
