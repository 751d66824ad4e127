"""JEST and CABS against uniform batches on the code-pairs example, at equal examples trained.

    .venv/bin/python benchmarks/joint_selection.py                # 16 min on 2 shared cores (takes the CPU lock itself)
    .venv/bin/python benchmarks/joint_selection.py --diagnostics  # 2 min: adds two uniform diagnostics to the JSON
    .venv/bin/python benchmarks/joint_selection.py --report       # tables and the plot, from the JSON

Task: docstring -> code retrieval on the Python standard library's (docstring, function) pairs
(``batchkit_examples.code_pairs``), trained on the 30%-noisy training split (5,324 pairs, a fixed
30% paired with another function's code), held-out R@1 / R@10 over the 830 pairs of held-out
modules. Model: ``TwoTowerRetrieval`` (SigLIP loss, AdamW, 20 warm-up steps then constant lr).
Every method trains b = 64 examples per step for 300 steps (19,200 examples); the selection
methods load super-batches of B = 320 (f = 0.8) and keep 64.

Methods (all through ``BatchKitCallback``, one torch thread):

* ``uniform``: random batches of 64 (no plugin);
* ``topk``: ``jest`` with ``selection: independent_topk`` (per-example learnability, the paper's
  comparison); ``jest``: ``jest`` (learnability, joint blocked sampling, 16 chunks);
* ``cabs_dm``, ``cabs_fm``: ``cabs`` on the example's concepts (``mod:`` / ``call:`` names of the code side).

JEST's reference is the example's recipe (``train_reference_model``): the same architecture, 300
steps at batch 64, lr 1e-3, on 1,000 clean pairs of the training split.

**Tuned equally, not on the held-out set.** Each method picks its lr from ``LR_GRID`` by its final
R@1 on a *tuning split of the training modules* (``crc32("tune/" + module) % 100 < 15`` of the
training modules are set aside as a clean tuning set; the rest, 30%-noisy, is trained on; the
tuning reference is trained on 1,000 clean pairs of that rest). Seed 0, the full 300 steps.

**Then** 3 seeds per method (the seed sets initialisation, order and draws; the noisy set is
fixed), held-out R@1 / R@10 every ``--every`` steps, and:

* iterations to reach uniform's final R@1 (the mean over seeds of uniform's R@1 at the last step),
  read off each method's mean curve (and per seed); ``jest_iterations_vs_uniform`` = JEST's
  iterations / uniform's own;
* the levers on JEST when it misses the goal: the filter ratio (f = 0.5, 0.9) and a stronger
  reference (4,000 clean pairs, lr 2e-3), each with 3 seeds; the JEST variants easy-reference and
  hard-learner with one seed; for every run, the share of corrupted pairs trained and how many
  distinct examples were trained;
* ``--diagnostics`` (afterwards, into the same JSON): uniform batches on the clean pairs only (an
  oracle noise filter) and on a random subset as large as JEST's coverage;
* the scoring overhead per step: forward FLOPs of JEST's scoring pass against the training step's
  (``torch.utils.flop_counter.FlopCounterMode`` with formulas for the towers' ``EmbeddingBag``;
  independent of the machine's load), and the training step's thread CPU time (batch stage included) of each
  method against uniform, the methods interleaved, median over steps and repeats, and the plugins'
  own hook time. The training runs hold the machine's CPU lock (``/tmp/bk-cpu.lock``) shared; the
  timing asks for it exclusively but goes on without it after ``--lock-wait`` seconds (other
  engineers' jobs hold it most of the time), and the JSON says whether it got it.

Writes benchmarks/results/joint_selection.json and docs/methods/joint_selection_curves.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_lock  # noqa: E402
from _common import retrieval_probe  # noqa: E402
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "joint_selection.json"
PLOT = ROOT / "docs" / "methods" / "joint_selection_curves.png"
LR_GRID = [2e-3, 4e-3, 8e-3]  # a first pass with [4e-3, 8e-3, 1.6e-2]: every method chose 4e-3 and did worst at 1.6e-2
BATCH, NOISE, FILTER = 64, 0.3, 0.8
METHODS = ("uniform", "topk", "jest", "cabs_dm", "cabs_fm")


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -------------------------------------------------------------------------------------------------
# Data and references
# -------------------------------------------------------------------------------------------------


def is_tuning_module(module: str) -> bool:
    return zlib.crc32(f"tune/{module}".encode()) % 100 < 15


def datasets(split: str) -> tuple[Any, Any, list[Any]]:
    """(noisy training set, clean evaluation set, the clean pairs the reference may use)."""
    from batchkit_examples.code_pairs import CodePairDataset
    from batchkit_examples.code_pairs import code_pair_datasets
    from batchkit_examples.code_pairs import noisy_code_assignment
    from batchkit_examples.code_pairs import split_pairs
    from batchkit_examples.code_pairs import stdlib_pairs

    if split == "final":
        train, held = code_pair_datasets(noise_fraction=NOISE, seed=0)
        return train, held, train.pairs
    train_pairs, _ = split_pairs(stdlib_pairs())  # the held-out modules are never touched here
    fit_pairs = [p for p in train_pairs if not is_tuning_module(p.module)]
    tune_pairs = [p for p in train_pairs if is_tuning_module(p.module)]
    noisy_fit = CodePairDataset(fit_pairs, noisy_code_assignment(len(fit_pairs), NOISE, 0))
    return noisy_fit, CodePairDataset(tune_pairs), fit_pairs


class PairsData:
    """A LightningDataModule-like pair of loaders over given datasets (the example's collate)."""

    def __init__(self, train: Any, val: Any) -> None:
        self.train, self.val = train, val

    def module(self) -> Any:
        import lightning.pytorch as pl
        from batchkit_examples.code_pairs import CodePairCollate
        from torch.utils.data import DataLoader

        train, val = self.train, self.val

        class Data(pl.LightningDataModule):
            def train_dataloader(self) -> DataLoader:
                return DataLoader(train, batch_size=BATCH, shuffle=True, drop_last=True, collate_fn=CodePairCollate())

            def val_dataloader(self) -> DataLoader:
                return DataLoader(val, batch_size=512, collate_fn=CodePairCollate())

        return Data()


def train_reference(pairs: list[Any], size: int, path: Path, lr: float, steps: int = 300,
                    seed: int = 0) -> dict[str, Any]:
    """JEST's reference: the example's recipe (same architecture, ``size`` clean pairs picked by
    ``np.random.default_rng(1)``, as ``code_pair_datasets(train_subset_size=...)`` does, batch 64)."""
    import lightning.pytorch as pl
    import numpy as np
    from batchkit_examples.code_pairs import CodePairDataset
    from batchkit_examples.code_pairs import TwoTowerRetrieval

    keep = np.sort(np.random.default_rng(1).permutation(len(pairs))[:size])
    clean = CodePairDataset([pairs[i] for i in keep])
    pl.seed_everything(seed, verbose=False)
    model = TwoTowerRetrieval(lr=lr)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=PairsData(clean, clean).module())
    trainer.save_checkpoint(path)
    return {"clean_pairs": size, "lr": lr, "steps": steps, "train_s": time.perf_counter() - start}


def reference_quality(path: Path, noisy_train: Any, held: Any) -> dict[str, float]:
    """The reference's own R@1 / R@10 on the evaluation set and how well its pair loss l_ii flags
    the corrupted training pairs (ROC AUC)."""
    import torch
    from batchkit_examples.code_pairs import CodePairCollate
    from batchkit_examples.code_pairs import load_reference_model
    from batchkit_examples.code_pairs import retrieval_recall
    from batchkit_examples.code_pairs import siglip_logits

    ref = load_reference_model(path)
    collate = CodePairCollate()
    with torch.no_grad():
        a, b = ref.pair_embeddings(collate([held[i] for i in range(len(held))]))
        recall = retrieval_recall(a, b)
        losses = []
        for s in range(0, len(noisy_train), 512):
            batch = collate([noisy_train[i] for i in range(s, min(len(noisy_train), s + 512))])
            a, b = ref.pair_embeddings(batch)
            losses += (-torch.nn.functional.logsigmoid(siglip_logits(a, b, ref.siglip_temperature,
                                                                      ref.siglip_bias).diagonal())).tolist()
    scores, noisy = torch.tensor(losses), noisy_train.noisy
    pos, neg = scores[noisy], scores[~noisy]
    auc = float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())
    return {"r1": recall[1], "r10": recall[10], "noisy_pair_auc": auc}


# -------------------------------------------------------------------------------------------------
# One run
# -------------------------------------------------------------------------------------------------


def entries_for(method: str, reference: Path | None, filter_ratio: float = FILTER,
                variant: str = "learnability") -> dict:
    if method == "uniform":
        return {}
    if method in ("jest", "topk"):
        return {"jest": {"plugin": "jest", "reference": str(reference), "filter_ratio": filter_ratio,
                         "variant": variant,
                         "selection": "joint" if method == "jest" else "independent_topk",
                         **({"reference": None} if variant == "hard_learner" else {})}}
    if method in ("cabs_dm", "cabs_fm"):
        return {"cabs": {"plugin": "cabs", "variant": method[-2:], "filter_ratio": filter_ratio}}
    raise ValueError(method)


def train_once(entries: dict, data: PairsData, seed: int, lr: float, steps: int, every: int) -> dict[str, Any]:
    """One run: the evaluation curve, step times, what was trained."""
    import lightning.pytorch as pl
    from batchkit_examples.code_pairs import TwoTowerRetrieval

    from batchkit import Plugin
    from batchkit import hookimpl
    from batchkit.config import build_plugins
    from batchkit.lightning import BatchKitCallback

    class Trained(Plugin):
        """What training_step received: dataset ids and corrupted flags."""

        name = "trained_recorder"

        def __init__(self) -> None:
            self.ids: list[int] = []
            self.noisy = 0

        @hookimpl
        def batchkit_before_forward(self, batch: Any) -> None:
            self.ids += batch["index"].tolist()
            self.noisy += int(batch["noisy"].sum())

    pl.seed_everything(seed, verbose=False)
    plugins = build_plugins(entries)
    recorder, probe = Trained(), retrieval_probe()
    callback = BatchKitCallback([*plugins, recorder], time_hooks=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=every,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback, probe])
    start = time.perf_counter()
    trainer.fit(TwoTowerRetrieval(lr=lr), datamodule=data.module())
    timings = callback.host.timings()
    hook_s = sum(t["batchkit_transform_batch"]["total_s"] for name, t in timings.items()
                 if name != "trained_recorder" and "batchkit_transform_batch" in t)
    hook_ms = hook_s * 1000 / max(1, trainer.global_step)
    out: dict[str, Any] = {
        "curve": probe.curve, "steps": trainer.global_step, "fit_wall_s": time.perf_counter() - start,
        "ms_per_step": 1000 * statistics.median(probe.wall), "cpu_ms_per_step": 1000 * statistics.median(probe.cpu),
        "selection_ms_per_step": hook_ms, "trained_examples": len(recorder.ids),
        "distinct_trained": len(set(recorder.ids)), "noisy_share": recorder.noisy / max(1, len(recorder.ids)),
    }
    for plugin in plugins:
        if hasattr(plugin, "greedy"):
            picks = plugin.greedy + plugin.random_fill + plugin.over_cap
            out["cabs_greedy_share"] = plugin.greedy / max(1, picks)
    return out


# -------------------------------------------------------------------------------------------------
# Reading the curves
# -------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def mean_curve(runs: list[dict[str, Any]], key: str = "r1") -> list[tuple[int, float]]:
    return [(p["step"], statistics.fmean(r["curve"][i][key] for r in runs)) for i, p in enumerate(runs[0]["curve"])]


def first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated step whose R@1 is at least ``target`` (None: never within the run)."""
    return next((step for step, value in curve if value >= target - 1e-9), None)


def summarise(method_runs: list[dict[str, Any]], target: float) -> dict[str, Any]:
    finals = [r["curve"][-1] for r in method_runs]
    per_seed = [first_reach([(p["step"], p["r1"]) for p in r["curve"]], target) for r in method_runs]
    return {
        "final_r1": mean_std([f["r1"] for f in finals]), "final_r10": mean_std([f["r10"] for f in finals]),
        "mean_r1_over_run": statistics.fmean(v for _, v in mean_curve(method_runs)),
        "r1_by_step": {str(s): v for s, v in mean_curve(method_runs)},
        "r10_by_step": {str(s): v for s, v in mean_curve(method_runs, "r10")},
        "iterations_to_uniform_final": first_reach(mean_curve(method_runs), target),
        "iterations_to_uniform_final_per_seed": per_seed,
        "ms_per_step": mean_std([r["ms_per_step"] for r in method_runs]),
        "selection_ms_per_step": mean_std([r["selection_ms_per_step"] for r in method_runs]),
        "noisy_share": mean_std([r["noisy_share"] for r in method_runs]),
        "distinct_trained": mean_std([r["distinct_trained"] for r in method_runs]),
        **({"cabs_greedy_share": mean_std([r["cabs_greedy_share"] for r in method_runs])}
           if "cabs_greedy_share" in method_runs[0] else {}),
    }


# -------------------------------------------------------------------------------------------------
# Overhead: step CPU time, interleaved, under the exclusive lock
# -------------------------------------------------------------------------------------------------


def overhead(data: PairsData, reference: Path, lrs: dict[str, float], steps: int, repeats: int,
             lock_wait: float) -> dict[str, Any]:
    """Each method's training-step thread CPU time (batch stage included), ``steps`` steps, the
    methods interleaved (ABCDE / EDCBA), ``repeats`` times; median per step over everything."""
    per_method: dict[str, list[float]] = {m: [] for m in METHODS}
    hook: dict[str, list[float]] = {m: [] for m in METHODS}
    with cpu_lock(exclusive=True, wait_s=lock_wait) as locked:
        start = time.perf_counter()
        for r in range(repeats):
            for method in METHODS if r % 2 == 0 else reversed(METHODS):
                run = train_once(entries_for(method, reference), data, 100 + r, lrs[method], steps, steps)
                per_method[method].append(run["cpu_ms_per_step"])
                hook[method].append(run["selection_ms_per_step"])
        wall = time.perf_counter() - start
    base = statistics.median(per_method["uniform"])
    return {
        "exclusive_lock": locked, "steps": steps, "repeats": repeats, "wall_s": wall,
        "cpu_ms_per_step": {m: statistics.median(v) for m, v in per_method.items()},
        "cpu_ms_per_step_runs": per_method,
        "vs_uniform": {m: statistics.median(v) / base for m, v in per_method.items()},
        "selection_hook_ms_per_step": {m: statistics.median(v) for m, v in hook.items()},
        "load_average_after": os.getloadavg()[0],
    }


# -------------------------------------------------------------------------------------------------
# Diagnostics: what JEST's selection changes, with uniform batches
# -------------------------------------------------------------------------------------------------


def diagnostics(out: dict[str, Any], every: int) -> dict[str, Any]:
    """Uniform batches of b, uniform's learning rate, the same seeds and steps, on two subsets of
    the noisy training set: ``clean_pairs_only`` (the 70% correctly paired: a perfect noise filter,
    every clean example covered) and ``random_subset_jest_size`` (a random subset, 30% noisy, as
    large as the distinct examples JEST trained). They separate what removing corrupted pairs is
    worth from what covering fewer examples costs."""
    import numpy as np
    from torch.utils.data import Subset

    train, held, _ = datasets("final")
    noisy = np.asarray(train.noisy)
    size = round(out["summary_by_method"]["jest"]["distinct_trained"]["mean"])
    subsets = {"clean_pairs_only": np.flatnonzero(~noisy),
               "random_subset_jest_size": np.sort(np.random.default_rng(2).permutation(len(train))[:size])}
    target, lr, runs = out["summary"]["uniform_final_r1"], out["lr"]["uniform"], {}
    started = time.perf_counter()
    for name, ids in subsets.items():
        per_seed = []
        for seed in out["seeds"]:
            run = train_once({}, PairsData(Subset(train, ids.tolist()), held), seed, lr, out["steps"], every)
            per_seed.append({"seed": seed, **run})
            print(f"[{time.perf_counter() - started:5.0f} s] {name} seed {seed}: R@1 {run['curve'][-1]['r1']:.3f}",
                  flush=True)
        runs[name] = {"examples": len(ids), "lr": lr, "per_seed": per_seed, "summary": summarise(per_seed, target)}
    return {"what": diagnostics.__doc__, "runs": runs, "machine": machine()}


# -------------------------------------------------------------------------------------------------
# Overhead: forward FLOPs of the scoring pass (independent of the machine's load)
# -------------------------------------------------------------------------------------------------


def _embedding_bag_flops(weight: Any, indices: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """A weighted-sum bag: one multiply (by the per-sample weight) and one add per index and dimension."""
    return 2 * _numel(indices) * weight[1]


def _embedding_bag_backward_flops(grad: Any, indices: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """The weight gradient of a weighted bag: grad row times the index's weight, added into its row."""
    return 2 * _numel(indices) * grad[1]


def _per_sample_weights_backward_flops(grad: Any, weight: Any, indices: Any, *args: Any, out_shape: Any = None,
                                       **kwargs: Any) -> int:
    """d loss / d w_t: a dot product of the bag's gradient row with the token's vector, per index."""
    return 2 * _numel(indices) * grad[1]


def _numel(shape: Any) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts the towers' ``EmbeddingBag`` (it counts matrix products
    only by default, and the code-pairs towers are bags of token vectors); lookups and element-wise
    ops count 0, as ``FlopCounterMode`` counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._embedding_bag: _embedding_bag_flops, aten._embedding_bag_forward_only: _embedding_bag_flops,
        aten._embedding_bag_backward: _embedding_bag_backward_flops,
        aten._embedding_bag_per_sample_weights_backward: _per_sample_weights_backward_flops})


def scoring_flops(train: Any, reference: Path, repeats: int = 5) -> dict[str, Any]:
    """Per optimizer step, the mean over ``repeats`` random super-batches of the training set:
    JEST's scoring pass (the learner's embeddings of the B = b / (1 - f) super-batch, both models'
    B x B SigLIP loss matrices, S and the blocked draw; the reference's embeddings, which the
    plugin caches per example, counted apart) against the training step on the b kept
    (forward, and forward + backward)."""
    import torch
    from batchkit_examples.code_pairs import CodePairCollate
    from batchkit_examples.code_pairs import TwoTowerRetrieval
    from batchkit_examples.code_pairs import load_reference_model
    from batchkit_joint_selection.jest import joint_sample
    from batchkit_joint_selection.jest import learnability_matrix
    from batchkit_joint_selection.jest import siglip_pair_losses

    super_size = round(BATCH / (1 - FILTER))
    collate, rng = CodePairCollate(), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    learner, ref = TwoTowerRetrieval(), load_reference_model(reference)
    totals: dict[str, list[int]] = {k: [] for k in ("learner_forward", "reference_forward", "matrices_and_draw",
                                                     "train_forward", "train_forward_backward")}
    for _ in range(repeats):
        ids = torch.randperm(len(train), generator=rng)[:super_size].tolist()
        super_batch = collate([train[i] for i in ids])
        kept = collate([train[i] for i in ids[:BATCH]])
        with torch.no_grad():
            with flop_counter() as c:
                la, lb = learner.pair_embeddings(super_batch)
            totals["learner_forward"].append(c.get_total_flops())
            with flop_counter() as c:
                ra, rb = ref.pair_embeddings(super_batch)
            totals["reference_forward"].append(c.get_total_flops())
            with flop_counter() as c:
                scores = learnability_matrix(
                    siglip_pair_losses(la, lb, float(learner.siglip_temperature), float(learner.siglip_bias)),
                    siglip_pair_losses(ra, rb, float(ref.siglip_temperature), float(ref.siglip_bias)))
                joint_sample(scores, BATCH, n_chunks=16, generator=torch.Generator().manual_seed(0))
            totals["matrices_and_draw"].append(c.get_total_flops())
        with flop_counter() as c:
            loss = learner.per_sample_loss(kept).mean()
        totals["train_forward"].append(c.get_total_flops())
        with flop_counter() as c:
            learner.per_sample_loss(kept).mean().backward()
        totals["train_forward_backward"].append(c.get_total_flops())
        learner.zero_grad()
        del loss
    mean = {k: statistics.fmean(v) for k, v in totals.items()}
    scoring = mean["learner_forward"] + mean["matrices_and_draw"]
    return {
        "super_batch": super_size, "batch": BATCH, "repeats": repeats, "flops": mean,
        # the steady state: every example's reference rows are cached after the first epoch (~17 steps)
        "jest_scoring_forward_flops_per_step": scoring,
        "jest_scoring_forward_flops_per_step_uncached_reference": scoring + mean["reference_forward"],
        "jest_scoring_vs_train_step": scoring / mean["train_forward_backward"],
        "jest_scoring_vs_train_step_uncached_reference": (scoring + mean["reference_forward"])
        / mean["train_forward_backward"],
        "counted": "matrix products (FlopCounterMode) and EmbeddingBag multiply-adds (custom formulas); lookups "
                   "and element-wise ops 0. CABS scores no model: 0 FLOPs.",
    }


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


LABELS = {"uniform": "uniform", "topk": "independent top-k", "jest": "JEST (learnability)", "cabs_dm": "CABS-DM",
          "cabs_fm": "CABS-FM", "jest_f0.5": "JEST, f = 0.5", "jest_f0.9": "JEST, f = 0.9",
          "jest_ref4000": "JEST, reference on 4,000 pairs", "jest_easy_reference": "JEST easy-reference (1 seed)",
          "jest_hard_learner": "JEST hard-learner (1 seed)",
          "clean_pairs_only": "diagnostic: uniform on the clean pairs only (3,727)",
          "random_subset_jest_size": "diagnostic: uniform on a random subset of JEST's coverage"}


def report(out: dict[str, Any]) -> str:
    rows = ["| method | lr | final R@1 | final R@10 | mean R@1 over the run "
            "| steps to uniform's final R@1 (mean curve; per seed) | corrupted pairs trained "
            "| distinct examples trained | ms/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows_of = [(name, s, out["runs"][name]["lr"]) for name, s in out["summary_by_method"].items()]
    rows_of += [(name, r["summary"], r["lr"]) for name, r in out.get("diagnostics", {}).get("runs", {}).items()]
    for name, s, lr in rows_of:
        per_seed = ", ".join("-" if v is None else str(v) for v in s["iterations_to_uniform_final_per_seed"])
        reach = s["iterations_to_uniform_final"]
        rows.append(
            f"| {LABELS.get(name, name)} | {lr:g} | {s['final_r1']['mean']:.3f} ± {s['final_r1']['std']:.3f} "
            f"| {s['final_r10']['mean']:.3f} | {s['mean_r1_over_run']:.3f} "
            f"| {'not reached' if reach is None else reach} ({per_seed}) | {100 * s['noisy_share']['mean']:.1f}% "
            f"| {s['distinct_trained']['mean']:.0f} | {s['ms_per_step']['mean']:.0f} |")
    return "\n".join(rows)


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"uniform": ("black", "-"), "topk": ("tab:orange", "-"), "jest": ("tab:blue", "-"),
              "cabs_dm": ("tab:green", "-"), "cabs_fm": ("tab:olive", "-"), "jest_ref4000": ("tab:blue", "--"),
              "jest_f0.5": ("tab:purple", ":"), "jest_f0.9": ("tab:cyan", ":"),
              "clean_pairs_only": ("tab:red", "-.")}
    all_runs = {**out["runs"], **out.get("diagnostics", {}).get("runs", {})}
    target = out["summary"]["uniform_final_r1"]
    for ax, names, title in ((axes[0], METHODS, "the five methods (3 seeds, mean ± std)"),
                             (axes[1], ("uniform", "jest", "jest_f0.5", "jest_f0.9", "jest_ref4000",
                                        "clean_pairs_only"), "levers on JEST; an oracle noise filter (dash-dot)")):
        for name in names:
            if name not in all_runs:
                continue
            runs = all_runs[name]["per_seed"]
            steps = [p["step"] for p in runs[0]["curve"]]
            values = [[r["curve"][i]["r1"] for r in runs] for i in range(len(steps))]
            mean = [statistics.fmean(v) for v in values]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            color, line = styles.get(name, ("gray", "-"))
            ax.plot(steps, mean, line, color=color, label=LABELS.get(name, name))
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.12)
        ax.axhline(target, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("optimizer step (64 examples trained per step)")
        ax.set_ylabel("held-out R@1 (docstring -> code, 830 pairs)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle("code pairs, 30% corrupted: uniform's final R@1 dashed", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


# -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--no-tuning", action="store_true", help="reuse the learning rates in the JSON")
    parser.add_argument("--overhead-steps", type=int, default=40)
    parser.add_argument("--overhead-repeats", type=int, default=3)
    parser.add_argument("--lock-wait", type=float, default=60.0, help="seconds to wait for the exclusive CPU lock")
    parser.add_argument("--report", action="store_true", help="print the tables and redraw the plot from the JSON")
    parser.add_argument("--diagnostics", action="store_true",
                        help="add to the JSON uniform batches on the clean pairs only and on a random subset as large "
                             "as JEST covers (the learning rates and seeds of the JSON)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results JSON (a trial run: elsewhere)")
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args()
    if args.report:
        out = json.loads(args.out.read_text())
        print(report(out))
        plot(out, args.plot)
        print(json.dumps(out["summary"], indent=1))
        return
    reexec_with_stable_malloc()
    quiet()
    import torch

    torch.set_num_threads(1)
    if args.diagnostics:
        out = json.loads(args.out.read_text())
        out["diagnostics"] = diagnostics(out, args.every)
        args.out.write_text(json.dumps(out, indent=1))
        print(json.dumps({k: v["summary"] for k, v in out["diagnostics"]["runs"].items()}, indent=1))
        return
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    out: dict[str, Any] = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "steps": args.steps,
                           "every": args.every, "batch_size": BATCH, "filter_ratio": FILTER, "noise_fraction": NOISE,
                           "seeds": args.seeds, "lr_grid": LR_GRID}
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="joint_selection_"))

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    # -- references -------------------------------------------------------------------------------
    final_train, held, final_clean = datasets("final")
    references: dict[str, Any] = {}
    paths = {"final": tmp / "ref1000.ckpt", "strong": tmp / "ref4000.ckpt", "tune": tmp / "ref_tune.ckpt"}
    for name, (pairs, size, lr) in {"final": (final_clean, 1000, 1e-3), "strong": (final_clean, 4000, 2e-3)}.items():
        references[name] = train_reference(pairs, size, paths[name], lr)
        references[name].update(reference_quality(paths[name], final_train, held))
        log(f"reference {name}: {references[name]}")
    out["references"] = references
    out["scoring_flops"] = scoring_flops(final_train, paths["final"])
    log(f"scoring FLOPs: {out['scoring_flops']['flops']}")
    final = PairsData(final_train, held)

    def save_partial() -> None:
        # so that a run stopped part-way leaves what it measured (the final write replaces it)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**out, "partial": True}, indent=1))

    # -- learning rates, on the tuning split --------------------------------------------------------
    shared = cpu_lock(exclusive=False, wait_s=600.0)
    shared.__enter__()
    if args.no_tuning and "lr" in previous:
        lrs = previous["lr"]
        out["lr_tuning_r1"] = previous.get("lr_tuning_r1")
    else:
        tune_train, tune_val, tune_clean = datasets("tune")
        references["tune"] = train_reference(tune_clean, 1000, paths["tune"], 1e-3)
        log(f"tuning split: train {len(tune_train)} (30% noisy), tune {len(tune_val)} (clean)")
        tuning: dict[str, dict[str, float]] = {}
        for method in METHODS:
            tuning[method] = {}
            for lr in LR_GRID:
                run = train_once(entries_for(method, paths["tune"]), PairsData(tune_train, tune_val), 0, lr,
                                 args.steps, args.steps)
                tuning[method][f"{lr:g}"] = run["curve"][-1]["r1"]
                log(f"[tune] {method} lr {lr:g}: R@1 {run['curve'][-1]['r1']:.3f}")
        lrs = {m: float(max(t, key=lambda k: t[k])) for m, t in tuning.items()}
        out["lr_tuning_r1"] = tuning
        out["tuning_split"] = {"train": len(tune_train), "tune": len(tune_val)}
    out["lr"] = lrs
    log(f"learning rates: {lrs}")
    save_partial()

    # -- the comparison -----------------------------------------------------------------------------
    plan: dict[str, tuple[dict, float, list[int]]] = {
        m: (entries_for(m, paths["final"]), lrs[m], args.seeds) for m in METHODS}
    plan["jest_f0.5"] = (entries_for("jest", paths["final"], 0.5), lrs["jest"], args.seeds)
    plan["jest_f0.9"] = (entries_for("jest", paths["final"], 0.9), lrs["jest"], args.seeds)
    plan["jest_ref4000"] = (entries_for("jest", paths["strong"]), lrs["jest"], args.seeds)
    plan["jest_easy_reference"] = (entries_for("jest", paths["final"], variant="easy_reference"), lrs["jest"],
                                   args.seeds[:1])
    plan["jest_hard_learner"] = (entries_for("jest", None, variant="hard_learner"), lrs["jest"], args.seeds[:1])
    runs: dict[str, Any] = {}
    for name, (entries, lr, seeds) in plan.items():
        per_seed = []
        for seed in seeds:
            run = train_once(entries, final, seed, lr, args.steps, args.every)
            per_seed.append({"seed": seed, **run})
            log(f"{name} seed {seed}: R@1 {run['curve'][-1]['r1']:.3f} R@10 {run['curve'][-1]['r10']:.3f} "
                f"noisy {run['noisy_share']:.3f} distinct {run['distinct_trained']} {run['ms_per_step']:.0f} ms/step")
        runs[name] = {"entries": entries, "lr": lr, "per_seed": per_seed}
        out["runs"] = runs
        save_partial()
    shared.__exit__(None, None, None)
    out["runs"] = runs
    target = statistics.fmean(r["curve"][-1]["r1"] for r in runs["uniform"]["per_seed"])
    out["summary_by_method"] = {name: summarise(r["per_seed"], target) for name, r in runs.items()}

    # -- overhead -----------------------------------------------------------------------------------
    log("overhead: waiting for the exclusive CPU lock")
    out["overhead"] = overhead(final, paths["final"], lrs, args.overhead_steps, args.overhead_repeats, args.lock_wait)
    log(f"overhead: {out['overhead']['cpu_ms_per_step']} (lock {out['overhead']['exclusive_lock']})")

    by = out["summary_by_method"]
    uniform_reach = by["uniform"]["iterations_to_uniform_final"]
    jest_reach = by["jest"]["iterations_to_uniform_final"]
    out["summary"] = {
        "uniform_final_r1": target,
        "topk_final_r1": by["topk"]["final_r1"]["mean"],
        "jest_final_r1": by["jest"]["final_r1"]["mean"],
        "cabs_dm_final_r1": by["cabs_dm"]["final_r1"]["mean"],
        "cabs_fm_final_r1": by["cabs_fm"]["final_r1"]["mean"],
        # JEST's iterations to uniform's final R@1 over uniform's own; null: JEST's mean curve never got there
        "jest_iterations_vs_uniform": None if jest_reach is None else jest_reach / uniform_reach,
        "uniform_iterations_to_final": uniform_reach,
        "jest_iterations_to_uniform_final": jest_reach,
        "uniform_final_r10": by["uniform"]["final_r10"]["mean"],
        "jest_final_r10": by["jest"]["final_r10"]["mean"],
        "topk_final_r10": by["topk"]["final_r10"]["mean"],
        "jest_ref4000_final_r1": by["jest_ref4000"]["final_r1"]["mean"],
        "jest_ref4000_iterations_vs_uniform": None if by["jest_ref4000"]["iterations_to_uniform_final"] is None
        else by["jest_ref4000"]["iterations_to_uniform_final"] / uniform_reach,
        "goal_met": jest_reach is not None and jest_reach <= 0.5 * uniform_reach
        and by["jest"]["final_r1"]["mean"] > by["topk"]["final_r1"]["mean"],
        # the scoring overhead per step: forward FLOPs of JEST's scoring pass (steady state, the
        # reference's embeddings cached), against the training step's forward + backward FLOPs, and
        # the measured step CPU time against uniform's
        "jest_scoring_forward_flops_per_step": out["scoring_flops"]["jest_scoring_forward_flops_per_step"],
        "train_step_flops": out["scoring_flops"]["flops"]["train_forward_backward"],
        "jest_scoring_flops_vs_train_step": out["scoring_flops"]["jest_scoring_vs_train_step"],
        "jest_step_cpu_vs_uniform": out["overhead"]["vs_uniform"]["jest"],
        "topk_step_cpu_vs_uniform": out["overhead"]["vs_uniform"]["topk"],
        "cabs_dm_step_cpu_vs_uniform": out["overhead"]["vs_uniform"]["cabs_dm"],
    }
    out["wall_s"] = time.perf_counter() - started
    shutil.rmtree(tmp, ignore_errors=True)  # the reference checkpoints (50 MB each)
    out["load_average_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(report(out))
    plot(out, args.plot)
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
