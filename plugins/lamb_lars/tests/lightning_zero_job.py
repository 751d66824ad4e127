"""2-process Lightning fits through batchkit's CPUDeepSpeedStrategy (gloo) with the ``lamb``/``lars``
plugin replacing the module's optimizer, one per case. Run by test_zero.py under torchrun, which
starts both ranks (so Lightning launches nothing and the cases share the two processes):

    torchrun --standalone --nproc_per_node 2 lightning_zero_job.py OUT_DIR CASE [CASE ...]

A case is ``<lamb|lars>_stage<S>_acc<N>``: ZeRO stage S, ``accumulate_grad_batches=N`` (N micro-
batches of PER_RANK_BATCH per rank and optimizer step, the same 160 samples in every case). Rank 0
saves the final parameters to OUT_DIR/<case>.pt.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from batchkit.testing import exit_rank_job

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


def global_batches(accumulate: int = 1):
    """What the two ranks see together at each optimizer step: DistributedSampler (no shuffle)
    deals sample i to rank i % 2, so micro-batch j covers samples 8j .. 8j+7 and optimizer step k
    those of micro-batches kN .. kN+N-1 (equal sizes: their mean loss is the batch's mean loss)."""
    x, y = dataset().tensors
    size = PER_RANK_BATCH * WORLD * accumulate
    for k in range(STEPS // accumulate):
        yield x[k * size:(k + 1) * size], y[k * size:(k + 1) * size]


def parse_case(case: str) -> tuple[str, int, int]:
    name, stage, accumulate = case.split("_")
    return name, int(stage.removeprefix("stage")), int(accumulate.removeprefix("acc"))


def main() -> None:
    import lightning.pytorch as pl
    from batchkit_lamb_lars.plugin import LambPlugin, LarsPlugin

    from batchkit.lightning import BatchKitCallback, CPUDeepSpeedStrategy

    out_dir, cases = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)

    class Module(pl.LightningModule):
        def __init__(self, lr):
            super().__init__()
            self.net = build_model()
            self.lr = lr

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            # replaced by the plugin; its lr is what the plugin inherits when lr is not given
            return torch.optim.SGD(self.parameters(), lr=self.lr)

    for case in cases:
        name, stage, accumulate = parse_case(case)
        options = dict(PLUGIN_OPTIONS[name])
        plugin = LambPlugin(**options) if name == "lamb" else LarsPlugin(**options)
        trainer = pl.Trainer(
            accelerator="cpu", devices=WORLD, strategy=CPUDeepSpeedStrategy(stage=stage), max_epochs=1,
            accumulate_grad_batches=accumulate, callbacks=[BatchKitCallback([plugin])], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        module = Module(options["lr"])
        loader = torch.utils.data.DataLoader(dataset(), batch_size=PER_RANK_BATCH, shuffle=False)
        trainer.fit(module, loader)
        assert trainer.global_step == STEPS // accumulate, trainer.global_step
        opt = trainer.strategy.deepspeed_engine.optimizer.optimizer  # ZeRO wrapper -> our optimizer
        params = list(module.net.parameters())
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):  # every rank joins
            state = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save({"params": state, "optimizer_type": type(opt).__name__}, os.path.join(out_dir, f"{case}.pt"))


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
