"""Sizing the CoLM benchmark (issue 12, phase 1): what random@b and random@2b cost and reach on the
skewed standard-library text mixture, so that ``benchmarks/coresets.py`` (phase 2: random@b,
random@B and CoLM@b-from-B, B = 2b) can be sized to run in minutes on a 2-core machine.

Model and data: ``batchkit_examples.text_mixture`` (the dense byte-level LM; 10 sources, 5 large
and 5 small, about 50:1 from the largest to the smallest). One torch thread throughout.

1. **Step time** of a training step (forward, backward, AdamW step, zero_grad) at b and at 2b,
   alternated in rounds on the same model, median over rounds; and the cost of CoLM's selection
   pass on a large batch of 2b: the zeroth-order estimates (two no-grad forwards), and
   ``select_coreset`` (Adam normalisation, top-k dims, facility location per source).
2. **Peak memory** of the same steps: tensor memory on the CPU as torch.profiler's memory profile
   records it (``profile(profile_memory=True, record_shapes=True, with_stack=True)``, then the
   allocation timeline of ``prof._memory_profile()``): the peak of the bytes allocated during the
   step above what was live before it (``step_peak``), plus the tensors live across steps
   (parameters and AdamW state, ``resident``). ``total = resident + step_peak``.
3. **Validation loss per source** after the same number of optimizer steps for random@b and
   random@2b (plain Lightning fits, same learning rate and schedule), several seeds: the per-source
   losses, their mean over sources and the worst source, at 5 points of training.

Timing and memory hold the exclusive CPU lock (``/tmp/bk-cpu.lock``, as the other benchmarks),
training the shared one.

    python benchmarks/coresets_sizing.py [--b 16] [--steps 300] [--seeds 0 1 2] [--rounds 11]

Writes benchmarks/results/coresets_sizing.json (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Iterator

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_lock  # noqa: E402
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "coresets_sizing.json"

MODEL = dict(dim=64, layers=2, heads=4, hidden=256, seq_len=64, lr=3e-3, weight_decay=0.1, warmup_steps=20)



def batches(dataset: Any, size: int, seed: int) -> Iterator[dict]:
    import torch
    from torch.utils.data import DataLoader

    while True:
        yield from DataLoader(dataset, batch_size=size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(seed))


def peak_tensor_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU tensor memory allocated by ``fn`` above what was live before it
    (torch.profiler's memory profile; tensors that existed before are excluded)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def cost(train: Any, b: int, rounds: int) -> dict[str, Any]:
    """Step time and peak memory at b and 2b, and CoLM's selection pass on 2b."""
    import torch
    import lightning.pytorch as pl
    from batchkit_coresets import AdamNormalizer
    from batchkit_coresets import RandomDirection
    from batchkit_coresets import resolve_parameter
    from batchkit_coresets import select_coreset
    from batchkit_coresets import zeroth_order
    from batchkit_examples import text_mixture as tm

    pl.seed_everything(0)
    model = tm.DenseLanguageModel(**MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=MODEL["lr"], weight_decay=MODEL["weight_decay"])
    name = resolve_parameter(model)
    small = [tm.DEFAULT_SOURCES.index(s) for s in tm.SMALL_SOURCES]
    loss_fn = lambda m, batch: m.per_sample_loss(batch)  # noqa: E731
    directions, normalizer = RandomDirection(seed=0), AdamNormalizer()
    streams = {size: batches(train, size, seed=size) for size in (b, 2 * b)}

    def step(batch: dict) -> None:
        model.per_sample_loss(batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def estimate(batch: dict) -> Any:
        return zeroth_order(loss_fn, model, batch, name, directions.draw(model.get_parameter(name).shape))

    def select(grads: Any, batch: dict) -> Any:
        return select_coreset(grads, batch[tm.SOURCE_KEY], b, small_sources=small, normalizer=normalizer)

    for _ in range(3):  # warm up: optimizer state exists, allocator warm
        for size in (b, 2 * b):
            step(next(streams[size]))
        large = next(streams[2 * b])
        select(estimate(large), large)

    times: dict[str, list[float]] = {"step_b": [], "step_2b": [], "estimate_2b": [], "select_2b": []}
    for _ in range(rounds):
        for size, key in ((b, "step_b"), (2 * b, "step_2b")):
            batch = next(streams[size])
            start = time.perf_counter()
            step(batch)
            times[key].append(time.perf_counter() - start)
        large = next(streams[2 * b])
        start = time.perf_counter()
        grads = estimate(large)
        middle = time.perf_counter()
        select(grads, large)
        times["estimate_2b"].append(middle - start)
        times["select_2b"].append(time.perf_counter() - middle)
    median_ms = {f"{key}_ms": 1e3 * statistics.median(values) for key, values in times.items()}

    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(t.numel() * t.element_size() for state in optimizer.state.values()
                    for t in state.values() if isinstance(t, torch.Tensor))
    large = next(streams[2 * b])
    peaks = {
        "step_b": peak_tensor_memory(lambda: step(next(streams[b]))),
        "step_2b": peak_tensor_memory(lambda: step(next(streams[2 * b]))),
        # CoLM's selection pass on the large batch: two no-grad forwards + the selection
        "selection_2b": peak_tensor_memory(lambda: select(estimate(large), large)),
    }
    # the two parts of the selection pass on their own
    peaks["estimate_2b"] = peak_tensor_memory(lambda: estimate(large))
    grads = estimate(large)
    peaks["select_2b"] = peak_tensor_memory(lambda: select(grads, large))
    del grads
    memory = {"resident_bytes": resident, **{f"{k}_step_peak_bytes": v for k, v in peaks.items()}}
    memory.update({f"{k}_total_mib": (resident + v) / 2**20 for k, v in peaks.items()})
    memory["method"] = ("torch.profiler memory profile (CPU tensor allocations; profile_memory, record_shapes, "
                        "with_stack; prof._memory_profile().timeline): peak above the tensors live before the step, "
                        "plus resident = parameters + AdamW state")
    return {"median_ms": median_ms, "rounds": rounds, "memory": memory, "param": name,
            "selection_dims": 2560, "param_numel": model.get_parameter(name).numel()}


class Curves:
    """A Lightning callback keeping every validation's per-source, mean and worst loss."""

    def __init__(self) -> None:
        import lightning.pytorch as pl

        class _Callback(pl.Callback):
            def on_validation_end(cb, trainer: pl.Trainer, module: pl.LightningModule) -> None:  # noqa: N805
                if trainer.sanity_checking:
                    return
                metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_loss/")}
                self.points.append({"step": trainer.global_step, **metrics})

        self.points: list[dict[str, float]] = []
        self.callback = _Callback()


def quality(train: Any, val: dict, b: int, steps: int, seeds: list[int]) -> dict[str, Any]:
    """random@b and random@2b, equal optimizer steps, per seed."""
    import torch
    import lightning.pytorch as pl
    from torch.utils.data import ConcatDataset
    from torch.utils.data import DataLoader
    from batchkit_examples import text_mixture as tm

    val_loader = DataLoader(ConcatDataset(list(val.values())), batch_size=256)
    runs: dict[str, dict[str, Any]] = {"random_b": {}, "random_2b": {}}
    for seed in seeds:
        for method, size in (("random_b", b), ("random_2b", 2 * b)):
            pl.seed_everything(seed)
            model = tm.DenseLanguageModel(**MODEL)
            curves = Curves()
            trainer = pl.Trainer(max_steps=steps, val_check_interval=max(1, steps // 5), check_val_every_n_epoch=None,
                                 accelerator="cpu", logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                 callbacks=[curves.callback])
            train_loader = DataLoader(train, batch_size=size, shuffle=True, drop_last=True,
                                      generator=torch.Generator().manual_seed(seed))
            start = time.perf_counter()
            trainer.fit(model, train_loader, val_loader)
            final = curves.points[-1]
            runs[method][str(seed)] = {"fit_seconds": time.perf_counter() - start, "final": final,
                                       "curve": curves.points}
            print(f"  seed {seed} {method:9s} mean {final['val_loss/mean']:.4f} worst {final['val_loss/worst']:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return runs


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for method, per_seed in runs.items():
        for key in ("mean", "worst"):
            values = [run["final"][f"val_loss/{key}"] for run in per_seed.values()]
            out[f"{method}_val_loss_{key}"] = statistics.mean(values)
            out[f"{method}_val_loss_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        worst = [max((v, k) for k, v in run["final"].items() if k not in ("val_loss/mean", "val_loss/worst", "step"))[1]
                 for run in per_seed.values()]
        out[f"{method}_worst_source"] = sorted(set(w.split("/", 1)[1] for w in worst))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b", type=int, default=16, help="small batch b (the large batch is 2b)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of every training run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds (median)")
    parser.add_argument("--skip-quality", action="store_true", help="step time and memory only")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    reexec_with_stable_malloc()

    import torch
    from batchkit_examples import text_mixture as tm

    torch.set_num_threads(1)
    train, val = tm.mixture_datasets(seq_len=MODEL["seq_len"], max_val_windows=128)
    counts = dict(zip(tm.DEFAULT_SOURCES, tm.source_counts(train)))
    print(f"train windows per source: {counts}", flush=True)

    with cpu_lock(exclusive=True):
        started = time.perf_counter()
        costs = cost(train, args.b, args.rounds)
        print(json.dumps(costs, indent=1), flush=True)
        cost_seconds = time.perf_counter() - started
    runs = {}
    if not args.skip_quality:
        with cpu_lock(exclusive=False):
            runs = quality(train, val, args.b, args.steps, args.seeds)

    ms, mem = costs["median_ms"], costs["memory"]
    summary = {
        "b": args.b, "B": 2 * args.b, "steps": args.steps, "seeds": args.seeds,
        "step_time_b_ms": ms["step_b_ms"], "step_time_2b_ms": ms["step_2b_ms"],
        "step_time_2b_vs_b": ms["step_2b_ms"] / ms["step_b_ms"],
        "selection_estimate_2b_ms": ms["estimate_2b_ms"], "selection_select_2b_ms": ms["select_2b_ms"],
        "peak_memory_b_mib": mem["step_b_total_mib"], "peak_memory_2b_mib": mem["step_2b_total_mib"],
        "peak_memory_selection_2b_mib": mem["selection_2b_total_mib"],
        "peak_memory_b_vs_2b": mem["step_b_total_mib"] / mem["step_2b_total_mib"],
        "peak_memory_selection_2b_vs_step_2b": mem["selection_2b_total_mib"] / mem["step_2b_total_mib"],
        **(summarise(runs) if runs else {}),
    }
    result = {"summary": summary, "model": MODEL, "sources": counts, "small_sources": list(tm.SMALL_SOURCES),
              "cost": costs, "cost_seconds": cost_seconds, "runs": runs, "machine": machine(),
              "command": "python " + " ".join(sys.argv)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
