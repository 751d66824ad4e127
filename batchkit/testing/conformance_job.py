"""The 2-process job of :class:`batchkit.testing.conformance.PluginConformance` (DDP on gloo).

    python -m batchkit.testing.conformance_job --spec SPEC.json --out DIR

Lightning re-runs this module for rank 1. Each rank writes ``DIR/rank<r>.json``: the dataset
indices of every micro-batch it trained, its number of batches per epoch, its optimizer steps and
its final parameters.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning.pytorch as pl  # noqa: E402

from batchkit.config import build_plugins  # noqa: E402
from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.testing import write_rank_record  # noqa: E402
from batchkit.testing.conformance import SampleRecorder  # noqa: E402
from batchkit.testing.conformance import load_object  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(open(args.spec).read())

    pl.seed_everything(0, workers=True)
    recorder = SampleRecorder(spec["index_field"])
    callback = BatchKitCallback([*build_plugins(spec["entries"]), recorder])
    module = load_object(spec["module_factory"])(**spec["module_kwargs"])
    loader = load_object(spec["loader_factory"])(**spec["loader_kwargs"])
    options = dict(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=spec["max_epochs"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out,
    )
    options.update(spec["trainer_kwargs"])
    trainer = pl.Trainer(callbacks=[callback], **options)
    trainer.fit(module, loader)
    write_rank_record(args.out, trainer.global_rank, {
        "seen": recorder.seen,
        "batches_per_epoch": int(trainer.num_training_batches),
        "global_step": int(trainer.global_step),
        "params": {k: v.detach().cpu().flatten().tolist() for k, v in module.named_parameters()},
    })


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
