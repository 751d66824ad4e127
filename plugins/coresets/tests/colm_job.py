"""2-process colm runs (DDP on gloo, or DeepSpeed ZeRO-2 on CPU), run by test_distributed.py.
Lightning's launcher re-runs this script for rank 1, so it is a plain script.

    python colm_job.py --strategy ddp|deepspeed --out DIR

Each rank writes OUT/rank<r>.json with one record per run: every selection (its large batch,
estimates, the global choice, what it trained), the samples training_step saw, the steps, the final
weights and the plugin's state. DDP runs: "global" (the default scope, checkpointing), "resumed"
(from the mid-epoch checkpoint of "global"), "rank" (scope rank) and "exact" (the exact estimator).
DeepSpeed: "global".
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
from colm_support import RecordingCoLM  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit_coresets.testing import SMALL_SOURCE  # noqa: E402
from batchkit_coresets.testing import SourceModule  # noqa: E402
from batchkit_coresets.testing import source_loader  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402

#: 128 samples, 2 ranks, b = 4 per rank, B = 8: 8 steps per epoch, 2 epochs
N, BATCH, EPOCHS, SAVE_AT = 128, 4, 2, 11
OPTIONS = {"small_sources": [SMALL_SOURCE], "dims": 32, "seed": 3}


def run(strategy: str, out: Path, ckpt_path: str | None = None, save_every: int | None = None, **options: object) -> dict:
    pl.seed_everything(0)
    plugin = RecordingCoLM(**{**OPTIONS, **options})
    module = SourceModule()
    callbacks: list = [BatchKitCallback([plugin])]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=EPOCHS,
        strategy="ddp" if strategy == "ddp" else CPUDeepSpeedStrategy(stage=2),
        callbacks=callbacks, logger=False, enable_checkpointing=bool(save_every),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(module, source_loader(n=N, batch_size=BATCH), ckpt_path=ckpt_path)
    state = plugin.batchkit_state_dict()["normalizer"]
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "batches_per_epoch": int(trainer.num_training_batches),
        "loader_batch_size": trainer.train_dataloader.batch_sampler.batch_size,
        "records": plugin.records,
        "seen": module.seen,
        "param_shape": list(module.get_parameter(plugin._param_name).shape),
        "moments": {"t": state["t"], "m": state["m_prev"].tolist(), "v": state["v_prev"].tolist()},
        "params": {k: v.detach().cpu().flatten().tolist() for k, v in module.state_dict().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    if args.strategy == "ddp":
        record = {"global": run("ddp", out / "global", save_every=SAVE_AT)}
        (path,) = (out / "global" / "ckpt").glob(f"*step={SAVE_AT}.ckpt")  # mid epoch 1
        record["resumed"] = run("ddp", out / "resumed", ckpt_path=str(path))
        record["rank"] = run("ddp", out / "rank", scope="rank")
        record["exact"] = run("ddp", out / "exact", estimator="exact")
    else:
        record = {"global": run("deepspeed", out / "global")}
    (out / f"rank{record['global']['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
