"""B3 batches against random batches on the code-pairs retrieval task (issue 14).

    flock -s /tmp/bk-cpu.lock .venv/bin/python benchmarks/contrastive_mining.py   # ~30 min on 2 shared cores
    .venv/bin/python benchmarks/contrastive_mining.py --report                    # the doc tables, from the JSON
    .venv/bin/python benchmarks/contrastive_mining.py --plot                      # the PNG, from the JSON

Task: docstring -> code retrieval on the standard library's (docstring, function) pairs
(``batchkit_examples.code_pairs``): the training split trimmed to 5,312 pairs (a multiple of
K = 32, ``train_subset_size=5312``), the 830 held-out pairs of held-out modules for the final
figures. Model: ``TwoTowerRetrieval`` (SigLIP loss, AdamW, 20 warm-up steps then constant).

Arms, all at the same number of optimizer steps in each budget (``--steps``: 100 and 300; held-out
R@1 / R@10 every ``--every`` steps; the first budget gives the summary):

* ``random64``, ``random256``: random batches of 64 and 256 (the host's shuffled loader);
* ``b3_64``: B3 batches of 64 (two whole clusters of K = 32, the ``b3`` plugin, MiniLM teacher on
  the docstrings in bfloat16, p = 30, m = 100) and ``b3_64_hn``: the same plus K_hn = 5 hard
  negatives per example (their code joins the batch's candidates in the SigLIP loss), and any
  ``--variants``.

Learning rates are tuned per arm and budget on a *development split of the training modules* (15%
of the training modules, by a salted crc32 of the module path; the held-out set is never used for a
choice): each arm trains on the rest with each rate of ``LR_GRID`` and seeds ``--tune-seeds``, and
keeps the best mean development R@1 at the last step. B3's clusters for the tuning split are mined
from the same teacher embeddings (the rows of the development modules left out). Then every arm
trains on the whole training split with seeds ``--seeds`` (0-4).

Mining is timed through the plugin's real path (``batchkit_prepare_data`` into an empty artefact
cache, 2 torch threads): teacher load, embedding, neighbours, graph, METIS, rebalance, hard
negatives, wall-clock and CPU seconds. The training runs (1 thread) then load the clusters from that
cache. ``batch_hardness`` counts, over one epoch, how many of each sample's teacher neighbours share
its batch under each batching. The machine has 2 cores shared with other engineers: wall-clock
times depend on their load (recorded), CPU seconds much less. Writes
benchmarks/results/contrastive_mining.json and docs/methods/contrastive_mining.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import retrieval_probe  # noqa: E402
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "contrastive_mining.json"
PLOT = ROOT / "docs" / "methods" / "contrastive_mining.png"
LR_GRID = [2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2]
TRAIN_SIZE = 5312
B3_COMMON = {"queries": "doc_texts", "teacher_dtype": "bfloat16", "K": 32, "p": 30, "m": 100, "progress": False}
#: name -> (batch size, b3 options or None)
ARMS: dict[str, tuple[int, dict[str, Any] | None]] = {
    "random64": (64, None),
    "random256": (256, None),
    "b3_64": (64, {}),
    "b3_64_hn": (64, {"hard_negatives": 5, "hard_negative_fields": ["code_ids"]}),
}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def is_dev_module(module: str) -> bool:
    """The development split of the training modules (for tuning only)."""
    return zlib.crc32(f"b3-dev:{module}".encode()) % 100 < 15


def b3_options(arm: str, variants: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    extra = variants.get(arm, ARMS.get(arm, (0, None))[1])
    return None if extra is None else {**B3_COMMON, **{k: v for k, v in extra.items() if k != "batch_size"}}


def batch_size_of(arm: str, variants: dict[str, dict[str, Any]]) -> int:
    return int(variants[arm].get("batch_size", 64)) if arm in variants else ARMS[arm][0]


def mine_timed(train: Any, cache_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """b3's prepare-data step on ``train`` into ``cache_dir``: the plugin's report."""
    from batchkit_contrastive_mining.plugin import B3Plugin

    from batchkit.cache import ArtifactCache
    from batchkit.host import BatchKitContext

    plugin = B3Plugin(**options)
    started = time.perf_counter()
    plugin.batchkit_prepare_data(train, ArtifactCache(cache_dir), BatchKitContext())
    return {**plugin.report, "wall_s": time.perf_counter() - started}


def train_once(train: Any, val: Any, batch_size: int, b3: dict[str, Any] | None, seed: int, steps: int, every: int,
               lr: float, cache_dir: Path) -> dict[str, Any]:
    """One run: R@1 / R@10 on ``val`` every ``every`` steps, and the training time per step."""
    import lightning.pytorch as pl
    from batchkit_contrastive_mining.plugin import B3Plugin
    from batchkit_examples.code_pairs import CodePairCollate
    from batchkit_examples.code_pairs import TwoTowerRetrieval
    from torch.utils.data import DataLoader

    from batchkit.lightning import BatchKitCallback

    pl.seed_everything(seed, verbose=False)
    model = TwoTowerRetrieval(lr=lr)
    plugins = [] if b3 is None else [B3Plugin(**b3)]
    probe = retrieval_probe()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=every,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[BatchKitCallback(plugins, cache_dir=cache_dir), probe])
    collate = CodePairCollate()
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate)
    val_loader = DataLoader(val, batch_size=512, collate_fn=collate)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)
    return {"curve": probe.curve, "ms_per_step": 1000 * probe.train_s / max(1, trainer.global_step),
            "fit_wall_s": time.perf_counter() - start, "steps": trainer.global_step}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def tuning_split(train: Any, embeddings: Any) -> tuple[Any, Any]:
    """(train minus the development modules, trimmed to a multiple of 32; the development pairs),
    each carrying ``doc_embeddings``: its rows of the full training set's teacher embeddings."""
    import numpy as np
    from batchkit_examples.code_pairs import CodePairDataset

    dev_rows = [i for i, p in enumerate(train.pairs) if is_dev_module(p.module)]
    rest = [i for i, p in enumerate(train.pairs) if not is_dev_module(p.module)]
    rest = rest[: len(rest) - len(rest) % 32]
    out = []
    for rows in (rest, dev_rows):
        part = CodePairDataset([train.pairs[i] for i in rows])
        part.doc_embeddings = np.asarray(embeddings)[rows]
        out.append(part)
    return out[0], out[1]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = results["budgets"]
    fig, axes = plt.subplots(len(budgets), 2, figsize=(10, 3.8 * len(budgets)), squeeze=False)
    for row, budget in zip(axes, budgets.values()):
        for arm, run in budget["runs"].items():
            steps = sorted(int(s) for s in run["r1_by_step"])
            for ax, key in zip(row, ("r1_by_step", "r10_by_step")):
                mean = [run[key][str(s)]["mean"] for s in steps]
                std = [run[key][str(s)]["std"] for s in steps]
                line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{arm} (lr {run['lr']:g})")
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=line.get_color(), alpha=0.15)
        for ax, name in zip(row, ("R@1", "R@10")):
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"held-out {name} ({results['dataset']['held_out']} pairs)")
            ax.set_title(f"{budget['steps']} steps, mean ± std over seeds {budget['seeds']}", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle("code_pairs docstring -> code retrieval: B3 batches vs random batches", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown_report(results: dict[str, Any]) -> str:
    """The markdown tables of docs/methods/contrastive_mining.md, from the results JSON."""
    lines = []
    for arm, mined in results["mining"].items():
        built = ", ".join(f"{k} {'built' if v else 'loaded'}" for k, v in mined["built"].items())
        lines += [f"**Mining for `{arm}`** ({built}; the times of a loaded artefact are those of its build; "
                  f"load average before {mined['load_average_before']:.1f})", "",
                  "| step | wall s | CPU s |", "|---|---:|---:|"]
        for step, sec in mined["seconds"].items():
            lines.append(f"| {step} | {sec:.2f} | {mined['cpu_seconds'][step]:.2f} |")
        lines += ["", "stats: " + json.dumps(mined["stats"]), ""]
    if "batch_hardness" in results:
        hardness = results["batch_hardness"]
        lines += [f"**Teacher neighbours per sample in its batch** (one epoch; hard: ranks [{hardness['p']}, "
                  f"{hardness['p'] + hardness['m']}), top: ranks [0, {hardness['p']}))", "",
                  "| batching | hard | top-p | random expectation (hard / top-p) |", "|---|---:|---:|---:|"]
        for name, row in hardness.items():
            if isinstance(row, dict):
                expected = (f"{row['expected_hard']:.2f} / {row['expected_top_p']:.2f}" if "expected_hard" in row
                             else "-")
                lines.append(f"| {name} | {row['hard_per_sample']:.2f} | {row['top_p_per_sample']:.2f} | {expected} |")
        lines.append("")
    for budget in results["budgets"].values():
        runs = budget["runs"]
        lines += [f"**Held-out retrieval after {budget['steps']} steps** (mean ± std over seeds {budget['seeds']})",
                  "", "| arm | batch | lr | R@1 | R@10 | ms/step |", "|---|---:|---:|---:|---:|---:|"]
        for arm, run in runs.items():
            r1, r10 = run["final_r1"], run["final_r10"]
            lines.append(f"| {arm} | {run['batch_size']} | {run['lr']:g} | {r1['mean']:.3f} ± {r1['std']:.3f} | "
                         f"{r10['mean']:.3f} ± {r10['std']:.3f} | {run['ms_per_step']['mean']:.0f} |")
        for key, name in (("r1_by_step", "R@1"), ("r10_by_step", "R@10")):
            steps = sorted({int(s) for run in runs.values() for s in run[key]})
            lines += ["", f"**Held-out {name} over steps, {budget['steps']}-step runs** (mean over seeds)", "",
                      "| step | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs)]
            for step in steps:
                cells = " | ".join(f"{run[key][str(step)]['mean']:.3f}" for run in runs.values())
                lines.append(f"| {step} | {cells} |")
        if "tuning" in budget:
            tuning = budget["tuning"]
            lines += ["", f"**Learning-rate tuning, {budget['steps']} steps** (development R@1 at the last step, "
                      f"mean of seeds {tuning['seeds']}; {tuning['train']} training / {tuning['dev']} development "
                      "pairs)", "",
                      "| arm | " + " | ".join(f"{lr:g}" for lr in tuning["lr_grid"]) + " | chosen |",
                      "|---|" + "---:|" * (len(tuning["lr_grid"]) + 1)]
            for arm, row in tuning["dev_r1"].items():
                lines.append(f"| {arm} | " + " | ".join(f"{row[f'{lr:g}']:.3f}" for lr in tuning["lr_grid"])
                             + f" | {budget['lr'][arm]:g} |")
        lines.append("")
    lines += ["summary: " + json.dumps(results["summary"])]
    return "\n".join(lines)


def parse_kv(items: list[str]) -> dict[str, float]:
    return {k: float(v) for k, v in (item.split("=", 1) for item in items)}


def batch_hardness(train: Any, cache_dir: Path, mining: dict[str, Any], batch_sizes: list[int],
                   p: int, m: int) -> dict[str, Any]:
    """How many of a sample's teacher neighbours share its batch, per batching, over one epoch.

    For sample i in batch B: ``hard`` = |R[i, p:p+m] ∩ B| (its teacher-ranked hard negatives, the
    ranks B3's graph is built from) and ``top`` = |R[i, :p] ∩ B| (the skipped top ranks: likely
    near-duplicates). Random batches of size b hold (b - 1) / (N - 1) of each, in expectation."""
    import numpy as np
    import torch
    from batchkit_contrastive_mining import top_neighbours
    from batchkit_contrastive_mining.plugin import ClusterBatchSampler

    from batchkit.cache import ArtifactCache

    cache = ArtifactCache(cache_dir)
    mined = mining.get("b3_64") or next(iter(mining.values()))
    ranks = top_neighbours(cache.load(mined["keys"]["embeddings"])["queries"], k=p + m, knn="exact")
    n = len(train)

    def count(batches: list[list[int]]) -> dict[str, float]:
        hard = top = 0
        for batch in batches:
            members = set(batch)
            for i in batch:
                hard += len(members.intersection(ranks[i, p:p + m].tolist()))
                top += len(members.intersection(ranks[i, :p].tolist()))
        seen = sum(len(b) for b in batches)
        return {"hard_per_sample": hard / seen, "top_p_per_sample": top / seen}

    out: dict[str, Any] = {"p": p, "m": m, "n": n}
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    for b in batch_sizes:
        batches = [order[j:j + b] for j in range(0, n - b + 1, b)]
        out[f"random{b}"] = {**count(batches), "expected_hard": m * (b - 1) / (n - 1),
                             "expected_top_p": p * (b - 1) / (n - 1)}
    clusters = np.asarray(cache.load(mined["keys"]["clusters"])["clusters"])
    k = clusters.shape[1]
    for b in batch_sizes:
        sampler = ClusterBatchSampler(None, clusters, clusters_per_batch=b // k, seed=0, shuffle=True)
        out[f"b3_{b}"] = count([list(batch) for batch in sampler])
    return out


def run_budget(arms: list[str], variants: dict[str, dict[str, Any]], train: Any, held: Any, steps: int, every: int,
               seeds: list[int], tune_seeds: list[int], lr_grid: list[float] | None, fixed_lr: dict[str, float],
               cache_dir: Path, embeddings: Any) -> dict[str, Any]:
    """Tune (unless ``lr_grid`` is None), then train every arm with every seed for ``steps`` steps."""
    out: dict[str, Any] = {"steps": steps, "every": every, "seeds": seeds}
    # 1. Learning rates, tuned per arm on the development split of the training modules: mean
    #    development R@1 at the last step over tune_seeds.
    chosen = {arm: fixed_lr.get(arm, 8e-3) for arm in arms}
    if lr_grid is not None:
        tune_train, dev = tuning_split(train, embeddings)
        tuning: dict[str, dict[str, float]] = {}
        for arm in arms:
            options = b3_options(arm, variants)
            if options is not None:
                options = {**options, "queries": "doc_embeddings"}
            tuning[arm] = {}
            for lr in lr_grid:
                r1 = [train_once(tune_train, dev, batch_size_of(arm, variants), options, seed, steps, steps, lr,
                                 cache_dir)["curve"][-1]["r1"] for seed in tune_seeds]
                tuning[arm][f"{lr:g}"] = statistics.fmean(r1)
                print(f"[{steps} steps, tune {arm}] lr {lr:g}: dev R@1 {statistics.fmean(r1):.3f}", flush=True)
            chosen[arm] = float(max(tuning[arm], key=lambda k: tuning[arm][k]))
        out["tuning"] = {"train": len(tune_train), "dev": len(dev), "lr_grid": lr_grid, "seeds": tune_seeds,
                         "dev_r1": tuning}
    out["lr"] = chosen

    # 2. The final runs: every arm, every seed, held-out curves.
    runs: dict[str, Any] = {}
    for arm in arms:
        per_seed = []
        for seed in seeds:
            run = train_once(train, held, batch_size_of(arm, variants), b3_options(arm, variants), seed, steps, every,
                             chosen[arm], cache_dir)
            per_seed.append({"seed": seed, **run})
            final = run["curve"][-1]
            print(f"[{steps} steps, {arm}] seed {seed}: R@1 {final['r1']:.3f} R@10 {final['r10']:.3f} "
                  f"{run['ms_per_step']:.0f} ms/step", flush=True)
        at = [point["step"] for point in per_seed[0]["curve"]]
        runs[arm] = {
            "batch_size": batch_size_of(arm, variants), "lr": chosen[arm],
            "final_r1": mean_std([r["curve"][-1]["r1"] for r in per_seed]),
            "final_r10": mean_std([r["curve"][-1]["r10"] for r in per_seed]),
            "ms_per_step": mean_std([r["ms_per_step"] for r in per_seed]),
            "r1_by_step": {str(s): mean_std([r["curve"][i]["r1"] for r in per_seed]) for i, s in enumerate(at)},
            "r10_by_step": {str(s): mean_std([r["curve"][i]["r10"] for r in per_seed]) for i, s in enumerate(at)},
            "per_seed": per_seed,
        }
    out["runs"] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 300],
                        help="budgets in optimizer steps; the first one gives the summary")
    parser.add_argument("--every", type=int, nargs="+", default=[10, 25], help="evaluation interval per budget")
    parser.add_argument("--arms", nargs="*", default=list(ARMS), help="built-in arms (none: only --variants)")
    parser.add_argument("--variants", default="{}",
                        help='extra arms as JSON: {"name": {b3 options, "batch_size": 64}}')
    parser.add_argument("--skip-tuning", action="store_true", help="use --lr (or 8e-3) instead of tuning")
    parser.add_argument("--lr", nargs="*", default=[], help="ARM=LR pairs (with --skip-tuning)")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=LR_GRID)
    parser.add_argument("--cache-dir", default=None, help="artefact cache (default: a fresh temporary directory, so "
                        "mining is timed cold)")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNG from the results JSON")
    parser.add_argument("--report", action="store_true", help="only print the markdown tables from the results JSON")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out_path = Path(args.out)
    if args.plot:
        plot(json.loads(out_path.read_text()), PLOT)
        return
    if args.report:
        print(markdown_report(json.loads(out_path.read_text())))
        return
    if len(args.every) != len(args.steps):
        parser.error("give one --every per --steps budget")
    reexec_with_stable_malloc()
    quiet()
    import torch

    variants = json.loads(args.variants)
    arms = list(dict.fromkeys(args.arms + list(variants)))
    info = machine()
    from batchkit_examples.code_pairs import code_pair_datasets

    from batchkit.cache import ArtifactCache

    tmp = tempfile.TemporaryDirectory()
    cache_dir = Path(args.cache_dir or tmp.name)
    train, held = code_pair_datasets(train_subset_size=TRAIN_SIZE)
    results: dict[str, Any] = {"machine": info, "command": " ".join(["python", *sys.argv]),
                               "dataset": {"train": len(train), "held_out": len(held)}, "arms": {}}
    for arm in arms:
        results["arms"][arm] = {"batch_size": batch_size_of(arm, variants), "b3": b3_options(arm, variants)}

    # 1. Mining, timed cold through the plugin (2 threads, the machine's cores), once per distinct option set.
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    mining: dict[str, Any] = {}
    for arm in arms:
        options = b3_options(arm, variants)
        if options is None:
            continue
        load_before = os.getloadavg()[0]
        mined = mine_timed(train, cache_dir, options)
        mined["load_average_before"] = load_before
        mining[arm] = mined
        print(f"[mining {arm}] built {mined['built']} in {mined['wall_s']:.1f} s: "
              + ", ".join(f"{k} {v:.2f}" for k, v in mined["seconds"].items()), flush=True)
    results["mining"] = mining
    torch.set_num_threads(1)
    embeddings = None
    if mining:
        results["batch_hardness"] = batch_hardness(train, cache_dir, mining, [64, 256], B3_COMMON["p"],
                                                   B3_COMMON["m"])
        print("[batch hardness] " + json.dumps(results["batch_hardness"]), flush=True)
        embeddings = ArtifactCache(cache_dir).load(next(iter(mining.values()))["keys"]["embeddings"])["queries"]

    # 2. Every budget: tuning, then the final runs.
    results["budgets"] = {}
    for steps, every in zip(args.steps, args.every):
        results["budgets"][str(steps)] = run_budget(
            arms, variants, train, held, steps, every, args.seeds, args.tune_seeds,
            None if args.skip_tuning else args.lr_grid, parse_kv(args.lr), cache_dir, embeddings)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))  # partial results survive an interruption
    results["load_average_after"] = os.getloadavg()[0]
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    first_b3 = mining.get("b3_64") or next(iter(mining.values()), None)
    # The summary holds exactly the four figures, from the first budget; every arm's R@1 /
    # R@10 (mean and std) per budget is in "budgets", the per-step mining times in "mining".
    runs = results["budgets"][str(args.steps[0])]["runs"]
    summary: dict[str, Any] = {key: runs[arm]["final_r1"]["mean"] if arm in runs else None
                               for arm, key in (("random64", "random64_r1"), ("random256", "random256_r1"),
                                                ("b3_64", "b3_64_r1"))}
    summary["mining_seconds"] = first_b3["seconds"]["total"] if first_b3 is not None else None
    results["summary"] = summary
    out_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(summary, indent=1))
    if out_path == RESULTS:
        plot(results, PLOT)


if __name__ == "__main__":
    main()
