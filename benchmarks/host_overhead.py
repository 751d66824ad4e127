"""Host overhead: a plain Lightning run versus the same run with BatchKitCallback and three
pass-through plugins implementing every hook, in one process, interleaved, median of several runs.

Step time is measured inside the training loop (from the first batch of epoch 2 to the end of the
last epoch), so Trainer construction and the first-epoch warm-up are excluded on both sides.

    python benchmarks/host_overhead.py [--repeats 7] [--epochs 4]

Writes benchmarks/results/host_overhead.json with ``overhead_ratio`` = callback step time / plain
step time (median over repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from batchkit import Plugin
from batchkit import hookimpl
from batchkit.lightning import BatchKitCallback


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class PassThrough(Plugin):
    """Implements every hook and changes nothing."""

    name = "pass_through"

    @hookimpl
    def batchkit_setup(self, host: Any) -> None: ...
    @hookimpl
    def batchkit_epoch_start(self, epoch: int) -> None: ...
    @hookimpl
    def batchkit_epoch_end(self, epoch: int) -> None: ...
    @hookimpl
    def batchkit_before_optimizer_step(self, optimizer: Any) -> None: ...
    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None: ...
    @hookimpl
    def batchkit_teardown(self, ctx: Any) -> None: ...
    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any) -> None: ...
    @hookimpl
    def batchkit_wrap_collate(self, collate_fn: Any) -> None: ...
    @hookimpl
    def batchkit_transform_batch(self, batch: Any) -> None: ...
    @hookimpl
    def batchkit_transform_loss(self, loss: Any) -> None: ...
    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer: Any) -> None: ...
    @hookimpl
    def batchkit_state_dict(self) -> dict:
        return {}
    @hookimpl
    def batchkit_load_state_dict(self, state: dict) -> None: ...


class StepTimer(pl.Callback):
    """Mean seconds per training batch from the start of epoch 2 to the end of training."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.batches = 0
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start is not None:
            self.batches += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.start

    @property
    def step_time(self) -> float:
        return self.seconds / self.batches


def run(with_batchkit: bool, data: TensorDataset, epochs: int) -> tuple[float, dict]:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    kit = None
    if with_batchkit:
        plugins = [PassThrough() for _ in range(3)]
        for i, p in enumerate(plugins):
            p._instance_name = f"pass{i}"
        kit = BatchKitCallback(plugins)
        callbacks.insert(0, kit)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(MLP(), DataLoader(data, batch_size=32, shuffle=True))
    per_plugin = kit.host.total_seconds() if kit else {}
    return timer.step_time, per_plugin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "host_overhead.json"))
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.samples, 64, generator=g), torch.randint(0, 10, (args.samples,), generator=g))
    run(False, data, 2)  # warm up both code paths once
    run(True, data, 2)
    plain, kit, ratios = [], [], []
    hook_seconds: dict = {}
    for i in range(args.repeats):
        # alternate which side goes first so drift in machine speed hits both sides alike
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {}
        for side in order:
            times[side], per_plugin = run(side, data, args.epochs)
            if side:
                hook_seconds = per_plugin
        plain.append(times[False])
        kit.append(times[True])
        ratios.append(times[True] / times[False])
        print(f"repeat {i}: plain {1e3 * times[False]:.3f} ms/step, batchkit {1e3 * times[True]:.3f} ms/step, ratio {ratios[-1]:.4f}")
    steps = (args.epochs - 1) * (args.samples // 32)
    result = {
        "overhead_ratio": statistics.median(ratios),
        "ratio_of_medians": statistics.median(kit) / statistics.median(plain),
        "plain_step_ms": 1e3 * statistics.median(plain),
        "batchkit_step_ms": 1e3 * statistics.median(kit),
        "ratios": ratios,
        "hook_ms_per_step_per_plugin": {k: 1e3 * v / (args.epochs * (args.samples // 32)) for k, v in hook_seconds.items()},
        "timed_steps_per_run": steps,
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "command": "python benchmarks/host_overhead.py " + f"--repeats {args.repeats} --epochs {args.epochs}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "ratios"}, indent=2))


if __name__ == "__main__":
    main()
