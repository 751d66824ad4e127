"""2-process runs of ``jest`` and ``cabs`` (DDP on gloo, or DeepSpeed ZeRO-2 on CPU), run by
test_distributed.py. Lightning's launcher re-runs this script for rank 1, so it is a plain script.

    python joint_selection_job.py --strategy ddp|deepspeed --out DIR [--resume]

Each rank writes OUT/rank<r>.json with, for each run: every step's super-batch (dataset ids, and
concepts for cabs), the global choice jest's selection reported on this rank, the dataset ids this
rank trained, and the final weights. With --resume, jest is also trained a second time from its
mid-epoch checkpoint (step 8 of 12; 6 steps per epoch).
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
from joint_support import REFERENCE  # noqa: E402
from joint_support import BeforeForward  # noqa: E402
from joint_support import SuperBatchRecorder  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from batchkit.lightning import BatchKitCallback  # noqa: E402
from batchkit.lightning import CPUDeepSpeedStrategy  # noqa: E402
from batchkit_joint_selection import CABSSelection  # noqa: E402
from batchkit_joint_selection import JESTSelection  # noqa: E402
from batchkit_joint_selection.testing import TinyTwoTower  # noqa: E402
from batchkit_joint_selection.testing import pair_loader  # noqa: E402
from batchkit.testing import exit_rank_job  # noqa: E402

EPOCHS = 2
RESUME_STEP = 8


def run(plugin_name: str, args: argparse.Namespace, out: Path, ckpt_path: str | None = None,
        save_every: int | None = None) -> dict:
    pl.seed_everything(0)
    if plugin_name == "jest":
        plugin = JESTSelection(reference=REFERENCE, reference_kwargs={"train_steps": 50}, n_chunks=4)
    else:
        plugin = CABSSelection(max_freq=3)
    recorder = SuperBatchRecorder()
    chosen: list[list[int]] = []
    trained: list[list[int]] = []

    def after(batch, module, ctx):  # the batch training_step receives
        trained.append(batch["index"].tolist())
        if plugin_name == "jest":
            chosen.append(plugin.last_chosen.tolist())

    callbacks: list = [BatchKitCallback([recorder, plugin, BeforeForward(after)])]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=EPOCHS,
        strategy="ddp" if args.strategy == "ddp" else CPUDeepSpeedStrategy(stage=2),
        callbacks=callbacks, logger=False, enable_checkpointing=bool(save_every),
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    module = TinyTwoTower()
    # 480 pairs, 2 ranks: 240 per rank, super-batches of 40 (b = 8, f = 0.8): 6 steps per epoch
    trainer.fit(module, pair_loader(n=480, batch_size=8), ckpt_path=ckpt_path)
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "batches_per_epoch": int(trainer.num_training_batches),
        "super_ids": recorder.ids,
        "super_concepts": recorder.concepts,
        "steps": recorder.steps,
        "chosen": chosen,
        "trained": trained,
        "state": {k: v for k, v in plugin.batchkit_state_dict().items() if k != "reference_cache"},
        "params": {k: v.detach().cpu().flatten().tolist() for k, v in module.state_dict().items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    record = {"jest": run("jest", args, out / "jest", save_every=RESUME_STEP if args.resume else None)}
    if args.resume:
        (path,) = (out / "jest" / "ckpt").glob(f"*step={RESUME_STEP}.ckpt")
        record["jest_resumed"] = run("jest", args, out / "jest_resumed", ckpt_path=str(path))
    record["cabs"] = run("cabs", args, out / "cabs")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{record['jest']['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
    exit_rank_job()  # see batchkit.testing.exit_rank_job: no teardown abort after the record is written
