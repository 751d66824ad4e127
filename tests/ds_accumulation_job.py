"""One SGD step with gradient accumulation through Lightning, for many strategies in one launch.

Run under torchrun with 2 processes (test_deepspeed_accumulation.py does)::

    torchrun --standalone --nproc_per_node 2 tests/ds_accumulation_job.py OUT_DIR

torchrun starts both ranks, so Lightning launches nothing and every case below runs in the same
two processes, one ``Trainer.fit`` after another (the process group outlives each fit). Each case
trains ``Linear(4, 1)`` with MSE and plain SGD (lr 0.1) for one optimizer step over
``accumulate`` micro-batches of 2 samples per rank; rank 0 writes the weights before and after
each case to ``OUT_DIR/updates.json``, and what Lightning logged to ``OUT_DIR/log.txt``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402

from batchkit import deepspeed_compat  # noqa: E402
from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402

MICRO_BATCH = 2
LR = 0.1


def dataset(accumulate: int) -> torch.utils.data.TensorDataset:
    """2 ranks x ``accumulate`` micro-batches x MICRO_BATCH samples (the same for every N)."""
    gen = torch.Generator().manual_seed(11)
    n = 2 * accumulate * MICRO_BATCH
    return torch.utils.data.TensorDataset(torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen))


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class UncorrectedDeepSpeed(CPUDeepSpeedStrategy):
    """Lightning's own DeepSpeedStrategy as it runs on a GPU (no batchkit correction), on CPU."""

    batchkit_corrects_gas_scaling = False
    backward = DeepSpeedStrategy.backward


def run(strategy, accumulate: int, callbacks=()) -> dict:
    module = Regression()
    before = {k: v.detach().clone().reshape(-1).tolist() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=1, accumulate_grad_batches=accumulate,
        callbacks=list(callbacks), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(dataset(accumulate), batch_size=MICRO_BATCH, shuffle=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 1, trainer.global_step
    params = list(module.parameters())
    stage3 = isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
    if stage3:  # ZeRO-3 keeps 1/world of each parameter per rank: gather them (both ranks join)
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            after = {k: v.detach().clone().reshape(-1).tolist() for k, v in module.state_dict().items()}
    else:
        after = {k: v.detach().clone().reshape(-1).tolist() for k, v in module.state_dict().items()}
    return {"accumulate": accumulate, "before": before, "after": after}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    log_file = out / f"log{os.environ.get('RANK', '0')}.txt"
    handler = logging.FileHandler(log_file)
    logging.getLogger("lightning.pytorch").addHandler(handler)  # it does not propagate
    results = {}
    for stage in (1, 2, 3):
        for n in (1, 2, 4):
            results[f"deepspeed_stage{stage}_n{n}"] = run(CPUDeepSpeedStrategy(stage=stage), n)
    # Lightning's strategy without batchkit's correction: alone (the bug), and with the callback
    results["uncorrected_stage2_n4"] = run(UncorrectedDeepSpeed(stage=2), 4)
    results["callback_stage2_n4"] = run(UncorrectedDeepSpeed(stage=2), 4, [BatchKitCallback([])])
    os.environ[deepspeed_compat.ENV_VAR] = "0"  # the opt-out
    results["opted_out_stage2_n2"] = run(CPUDeepSpeedStrategy(stage=2), 2)
    del os.environ[deepspeed_compat.ENV_VAR]
    results["ddp_n4"] = run("ddp", 4)
    handler.flush()
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "updates.json").write_text(json.dumps(results))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
