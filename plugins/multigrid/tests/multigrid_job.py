"""2-process multigrid training on clips (DDP on gloo, or DeepSpeed ZeRO-2 on CPU), run by
test_distributed.py. Lightning's launcher re-runs this script for rank 1, so it is a plain script.

    python multigrid_job.py --strategy ddp|deepspeed --out DIR

Each rank writes OUT/rank<r>.json: the input shape, learning rate and samples of every step, the
number of batches of every epoch as Lightning saw it, the step count the host planned, and the
final weights.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning.pytorch as pl  # noqa: E402

from batchkit import Plugin  # noqa: E402
from batchkit import hookimpl  # noqa: E402
from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit.testing import write_rank_record  # noqa: E402
from batchkit_multigrid import MultigridPlugin  # noqa: E402
from batchkit_multigrid.testing import TinyShapeModule  # noqa: E402
from batchkit_multigrid.testing import clip_loader  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402


class EpochLengths(Plugin):
    name = "epoch_lengths"

    def __init__(self) -> None:
        self.lengths: list[int] = []

    @hookimpl
    def batchkit_epoch_start(self, ctx) -> None:
        self.lengths.append(int(ctx.trainer.num_training_batches))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    lengths = EpochLengths()
    callback = BatchKitCallback([MultigridPlugin(2, [1]), lengths])
    module = TinyShapeModule(clips=True, milestones=[2], record=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=3,
        strategy="ddp" if args.strategy == "ddp" else CPUDeepSpeedStrategy(stage=2),
        callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=args.out,
    )
    # 96 clips (1, 8, 16, 16), b = 2: 48 per rank
    trainer.fit(module, clip_loader(n=96, batch_size=2))
    write_rank_record(args.out, trainer.global_rank, {
        "shapes": module.shapes, "lr_in_step": module.lr_in_step, "seen": module.seen,
        "epoch_lengths": lengths.lengths, "total_steps": callback.host.ctx.total_steps,
        "global_step": trainer.global_step,
        "weights": {k: v.detach().cpu().flatten().tolist() for k, v in module.named_parameters()},
    })


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
