"""CoLM against random batches on the skewed standard-library text mixture (issue 12).

Methods, all with the same number of optimizer steps and the same model, schedule and data:

* ``random_b``: plain training at the batch size b;
* ``random_B``: plain training at the large batch size B = ``--factor`` × b;
* ``colm``: the ``colm`` plugin, loading B and training on the coreset of b (``small_sources`` = the
  mixture's five small sources, every other option at its default);
* ablations (``--ablations``, at colm's tuned learning rate): ``colm`` with the fixed direction of
  the reference code (``colm_fixed_z``), with the exact per-example gradients (``colm_exact``), with
  all coordinates instead of the top 2560 (``colm_all_dims``), and CoLM's rule without its
  gradient matching (``small_kept_random``: the small sources kept whole, each large source's
  proportional budget drawn at random).

Model and data: ``batchkit_examples.text_mixture`` (the dense byte-level LM, 10 sources: asyncio,
prose, email, http, logging large; json, wsgiref, zoneinfo, dbm, sqlite3 small; 53:1). One torch
thread throughout.

1. **Learning rate**, tuned equally: every method runs the same grid (``--lrs``) with a tuning
   seed on a tuning split (10% of every source's training windows held out of training, the rest
   trained on), and keeps the learning rate with the lowest mean-over-sources loss on that split.
   The reported runs then train on all training windows and are scored on the validation sets.
2. **Validation loss per source** after ``--steps`` optimizer steps, seeds ``--seeds``: every
   source's loss, their mean (``val_loss/mean``) and the worst source, at ten points of training;
   and how many examples of each source each method trained.
3. **Cost** of one training step, on the same model, alternated in rounds (median): random at b,
   random at B, and colm (its selection pass on B: the estimates and the selection, through the
   plugin and the host's chain, then the step on b); and the **peak memory** of each step measured
   as the phase-1 sizing did (torch.profiler's memory profile of CPU tensor allocations: the peak
   above what was live before the step, plus the resident parameters and AdamW state).

Timing and memory hold the exclusive CPU lock (``/tmp/bk-cpu.lock``), training the shared one.

    python benchmarks/coresets.py [--b 16] [--factor 2] [--steps 300] [--seeds 0 1 2] [--ablations]
    python benchmarks/coresets.py --report        # tables and the plot from the JSON

Writes benchmarks/results/coresets.json (or ``--output``) and docs/methods/coresets_curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402
from coresets_sizing import MODEL  # noqa: E402
from coresets_sizing import Curves  # noqa: E402
from coresets_sizing import batches  # noqa: E402
from _common import cpu_lock  # noqa: E402
from coresets_sizing import peak_tensor_memory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "coresets.json"
PLOT = ROOT / "docs" / "methods" / "coresets_curves.png"

#: the colm variants: plugin options on top of the defaults
COLM_VARIANTS = {
    "colm": {},
    "colm_fixed_z": {"redraw": False},
    "colm_exact": {"estimator": "exact"},
    "colm_all_dims": {"dims": None},
}


def small_source_ids() -> list[int]:
    from batchkit_examples import text_mixture as tm

    return [tm.DEFAULT_SOURCES.index(s) for s in tm.SMALL_SOURCES]


def tuning_split(train: Any, fraction: float = 0.1, seed: int = 1234) -> tuple[Any, Any]:
    """(train minus the tuning windows, the tuning windows): ``fraction`` of every source's training
    windows, drawn at random."""
    import torch
    from torch.utils.data import Subset

    gen = torch.Generator().manual_seed(seed)
    keep, held, offset = [], [], 0
    for part in train.datasets:
        order = (torch.randperm(len(part), generator=gen) + offset).tolist()
        cut = max(1, int(fraction * len(part)))
        held += order[:cut]
        keep += order[cut:]
        offset += len(part)
    return Subset(train, sorted(keep)), Subset(train, sorted(held))


class SourceCounter:
    """A batchkit plugin (built lazily: batchkit is imported inside the benchmark) counting the
    examples of every source that training_step receives."""

    def __new__(cls, num_sources: int) -> Any:
        import torch

        from batchkit import Plugin
        from batchkit import hookimpl

        class _Counter(Plugin):
            name = "source_counter"

            def __init__(self) -> None:
                self.counts = torch.zeros(num_sources, dtype=torch.long)

            @hookimpl
            def batchkit_before_forward(self, batch: Any) -> None:
                self.counts += torch.bincount(batch["source"].cpu(), minlength=num_sources)

        return _Counter()


def small_kept_random_indices(sources: Any, keep: int, generator: Any) -> Any:
    """Every small-source example, then per large source its proportional budget at random (sorted)."""
    import torch

    from batchkit_coresets import proportional_budget
    from batchkit_coresets import small_source_mask

    sources = sources.cpu()
    small = small_source_mask(sources, small_source_ids())
    chosen = [small.nonzero().flatten()[:keep]]
    rest = (~small).nonzero().flatten()
    ids, counts = sources[rest].unique(return_counts=True)
    for source, k_s in zip(ids.tolist(), proportional_budget(counts.tolist(), keep - len(chosen[0]))):
        members = rest[sources[rest] == source]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k_s]])
    return torch.cat(chosen).sort().values


def small_kept_random(factor: int, seed: int) -> Any:
    """The ablation ``small_kept_random``: CoLM's selection with the facility location replaced by a
    random draw: every small-source example of the large batch, then, per large source, its
    proportional budget drawn at random. A batchkit plugin (built lazily, as SourceCounter)."""
    import torch

    from batchkit import Plugin
    from batchkit import hookimpl

    class _SmallKeptRandom(Plugin):
        name = "small_kept_random"
        load_factor = float(factor)

        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        @hookimpl
        def batchkit_transform_batch(self, batch: Any, ctx: Any) -> Any:
            chosen = small_kept_random_indices(batch["source"], ctx.super_batch.keep_size(self), self.generator)
            return ctx.batch_spec.select(batch, chosen)

    return _SmallKeptRandom()


def method_spec(method: str, b: int, factor: int) -> tuple[int, dict[str, Any] | None]:
    """(loader batch size, colm options or None) of a method."""
    if method == "random_b":
        return b, None
    if method == "random_B":
        return factor * b, None
    if method == "small_kept_random":
        return b, {}
    return b, {"large_batch_factor": factor, "small_sources": small_source_ids(), **COLM_VARIANTS[method]}


def fit(method: str, seed: int, lr: float, steps: int, train: Any, val: Any, b: int, factor: int,
        points: int = 10) -> dict[str, Any]:
    """One training run; the validation curve per source and what it trained."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from batchkit.lightning import BatchKitCallback
    from batchkit_coresets import CoLM
    from batchkit_examples import text_mixture as tm

    pl.seed_everything(seed)
    model = tm.DenseLanguageModel(**{**MODEL, "lr": lr})
    batch_size, options = method_spec(method, b, factor)
    counter = SourceCounter(len(tm.DEFAULT_SOURCES))
    plugins = [counter]
    if method == "small_kept_random":
        plugins.append(small_kept_random(factor, seed))
    elif options is not None:
        plugins.append(CoLM(seed=seed, **options))
    curves = Curves()
    # max_epochs=-1: the model's configure_optimizers reads trainer.estimated_stepping_batches, which
    # with max_epochs set builds the train loader before batchkit wraps it (see the plugin's README)
    trainer = pl.Trainer(max_epochs=-1, max_steps=steps, val_check_interval=steps // points,
                         check_val_every_n_epoch=None, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[curves.callback, BatchKitCallback(plugins)])
    train_loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val, batch_size=256)
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    seconds = time.perf_counter() - start
    assert trainer.global_step == steps
    final = curves.points[-1]
    print(f"  {method:14s} seed {seed} lr {lr:.0e}: mean {final['val_loss/mean']:.4f} worst "
          f"{final['val_loss/worst']:.4f} ({seconds:.0f} s)", flush=True)
    return {"fit_seconds": seconds, "final": final, "curve": curves.points,
            "trained_per_source": dict(zip(tm.DEFAULT_SOURCES, counter.counts.tolist()))}


def tune(methods: list[str], lrs: list[float], steps: int, train: Any, b: int, factor: int,
         seed: int) -> dict[str, Any]:
    """Each method on the same learning-rate grid, on the tuning split."""
    fit_on, held = tuning_split(train)
    grid: dict[str, dict[str, float]] = {}
    for method in methods:
        grid[method] = {}
        for lr in lrs:
            grid[method][repr(lr)] = fit(method, seed, lr, steps, fit_on, held, b, factor, points=1)["final"]["val_loss/mean"]
    best = {method: float(min(scores, key=scores.get)) for method, scores in grid.items()}
    edge = {method: lr in (min(lrs), max(lrs)) for method, lr in best.items()}
    if any(edge.values()):
        print(f"WARNING: best learning rate at the edge of the grid for {[m for m, e in edge.items() if e]}", flush=True)
    return {"grid": grid, "best_lr": best, "best_at_grid_edge": edge, "seed": seed,
            "criterion": "mean over sources of the tuning-split loss"}


def cost(train: Any, b: int, factor: int, rounds: int) -> dict[str, Any]:
    """Step time and peak memory of a training step: random at b and B, colm (selection + step)."""
    import lightning.pytorch as pl
    import torch

    from batchkit.host import PluginHost
    from batchkit.host import SuperBatchPlan
    from batchkit_coresets import CoLM
    from batchkit_examples import text_mixture as tm

    pl.seed_everything(0)
    model = tm.DenseLanguageModel(**MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MODEL["lr"], weight_decay=MODEL["weight_decay"])
    B = factor * b
    plugin = CoLM(large_batch_factor=factor, small_sources=small_source_ids())
    host = PluginHost([plugin])
    host.ctx.super_batch = SuperBatchPlan.build(b, [(plugin.instance_name, float(factor))])
    streams = {size: batches(train, size, seed=size) for size in (b, B)}

    def step(batch: dict) -> None:
        model.per_sample_loss(batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def select(large: dict) -> dict:
        return host.chain("batchkit_transform_batch", large, module=model, ctx=host.ctx)

    def colm_step(large: dict) -> None:
        step(select(large))

    for _ in range(3):  # warm up: optimizer state exists, allocator warm, the moments tracked
        step(next(streams[b]))
        step(next(streams[B]))
        colm_step(next(streams[B]))

    times: dict[str, list[float]] = {"random_b": [], "random_B": [], "colm": [], "colm_selection": []}
    for _ in range(rounds):
        for size, key in ((b, "random_b"), (B, "random_B")):
            batch = next(streams[size])
            start = time.perf_counter()
            step(batch)
            times[key].append(time.perf_counter() - start)
        large = next(streams[B])
        start = time.perf_counter()
        small = select(large)
        middle = time.perf_counter()
        step(small)
        times["colm_selection"].append(middle - start)
        times["colm"].append(time.perf_counter() - start)
    median_ms = {key: 1e3 * statistics.median(values) for key, values in times.items()}

    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(t.numel() * t.element_size() for state in optimizer.state.values()
                    for t in state.values() if isinstance(t, torch.Tensor))
    moments = sum(t.numel() * t.element_size() for t in (plugin.normalizer.m_prev, plugin.normalizer.v_prev))
    peaks = {
        "random_b": peak_tensor_memory(lambda: step(next(streams[b]))),
        "random_B": peak_tensor_memory(lambda: step(next(streams[B]))),
        "colm": peak_tensor_memory(lambda: colm_step(next(streams[B]))),
        "colm_selection": peak_tensor_memory(lambda: select(next(streams[B]))),
    }
    # colm also keeps its tracked Adam moments (2 × |θ| floats) between steps
    totals = {key: (resident + peak + (moments if key.startswith("colm") else 0)) / 2**20 for key, peak in peaks.items()}
    return {"median_ms": median_ms, "rounds": rounds, "resident_bytes": resident, "colm_moments_bytes": moments,
            "step_peak_bytes": peaks, "peak_mib": totals,
            "memory_method": "torch.profiler memory profile (CPU tensor allocations; profile_memory, record_shapes, "
                             "with_stack; prof._memory_profile().timeline): peak above the tensors live before the step, "
                             "plus resident = parameters + AdamW state (+ colm's tracked moments)"}


def gradient_match(train: Any, b: int, factor: int, warm_steps: int = 150, probes: int = 20,
                   draws: int = 8) -> dict[str, Any]:
    """Why CoLM does (not) reach random@B: how well each b-subset's mean gradient (of the whole
    model) matches the large batch's, ||g_S − g_B|| / ||g_B||, on large batches of a model trained
    by colm for ``warm_steps`` steps (so its moments are live). Subsets: colm's coreset (zeroth-order
    and exact estimates); a random b; ``small_kept_random`` (colm's rule with the facility location
    replaced by a random draw)."""
    import lightning.pytorch as pl
    import torch

    from batchkit.host import PluginHost
    from batchkit.host import SuperBatchPlan
    from batchkit_coresets import CoLM
    from batchkit_examples import text_mixture as tm

    pl.seed_everything(1)
    model = tm.DenseLanguageModel(**MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MODEL["lr"], weight_decay=MODEL["weight_decay"])
    B, small = factor * b, small_source_ids()
    hosts = {}
    for name, options in (("colm", {}), ("colm_exact", {"estimator": "exact"})):
        host = hosts[name] = PluginHost([CoLM(large_batch_factor=factor, small_sources=small, **options)])
        host.ctx.super_batch = SuperBatchPlan.build(b, [("colm", float(factor))])
    stream = batches(train, B, seed=7)

    def select(large: dict, name: str = "colm") -> dict:
        return hosts[name].chain("batchkit_transform_batch", large, module=model, ctx=hosts[name].ctx)

    for _ in range(warm_steps):  # trained on colm's coresets; the exact variant's moments follow along
        large = next(stream)
        select(large, "colm_exact")
        model.per_sample_loss(select(large)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def gradient(batch: dict, index: torch.Tensor) -> torch.Tensor:
        loss = model.per_sample_loss({k: v[index] for k, v in batch.items()}).mean()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])

    gen = torch.Generator().manual_seed(0)
    errors: dict[str, list[float]] = {"colm": [], "colm_exact": [], "random_b": [], "small_kept_random": []}
    for _ in range(probes):
        large = next(stream)
        large["index"] = torch.arange(B)
        g_large = gradient(large, torch.arange(B))
        norm = float(g_large.norm())
        for name in hosts:
            chosen = select(large, name)["index"]
            errors[name].append(float((gradient(large, chosen) - g_large).norm()) / norm)
        for _ in range(draws):
            subset = torch.randperm(B, generator=gen)[:b]
            errors["random_b"].append(float((gradient(large, subset) - g_large).norm()) / norm)
            subset = small_kept_random_indices(large[tm.SOURCE_KEY], b, gen)
            errors["small_kept_random"].append(float((gradient(large, subset) - g_large).norm()) / norm)
    return {"warm_steps": warm_steps, "probes": probes, "random_draws_per_probe": draws,
            "relative_error_mean": {k: statistics.mean(v) for k, v in errors.items()},
            "relative_error_median": {k: statistics.median(v) for k, v in errors.items()}}


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, per_seed in runs.items():
        for key in ("mean", "worst"):
            values = [run["final"][f"val_loss/{key}"] for run in per_seed.values()]
            out[f"{method}_val_loss_{key}"] = statistics.mean(values)
            out[f"{method}_val_loss_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def method_runs(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """method -> seed -> run, from the results JSON (one key per method)."""
    return {method: result[method] for method in result["methods"]}


def report(result: dict[str, Any]) -> str:
    """The markdown tables of docs/benchmarks.md and docs/methods/coresets.md."""
    from batchkit_examples import text_mixture as tm

    s, runs = result["summary"], method_runs(result)
    lines = ["| method | lr | val loss, mean over sources | worst source | "
             + " | ".join(tm.DEFAULT_SOURCES) + " | small-source share trained |",
             "|---|---:|---:|---:|" + "---:|" * len(tm.DEFAULT_SOURCES) + "---:|"]
    for method, per_seed in runs.items():
        finals = [run["final"] for run in per_seed.values()]
        per_source = [statistics.mean(f[f"val_loss/{src}"] for f in finals) for src in tm.DEFAULT_SOURCES]
        trained = [run["trained_per_source"] for run in per_seed.values()]
        small = statistics.mean(sum(t[src] for src in tm.SMALL_SOURCES) / sum(t.values()) for t in trained)
        lines.append(f"| {method} | {result['lr'][method]:.3g} | {s[f'{method}_val_loss_mean']:.4f} ± "
                     f"{s[f'{method}_val_loss_mean_std']:.4f} | {s[f'{method}_val_loss_worst']:.4f} ± "
                     f"{s[f'{method}_val_loss_worst_std']:.4f} | " + " | ".join(f"{v:.3f}" for v in per_source)
                     + f" | {small:.1%} |")
    ms, mib = result["cost"]["median_ms"], result["cost"]["peak_mib"]
    lines += ["", "| step | median ms | peak tensor memory, MiB | vs random@B |", "|---|---:|---:|---:|"]
    for key, label in (("random_b", "random@b"), ("random_B", "random@B"), ("colm", "colm@b-from-B (selection + step)"),
                       ("colm_selection", "colm selection pass alone")):
        lines.append(f"| {label} | {ms[key]:.0f} | {mib[key]:.1f} | {mib[key] / mib['random_B']:.2f} |")
    match = result["gradient_match"]
    lines += ["", f"| b-subset of a large batch (after {match['warm_steps']} colm steps, {match['probes']} large batches) "
              "| ‖g_S − g_B‖ / ‖g_B‖, mean | median |", "|---|---:|---:|"]
    for key, value in match["relative_error_mean"].items():
        lines.append(f"| {key} | {value:.3f} | {match['relative_error_median'][key]:.3f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from batchkit_examples import text_mixture as tm

    keys = [f"val_loss/{src}" for src in tm.DEFAULT_SOURCES] + ["val_loss/mean", "val_loss/worst"]
    fig, axes = plt.subplots(3, 4, figsize=(16, 10), sharex=True)
    colours = {"random_b": "tab:blue", "random_B": "tab:green", "colm": "tab:red", "colm_fixed_z": "tab:orange",
               "colm_exact": "tab:purple", "colm_all_dims": "tab:brown", "small_kept_random": "tab:gray"}
    for ax, key in zip(axes.flat, keys):
        for method, per_seed in method_runs(result).items():
            curves = [run["curve"] for run in per_seed.values()]
            steps = [p["step"] for p in curves[0]]
            mean = [statistics.mean(c[i][key] for c in curves) for i in range(len(steps))]
            label = {"random_b": f"random@b={result['b']}", "random_B": f"random@B={result['B']}",
                     "colm": f"CoLM@{result['b']}-from-{result['B']}"}.get(method, method)
            ax.plot(steps, mean, label=label, color=colours.get(method), lw=1.5,
                    ls="-" if method in ("random_b", "random_B", "colm") else "--" if method == "small_kept_random" else ":")
        name = key.split("/", 1)[1]
        small = " (small)" if name in tm.SMALL_SOURCES else ""
        ax.set_title(f"{name}{small}" if name not in ("mean", "worst") else f"{name} over sources")
        ax.grid(alpha=0.3)
        start = len(steps) // 3  # the first points are far above the rest
        low = min(min(statistics.mean(run["curve"][i][key] for run in ps.values()) for i in range(start, len(steps)))
                  for ps in method_runs(result).values())
        high = max(max(statistics.mean(run["curve"][i][key] for run in ps.values()) for i in range(start, len(steps)))
                   for ps in method_runs(result).values())
        ax.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    axes.flat[0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(f"Validation loss per source (mean of {len(result['seeds'])} seeds), equal optimizer steps")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b", type=int, default=16, help="the batch size b trained on")
    parser.add_argument("--factor", type=int, default=2, help="B / b")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 6e-3, 1.2e-2, 2.4e-2, 4.8e-2], help="the tuning grid")
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="skip tuning: this lr for every method")
    parser.add_argument("--methods", nargs="+", default=["random_b", "random_B", "colm"])
    parser.add_argument("--ablations", action="store_true", help="also colm_fixed_z, colm_exact, colm_all_dims "
                                                                 "(at colm's tuned lr)")
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds (median)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--cost-from", type=Path, default=None, help="take step time and memory from this results "
                                                                     "JSON instead of measuring them")
    parser.add_argument("--report", action="store_true", help="print the tables and redraw the plot from the JSON")
    args = parser.parse_args()
    if args.report:
        result = json.loads(args.output.read_text())
        print(report(result))
        plot(result, args.plot)
        return
    reexec_with_stable_malloc()

    import torch

    from batchkit_examples import text_mixture as tm

    torch.set_num_threads(1)
    train, val_sets = tm.mixture_datasets(seq_len=MODEL["seq_len"], max_val_windows=128)
    from torch.utils.data import ConcatDataset

    val = ConcatDataset(list(val_sets.values()))
    started = time.perf_counter()
    if args.cost_from is not None:  # exploration runs: the cost section of an earlier result
        costs = json.loads(args.cost_from.read_text())["cost"]
    else:
        with cpu_lock(exclusive=True):
            costs = cost(train, args.b, args.factor, args.rounds)
    print(json.dumps(costs["median_ms"]), json.dumps(costs["peak_mib"]), flush=True)
    with cpu_lock(exclusive=False):
        matching = gradient_match(train, args.b, args.factor)
        print(f"gradient match: {matching['relative_error_mean']}", flush=True)
        if args.lr is None:
            tuning = tune(args.methods, args.lrs, args.steps, train, args.b, args.factor, args.tune_seed)
            lrs = dict(tuning["best_lr"])
        else:
            tuning, lrs = None, {method: args.lr for method in args.methods}
        methods = list(args.methods)
        if args.ablations:
            extra = [m for m in [*COLM_VARIANTS, "small_kept_random"] if m not in methods]
            methods += extra
            lrs.update({m: lrs.get("colm", args.lr or 3e-3) for m in extra})
        print(f"learning rates: {lrs}", flush=True)
        runs: dict[str, dict[str, Any]] = {m: {} for m in methods}
        for seed in args.seeds:
            for method in methods:
                runs[method][str(seed)] = fit(method, seed, lrs[method], args.steps, train, val, args.b, args.factor)

    summary = summarise(runs)
    B = args.factor * args.b
    mib = costs["peak_mib"]
    summary.update({
        "b": args.b, "B": B, "steps": args.steps, "seeds": args.seeds,
        "peak_memory_colm_vs_random_B": mib["colm"] / mib["random_B"],
        "peak_memory_random_b_vs_random_B": mib["random_b"] / mib["random_B"],
        "step_time_ms": costs["median_ms"],
        "selection_overhead_ms": costs["median_ms"]["colm_selection"],
        "gradient_error_vs_B": matching["relative_error_mean"],
    })
    if "colm" in runs and "random_B" in runs and "random_b" in runs:
        summary["goal"] = {
            "colm_mean_reaches_random_B": summary["colm_val_loss_mean"] <= summary["random_B_val_loss_mean"],
            "colm_worst_reaches_random_B": summary["colm_val_loss_worst"] <= summary["random_B_val_loss_worst"],
            "memory_at_most_0.6": summary["peak_memory_colm_vs_random_B"] <= 0.6,
            "colm_beats_random_b_mean": summary["colm_val_loss_mean"] < summary["random_b_val_loss_mean"],
            "colm_beats_random_b_worst": summary["colm_val_loss_worst"] < summary["random_b_val_loss_worst"],
        }
    result = {"summary": summary, "methods": methods, **runs, "lr": lrs, "tuning": tuning, "b": args.b, "B": B,
              "seeds": args.seeds, "model": MODEL, "sources": dict(zip(tm.DEFAULT_SOURCES, tm.source_counts(train))),
              "small_sources": list(tm.SMALL_SOURCES), "cost": costs, "gradient_match": matching,
              "machine": machine(),
              "seconds": time.perf_counter() - started, "command": "python " + " ".join(sys.argv)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(report(result))
    plot(result, args.plot)


if __name__ == "__main__":
    main()
