"""Micro-batch versus global-batch load-balancing loss on real two-domain text.

The example byte-level MoE LM (``batchkit_examples.moe_lm``: 2 MoE layers, 8 experts, top-2) is
trained on a 1:1 mixture of Python source (the standard library) and English prose
(``pydoc_data.topics``), once per seed with ``moe_lbl`` in ``micro`` mode and once in ``global``
mode, at the same coefficient and otherwise identical settings (same seeds, data order, model
init, optimizer). Each optimizer step accumulates several small micro-batches, so the micro-batch
loss balances the experts over a couple of sequences while the global one (Algorithm 1's buffer)
balances them over the whole step.

Measured after training, on held-out documents of each domain:

* validation loss per domain (mean and std over seeds);
* specialisation: the Jensen-Shannon divergence (bits) between the code tokens' and the prose tokens'
  distributions over experts, per layer, averaged over layers (0 = both domains routed alike);
* balance: the LBL of the validation mixture at micro-batch scope and at whole-set scope, and the
  max/mean expert load of the mixture.

Then the step-time cost of the global sync: a 2-process DDP run (gloo) driving the plugin through
batchkit's host, alternating blocks of steps in ``micro`` and ``global`` mode inside the same two
processes (the order flips every round), median over rounds of the ratio
``step time global / step time micro``.

The training runs hold the shared CPU lock (``/tmp/bk-cpu.lock``), the timing part the exclusive
one. Each training run is its own process with 1 torch thread; ``--jobs 2`` runs two at a time.

    python benchmarks/moe_balance.py [--seeds 0 1 2] [--steps 600] [--jobs 2] [--rounds 21]
    python benchmarks/moe_balance.py --overhead-only [--rounds 31]   # timing again, other results kept
    python benchmarks/moe_balance.py --profile after                  # operators and host copies

``--profile LABEL`` counts, with torch.profiler on the CPU, the operators (what would each be a
kernel launch on a GPU) that the plugin's hooks run per micro-batch and per optimizer step, and the
calls that copy tensor values to the host, in the setting of the GPU run of issue 17 (one process,
global mode, 8 micro-batches per step, logging every 10 steps) and stores them under
``loss_stage_profile.LABEL``. Run it with another checkout's environment to profile that code
(``before``: ``/work/main/.venv/bin/python benchmarks/moe_balance.py --profile before``).

Writes benchmarks/results/moe_balance.json and docs/methods/moe_balance_expert_load.png.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from queue import Empty
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_lock  # noqa: E402
from _common import machine  # noqa: E402
from _common import reexec_with_stable_malloc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "moe_balance.json"
PLOT = ROOT / "docs" / "methods" / "moe_balance_expert_load.png"
MODES = ("micro", "global")

MODEL = dict(dim=64, layers=2, heads=4, num_experts=8, top_k=2, expert_hidden=128, seq_len=128, lr=3e-3,
             warmup_steps=30)
TRAIN = dict(micro_batch=2, accumulate=8, coefficient=0.01)



# -------------------------------------------------------------------------------------------------
# One training run (its own process)
# -------------------------------------------------------------------------------------------------


def routing_balance(model: Any, val_sets: dict, micro_batch: int, seed: int) -> dict[str, float]:
    """LBL of the validation mixture at micro-batch scope (random pairs of windows) and over the whole
    set, averaged over layers, and the max/mean expert load of the whole mixture."""
    import torch

    from batchkit_moe_balance import load_balancing_loss
    from batchkit_moe_balance import load_imbalance
    from batchkit_moe_balance import routing_statistics

    k = model.hparams.top_k
    windows = torch.cat([ds.windows for ds in val_sets.values()])
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    seen: list[torch.Tensor] = []
    hooks = [b.moe.router.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for b in model.blocks]
    micro, whole = [], None
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order) - micro_batch + 1, micro_batch):
            seen.clear()
            model(windows[order[start:start + micro_batch], :-1])
            stats = [routing_statistics(z, k) for z in seen]  # per layer (c, sum p, T)
            c, s, t = (torch.stack([x[i] for x in stats]) for i in range(3))
            micro.append(load_balancing_loss(c, t, s, t, k).mean().item())
            whole = (c, s, t) if whole is None else (whole[0] + c, whole[1] + s, whole[2] + t)
    for h in hooks:
        h.remove()
    c, s, t = whole
    return {
        "lbl_micro_batch": statistics.fmean(micro),
        "lbl_whole_set": load_balancing_loss(c, t, s, t, k).mean().item(),
        "imbalance_whole_set": load_imbalance(c).mean().item(),
    }


def one_run(mode: str, seed: int, steps: int, out: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from batchkit_examples.moe_lm import DOMAINS
    from batchkit_examples.moe_lm import MoELanguageModel
    from batchkit_examples.moe_lm import TwoDomainTextDataModule
    from batchkit_examples.moe_lm import expert_load_by_domain
    from batchkit_examples.moe_lm import jensen_shannon
    from torch.utils.data import DataLoader

    from batchkit import BatchKitCallback
    from batchkit_moe_balance import MoELoadBalancing

    torch.set_num_threads(1)
    pl.seed_everything(seed)
    data = TwoDomainTextDataModule(seq_len=MODEL["seq_len"], batch_size=TRAIN["micro_batch"], max_val_windows=256, seed=0)
    model = MoELanguageModel(**MODEL)
    plugin = MoELoadBalancing(coefficient=TRAIN["coefficient"], mode=mode, router_type="Router", log_every_n_steps=0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=TRAIN["accumulate"], limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[BatchKitCallback([plugin])], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    train_s = time.perf_counter() - start
    model.eval()
    val_loss = {}
    with torch.no_grad():
        for domain in DOMAINS:
            losses = [model.lm_loss(w).item() * len(w) for w, _ in DataLoader(data.val_sets[domain], batch_size=64)]
            val_loss[domain] = sum(losses) / len(data.val_sets[domain])
    loads = expert_load_by_domain(model, data.val_sets)
    jsd = jensen_shannon(loads["code"], loads["prose"])  # per layer
    record = {
        "mode": mode, "seed": seed, "steps": steps, "train_s": train_s,
        "val_loss": val_loss,
        "specialisation_per_layer": jsd.tolist(),
        "specialisation": jsd.mean().item(),
        "expert_load": {d: loads[d].tolist() for d in DOMAINS},
        "balance": routing_balance(model, data.val_sets, TRAIN["micro_batch"], seed),
    }
    out.write_text(json.dumps(record))


def quality(seeds: list[int], steps: int, jobs: int, workdir: Path) -> list[dict]:
    workdir.mkdir(parents=True, exist_ok=True)
    runs = [(mode, seed) for seed in seeds for mode in MODES]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    pending, running, results = list(runs), [], []
    with cpu_lock(exclusive=False):
        while pending or running:
            while pending and len(running) < jobs:
                mode, seed = pending.pop(0)
                out = workdir / f"{mode}_seed{seed}.json"
                cmd = [sys.executable, __file__, "--one-run", mode, str(seed), "--steps", str(steps), "--out", str(out)]
                log = open(workdir / f"{mode}_seed{seed}.log", "w")
                running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), out, mode, seed))
            time.sleep(1)
            for entry in list(running):
                proc, out, mode, seed = entry
                if proc.poll() is None:
                    continue
                running.remove(entry)
                if proc.returncode != 0:
                    raise SystemExit(f"run {mode} seed {seed} failed; see {workdir}/{mode}_seed{seed}.log")
                results.append(json.loads(out.read_text()))
                r = results[-1]
                print(f"{mode:6s} seed {seed}: val code {r['val_loss']['code']:.4f} prose {r['val_loss']['prose']:.4f} "
                      f"JSD {r['specialisation']:.4f}  ({r['train_s']:.0f} s)", flush=True)
    return results


# -------------------------------------------------------------------------------------------------
# All-reduce overhead: 2 processes, DDP on gloo, both modes alternating inside the same processes
# -------------------------------------------------------------------------------------------------


def overhead_worker(rank: int, world: int, port: int, steps_per_block: int, rounds: int, queue: Any) -> None:
    import torch
    import torch.distributed as torch_dist
    import torch.nn.functional as F
    from batchkit_examples.moe_lm import MoELanguageModel
    from batchkit_examples.moe_lm import two_domain_datasets
    from torch.nn.parallel import DistributedDataParallel

    from batchkit import PluginHost
    from batchkit_moe_balance import MoELoadBalancing

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MoELanguageModel(**MODEL)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train, _ = two_domain_datasets(MODEL["seq_len"], max_train_windows=512, max_val_windows=1)
    gen = torch.Generator().manual_seed(rank)
    hosts = {}
    for mode in MODES:
        plugin = MoELoadBalancing(coefficient=TRAIN["coefficient"], mode=mode, router_type="Router", log_every_n_steps=0)
        hosts[mode] = PluginHost([plugin])
        hosts[mode].time_hooks = True
        hosts[mode].ctx.rank, hosts[mode].ctx.world_size = rank, world
        plugin.attach(model)  # both attached; only the host that opens its window records
    # Time blocked waiting for the counts' all-reduce (global mode overlaps it since issue 17: the
    # wait is in backward; before, the blocking all-reduce sat in the loss stage, see loss_stage_us).
    waited = [0.0]
    counts_class = getattr(importlib.import_module("batchkit_moe_balance.plugin"), "_MicroBatchCounts", None)
    if counts_class is not None:
        untimed_wait = counts_class.wait_all

        def timed_wait(self: Any) -> None:
            start = time.perf_counter()
            untimed_wait(self)
            waited[0] += time.perf_counter() - start

        counts_class.wait_all = timed_wait
    wait_ms: list[float] = []
    # CPU time of this process per step (its threads, gloo's included): the work each mode does,
    # which other processes on a shared machine slow down far less than the wall-clock time
    cpu_times: dict[str, list[float]] = {m: [] for m in MODES}

    def block(mode: str) -> float:
        host = hosts[mode]
        torch_dist.barrier()
        waited[0] = 0.0
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps_per_block):
            idx = torch.randint(len(train), (TRAIN["micro_batch"],), generator=gen)
            window = torch.stack([train[int(i)][0] for i in idx])
            host.notify("batchkit_before_forward", batch=window, module=model, ctx=host.ctx)
            logits = ddp(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
            loss = host.chain("batchkit_transform_loss", loss, outputs=loss, batch=window, module=model, ctx=host.ctx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            host.ctx.global_step += 1
            host.notify("batchkit_step_end", ctx=host.ctx)
        torch_dist.barrier()
        elapsed = (time.perf_counter() - start) / steps_per_block
        cpu_times[mode].append((time.process_time() - cpu_start) / steps_per_block)
        if mode == "global":
            wait_ms.append(1e3 * waited[0] / steps_per_block)
        return elapsed

    block("micro"), block("global")  # warm-up
    for mode in MODES:
        hosts[mode].reset_timings()
        cpu_times[mode].clear()
    wait_ms.clear()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            times[mode].append(block(mode))
    loss_stage_us = {m: hosts[m].timings()["moe_lbl"]["batchkit_transform_loss"]["mean_us"] for m in MODES}
    # The collective alone: the same [layers, experts + 1] float64 packet, back to back, ranks in step.
    packet = torch.zeros(MODEL["layers"], MODEL["num_experts"] + 1, dtype=torch.float64)
    torch_dist.barrier()
    latencies = []
    cpu_start = time.process_time()
    for _ in range(300):
        start = time.perf_counter()
        torch_dist.all_reduce(packet)
        latencies.append(time.perf_counter() - start)
    allreduce_cpu_us = 1e6 * (time.process_time() - cpu_start) / 300  # this process's threads, gloo's included
    if rank == 0:
        queue.put({"times": times, "cpu_times": cpu_times, "loss_stage_us": loss_stage_us,
                   "allreduce_alone_us": 1e6 * statistics.median(latencies[50:]), "allreduce_cpu_us": allreduce_cpu_us,
                   "wait_ms_per_step": statistics.median(wait_ms) if counts_class is not None else None})
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def overhead(steps_per_block: int, rounds: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with cpu_lock(exclusive=True):
        procs = [ctx.Process(target=overhead_worker, args=(r, 2, port, steps_per_block, rounds, queue)) for r in range(2)]
        for p in procs:
            p.start()
        result = None
        while result is None:  # a rank that dies leaves the other blocked in a collective: stop both
            try:
                result = queue.get(timeout=5)
            except Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    for p in procs:
                        p.kill()
                    raise SystemExit(f"overhead timing: rank(s) died {dead} (rank, exit code; negative = signal)") from None
        for p in procs:  # the figures are in; a rank stuck in its shutdown must not hold the run
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    times = result["times"]
    ratios = [g / m for g, m in zip(times["global"], times["micro"])]
    quartiles = statistics.quantiles(ratios, n=4)
    cpu_ratios = [g / m for g, m in zip(result["cpu_times"]["global"], result["cpu_times"]["micro"])]
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_quartiles": [quartiles[0], quartiles[2]],
        "ratio_of_median_step_times": statistics.median(times["global"]) / statistics.median(times["micro"]),
        "ratios": ratios,
        "step_ms": {m: 1e3 * statistics.median(times[m]) for m in MODES},
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_quartiles": [statistics.quantiles(cpu_ratios, n=4)[0], statistics.quantiles(cpu_ratios, n=4)[2]],
        "cpu_ms_per_step": {m: 1e3 * statistics.median(result["cpu_times"][m]) for m in MODES},
        "loss_stage_us": result["loss_stage_us"],
        "allreduce_alone_us": result["allreduce_alone_us"],
        "allreduce_cpu_us": result["allreduce_cpu_us"],
        "global_wait_in_backward_ms_per_step": result["wait_ms_per_step"],
        "steps_per_block": steps_per_block,
        "rounds": rounds,
        "setup": "2 processes, DDP on gloo, 1 torch thread each, micro-batch "
                 f"{TRAIN['micro_batch']} x {MODEL['seq_len']} tokens per rank, no accumulation, AdamW",
        "note": "loss_stage_us is the host's timing of transform_loss; in global mode with 2 ranks the counts and "
                "their all-reduce start in the last router's forward hook and the wait is in backward, outside that "
                "hook (global_wait_in_backward_ms_per_step; none before issue 17, whose wait was in the loss stage)",
        "load_average_before": os.getloadavg()[0],
    }


# -------------------------------------------------------------------------------------------------
# Operators and host copies of the plugin's hooks (torch.profiler, CPU)
# -------------------------------------------------------------------------------------------------

#: operators that launch no kernel on a GPU (views, allocation, metadata)
NO_KERNEL = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::expand",
             "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::detach", "aten::alias",
             "aten::empty", "aten::empty_strided", "aten::t", "aten::transpose", "aten::permute", "aten::lift_fresh",
             "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::result_type", "aten::contiguous",
             "aten::_unsafe_view", "aten::split", "aten::unbind", "aten::chunk", "aten::narrow", "aten::numel"}
#: Tensor methods that copy values to the host (a device-to-host copy and a sync on a GPU)
HOST_READS = {"tolist", "item", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"}


def count_ops(fn: Any, within: str | None = None) -> tuple[Any, int, int]:
    """Run ``fn`` under torch.profiler (CPU): its result, the number of leaf aten operators that would
    launch a kernel on a GPU, and the number of host reads (``aten::_local_scalar_dense``, and the
    Tensor methods in HOST_READS, counted with a TorchFunctionMode since ``tolist`` of a CPU tensor
    records no operator). With ``within``, only the operators run inside ``record_function(within)``."""
    from torch.overrides import TorchFunctionMode
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    class Reads(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if getattr(func, "__name__", "") in HOST_READS:
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    Reads.count = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof, Reads():
        result = fn()
    events = prof.events()
    parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    def inside(e: Any) -> bool:
        while e is not None:
            if within in e.name:
                return True
            e = e.cpu_parent
        return False

    ops = [e.name for e in events if e.name.startswith("aten::") and id(e) not in parents and e.name not in NO_KERNEL
           and (within is None or inside(e))]
    scalar_reads = sum(e.name == "aten::_local_scalar_dense" for e in events)
    return result, len(ops), max(Reads.count, scalar_reads)


def profile_hooks(label: str, steps: int = 20, accumulate: int = 8, every: int = 10) -> dict:
    """Operators and host reads per hook call of the plugin in one process, global mode (the setting of
    the GPU run in issue 17: examples/moe_lm.yaml, 2 MoE layers, 8 micro-batches per step, logging
    every 10 steps), driven through batchkit's host like the Lightning callback does."""
    import subprocess as sp

    import batchkit_moe_balance
    import torch
    import torch.nn.functional as F
    from batchkit_examples.moe_lm import MoELanguageModel
    from batchkit_examples.moe_lm import two_domain_datasets

    from batchkit import PluginHost
    from batchkit_moe_balance import MoELoadBalancing

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MoELanguageModel(**MODEL)
    train, _ = two_domain_datasets(MODEL["seq_len"], max_train_windows=64, max_val_windows=1)
    gen = torch.Generator().manual_seed(0)

    def run(overlapped: bool) -> dict:
        plugin = MoELoadBalancing(coefficient=TRAIN["coefficient"], mode="global", router_type="Router", log_every_n_steps=every)
        if overlapped:
            plugin._overlap_in_one_process = True  # the path that runs with more than one rank
            on_router_call = plugin._on_router_call

            def traced(layer: int, logits: Any) -> None:
                with torch.profiler.record_function("moe_lbl.router_hook"):
                    on_router_call(layer, logits)

            plugin._on_router_call = traced
        host = PluginHost([plugin])
        plugin.attach(model)
        rec: dict[str, list[int]] = {k: [] for k in ("batch_ops", "loss_ops", "loss_reads", "batch_reads", "hook_ops",
                                                    "backward_ops",
                                                    "step_end_ops_logging", "step_end_reads_logging",
                                                    "step_end_ops_other", "step_end_reads_other",
                                                    "step_reads_logging", "step_reads_other")}
        for step in range(steps + 1):  # step 0 warms up (caches) and is not recorded
            reads_in_step = 0
            for micro in range(accumulate):
                window = torch.stack([train[int(i)][0] for i in torch.randint(len(train), (TRAIN["micro_batch"],), generator=gen)])
                host.ctx.is_last_micro_batch = micro == accumulate - 1
                _, ops_b, reads_b = count_ops(functools.partial(
                    host.notify, "batchkit_before_forward", batch=window, module=model, ctx=host.ctx))
                logits, hook_ops, _ = count_ops(functools.partial(model, window[:, :-1]), within="moe_lbl.router_hook")
                loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
                total, ops_l, reads_l = count_ops(functools.partial(
                    host.chain, "batchkit_transform_loss", loss, outputs=loss, batch=window, module=model, ctx=host.ctx))
                _, backward_ops, _ = count_ops(total.backward, within="DeferredLBLGradientBackward")
                if step:
                    rec["backward_ops"].append(backward_ops)
                    rec["batch_ops"].append(ops_b)
                    rec["batch_reads"].append(reads_b)
                    rec["loss_ops"].append(ops_l)
                    rec["loss_reads"].append(reads_l)
                    rec["hook_ops"].append(hook_ops)
                reads_in_step += reads_b + reads_l
            model.zero_grad(set_to_none=True)
            host.ctx.global_step += 1
            _, ops_s, reads_s = count_ops(functools.partial(host.notify, "batchkit_step_end", ctx=host.ctx))
            host.pop_metrics()
            if step:
                kind = "logging" if host.ctx.global_step % every == 0 else "other"
                rec[f"step_end_ops_{kind}"].append(ops_s)
                rec[f"step_end_reads_{kind}"].append(reads_s)
                rec[f"step_reads_{kind}"].append(reads_in_step + reads_s)
        plugin.detach()
        return rec

    def summarise(rec: dict) -> dict:
        mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
        return {
            "ops_per_micro_batch": {"batch_stage": mean(rec["batch_ops"]), "loss_stage": mean(rec["loss_ops"])},
            "ops_per_step_end": {"logging_step": mean(rec["step_end_ops_logging"]), "other_step": mean(rec["step_end_ops_other"])},
            "host_reads_per_step": {"logging_step": mean(rec["step_reads_logging"]), "other_step": mean(rec["step_reads_other"])},
            "host_reads_per_micro_batch_in_loss_stage": mean(rec["loss_reads"]),
            "router_hook_ops_per_micro_batch": mean(rec["hook_ops"]),
            "deferred_backward_ops_per_micro_batch": mean(rec["backward_ops"]),
        }

    out = {"one_process": summarise(run(False))}
    if hasattr(MoELoadBalancing, "_overlap_in_one_process"):
        out["overlapped_path"] = summarise(run(True))  # what runs with more than one rank
    out["cpu_ms_per_step"] = cpu_per_step(model, train)
    source = Path(batchkit_moe_balance.__file__).resolve().parent
    commit = sp.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                    check=False).stdout.strip()
    out.update(label=label, command=f"{sys.executable} " + " ".join(sys.argv), plugin_source=str(source), commit=commit,
               steps=steps, accumulate=accumulate,
               log_every_n_steps=every, layers=MODEL["layers"], experts=MODEL["num_experts"],
               how="torch.profiler on the CPU: leaf aten operators (views and allocations excluded) per hook call, "
                   "mean over steps after one warm-up step; host reads = aten::_local_scalar_dense and Tensor.tolist/"
                   "item/__float__/__bool__/cpu/numpy calls")
    return out


def cpu_per_step(model: Any, train: Any, rounds: int = 40, steps: int = 10) -> dict:
    """CPU time (this thread) per training step in one process, without the plugin, with it in micro
    mode, and in global mode on the overlapped path when the code has one: blocks of steps
    interleaved, order flipped every round, median over rounds. CPU time, unlike wall time, is
    barely changed by other processes on a shared machine."""
    import torch
    import torch.nn.functional as F

    from batchkit import PluginHost
    from batchkit_moe_balance import MoELoadBalancing

    windows = [torch.stack([train[i][0], train[i + 1][0]]) for i in range(0, 2 * steps, 2)]
    variants: dict[str, Any] = {"none": None}
    for name, mode in (("micro", "micro"), ("global_overlapped", "global")):
        if name == "global_overlapped" and not hasattr(MoELoadBalancing, "_overlap_in_one_process"):
            continue
        plugin = MoELoadBalancing(coefficient=TRAIN["coefficient"], mode=mode, router_type="Router", log_every_n_steps=0)
        plugin._overlap_in_one_process = name == "global_overlapped"
        host = PluginHost([plugin])
        plugin.attach(model)
        variants[name] = host

    def step(host: Any, window: Any) -> None:
        if host is not None:
            host.notify("batchkit_before_forward", batch=window, module=model, ctx=host.ctx)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        if host is not None:
            loss = host.chain("batchkit_transform_loss", loss, outputs=loss, batch=window, module=model, ctx=host.ctx)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if host is not None:
            host.ctx.global_step += 1
            host.notify("batchkit_step_end", ctx=host.ctx)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            start = time.thread_time()
            for window in windows:
                step(variants[name], window)
            if r:  # round 0 warms up
                times[name].append(1e3 * (time.thread_time() - start) / steps)
    out = {name: statistics.median(t) for name, t in times.items()}
    out.update({f"{name}_minus_micro": statistics.median([a - b for a, b in zip(times[name], times["micro"])])
                for name in times if name not in ("micro", "none")})
    out["how"] = f"thread CPU time, {rounds} rounds of {steps} steps per variant, interleaved, median"
    return out


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = len(runs[0]["expert_load"]["code"])
    experts = len(runs[0]["expert_load"]["code"][0])
    fig, axes = plt.subplots(len(MODES), layers, figsize=(4.2 * layers, 5.6), sharey=True)
    x = np.arange(experts)
    for row, mode in enumerate(MODES):
        mine = [r for r in runs if r["mode"] == mode]
        for layer in range(layers):
            ax = axes[row][layer]
            code, prose = [], []
            for r in mine:  # experts are interchangeable across seeds: sort each run by code preference
                c = np.array(r["expert_load"]["code"][layer])
                p = np.array(r["expert_load"]["prose"][layer])
                order = np.argsort(-(c - p))
                code.append(c[order])
                prose.append(p[order])
            code, prose = np.array(code), np.array(prose)
            ax.bar(x - 0.2, code.mean(0), 0.4, yerr=code.std(0), label="code (stdlib)", color="#1f77b4")
            ax.bar(x + 0.2, prose.mean(0), 0.4, yerr=prose.std(0), label="prose (pydoc topics)", color="#ff7f0e")
            ax.axhline(1 / experts, color="grey", lw=0.8, ls="--")
            jsd = statistics.fmean(r["specialisation_per_layer"][layer] for r in mine)
            ax.set_title(f"{mode} LBL, layer {layer}: JSD {jsd:.3f} bits", fontsize=10)
            ax.set_xticks(x)
            ax.set_xticklabels([str(i + 1) for i in x], fontsize=8)
            if row == len(MODES) - 1:
                ax.set_xlabel("expert, sorted by code-minus-prose load")
            if layer == 0:
                ax.set_ylabel("share of top-k choices")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Per-domain expert load on held-out text (mean ± std over {len({r['seed'] for r in runs})} seeds)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(runs: list[dict], cost: dict | None, args: argparse.Namespace) -> dict:
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["seed"])
        out[mode] = {
            "val_loss": {d: mean_std([r["val_loss"][d] for r in mine]) for d in ("code", "prose")},
            "specialisation": mean_std([r["specialisation"] for r in mine]),
            "seeds": [r["seed"] for r in mine],
            "allreduce_overhead": 1.0 if mode == "micro" else (cost["ratio_median"] if cost else None),
            "specialisation_per_layer": [statistics.fmean(r["specialisation_per_layer"][l] for r in mine)
                                         for l in range(len(mine[0]["specialisation_per_layer"]))],
            "balance": {k: mean_std([r["balance"][k] for r in mine]) for k in mine[0]["balance"]},
            "per_seed": [{"seed": r["seed"], "val_loss": r["val_loss"], "specialisation": r["specialisation"],
                          "balance": r["balance"], "train_s": r["train_s"]} for r in mine],
        }
    out["allreduce_overhead_detail"] = cost
    out["summary"] = {"allreduce_overhead": cost["ratio_median"] if cost else None}
    out["config"] = {"model": MODEL, "train": {**TRAIN, "steps": args.steps}, "metric": {
        "specialisation": "Jensen-Shannon divergence (bits) between code and prose expert distributions on held-out "
                          "text, per layer, mean over layers",
        "allreduce_overhead": "step time with global sync / micro (no sync), 2-process DDP, median over rounds"}}
    out["command"] = "python " + " ".join(sys.argv)
    out["machine"] = machine()
    return out


def print_cost(cost: dict) -> None:
    print(f"all-reduce overhead: step time global / micro = {cost['ratio_median']:.4f} "
          f"(quartiles {cost['ratio_quartiles'][0]:.3f}-{cost['ratio_quartiles'][1]:.3f}; "
          f"micro {cost['step_ms']['micro']:.2f} ms, global {cost['step_ms']['global']:.2f} ms; "
          f"loss stage {cost['loss_stage_us']['micro']:.0f} vs {cost['loss_stage_us']['global']:.0f} us; "
          f"all-reduce alone {cost['allreduce_alone_us']:.0f} us; CPU time ratio "
          f"{cost['cpu_ratio_median']:.4f}; rank 0 waited "
          f"{cost.get('global_wait_in_backward_ms_per_step') or 0:.3f} ms per step for the counts)", flush=True)


def update_summary(result: dict) -> None:
    """The figures issue 17 names, at the top of the results file."""
    summary = result.setdefault("summary", {})
    if result.get("allreduce_overhead_detail"):
        summary["allreduce_overhead"] = result["allreduce_overhead_detail"]["ratio_median"]
    for label, figures in result.get("loss_stage_profile", {}).items():
        one = figures["one_process"]
        summary[f"loss_stage_ops_per_micro_batch_{label}"] = one["ops_per_micro_batch"]["loss_stage"]
        summary[f"host_reads_per_non_logging_step_{label}"] = one["host_reads_per_step"]["other_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per training run")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (1 thread each)")
    parser.add_argument("--rounds", type=int, default=21, help="timing rounds of the all-reduce overhead")
    parser.add_argument("--steps-per-block", type=int, default=30)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--overhead-only", action="store_true",
                        help="run only the timing part and update its figures in --out, keeping the rest")
    parser.add_argument("--profile", metavar="LABEL",
                        help="count operators and host copies of the hooks; store them under loss_stage_profile.LABEL in --out")
    parser.add_argument("--reuse-runs", action="store_true", help="take the training runs already in --workdir")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "moe_balance"))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--plot", default=str(PLOT))
    parser.add_argument("--one-run", nargs=2, metavar=("MODE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        one_run(args.one_run[0], int(args.one_run[1]), args.steps, Path(args.out))
        return
    if args.profile:
        result = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        figures = profile_hooks(args.profile)
        result.setdefault("loss_stage_profile", {})[args.profile] = figures
        update_summary(result)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(figures, indent=2))
        return
    reexec_with_stable_malloc()
    if args.overhead_only:
        cost = overhead(args.steps_per_block, args.rounds)
        print_cost(cost)
        result = json.loads(Path(args.out).read_text())  # read now: other parts may have been updated meanwhile
        result["global"]["allreduce_overhead"] = cost["ratio_median"]
        result["allreduce_overhead_detail"] = cost
        result["overhead_command"] = "python " + " ".join(sys.argv)
        result["overhead_machine"] = machine()
        update_summary(result)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return
    if args.reuse_runs:
        runs = [json.loads((Path(args.workdir) / f"{mode}_seed{seed}.json").read_text()) for seed in args.seeds for mode in MODES]
        assert all(r["steps"] == args.steps for r in runs), "--steps differs from the runs in --workdir"
    else:
        runs = quality(args.seeds, args.steps, args.jobs, Path(args.workdir))
    cost = None
    if not args.skip_overhead:
        cost = overhead(args.steps_per_block, args.rounds)
        print_cost(cost)
    result = report(runs, cost, args)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    if "loss_stage_profile" in previous:
        result["loss_stage_profile"] = previous["loss_stage_profile"]
    update_summary(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    plot(runs, Path(args.plot))
    for mode in MODES:
        r = result[mode]
        print(f"{mode:6s}: val code {r['val_loss']['code']['mean']:.4f}±{r['val_loss']['code']['std']:.4f}  "
              f"prose {r['val_loss']['prose']['mean']:.4f}±{r['val_loss']['prose']['std']:.4f}  "
              f"JSD {r['specialisation']['mean']:.4f}±{r['specialisation']['std']:.4f}")


if __name__ == "__main__":
    main()
