"""A 2-process training job run by the multi-process tests (DDP on gloo, DeepSpeed ZeRO-2 on CPU).

Lightning's launcher starts rank 1 by re-running this script, so it must be a plain script, not a
pytest test. Each rank writes what its recording plugin saw to ``OUT/rank<r>.json``.

    python tests/dist_job.py --strategy ddp|deepspeed --out DIR [--accumulate N] [--epochs N]
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
from helpers import IndexedDataset  # noqa: E402
from helpers import RecordingPlugin  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from typing import Any  # noqa: E402

from batchkit import Plugin  # noqa: E402
from batchkit import dist  # noqa: E402
from batchkit import hookimpl  # noqa: E402
from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402


class FailOnRank(Plugin):
    """Raises in the batch stage on one rank only, at optimizer step 3."""

    name = "fail_on_rank"

    def __init__(self, rank: int) -> None:
        self.rank = rank

    @hookimpl
    def batchkit_transform_batch(self, ctx: Any) -> None:
        if ctx.rank == self.rank and ctx.global_step == 3:
            raise RuntimeError(f"plugin failure on rank {ctx.rank}")


class DropLastBatchOnRank1(Plugin):
    """A faulty sampler plugin: gives rank 1 one batch fewer than rank 0."""

    name = "drop_on_rank1"

    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any, ctx: Any) -> Any:
        if ctx.rank != 1:
            return None
        batches = list(batch_sampler)[:-1]
        return batches  # a list of index lists is a valid (if static) batch sampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--uneven", action="store_true", help="rank 1's sampler plugin drops a batch")
    parser.add_argument("--fail-on-rank", type=int, default=None, help="this rank's plugin raises at step 3")
    args = parser.parse_args()

    from helpers import TinyModule

    pl.seed_everything(0)
    recorder = RecordingPlugin()
    plugins = [recorder]
    if args.uneven:
        plugins.append(DropLastBatchOnRank1())
    if args.fail_on_rank is not None:
        plugins.append(FailOnRank(args.fail_on_rank))
    strategy = "ddp" if args.strategy == "ddp" else CPUDeepSpeedStrategy(stage=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        callbacks=[BatchKitCallback(plugins)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # 90 samples, batch 8, 2 ranks: 45 per rank -> 6 batches each (the last one short).
    loader = DataLoader(IndexedDataset(n=90), batch_size=8, shuffle=True)
    module = TinyModule()
    trainer.fit(module, loader)
    # A collective after fit: hangs (and the test times out) if the ranks fell out of step.
    total = dist.all_reduce(torch.tensor([float(len(module.seen))]))
    rank = trainer.global_rank
    collectives = {
        "mean": dist.all_reduce(torch.tensor([float(rank)]), "mean").item(),
        "max": dist.all_reduce(torch.tensor([float(rank)]), "max").item(),
        "gather": dist.all_gather(torch.tensor([rank, 10 * rank])).tolist(),
        "gather_object": dist.all_gather_object({"rank": rank}),
        "broadcast": dist.broadcast_object(f"from rank {rank}", src=1),
        "rank_world": [dist.get_rank(), dist.get_world_size(), dist.is_distributed()],
    }
    params = {k: v.detach().cpu().tolist() for k, v in module.state_dict().items()} if args.strategy == "ddp" else {}
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "events": recorder.events,
        "seen": module.seen,
        "total_batches_all_ranks": float(total.item()),
        "params": params,
        "collectives": collectives,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
