"""The installed example package `batchkit-mixup` is found through the entry point and works from
YAML, from the callback and from the `batchkit` command, exactly as a third-party plugin would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from batchkit.config import available_plugins
from batchkit.lightning import BatchKitCallback

ROOT = Path(__file__).resolve().parents[1]
BATCHKIT = Path(sys.executable).with_name("batchkit")
ENV = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}


def test_mixup_is_discovered_through_its_entry_point() -> None:
    info = available_plugins()["mixup"]
    assert (info.distribution, info.value) == ("batchkit-mixup", "batchkit_mixup:MixupPlugin")
    factory = info.load()
    assert factory.__module__ == "batchkit_mixup"


def test_mixup_from_yaml_through_the_callback(tmp_path: Path) -> None:
    cfg = tmp_path / "plugins.yaml"
    cfg.write_text("batchkit:\n  plugins:\n    mix: {plugin: mixup, alpha: 1.0, num_classes: 2}\n")
    callback = BatchKitCallback.from_yaml(cfg)
    mix = callback.host.plugins["mix"]

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)
            self.targets: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            self.targets.append(y)
            return torch.nn.functional.cross_entropy(self.lin(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    module = Linear()
    pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, DataLoader(data, batch_size=8))
    # labels arrived as mixed class probabilities: rows sum to 1, values strictly between 0 and 1 somewhere
    assert all(t.dtype == torch.float32 and torch.allclose(t.sum(1), torch.ones(len(t))) for t in module.targets)
    assert any(((t > 0) & (t < 1)).any() for t in module.targets)
    assert mix.last_lambda is not None


def test_batchkit_plugins_lists_installed_plugins_and_chain_order() -> None:
    out = subprocess.run([str(BATCHKIT), "plugins", "--config", str(ROOT / "examples/mnist_demo.yaml")],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mixup" in out.stdout and "batchkit-mixup" in out.stdout and "0.1.0" in out.stdout
    assert "transform_batch" in out.stdout and "state_dict" in out.stdout
    assert "chain order" in out.stdout and "mix" in out.stdout


def test_batchkit_fit_runs_the_yaml_job_with_a_dotlist_override(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BATCHKIT), "fit", "--config", str(ROOT / "examples/mnist_demo.yaml"),
         "--trainer.max_epochs=1", "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1",
         f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
         "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "batchkit.plugins.mix.alpha=0.7"],
        capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "time in plugin hooks" in out.stdout and "transform_batch" in out.stdout
    assert "val_acc=" in out.stdout
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "batchkit/mix/lambda" in metrics


def test_batchkit_fit_reports_a_bad_option_clearly(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BATCHKIT), "fit", "--config", str(ROOT / "examples/mnist_demo.yaml"), "batchkit.plugins.mix.alhpa=0.7",
         f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "entry 'mix' (plugin 'mixup'): unknown option 'alhpa' (did you mean 'alpha'?)" in out.stderr
    assert "Traceback" not in out.stderr
