"""Multigrid, phase 1: the baseline it will be compared with, and what each multigrid shape costs.

    python benchmarks/multigrid_baseline.py                      # both parts (~30 min on the shared 2 cores)
    python benchmarks/multigrid_baseline.py --part shapes        # shape costs only (~2 min)
    python benchmarks/multigrid_baseline.py --part baseline --seeds 0 1 --epochs 6

Data and model: moving-digit clips (``batchkit_examples.moving_digits``: 16 x 64 x 64, label = the
class of the moving digit; 3,000 training clips, 1,000 validation clips of held-out digits) and
``MovingDigitsCNN`` (channels 16, SGD momentum 0.9, lr 0.05, weight decay 5e-4, batch 32), one CPU
thread per process (on the shared 2-core machine two intra-op threads were 5-50x slower under load).

Part ``shapes``: every (batch size, T x H x W) of the default multigrid schedule for that baseline,
measured in one process, interleaved (repeat r over all shapes), median of ``--repeats``:
* ``step``: one training step (forward, backward, SGD step) on a batch of that shape;
* ``data``: making that batch in the loader: rendering the clips (full size, as a video loader
  decodes them) and ``collate_at_size`` (stride and resize to the shape).
Per-sample costs relative to the base shape say what multigrid can save: its steps at small shapes
must be much cheaper per sample. From them, the predicted training time of the whole multigrid
schedule against the baseline's: compute only; compute + data in one process (num_workers=0);
and data in a worker on a free core (each batch costs the slower of the two).

The shape timing holds the machine's CPU lock (``/tmp/bk-cpu.lock``) exclusively, the training
runs shared, as the other benchmarks here do.

Part ``baseline``: plain Lightning training at the base shape, per seed (initialisation and
shuffle): training time per epoch (wall clock, validation excluded) and validation accuracy after
every epoch.

Writes benchmarks/results/multigrid_baseline.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_lock  # noqa: E402
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "multigrid_baseline.json"

BATCH_SIZE = 32
LR = 0.05
CHANNELS = 16
TRAIN_CLIPS, VAL_CLIPS = 3000, 1000


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)



def shape_costs(epochs: int, milestones: list[int], repeats: int, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from batchkit_examples.moving_digits import MovingDigitsCNN
    from batchkit_examples.moving_digits import load_moving_digits
    from batchkit_multigrid import MultigridSchedule
    from batchkit_multigrid import collate_at_size
    from batchkit_multigrid import input_size

    train, _ = load_moving_digits(TRAIN_CLIPS, 10)
    base = input_size(train)
    schedule = MultigridSchedule(base, epochs, milestones, base_batch_size=BATCH_SIZE)
    shapes = sorted({schedule.batch_shape(s.start_epoch, i)[:2] for s in schedule.stages for i in range(3)},
                    key=lambda bs: -bs[0])
    torch.manual_seed(0)
    model = MovingDigitsCNN(channels=CHANNELS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = {shape: collate_at_size([train[i] for i in range(shape[0])], shape[1]) for shape in shapes}

    def train_steps(shape) -> float:
        x, y = batches[shape]
        start = time.perf_counter()
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    def make_batch(shape, offset: int) -> float:
        start = time.perf_counter()
        collate_at_size([train[(offset + i) % len(train)] for i in range(shape[0])], shape[1])
        return time.perf_counter() - start

    for shape in shapes:  # warm-up
        train_steps(shape)
    step_s: dict = {s: [] for s in shapes}
    data_s: dict = {s: [] for s in shapes}
    for r in range(repeats):
        for shape in shapes:
            step_s[shape].append(train_steps(shape))
            data_s[shape].append(make_batch(shape, 97 * r))

    base_shape = (BATCH_SIZE, base)
    per_sample = {s: statistics.median(step_s[s]) / s[0] for s in shapes}
    data_per_sample = {s: statistics.median(data_s[s]) / s[0] for s in shapes}
    if base_shape not in per_sample:  # the schedule always ends at the base shape; guard anyway
        raise RuntimeError(f"the schedule has no base shape {base_shape}")
    rows = []
    for s in shapes:
        rows.append({
            "batch_size": s[0], "size": list(s[1]), "voxels_per_sample": math.prod(s[1]),
            "step_ms": 1e3 * statistics.median(step_s[s]), "step_ms_per_sample": 1e3 * per_sample[s],
            "data_ms_per_sample": 1e3 * data_per_sample[s],
            "step_cost_per_sample_vs_base": per_sample[s] / per_sample[base_shape],
            "step_time_vs_base_step": statistics.median(step_s[s]) / statistics.median(step_s[base_shape]),
        })

    # Predicted training time of the whole schedule (every stage's epochs at its short cycle), in
    # units of one baseline epoch, against the baseline's ``epochs`` epochs.
    def epoch_cost(epoch: int, data: str) -> float:
        """data: "none" (compute only), "serial" (loader in the training process, num_workers=0),
        "overlap" (loader in a worker on a free core: the slower of the two per batch)."""
        total = 0.0
        for i in range(schedule.batches_in_epoch(epoch, TRAIN_CLIPS)):
            b, size, _ = schedule.batch_shape(epoch, i)
            step, load = per_sample[(b, size)], data_per_sample[(b, size)]
            total += b * {"none": step, "serial": step + load, "overlap": max(step, load)}[data]
        return total

    base_epoch = TRAIN_CLIPS // BATCH_SIZE * BATCH_SIZE
    baseline_compute = epochs * base_epoch * per_sample[base_shape]
    baseline_with_data = epochs * base_epoch * (per_sample[base_shape] + data_per_sample[base_shape])
    baseline_overlap = epochs * base_epoch * max(per_sample[base_shape], data_per_sample[base_shape])
    mg_compute = sum(epoch_cost(e, "none") for e in range(schedule.max_epochs))
    mg_with_data = sum(epoch_cost(e, "serial") for e in range(schedule.max_epochs))
    mg_overlap = sum(epoch_cost(e, "overlap") for e in range(schedule.max_epochs))
    baseline_steps = epochs * (TRAIN_CLIPS // BATCH_SIZE)
    mg_steps = sum(schedule.batches_in_epoch(e, TRAIN_CLIPS) for e in range(schedule.max_epochs))
    return {
        "base_size": list(base), "base_batch_size": BATCH_SIZE, "baseline_epochs": epochs, "lr_milestones": milestones,
        "schedule": schedule.describe(), "multigrid_epochs": schedule.max_epochs,
        "shapes": rows,
        "prediction": {
            "baseline_steps": baseline_steps, "multigrid_steps": mg_steps,
            "baseline_train_s_compute": baseline_compute, "multigrid_train_s_compute": mg_compute,
            "speedup_compute_only": baseline_compute / mg_compute,
            "baseline_train_s_with_data": baseline_with_data, "multigrid_train_s_with_data": mg_with_data,
            "speedup_with_data_in_process": baseline_with_data / mg_with_data,
            "speedup_with_data_in_a_worker_on_a_free_core": baseline_overlap / mg_overlap,
        },
    }


def baseline_run(seed: int, epochs: int, milestones: list[int], num_workers: int) -> dict[str, Any]:
    import lightning.pytorch as pl

    from batchkit_examples.moving_digits import MovingDigitsCNN
    from batchkit_examples.moving_digits import MovingDigitsDataModule

    pl.seed_everything(seed, workers=True)
    dm = MovingDigitsDataModule(batch_size=BATCH_SIZE, num_workers=num_workers, seed=seed,
                                train_clips=TRAIN_CLIPS, val_clips=VAL_CLIPS)
    model = MovingDigitsCNN(channels=CHANNELS, lr=LR, lr_milestones=milestones)

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.epoch_s: list[float] = []
            self.val_acc: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            # validation runs before this hook in Lightning 2.x: subtract it
            self.epoch_s.append(time.perf_counter() - self._start - getattr(self, "_val_s", 0.0))
            self._val_s = 0.0

        def on_validation_epoch_start(self, trainer, module) -> None:
            self._val_start = time.perf_counter()

        def on_validation_epoch_end(self, trainer, module) -> None:
            if trainer.sanity_checking:
                return
            self._val_s = time.perf_counter() - self._val_start
            self.val_acc.append(float(trainer.callback_metrics["val/acc"]))

    clock = Clock()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[clock], deterministic=True)
    start = time.perf_counter()
    trainer.fit(model, dm)
    return {"seed": seed, "epoch_train_s": clock.epoch_s, "val_acc": clock.val_acc,
            "final_val_acc": clock.val_acc[-1], "fit_wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["shapes", "baseline", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--milestones", type=int, nargs="+", default=[7, 9])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON to update (default %(default)s)")
    args = parser.parse_args()
    reexec_with_stable_malloc()
    import torch

    torch.set_num_threads(1)
    quiet()
    out: Path = args.results
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    command = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv)
    summary = result.setdefault("summary", {})
    if args.part in ("shapes", "both"):
        with cpu_lock(exclusive=True):
            where = machine()
            costs = shape_costs(args.epochs, args.milestones, args.repeats, args.steps)
        result["shapes"] = {"command": command, "machine": where, **costs}
        print(costs["schedule"])
        for row in costs["shapes"]:
            print(f"b={row['batch_size']:>4} size={tuple(row['size'])!s:<14} step {row['step_ms']:8.1f} ms  "
                  f"per sample {row['step_ms_per_sample']:6.2f} ms (x{row['step_cost_per_sample_vs_base']:.3f} of base)  "
                  f"data {row['data_ms_per_sample']:5.2f} ms/sample")
        print(json.dumps(costs["prediction"], indent=1))
        prediction = costs["prediction"]
        summary.update({"predicted_speedup_compute_only": prediction["speedup_compute_only"],
                        "predicted_speedup_with_data_in_process": prediction["speedup_with_data_in_process"],
                        "predicted_speedup_with_data_in_a_worker": prediction["speedup_with_data_in_a_worker_on_a_free_core"]})
    if args.part in ("baseline", "both"):
        runs, where = [], machine()
        for seed in args.seeds:
            with cpu_lock(exclusive=False):
                run = baseline_run(seed, args.epochs, args.milestones, args.num_workers)
            print(f"seed {seed}: epoch s {[round(s, 1) for s in run['epoch_train_s']]} "
                  f"val/acc {[round(a, 3) for a in run['val_acc']]}", flush=True)
            runs.append(run)
        result["baseline"] = {"command": command, "machine": where, "epochs": args.epochs, "milestones": args.milestones,
                              "batch_size": BATCH_SIZE,
                              "lr": LR, "channels": CHANNELS, "num_workers": args.num_workers, "per_seed": runs}
        summary.update({
            "baseline_final_acc": statistics.mean(r["final_val_acc"] for r in runs),
            "baseline_final_acc_per_seed": [r["final_val_acc"] for r in runs],
            "baseline_epoch_s_median": statistics.median(s for r in runs for s in r["epoch_train_s"]),
        })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
