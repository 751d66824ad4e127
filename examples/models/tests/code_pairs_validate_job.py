"""Validate a code-pairs checkpoint on 1 or 2 processes and write the held-out metrics (rank 0) to
a JSON file. Lightning's DDP launcher starts rank 1 by re-running this script, so it is a plain
script, not a pytest test.

    python code_pairs_validate_job.py CHECKPOINT OUT.json DEVICES
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl

from batchkit_examples.code_pairs import CodePairsDataModule
from batchkit_examples.code_pairs import load_reference_model
from batchkit.testing import exit_rank_job

if __name__ == "__main__":
    checkpoint, out, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = load_reference_model(checkpoint)
    # 830 held-out pairs in batches of 100: uneven shards, padded with repeats by the sampler.
    data = CodePairsDataModule(val_batch_size=100)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({k: float(v) for k, v in metrics.items()}, f)
    exit_rank_job()  # see batchkit.testing.exit_rank_job
