"""2-process job for the host API (DDP on gloo, or DeepSpeed ZeRO-2 on CPU), run by
test_distributed.py: global batches from the unsharded base sampler with metadata, split across
ranks by the host, then a super-batch plugin that selects over the global super-batch; a
prepare-data artefact built once for both ranks; a loader rebuild and an lr scale from epoch 1.

    python tests/host_api_job.py --strategy ddp|deepspeed --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
from host_api_plugins import PrepareOnceScaleAndRebuild  # noqa: E402
from host_api_plugins import SelectGlobally  # noqa: E402
from host_api_plugins import TagBatches  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit.testing import IndexedDataset  # noqa: E402
from batchkit.testing import TinyModule  # noqa: E402
from batchkit.testing import write_rank_record  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402


class Module(TinyModule):
    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return super().training_step(batch[:3], batch_idx)  # drop the metadata field AppendMeta added


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pl.seed_everything(0)
    tagger, selector, prepare = TagBatches(global_batches=True), SelectGlobally(), PrepareOnceScaleAndRebuild(args.out)
    # the metadata field AppendMeta adds holds 3 numbers for the whole batch: declared shared
    callback = BatchKitCallback([tagger, selector, prepare], batch_spec={"shared": ["3"]}, cache_dir=f"{args.out}/cache")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp" if args.strategy == "ddp" else CPUDeepSpeedStrategy(stage=2),
        max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=args.out,
    )
    module = Module()
    # 64 samples, 4 per rank per step, super-batches of 2x: global batches of 16, 4 steps per epoch
    trainer.fit(module, DataLoader(IndexedDataset(n=64), batch_size=4, shuffle=True))
    write_rank_record(args.out, trainer.global_rank, {
        "seen": module.seen,
        "super_ids": selector.super_ids,
        "chosen": selector.chosen,
        "ctx_meta": tagger.ctx_meta,
        "sampler_lengths": tagger.sampler_lengths,
        "global_step": trainer.global_step,
        "train_batch_size": trainer.train_dataloader.batch_sampler.batch_size,
        "artefact_n": prepare.artefact["n"],
        "lr_in_step": prepare.lr_in_step,
        "lr_after": trainer.optimizers[0].param_groups[0]["lr"],
    })


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
