"""2-process hard-batch selection (DDP on gloo, or DeepSpeed ZeRO-2 on CPU), run by
test_distributed.py. Lightning's launcher re-runs this script for rank 1, so it is a plain script.

    python hard_batches_job.py --strategy ddp|deepspeed --out DIR [--resume]

Each rank writes OUT/rank<r>.json: the mini-batch id and local loss of every step, its shard, and
the final weights. With --resume (DDP) it also trains a second time from the mid-round checkpoint
of the first run and records that run too.
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
from hard_samples_support import LABEL_NOISE  # noqa: E402
from hard_samples_support import RecordingNet  # noqa: E402
from hard_samples_support import batch_ids  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit.testing import IndexedDataset  # noqa: E402
from batchkit_hard_samples import HardBatchSelection  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402

EPOCHS = 3


def run(args: argparse.Namespace, out: Path, ckpt_path: str | None = None, save_every: int | None = None) -> dict:
    pl.seed_everything(0)
    plugin = HardBatchSelection(delta=0.5)
    module = RecordingNet()
    callbacks: list = [BatchKitCallback([plugin])]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=EPOCHS,
        strategy="ddp" if args.strategy == "ddp" else CPUDeepSpeedStrategy(stage=2),
        callbacks=callbacks, logger=False, enable_checkpointing=bool(save_every),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    # 96 samples, 2 ranks, batch 6: 48 per rank -> M = 8 mini-batches per rank, k = 4 per round
    trainer.fit(module, DataLoader(IndexedDataset(n=96, noise=LABEL_NOISE), batch_size=6, shuffle=True), ckpt_path=ckpt_path)
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "ids": batch_ids(module.seen, plugin._partition),
        "losses": module.losses,
        "seen": module.seen,
        "shard": sorted(i for b in plugin._partition for i in b),
        "table": plugin.table.tolist(),
        "applied_upto": plugin.applied_upto,
        "params": {k: v.detach().cpu().tolist() for k, v in module.state_dict().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    record = {"full": run(args, out, save_every=10 if args.resume else None)}
    if args.resume:
        (path,) = (out / "ckpt").glob("*step=10.ckpt")  # mid round 1 (positions 8-11), mid epoch 1
        record["resumed"] = run(args, out / "resumed", ckpt_path=str(path))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{record['full']['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
