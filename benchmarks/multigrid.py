"""Multigrid against the baseline at the base shape: wall-clock and epochs to the baseline's final
accuracy, and final accuracy, over several seeds.

    python benchmarks/multigrid.py                               # 3 seeds, all methods (~25 min here)
    python benchmarks/multigrid.py --seeds 0 --num-workers 0     # one seed, loader in the training process
    python benchmarks/multigrid.py --report                      # tables and the plot from the JSON
    python benchmarks/multigrid.py --seeds 0 --train-clips 12000 --results benchmarks/results/multigrid_12k.json \
        --plot docs/methods/multigrid_curves_12k.png             # 4x the clips per epoch (~30 min here)

Data and model (as phase 1's baseline, ``benchmarks/multigrid_baseline.py``): moving-digit clips
(``batchkit_examples.moving_digits``: 1 x 16 x 64 x 64, label = the class of the moving digit; 3,000
training clips, 1,000 validation clips of held-out digits) and ``MovingDigitsCNN`` (channels 16,
SGD momentum 0.9, lr 0.05, weight decay 5e-4), one torch thread per process.

* ``baseline``: batch 32 at 16 x 64 x 64, 10 epochs, LR x0.1 at epochs 7 and 9 (``MultiStepLR``).
* ``multigrid``: the ``multigrid`` plugin with that baseline (``baseline_epochs: 10``,
  ``baseline_lr_milestones: [7, 9]``, the paper's default cycles): 15 epochs, the module's
  ``MultiStepLR`` at the schedule's ``module_lr_milestones`` ([11, 14]), the LR scaled by the
  long-cycle batch factor, the same DataLoader (batch 32; the plugin regroups it).
* ``multigrid_long``: the same with ``short_cycle: false`` (the long cycle alone, SlowFast's
  ``MULTIGRID.SHORT_CYCLE False``): 15 epochs, module milestones [11, 14].
* ablations (only with ``--methods``): ``multigrid_short`` (the short cycle alone) and
  ``multigrid_long_ef1`` (the long cycle alone with ``epoch_factor`` 1.0).

Both use the same DataLoader (``--num-workers``, default 1: the loader in a worker process, as video
training runs it) and validate after every epoch at the base shape. Per epoch we record the
validation accuracy and, cumulatively from the start of the fit with validation excluded, the
wall-clock time and the training thread's CPU time (the compute in the training process: forward,
backward, optimizer, and with ``--num-workers 0`` also the loader; it is what the machine's other
load disturbs least). The loader workers' CPU time is recorded per run.

For each seed the target is that seed's baseline final accuracy: the multigrid run's time to the
target is its cumulative time at the end of the first epoch whose validation accuracy reaches it.
Runs are interleaved (seed 0: baseline then multigrid; seed 1: the other way round; ...) so that
drifting load hits both methods alike. The machine's load average is recorded around every run.

Writes benchmarks/results/multigrid.json and docs/methods/multigrid_curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "multigrid.json"
PLOT = ROOT / "docs" / "methods" / "multigrid_curves.png"

BATCH_SIZE = 32
LR = 0.05
CHANNELS = 16
EPOCHS = 10
MILESTONES = [7, 9]
TRAIN_CLIPS, VAL_CLIPS = 3000, 1000
#: the multigrid configurations compared with the baseline: plugin options
VARIANTS: dict[str, dict[str, Any]] = {"multigrid": {}, "multigrid_long": {"short_cycle": False}}
#: ablations, run only when named in --methods
ABLATIONS: dict[str, dict[str, Any]] = {"multigrid_short": {"long_cycle": False},
                                        "multigrid_long_ef1": {"short_cycle": False, "epoch_factor": 1.0}}
VARIANTS.update(ABLATIONS)
DEFAULT_METHODS = ["baseline", "multigrid", "multigrid_long"]


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(method: str, seed: int, num_workers: int, train_clips: int = TRAIN_CLIPS) -> dict[str, Any]:
    import lightning.pytorch as pl

    from batchkit.lightning import BatchKitCallback
    from batchkit_examples.moving_digits import MovingDigitsCNN
    from batchkit_examples.moving_digits import MovingDigitsDataModule
    from batchkit_multigrid import MultigridPlugin

    class Clock(pl.Callback):
        """Cumulative training wall-clock and training-thread CPU time at the end of every epoch,
        from the start of the fit, validation excluded."""

        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.val_acc: list[float] = []
            self.batches: list[int] = []
            self._val_wall = self._val_cpu = 0.0

        def on_fit_start(self, trainer, module) -> None:
            self._wall0, self._cpu0 = time.perf_counter(), time.thread_time()

        def on_validation_epoch_start(self, trainer, module) -> None:
            self._v_wall, self._v_cpu = time.perf_counter(), time.thread_time()
            if not trainer.sanity_checking:
                self.wall.append(self._v_wall - self._wall0 - self._val_wall)
                self.cpu.append(self._v_cpu - self._cpu0 - self._val_cpu)
                self.batches.append(int(trainer.num_training_batches))

        def on_validation_epoch_end(self, trainer, module) -> None:
            self._val_wall += time.perf_counter() - self._v_wall
            self._val_cpu += time.thread_time() - self._v_cpu
            if not trainer.sanity_checking:
                self.val_acc.append(float(trainer.callback_metrics["val/acc"]))

    pl.seed_everything(seed, workers=True)
    dm = MovingDigitsDataModule(batch_size=BATCH_SIZE, num_workers=num_workers, seed=seed, train_clips=train_clips,
                                val_clips=VAL_CLIPS)
    clock = Clock()
    callbacks: list = [clock]
    if method == "baseline":
        max_epochs, milestones = EPOCHS, MILESTONES
    else:
        plugin = MultigridPlugin(EPOCHS, MILESTONES, **VARIANTS[method])
        schedule = plugin._make_schedule((16, 64, 64))
        max_epochs, milestones = schedule.max_epochs, schedule.module_lr_milestones
        callbacks.insert(0, BatchKitCallback([plugin]))
    model = MovingDigitsCNN(channels=CHANNELS, lr=LR, lr_milestones=milestones)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, deterministic=True)
    load_before, children_before = os.getloadavg()[0], children_cpu()
    start = time.perf_counter()
    trainer.fit(model, dm)
    return {"method": method, "seed": seed, "epochs": max_epochs, "lr_milestones": milestones,
            "steps": int(trainer.global_step), "batches_per_epoch": clock.batches,
            "val_acc": clock.val_acc, "final_acc": clock.val_acc[-1],
            "train_wall_s": clock.wall, "train_cpu_s": clock.cpu,
            "fit_wall_s": time.perf_counter() - start, "loader_workers_cpu_s": children_cpu() - children_before,
            "load_average": [load_before, os.getloadavg()[0]]}


def to_target(curve_acc: list[float], curve_time: list[float], target: float) -> tuple[int | None, float | None]:
    """(epochs, cumulative time) at the end of the first epoch whose accuracy reaches ``target``."""
    for epoch, (acc, t) in enumerate(zip(curve_acc, curve_time)):
        if acc >= target - 1e-9:
            return epoch + 1, t
    return None, None


def analyse_variant(runs: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    """Per seed and summarised: ``variant`` against the baseline of the same seed."""
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if ("baseline", r["seed"]) in by and (variant, r["seed"]) in by})
    per_seed = []
    for seed in seeds:
        base, mg = by["baseline", seed], by[variant, seed]
        target = base["final_acc"]
        epochs, wall = to_target(mg["val_acc"], mg["train_wall_s"], target)
        _, cpu = to_target(mg["val_acc"], mg["train_cpu_s"], target)
        row = {"seed": seed, "target_acc": target, "baseline_final_acc": target, "multigrid_final_acc": mg["final_acc"],
               "baseline_wall_s": base["train_wall_s"][-1], "baseline_cpu_s": base["train_cpu_s"][-1],
               "multigrid_total_wall_s": mg["train_wall_s"][-1], "multigrid_total_cpu_s": mg["train_cpu_s"][-1],
               "multigrid_epochs_to_target": epochs, "multigrid_wall_to_target_s": wall, "multigrid_cpu_to_target_s": cpu,
               "baseline_epochs_to_target": EPOCHS, "reached": epochs is not None}
        # to the target: none when the run never reached it (the full-run ratios below say what it cost)
        row["wall_clock_speedup"] = base["train_wall_s"][-1] / wall if wall is not None else None
        row["cpu_speedup"] = base["train_cpu_s"][-1] / cpu if cpu is not None else None
        row["wall_clock_speedup_full_run"] = base["train_wall_s"][-1] / mg["train_wall_s"][-1]
        row["cpu_speedup_full_run"] = base["train_cpu_s"][-1] / mg["train_cpu_s"][-1]
        per_seed.append(row)
    if not per_seed:
        return {"per_seed": [], "summary": {}}
    mean = statistics.mean
    base_acc = mean(r["baseline_final_acc"] for r in per_seed)
    mg_acc = mean(r["multigrid_final_acc"] for r in per_seed)
    common = []
    for seed in seeds:  # the same, against the mean baseline accuracy
        mg = by[variant, seed]
        e, w = to_target(mg["val_acc"], mg["train_wall_s"], base_acc)
        common.append({"seed": seed, "epochs": e, "wall_s": w})
    reached = all(r["reached"] for r in per_seed)

    def median_if_reached(key: str) -> float | None:
        return statistics.median(r[key] for r in per_seed) if reached else None

    summary = {
        "baseline_final_acc": base_acc,
        "multigrid_final_acc": mg_acc,
        "final_acc_difference_points": 100 * (mg_acc - base_acc),
        # median over seeds of the speed-up to the baseline's final accuracy; null unless every seed reached it
        "wall_clock_speedup": median_if_reached("wall_clock_speedup"),
        "wall_clock_speedup_per_seed": [r["wall_clock_speedup"] for r in per_seed],
        "cpu_speedup": median_if_reached("cpu_speedup"),
        "cpu_speedup_per_seed": [r["cpu_speedup"] for r in per_seed],
        "wall_clock_speedup_full_run": statistics.median(r["wall_clock_speedup_full_run"] for r in per_seed),
        "cpu_speedup_full_run": statistics.median(r["cpu_speedup_full_run"] for r in per_seed),
        "reached_target_per_seed": [r["reached"] for r in per_seed],
        "multigrid_epochs_to_target_per_seed": [r["multigrid_epochs_to_target"] for r in per_seed],
        "baseline_epochs": EPOCHS,
        "multigrid_epochs": by[variant, seeds[0]]["epochs"],
        "baseline_steps": by["baseline", seeds[0]]["steps"],
        "multigrid_steps": by[variant, seeds[0]]["steps"],
        "to_mean_baseline_acc": common,
        "seeds": seeds,
    }
    return {"per_seed": per_seed, "summary": summary}


def analyse(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary is the plugin's default configuration (``multigrid``); every variant's own
    figures are under ``variants``."""
    variants = {v: analyse_variant(runs, v) for v in VARIANTS if any(r["method"] == v for r in runs)}
    headline = variants.get("multigrid") or next(iter(variants.values()), {"summary": {}, "per_seed": []})
    summary = dict(headline["summary"])
    summary["variants"] = {v: a["summary"] for v, a in variants.items()}
    return {"summary": summary, "per_seed": headline["per_seed"], "variants": variants}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = {"baseline": "tab:blue", "multigrid": "tab:orange", "multigrid_long": "tab:green",
               "multigrid_short": "tab:red", "multigrid_long_ef1": "tab:purple"}
    for ax, key, label in ((axes[0], "train_wall_s", "training wall-clock (s, validation excluded)"),
                           (axes[1], "train_cpu_s", "training-thread CPU time (s)")):
        for r in runs:
            ax.plot(r[key], [100 * a for a in r["val_acc"]], marker="o", markersize=3, color=colours[r["method"]],
                    alpha=0.8, label=f"{r['method']} (seed {r['seed']})")
        baseline_final = [100 * r["final_acc"] for r in runs if r["method"] == "baseline"]
        if baseline_final:
            ax.axhline(statistics.mean(baseline_final), color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = {l.split(" (")[0]: h for h, l in zip(handles, labels)}
    axes[0].legend(unique.values(), unique.keys(), loc="lower right")
    fig.suptitle("Moving digits, MovingDigitsCNN: baseline (10 epochs at 16x64x64) vs multigrid (15 epochs; "
                 "both cycles, and the long cycle alone); dashed: mean baseline final accuracy", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(result: dict[str, Any]) -> None:
    for variant, analysis in result.get("variants", {}).items():
        print(f"== {variant}")
        for row in analysis["per_seed"]:
            reached = row["multigrid_wall_to_target_s"]
            print(f"seed {row['seed']}: baseline {100 * row['baseline_final_acc']:.1f}% in {row['baseline_wall_s']:.0f} s "
                  f"({row['baseline_cpu_s']:.0f} s CPU); {variant} {100 * row['multigrid_final_acc']:.1f}% final, "
                  + (f"reached the target at epoch {row['multigrid_epochs_to_target']} in {reached:.0f} s "
                     f"({row['multigrid_cpu_to_target_s']:.0f} s CPU)" if reached is not None else "never reached the target")
                  + f"; full run {row['wall_clock_speedup_full_run']:.2f}x faster (wall), {row['cpu_speedup_full_run']:.2f}x (CPU)")
    print(json.dumps(result.get("summary", {}), indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--train-clips", type=int, default=TRAIN_CLIPS, help="training clips (default %(default)s)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=["baseline", *VARIANTS])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--report", action="store_true", help="only print the tables and redraw the plot from the JSON")
    args = parser.parse_args()
    if args.report:
        result = json.loads(args.results.read_text())
        analysis = analyse(result["runs"])  # recomputed from the runs
        result.update(summary=analysis["summary"], per_seed=analysis["per_seed"], variants=analysis["variants"])
        args.results.write_text(json.dumps(result, indent=1) + "\n")
        report(result)
        plot(result["runs"], args.plot)
        return
    reexec_with_stable_malloc()
    import torch

    torch.set_num_threads(1)
    quiet()
    runs = []
    where = machine()
    for i, seed in enumerate(args.seeds):  # interleaved; the order turns round every seed
        order = args.methods if i % 2 == 0 else list(reversed(args.methods))
        for method in order:
            r = run(method, seed, args.num_workers, args.train_clips)
            print(f"{method} seed {seed}: acc {[round(100 * a, 1) for a in r['val_acc']]} wall {[round(t) for t in r['train_wall_s']]} "
                  f"cpu {[round(t) for t in r['train_cpu_s']]} load {r['load_average']}", flush=True)
            runs.append(r)
    analysis = analyse(runs)
    command = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv)
    result = {"summary": analysis.get("summary", {}), "command": command, "machine": where,
              "load_average_after": os.getloadavg()[0], "num_workers": args.num_workers,
              "baseline": {"epochs": EPOCHS, "lr_milestones": MILESTONES, "batch_size": BATCH_SIZE, "lr": LR,
                           "channels": CHANNELS, "train_clips": args.train_clips, "val_clips": VAL_CLIPS},
              "variant_options": {m: VARIANTS[m] for m in args.methods if m in VARIANTS}, "per_seed": analysis["per_seed"], "variants": analysis["variants"],
              "runs": runs}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    report(result)
    plot(runs, args.plot)


if __name__ == "__main__":
    main()
