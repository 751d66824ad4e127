"""2-process Lightning fit through batchkit's CPUDeepSpeedStrategy (ZeRO-2, gloo) with the
``lamb``/``lars`` plugin replacing the module's optimizer. Run by test_zero.py:

    python lightning_zero_job.py OUT_DIR lamb|lars

Lightning's launcher re-runs this script for rank 1, so it is a plain script. Rank 0 saves the
final parameters to OUT_DIR/<name>.pt.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import torch

STEPS = 20
PER_RANK_BATCH = 4
WORLD = 2
PLUGIN_OPTIONS = {
    "lamb": dict(lr=2e-2, weight_decay=0.01),
    "lars": dict(lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coeff=0.02),
}


def build_model() -> torch.nn.Module:
    torch.manual_seed(4321)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 37), torch.nn.LayerNorm(37), torch.nn.Tanh(), torch.nn.Linear(37, 29),
        torch.nn.Tanh(), torch.nn.Linear(29, 3),
    )


def dataset() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(7)
    n = STEPS * PER_RANK_BATCH * WORLD
    return torch.utils.data.TensorDataset(torch.randn(n, 13, generator=gen), torch.randn(n, 3, generator=gen))


def global_batches():
    """What the two ranks see together at each step: DistributedSampler (no shuffle) deals
    sample i to rank i % 2, so step k covers samples 8k .. 8k+7."""
    x, y = dataset().tensors
    size = PER_RANK_BATCH * WORLD
    for k in range(STEPS):
        yield x[k * size:(k + 1) * size], y[k * size:(k + 1) * size]


def main() -> None:
    import lightning.pytorch as pl
    from batchkit_lamb_lars.plugin import LambPlugin, LarsPlugin

    from batchkit.lightning import BatchKitCallback, CPUDeepSpeedStrategy

    out_dir, name = sys.argv[1], sys.argv[2]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            # replaced by the plugin; its lr is what the plugin inherits when lr is not given
            return torch.optim.SGD(self.parameters(), lr=PLUGIN_OPTIONS[name]["lr"])

    options = dict(PLUGIN_OPTIONS[name])
    plugin = LambPlugin(**options) if name == "lamb" else LarsPlugin(**options)
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, strategy=CPUDeepSpeedStrategy(stage=2), max_epochs=1,
        callbacks=[BatchKitCallback([plugin])], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    module = Module()
    loader = torch.utils.data.DataLoader(dataset(), batch_size=PER_RANK_BATCH, shuffle=False)
    trainer.fit(module, loader)
    if trainer.global_rank == 0:
        assert trainer.global_step == STEPS, trainer.global_step
        opt = trainer.strategy.deepspeed_engine.optimizer.optimizer  # ZeRO wrapper -> our optimizer
        torch.save({"params": {k: v.detach().clone() for k, v in module.net.state_dict().items()},
                    "optimizer_type": type(opt).__name__}, os.path.join(out_dir, f"{name}.pt"))


if __name__ == "__main__":
    main()
