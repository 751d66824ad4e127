"""b3 with 2 processes (DeepSpeed ZeRO-2 on CPU, or DDP), run by test_distributed.py. Lightning's
launcher re-runs this script for rank 1, so it is a plain script.

    python b3_job.py --strategy deepspeed|ddp --out DIR

96 topic pairs, the cheap hashed teacher, K = 4, 8 samples per rank (global batches of 4
clusters), 2 hard negatives per sample with their ``target`` field, one DataLoader worker (so the
collate wrapper runs pickled, in a worker). Each rank writes OUT/rank<r>.json: the sample ids of
every step, the clusters, the hard negatives it received and whether their fields were the
negatives' own, how many texts its teacher embedded, the artefact keys and its step counts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from batchkit.config import build_plugins  # noqa: E402
from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit.testing import write_rank_record  # noqa: E402
from batchkit_contrastive_mining import testing  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402

EPOCHS = 2
ENTRY = {"plugin": "b3", "queries": "texts", "targets": "target_texts",
         "teacher": "batchkit_contrastive_mining.testing:hashed_bag_teacher",
         "K": 4, "p": 2, "m": 12, "hard_negatives": 2, "hard_negative_fields": ["target"], "progress": False}


class Recording(testing.TinyPairModule):
    """Also records each batch's hard negatives and checks their delivered field."""

    def __init__(self) -> None:
        super().__init__()
        self.negatives: list[list[list[int]]] = []
        self.fields_match = True
        self.dataset = testing.TopicPairs(96)

    def training_step(self, batch, batch_idx):
        ids = batch["hard_negatives"]
        self.negatives.append(ids.tolist())
        expected = self.dataset.target[ids.reshape(-1)].reshape(*ids.shape, -1)
        self.fields_match &= bool(torch.equal(batch["hard_negative_target"].cpu(), expected))
        return super().training_step(batch, batch_idx)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    pl.seed_everything(0)
    (plugin,) = build_plugins({"b3": ENTRY})
    module = Recording()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=EPOCHS,
        strategy="ddp" if args.strategy == "ddp" else CPUDeepSpeedStrategy(stage=2),
        callbacks=[BatchKitCallback([plugin], cache_dir=out / "cache")], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(module, testing.pair_loader(96, batch_size=8, num_workers=1))
    write_rank_record(out, trainer.global_rank, {
        "seen": module.seen, "negatives": module.negatives, "fields_match": module.fields_match,
        "clusters": plugin.clusters.tolist(), "keys": plugin.report["keys"], "built": plugin.report["built"],
        "teacher_texts": testing.TEACHER_CALLS[0], "global_step": trainer.global_step,
        "batches_per_epoch": int(trainer.num_training_batches), "hard_negative_steps": module.hard_negative_steps,
    })


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
