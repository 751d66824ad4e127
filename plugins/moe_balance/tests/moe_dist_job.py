"""The 2-process job of test_distributed.py: the tiny MoE under DDP (gloo) or DeepSpeed ZeRO-2 on
CPU, with the moe_lbl plugin; each rank writes what it saw to OUT/rank<r>.json.

    python moe_dist_job.py --strategy ddp|deepspeed --mode global|micro --accumulate N --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from tiny_moe import TinyMoE  # noqa: E402
from tiny_moe import TokenDataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from batchkit import Plugin  # noqa: E402
from batchkit import hookimpl  # noqa: E402
from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit_moe_balance import MoELoadBalancing  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402


class Recorder(Plugin):
    """Runs after moe_lbl in the loss chain and records, per micro-batch, what it computed."""

    name = "moe_recorder"
    order = 10

    def __init__(self, lbl: MoELoadBalancing) -> None:
        self.lbl = lbl
        self.micro_batches: list[dict] = []
        self.step_ends: list[int] = []

    @hookimpl
    def batchkit_transform_loss(self, loss, batch, ctx) -> None:
        self.micro_batches.append({
            "global_step": ctx.global_step, "micro_step": ctx.micro_step, "last_micro": ctx.is_last_micro_batch,
            "indices": [int(i) for i in batch[1]], "loss": float(loss.detach()),
            # the LBL term whose gradient was trained (exact: waits for the counts' all-reduce)
            "trained_lbl": float(self.lbl.coefficient * self.lbl.last_layer_losses.mean()),
            "f_counts": self.lbl.last_f_counts.tolist(), "local_counts": self.lbl.last_local_counts.tolist(),
        })

    @hookimpl
    def batchkit_step_end(self, ctx) -> None:
        self.step_ends.append(ctx.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--mode", default="global")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0)
    module = TinyMoE()
    initial = {k: v.detach().clone().tolist() for k, v in module.state_dict().items()}
    lbl = MoELoadBalancing(coefficient=1.0, mode=args.mode, router_type="TinyRouter", log_every_n_steps=1)
    recorder = Recorder(lbl)
    strategy = "ddp" if args.strategy == "ddp" else CPUDeepSpeedStrategy(stage=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=args.steps,
        accumulate_grad_batches=args.accumulate, callbacks=[BatchKitCallback([lbl, recorder])],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    # 16 sequences, batch 2 per rank: 4 micro-batches per rank per epoch.
    trainer.fit(module, DataLoader(TokenDataset(), batch_size=2, shuffle=False))
    record = {
        "rank": trainer.global_rank,
        "initial": initial,
        "final": {k: v.detach().cpu().tolist() for k, v in module.state_dict().items()},
        "micro_batches": recorder.micro_batches,
        "step_ends": recorder.step_ends,
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if "moe_lbl" in k},
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
