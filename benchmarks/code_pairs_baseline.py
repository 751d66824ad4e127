"""The code-pairs example's baselines: what the JEST/CABS and B3 benchmarks start from.

    python benchmarks/code_pairs_baseline.py --steps 100 --every 10   # ~6 min on 2 shared cores
    python benchmarks/code_pairs_baseline.py --steps 300 --every 50   # ~20 min
    python benchmarks/code_pairs_baseline.py --seeds 0 --steps 300 --lr 4e-3   # no learning-rate search

Each budget (``--steps``): a learning-rate search, then 2 batch sizes x 2 noise levels x 3 seeds.

Task: docstring -> code retrieval on the Python standard library's (docstring, function) pairs
(``batchkit_examples.code_pairs``): 5,324 training pairs, 830 held-out pairs from held-out modules.
Model: ``TwoTowerRetrieval`` (SigLIP loss, AdamW, warm-up then constant learning rate). Every run
goes through ``BatchKitCallback`` with no plugin (so a plugin run later draws the same shuffles),
one CPU thread, the same number of optimizer steps.

Measured:

* random batches of 64 and of 256, clean and 30%-noisy training pairs (a fixed noisy set), 3 seeds
  (the seed sets initialisation and order): held-out R@1 / R@10 (docstring -> code over all 830)
  every ``--every`` steps, and training time per step (evaluation excluded);
* each batch size with its own best learning rate of ``LR_GRID`` (R@1 after ``--steps`` steps, clean
  data, seed 0), so the gap between them is not an artefact of one learning rate suiting one size.
  The pick is made on the held-out set itself (there is no third split): fine for describing the
  task, but a method benchmark should tune on a split of the training modules;
* JEST's reference model (same architecture, 1,000 clean pairs, 300 steps at 64, lr 1e-3): its held-out
  R@1 / R@10 and how well its loss on a training pair separates the corrupted pairs from the rest
  (ROC AUC of l_ii over the 30%-noisy training set: 0.5 is chance).

The machine is shared by several engineers: times are approximate, and the load average is
recorded. Writes benchmarks/results/code_pairs_baseline.json.
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import retrieval_probe  # noqa: E402
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "code_pairs_baseline.json"
LR_GRID = [5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train_once(batch_size: int, noise: float, seed: int, steps: int, every: int, lr: float) -> dict[str, Any]:
    """One run: held-out metrics every ``every`` steps and the training time per step."""
    import lightning.pytorch as pl
    from batchkit_examples.code_pairs import CodePairsDataModule
    from batchkit_examples.code_pairs import TwoTowerRetrieval

    from batchkit.lightning import BatchKitCallback

    pl.seed_everything(seed, verbose=False)
    model = TwoTowerRetrieval(lr=lr)
    data = CodePairsDataModule(batch_size=batch_size, noise_fraction=noise, seed=0)  # the same noisy set for every seed
    probe = retrieval_probe(("r1", "r10", "r1_code2doc", "r10_code2doc"))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=every,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[BatchKitCallback([]), probe])
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return {"curve": probe.curve, "ms_per_step": 1000 * probe.train_s / trainer.global_step,
            "fit_wall_s": time.perf_counter() - start, "steps": trainer.global_step}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def roc_auc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting half."""
    import torch

    s = torch.tensor(scores)
    p = torch.tensor(positive)
    pos, neg = s[p], s[~p]
    greater = (pos.unsqueeze(1) > neg.unsqueeze(0)).float().mean()
    ties = (pos.unsqueeze(1) == neg.unsqueeze(0)).float().mean()
    return float(greater + 0.5 * ties)


def reference_check(steps: int) -> dict[str, Any]:
    """JEST's reference model: held-out retrieval and how well its pair loss flags corrupted pairs."""
    import torch
    from batchkit_examples.code_pairs import CodePairCollate
    from batchkit_examples.code_pairs import code_pair_datasets
    from batchkit_examples.code_pairs import retrieval_recall
    from batchkit_examples.code_pairs import siglip_logits
    from batchkit_examples.code_pairs import train_reference_model

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ref = train_reference_model(Path(tmp) / "reference.ckpt", clean_subset_size=1000, max_steps=steps,
                                    model_kwargs={"lr": 1e-3})
        train_s = time.perf_counter() - start
    noisy_train, held = code_pair_datasets(noise_fraction=0.3, seed=0)
    collate = CodePairCollate()
    with torch.no_grad():
        a, b = ref.pair_embeddings(collate([held[i] for i in range(len(held))]))
        recall = retrieval_recall(a, b)
        pair_losses = []
        for start_i in range(0, len(noisy_train), 512):
            batch = collate([noisy_train[i] for i in range(start_i, min(len(noisy_train), start_i + 512))])
            a, b = ref.pair_embeddings(batch)
            logit = siglip_logits(a, b, ref.siglip_temperature, ref.siglip_bias).diagonal()
            pair_losses.extend((-torch.nn.functional.logsigmoid(logit)).tolist())  # l_ii
    return {"clean_subset_size": 1000, "steps": steps, "batch_size": 64, "lr": 1e-3, "train_wall_s": train_s,
            "held_out_r1": recall[1], "held_out_r10": recall[10],
            "noisy_pair_auc": roc_auc(pair_losses, noisy_train.noisy.tolist())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--reference", action="store_true", help="redo the reference-model check")
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for every run instead of each batch size's best of LR_GRID")
    args = parser.parse_args()
    reexec_with_stable_malloc()
    quiet()
    import torch

    torch.set_num_threads(1)
    info = machine()
    from batchkit_examples.code_pairs import code_pair_datasets
    from batchkit_examples.code_pairs import stdlib_pairs

    train, held = code_pair_datasets()
    # One file for every budget: a run for one --steps replaces that budget's section only.
    out: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    out["dataset"] = {"pairs": len(stdlib_pairs()), "train": len(train), "held_out": len(held),
                      "python": sys.version.split()[0]}
    budget: dict[str, Any] = {"machine": info, "command": " ".join(["python", *sys.argv]),
                              "steps": args.steps, "every": args.every, "seeds": args.seeds, "lr_grid": LR_GRID}
    chosen = {64: args.lr, 256: args.lr}
    if args.lr is None:
        tuning: dict[str, dict[str, float]] = {}
        for batch_size in (64, 256):
            tuning[str(batch_size)] = {}
            for lr in LR_GRID:
                run = train_once(batch_size, 0.0, 0, args.steps, args.steps, lr)
                tuning[str(batch_size)][f"{lr:g}"] = run["curve"][-1]["r1"]
                print(f"[lr] batch {batch_size} lr {lr:g}: R@1 {run['curve'][-1]['r1']:.3f}", flush=True)
            chosen[batch_size] = float(max(tuning[str(batch_size)], key=lambda k: tuning[str(batch_size)][k]))
        budget["lr_tuning_r1"] = tuning
    budget["lr"] = {str(k): v for k, v in chosen.items()}
    runs: dict[str, Any] = {}
    for noise in (0.0, 0.3):
        for batch_size in (64, 256):
            name = f"random{batch_size}_{'noisy' if noise else 'clean'}"
            per_seed = []
            for seed in args.seeds:
                run = train_once(batch_size, noise, seed, args.steps, args.every, chosen[batch_size])
                per_seed.append({"seed": seed, **run})
                final = run["curve"][-1]
                print(f"[{args.steps} steps, {name}] seed {seed}: R@1 {final['r1']:.3f} R@10 {final['r10']:.3f} "
                      f"{run['ms_per_step']:.0f} ms/step", flush=True)
            runs[name] = {
                "batch_size": batch_size, "noise_fraction": noise, "lr": chosen[batch_size],
                "final_r1": mean_std([r["curve"][-1]["r1"] for r in per_seed]),
                "final_r10": mean_std([r["curve"][-1]["r10"] for r in per_seed]),
                "ms_per_step": mean_std([r["ms_per_step"] for r in per_seed]),
                "r1_by_step": {str(p["step"]): mean_std([r["curve"][i]["r1"] for r in per_seed])["mean"]
                               for i, p in enumerate(per_seed[0]["curve"])},
                "per_seed": per_seed,
            }
    budget["runs"] = runs
    budget["load_average_after"] = os.getloadavg()[0]
    out.setdefault("budgets", {})[str(args.steps)] = budget
    if args.reference or "reference" not in out:
        out["reference"] = reference_check(300)
        print(f"[reference] {out['reference']}", flush=True)
    summary: dict[str, float] = {}
    for steps, part in sorted(out["budgets"].items(), key=lambda kv: int(kv[0])):
        for name, r in part["runs"].items():
            summary[f"{name}_r1_at_{steps}"] = r["final_r1"]["mean"]
            summary[f"{name}_r10_at_{steps}"] = r["final_r10"]["mean"]
            summary[f"{name}_ms_per_step_at_{steps}"] = r["ms_per_step"]["mean"]
    summary["reference_r1"] = out["reference"]["held_out_r1"]
    summary["reference_noisy_pair_auc"] = out["reference"]["noisy_pair_auc"]
    out["summary"] = summary
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
