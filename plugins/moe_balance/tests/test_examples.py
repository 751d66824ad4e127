"""The example jobs run from the command line: examples/moe_hf.yaml (a tiny Hugging Face Mixtral
found by ``router_type: auto``) and examples/moe_lm.yaml (its progress bar), a few steps each."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BATCHKIT = Path(sys.executable).with_name("batchkit")
ENV = {**os.environ, "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def fit(config: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(BATCHKIT), "fit", "--config", str(ROOT / "examples" / config), f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.log_every_n_steps=1", *overrides],
        capture_output=True, text=True, env=ENV, timeout=600, cwd=tmp_path, check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return out


def test_moe_hf_example_trains_a_tiny_mixtral_with_the_global_lbl(tmp_path: Path) -> None:
    out = fit("moe_hf.yaml", tmp_path, "--trainer.max_steps=3", "--trainer.val_check_interval=12",
              "--trainer.limit_val_batches=1")
    assert "val_loss/code=" in out.stdout and "transform_loss" in out.stdout
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("batchkit/lbl/lbl_global_batch")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]  # logged at every optimizer step (log_every_n_steps=1)
    # both MixtralTopKRouter layers were found and balanced over the step's 4 micro-batches
    for r in rows:
        assert 1.0 <= float(r["batchkit/lbl/layer1/lbl_global_batch"]) < 4.0
        assert sum(float(r[f"batchkit/lbl/layer0/load/expert{i}"]) for i in range(8)) == pytest.approx(1.0)


def test_moe_lm_example_progress_bar_counts_micro_batches_against_the_steps(tmp_path: Path) -> None:
    out = fit("moe_lm.yaml", tmp_path, "--trainer.max_steps=2", "--trainer.val_check_interval=16",
              "--trainer.limit_val_batches=1", "--data.init_args.max_val_windows=8")
    text = out.stdout + out.stderr
    assert "Epoch 0/0" in text and "/-2" not in text
    assert "16/16" in text and "step: 2/2" in text  # 2 steps x 8 accumulated micro-batches
