"""The `batchkit` command, run in-process through ``batchkit.cli.main`` (what the console script
calls): overrides in both forms reach the parsed config (``--print_config``, the saved
``config.yaml``), ``batchkit plugins --config`` is a dry run that catches what ``fit`` would refuse
at setup and shows the chain tiers, and every batchkit error ends the command the same way."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from batchkit import PluginError
from batchkit.cli import main
from batchkit.cli import run_fit_cli
from batchkit.lightning import BatchKitCallback


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples/mnist_demo.yaml"
MOE = ROOT / "examples/moe_lm.yaml"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``batchkit ARGV``: exit status, stdout, stderr (jsonargparse exits through SystemExit)."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def fit_config(tmp_path: Path, plugins: str, model: str = "{class_path: cli_support.ClassifierModule}") -> Path:
    """A `batchkit fit` config for a two-step run of the tests' classifier."""
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          max_steps: 2
          limit_val_batches: 0
          enable_checkpointing: false
          enable_progress_bar: false
          enable_model_summary: false
          default_root_dir: {tmp_path}
          logger:
            class_path: lightning.pytorch.loggers.CSVLogger
            init_args: {{save_dir: {tmp_path}}}
        model: {model}
        batchkit:
          plugins:
        """) + textwrap.indent(textwrap.dedent(plugins), "    "))
    return path


# -- 1 + 2: overrides, in both forms, are part of the parsed config ------------------------------


def test_print_config_shows_dotlist_and_flag_overrides_merged_into_the_list(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["fit", "--config", str(DEMO), "batchkit.plugins.hard.delta=0.25",
                        "--batchkit.plugins.mix.alpha=0.4", "--batchkit.plugins.mix.num_classes", "12", "--print_config"], capsys)
    assert rc == 0, err
    plugins = yaml.safe_load(out)["batchkit"]["plugins"]
    # every entry is still there; only the overridden values changed
    assert plugins == {"hard": {"plugin": "hard_batches", "delta": 0.25},
                       "mix": {"plugin": "mixup", "alpha": 0.4, "num_classes": 12}}
    assert "batchkit_override" not in out


def test_a_run_uses_and_saves_the_overridden_list_and_repeats_from_its_saved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = fit_config(tmp_path, """\
        hard: {plugin: hard_batches, delta: 0.5}
        mix: {plugin: mixup, alpha: 0.2, num_classes: 3}
        """)
    cli = run_fit_cli(["fit", "--config", str(config), "batchkit.plugins.hard.delta=0.25", "--batchkit.plugins.mix.alpha=0.4"])
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, BatchKitCallback)]
    plugins = callback.host.plugins
    assert (plugins["hard"].delta, plugins["mix"].alpha) == (0.25, 0.4)
    assert cli.trainer.global_step == 2
    saved = Path(cli.trainer.log_dir) / "config.yaml"
    expected = {"hard": {"plugin": "hard_batches", "delta": 0.25}, "mix": {"plugin": "mixup", "alpha": 0.4, "num_classes": 3}}
    assert yaml.safe_load(saved.read_text())["batchkit"]["plugins"] == expected
    capsys.readouterr()
    rc, out, err = run(["fit", "--config", str(saved), "--print_config"], capsys)
    assert rc == 0, err
    assert yaml.safe_load(out)["batchkit"]["plugins"] == expected


@pytest.mark.parametrize("after", [[], ["--print_config"]])
def test_a_flag_override_without_a_value_is_refused(capsys: pytest.CaptureFixture[str], after: list[str]) -> None:
    rc, _, err = run(["fit", "--config", str(DEMO), "--batchkit.plugins.mix.alpha", *after], capsys)
    assert rc == 2
    assert err.strip() == "error: batchkit: --batchkit.plugins.mix.alpha needs a value: --batchkit.plugins.mix.alpha=VALUE (or --batchkit.plugins.mix.alpha VALUE)"


# -- 4: `batchkit plugins` ---------------------------------------------------------------------


def test_help_lists_the_plugins_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    assert "batchkit plugins [--config FILE [OVERRIDES]]" in " ".join(out.split())
    rc, out, _ = run(["plugins", "--help"], capsys)
    assert rc == 0 and out.startswith("usage: batchkit plugins [--config FILE.yaml [OVERRIDE ...]]")


@pytest.mark.parametrize("argv", [["plugins", "--config"], ["plugins", "--config", "--other"], ["plugins", "batchkit.plugins.mix.alpha=1"]])
def test_plugins_without_a_config_file_is_a_clear_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(argv, capsys)
    assert rc == 2
    assert err.startswith("error: batchkit plugins: ") and "batchkit plugins --config FILE.yaml" in err


def test_plugins_with_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["plugins", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert (rc, err.strip()) == (2, f"error: batchkit plugins: config file {str(tmp_path / 'nope.yaml')!r} does not exist")


def with_entry(tmp_path: Path, source: Path, entry: str) -> Path:
    """``source`` with one more entry under ``batchkit.plugins`` (its last section)."""
    text = source.read_text()
    assert text.rstrip().splitlines()[-1].startswith("      ")  # the file ends inside the plugin list
    path = tmp_path / source.name
    path.write_text(text.rstrip("\n") + f"\n    {entry}\n")
    return path


@pytest.mark.parametrize(
    ("entry", "messages"),
    [
        # a setup check: selective_backprop needs the module's per-sample losses
        ("sb: {plugin: selective_backprop}", ["selective_backprop: the module MoELanguageModel has no per_sample_loss(batch) method"]),
        # the optimizer chain: LAMB's split groups against the module's LambdaLR
        ("opt: {plugin: lamb, weight_decay: 0.01}", ["LambdaLR is bound to the old groups", "set exclude: false on entry 'opt'"]),
    ],
    ids=["setup-check", "optimizer-chain"],
)
@pytest.mark.parametrize("given_as", ["file", "override"])
def test_the_dry_run_catches_what_fit_would_refuse_at_setup(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str,
                                                            messages: list[str], given_as: str) -> None:
    """Both configs passed `batchkit plugins --config` before (it only built the plugins) and
    failed at `batchkit fit`; the dry run instantiates the model and runs the setup checks."""
    if given_as == "file":
        argv = ["plugins", "--config", str(with_entry(tmp_path, MOE, entry))]
    else:
        name, value = entry.split(": ", 1)
        argv = ["plugins", "--config", str(MOE), f"batchkit.plugins.{name}={value}"]
    rc, out, err = run(argv, capsys)
    assert rc == 2, out
    (error,) = [line for line in err.splitlines() if line.startswith("error: ")]  # after any warnings
    assert all(m in error for m in messages), err
    assert "Traceback" not in err


def test_a_dry_run_that_passes_reports_what_it_checked(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["plugins", "--config", str(MOE), "batchkit.plugins.opt={plugin: lamb, exclude: false}",
                        "--trainer.max_steps=10"], capsys)
    assert rc == 0, err
    text = " ".join(out.split())
    assert "setup checks of 2 plugin(s) passed against MoELanguageModel" in text
    assert "optimizer chain ['opt'] gives Lamb (2 groups); LambdaLR re-pointed" in text
    assert "opt (lamb)" in text and "lbl (moe_lbl)" in text  # the override reached the chain table


def test_chain_table_shows_tiers_and_the_list_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plugins.yaml"
    path.write_text(textwrap.dedent("""\
        batchkit:
          plugins:
            hard: {plugin: hard_batches}
            mix: {plugin: mixup}
            lbl: {plugin: moe_lbl, router_type: Router}
            sb: {plugin: selective_backprop}
        """))
    rc, out, err = run(["plugins", "--config", str(path), "batchkit.plugins.lbl.order=-100", "--batchkit.plugins.sb.enabled=false"], capsys)
    assert rc == 0, err
    chains = out[out.index("chain order for"):]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in chains.splitlines() if line.count("│") == 5]
    hook = ""
    table = []
    for row in rows:
        hook = row[0] or hook
        table.append((hook, *row[1:]))
    # order -100 sorts lbl first among the ordinary loss implementations, never before a tryfirst one
    assert [r for r in table if r[0] == "transform_loss"] == [
        ("transform_loss", "tryfirst", "0", "hard (hard_batches)"),
        ("transform_loss", "ordinary", "-100", "lbl (moe_lbl)"),
    ]
    assert [r for r in table if r[0] in ("transform_batch", "before_forward")] == [
        ("transform_batch", "ordinary", "0", "mix (mixup)"),
        ("before_forward", "ordinary", "-100", "lbl (moe_lbl)"),
    ]
    assert not any("sb" in r[3] for r in table)  # switched off by the flag-form override
    assert "sorts only within a tier" in " ".join(chains.split())

    # the trylast tier is shown too, whatever the order (multigrid wraps the batch sampler last)
    path.write_text("batchkit:\n  plugins:\n    mg: {plugin: multigrid, order: -100, baseline_epochs: 2, baseline_lr_milestones: [1]}\n")
    rc, out, err = run(["plugins", "--config", str(path)], capsys)
    assert rc == 0, err
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") == 5]
    assert ["wrap_batch_sampler", "trylast", "-100", "mg (multigrid)"] in rows
    assert ["wrap_collate", "tryfirst", "-100", "mg (multigrid)"] in rows
    assert "no `model` section, so no setup checks against a module ran" in " ".join(chains.split())


# -- 5: one error type, one message, one exit status --------------------------------------------


@pytest.fixture()
def refuser_installed(tmp_path: Path):
    """`setup_refuser` and `counting_miner` (tests/cli_support.py) installed as third-party
    plugins: entry points."""
    info = tmp_path / "site" / "cli_support_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cli-support-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[batchkit.plugins]\nsetup_refuser = cli_support:SetupRefuser\ncounting_miner = cli_support:CountingMiner\n"
    )
    sys.path.insert(0, str(info.parent))
    importlib.invalidate_caches()
    yield
    sys.path.remove(str(info.parent))
    importlib.invalidate_caches()


@pytest.mark.parametrize(
    ("plugins", "model", "message"),
    [
        # a third-party plugin's check written with ValueError
        ("bad: {plugin: setup_refuser}", "{class_path: cli_support.ClassifierModule}",
         "error: batchkit: entry 'bad' (plugin 'setup_refuser') refused the setup: setup_refuser: ClassifierModule has no frobnicator; add one"),
        # a PluginError that reaches the command wrapped in another exception
        ("bad: {plugin: setup_refuser, how: wrapped}", "{class_path: cli_support.ClassifierModule}",
         "error: setup_refuser: the wrapped refusal"),
        # a built-in plugin's PluginError
        ("sb: {plugin: selective_backprop}", "{class_path: cli_support.ClassifierModule, init_args: {per_sample: false}}",
         "error: selective_backprop: the module ClassifierModule has no per_sample_loss(batch) method"),
        # a config error
        ("mix: {plugin: mixup, enable: false}", "{class_path: cli_support.ClassifierModule}",
         "error: batchkit: entry 'mix' (plugin 'mixup'): unknown option 'enable' (did you mean the reserved key 'enabled'?)"),
        # a PluginError raised while LightningCLI instantiates the model (jsonargparse wraps it)
        ("mix: {plugin: mixup}", "{class_path: cli_support.RefusingModule}", "error: refusing_module: refused in __init__"),
    ],
    ids=["value-error", "wrapped", "plugin-error", "config-error", "wrapped-by-jsonargparse"],
)
def test_every_setup_error_ends_the_command_the_same_way(tmp_path: Path, capsys: pytest.CaptureFixture[str], refuser_installed: None,
                                                         plugins: str, model: str, message: str) -> None:
    config = fit_config(tmp_path, plugins, model=model)
    rc, _, err = run(["fit", "--config", str(config)], capsys)
    assert rc == 2
    assert err.startswith(message), err
    assert "Traceback" not in err
    # the dry run stops at the same error
    rc, _, err = run(["plugins", "--config", str(config)], capsys)
    assert rc == 2 and err.startswith(message), err


def test_a_setup_value_error_becomes_a_plugin_error_in_the_python_api_too(refuser_installed: None) -> None:
    import lightning.pytorch as pl

    from cli_support import ClassifierModule

    callback = BatchKitCallback({"bad": {"plugin": "setup_refuser"}})
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(PluginError, match=r"^batchkit: entry 'bad' \(plugin 'setup_refuser'\) refused the setup") as info:
        trainer.fit(ClassifierModule())
    assert isinstance(info.value.__cause__, ValueError)  # the original, for the traceback


def test_batchkit_error_in_finds_the_cause() -> None:
    from batchkit.cli import batchkit_error_in

    inner = PluginError("x: inner")
    try:
        try:
            raise inner
        except PluginError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as outer:
        assert batchkit_error_in(outer) is inner
    assert batchkit_error_in(RuntimeError("plain")) is None


# -- batchkit prepare (also: batchkit mine) ------------------------------------------------------


def test_prepare_fills_the_cache_once_and_fit_then_loads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             refuser_installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli_support import CountingMiner

    monkeypatch.setenv("BATCHKIT_CACHE_DIR", str(tmp_path / "cache"))
    CountingMiner.BUILDS.clear()
    config = fit_config(tmp_path, "miner: {plugin: counting_miner}")
    rc, out, _ = run(["prepare", "--config", str(config)], capsys)
    assert rc == 0 and CountingMiner.BUILDS == [3]
    assert "prepared TensorDataset (32 samples)" in out and "1 artefact(s)" in out
    rc, _, _ = run(["mine", "--config", str(config)], capsys)  # the alias; already cached
    assert rc == 0 and CountingMiner.BUILDS == [3]
    rc, _, _ = run(["fit", "--config", str(config)], capsys)
    assert rc == 0 and CountingMiner.BUILDS == [3]  # fit loaded what prepare built
    rc, _, _ = run(["prepare", "--config", str(config), "batchkit.plugins.miner.k=2"], capsys)
    assert rc == 0 and CountingMiner.BUILDS == [3, 2]  # an option changed: a new artefact
