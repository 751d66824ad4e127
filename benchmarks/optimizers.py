"""Optimizer step time of LAMB and LARS against torch's fused AdamW, on a BERT-like tensor mix.

    python benchmarks/optimizers.py                # ~50M params, 5 rounds x 3 timed steps, median
    python benchmarks/optimizers.py --quick        # small mix, a smoke run (writes nothing)
    python benchmarks/optimizers.py --device cuda --layers 24 --hidden 1024 --ffn 4096
                                                   # on a GPU: BERT-large's 335M params

One process, one run: every optimizer gets its own copy of the same parameters and gradients
(fp32) and takes warm-up steps; then, in each of --rounds rounds, every optimizer takes one
untimed and --steps-per-round timed steps back to back. The median over its timed steps
(15 by default) is reported. "Effective GB/s" divides the bytes each
algorithm must move at minimum (the model in docs/optimizers.md: AdamW 28 B/param, two-pass
LAMB 40, LARS 28) by the step time, next to the machine's measured copy bandwidth.

Writes benchmarks/results/optimizers.json (ratios, times, bandwidths, parity vs timm, machine);
with --device cuda, optimizers_cuda.json. On a GPU each timed step is bracketed by
torch.cuda.synchronize(), so the time includes the host's launch work, as a training step sees it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from _common import MALLOC_ENV
from _common import machine
from _common import reexec_with_stable_malloc

ROOT = Path(__file__).resolve().parent
BYTES_PER_PARAM = {"adamw": 28, "lamb": 40, "lars": 28}



def bert_like_shapes(layers: int = 4, hidden: int = 768, ffn: int = 3072, vocab: int = 30522) -> list[tuple[int, ...]]:
    """BERT-base's tensors with ``layers`` encoder layers: ~52M parameters at layers=4."""
    shapes = [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]  # embeddings + LayerNorm
    for _ in range(layers):
        for _ in range(4):  # Q, K, V, attention output
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]
        shapes += [(hidden,), (hidden,)]  # LayerNorm
    shapes += [(hidden, hidden), (hidden,)]  # pooler
    return shapes


def load_timm_optim(module: str) -> types.ModuleType:
    """timm.optim.<module> without timm/__init__ (which imports torchvision)."""
    spec = importlib.util.find_spec("timm")
    root = Path(list(spec.submodule_search_locations)[0]) / "optim"
    if "_timm_optim_isolated" not in sys.modules:
        pkg = types.ModuleType("_timm_optim_isolated")
        pkg.__path__ = [str(root)]
        sys.modules["_timm_optim_isolated"] = pkg
    name = f"_timm_optim_isolated.{module}"
    file_spec = importlib.util.spec_from_file_location(name, root / f"{module}.py")
    mod = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = mod
    file_spec.loader.exec_module(mod)
    return mod


def make_params(shapes, seed=0, device="cpu"):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device) * 1e-3
    return params


def synchronizer(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def copy_bandwidth(n_bytes: int = 1 << 28, repeats: int = 7, device: str = "cpu") -> float:
    """GB/s of dst.copy_(src) (read + write counted) with torch's threads, or on the GPU."""
    if device == "cuda":
        n_bytes = 1 << 31  # well past the GPU's L2 (50 MB on an H100)
    sync = synchronizer(device)
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times) / 1e9


def cuda_breakdown(opt, steps: int = 5) -> dict:
    """Where a GPU step's time goes: the host's time to return from step() (launch work), and
    the kernels' own time and count per step from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    host = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return {"host_ms": statistics.median(host) * 1e3,
            "kernel_ms": sum(e.self_device_time_total for e in events) / steps / 1e3,
            "kernels_per_step": sum(e.count for e in events) / steps}


def optimizers(params, names, device="cpu"):
    from batchkit_lamb_lars import Lamb, Lars

    timm_lamb = load_timm_optim("lamb").Lamb
    timm_lars = load_timm_optim("lars").Lars
    try:
        import torch_optimizer
    except ImportError:  # not on every GPU image; the CPU runs of `make test`'s venv have it
        torch_optimizer = None

    lamb = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    lars = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coeff=0.001)
    factories = {
        "adamw_fused (torch)": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True),
        "lamb_fused (ours)": lambda: Lamb(params, impl="fused", **lamb),
        "lamb_foreach (ours)": lambda: Lamb(params, impl="foreach", **lamb),
        # the stash of u is on by default on CPU only; measure it where it is off
        "lamb_fused_stash (ours)": (lambda: Lamb(params, impl="fused", stash_update=True, **lamb))
        if device == "cuda" else None,
        "lamb (timm)": lambda: timm_lamb(params, max_grad_norm=None, always_adapt=True, **lamb),
        "lamb (torch-optimizer)": (lambda: torch_optimizer.Lamb(params, **lamb)) if torch_optimizer else None,
        "lars_fused (ours)": lambda: Lars(params, impl="fused", **lars),
        "lars_foreach (ours)": lambda: Lars(params, impl="foreach", **lars),
        "lars (timm)": lambda: timm_lars(params, always_adapt=True, **lars),
    }
    return {k: v for k, v in factories.items() if v is not None and (not names or k.split(" ")[0] in names)}


def parity_vs_timm(shapes, steps: int, device: str = "cpu") -> float:
    """Max |ours fused - timm| over all parameters after ``steps`` LAMB steps (fp32)."""
    from batchkit_lamb_lars import Lamb

    timm_lamb = load_timm_optim("lamb").Lamb
    a, b = make_params(shapes, seed=1, device=device), make_params(shapes, seed=1, device=device)
    opt_a = Lamb(a, impl="fused", lr=1e-3, weight_decay=0.01)
    opt_b = timm_lamb(b, lr=1e-3, weight_decay=0.01, max_grad_norm=None, always_adapt=True)
    for _ in range(steps):
        opt_a.step()
        opt_b.step()
    return max((x - y).abs().max().item() for x, y in zip(a, b))




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="encoder layers of the BERT-like mix (4: ~52M params)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all optimizers")
    parser.add_argument("--steps-per-round", type=int, default=3, help="timed steps per optimizer and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="subset, e.g. lamb_fused adamw_fused")
    parser.add_argument("--parity-steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 layer, small vocab: a smoke run")
    parser.add_argument("--out", default=None, help="default: results/optimizers.json (cpu), optimizers_cuda.json")
    parser.add_argument("--system-malloc", action="store_true",
                        help="keep glibc's default malloc settings (see MALLOC_ENV)")
    args = parser.parse_args()
    if not args.system_malloc:
        # the allocator settings also help the baselines (about 2x here), not the fused kernels,
        # which allocate nothing per step
        reexec_with_stable_malloc()

    device = args.device
    out = args.out or str(ROOT / "results" / ("optimizers_cuda.json" if device == "cuda" else "optimizers.json"))
    sync = synchronizer(device)
    shapes = (bert_like_shapes(layers=1, vocab=2000) if args.quick
              else bert_like_shapes(layers=args.layers, hidden=args.hidden, ffn=args.ffn))
    n_params = sum(torch.Size(s).numel() for s in shapes)
    info = machine()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["torch_cuda"] = torch.version.cuda
    print(f"{len(shapes)} tensors, {n_params / 1e6:.1f}M parameters; {info['cpu']}, {info['cores']} cores, "
          f"torch {info['torch']} ({info['torch_threads']} threads)" + (f"; {info['gpu']}" if device == "cuda" else ""),
          flush=True)
    bandwidth = copy_bandwidth(device=device)
    print(f"copy bandwidth: {bandwidth:.1f} GB/s counting read + write "
          f"({1.5 * bandwidth:.1f} GB/s with the write-allocate read of the destination)", flush=True)

    # Every optimizer keeps its own parameters and state. Timing runs in rounds: in each round
    # every optimizer takes one untimed step (to re-warm after the others) and then
    # --steps-per-round timed steps back to back; a burst of load from another process then
    # hits all of them alike, while each one's steps still run undisturbed by the others.
    names = list(optimizers(None, args.only, device))
    runs = {}
    for name in names:
        params = make_params(shapes, device=device)
        opt = optimizers(params, [name.split(" ")[0]], device)[name]()
        for _ in range(args.warmup):
            opt.step()
        runs[name] = (params, opt, [])
    for _ in range(args.rounds):
        for name in names:
            opt, times = runs[name][1], runs[name][2]
            opt.step()
            for _ in range(args.steps_per_round):
                sync()
                t0 = time.perf_counter()
                opt.step()
                sync()
                times.append(time.perf_counter() - t0)
    breakdown = {name: cuda_breakdown(runs[name][1]) for name in names} if device == "cuda" else {}
    results = {}
    for name in names:
        times = runs[name][2]
        median = statistics.median(times)
        algo = name.split("_")[0].split(" ")[0]
        gbs = BYTES_PER_PARAM[algo] * n_params / median / 1e9
        results[name] = {"median_ms": median * 1e3, "min_ms": min(times) * 1e3, "effective_GBps": gbs,
                         "bytes_per_param_model": BYTES_PER_PARAM[algo], "times_ms": [t * 1e3 for t in times]}
        results[name].update(breakdown.get(name, {}))
        extra = ""
        if name in breakdown:
            b = breakdown[name]
            extra = (f"  host {b['host_ms']:.2f} ms, kernels {b['kernel_ms']:.2f} ms "
                     f"({BYTES_PER_PARAM[algo] * n_params / b['kernel_ms'] / 1e6:.0f} GB/s), "
                     f"{b['kernels_per_step']:.0f} launches")
        print(f"{name:26s} {median * 1e3:9.1f} ms  (min {min(times) * 1e3:7.1f})  {gbs:6.1f} GB/s "
              f"= {gbs / bandwidth:5.2f} x copy{extra}", flush=True)
    del runs

    def ratio(a: str, b: str) -> float | None:
        if a in results and b in results:
            return results[a]["median_ms"] / results[b]["median_ms"]
        return None

    parity = parity_vs_timm(shapes, args.parity_steps, device) if args.parity_steps else None
    summary = {
        "lamb_fused_vs_adamw_fused": ratio("lamb_fused (ours)", "adamw_fused (torch)"),
        "lars_fused_vs_adamw_fused": ratio("lars_fused (ours)", "adamw_fused (torch)"),
        "lamb_fused_vs_timm_lamb": ratio("lamb_fused (ours)", "lamb (timm)"),
        "lamb_foreach_vs_adamw_fused": ratio("lamb_foreach (ours)", "adamw_fused (torch)"),
        "timm_lamb_vs_adamw_fused": ratio("lamb (timm)", "adamw_fused (torch)"),
        "lars_fused_vs_timm_lars": ratio("lars_fused (ours)", "lars (timm)"),
        "parity_max_abs_diff": parity,
        "parity_steps": args.parity_steps,
        "targets": {"lamb_fused_vs_adamw_fused": 1.5, "lars_fused_vs_adamw_fused": 1.0},
    }
    summary["targets_met"] = {
        k: (summary[k] is not None and summary[k] <= limit) for k, limit in summary["targets"].items()
    }
    report = {
        **summary,
        "device": device,
        "n_params": n_params,
        "n_tensors": len(shapes),
        "copy_bandwidth_GBps": bandwidth,
        "copy_bandwidth_with_write_allocate_GBps": 1.5 * bandwidth if device == "cpu" else None,
        "steps_timed": args.rounds * args.steps_per_round,
        "warmup": args.warmup,
        "optimizers": results,
        "machine": info,
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT.parent), *sys.argv[1:]]),
    }
    for k in ("lamb_fused_vs_adamw_fused", "lars_fused_vs_adamw_fused", "lamb_fused_vs_timm_lamb",
              "parity_max_abs_diff"):
        print(f"{k}: {summary[k]}")
    if not args.quick:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
