"""Host overhead: a plain Lightning run versus the same run with BatchKitCallback and three
pass-through plugins implementing every hook, in one process, interleaved, median of several runs.

Step time is the CPU time of the training thread (``time.thread_time``; with ``num_workers=0`` and
one torch thread all the work is on that thread), which other processes on a shared 2-core machine
disturb far less than wall time, from the second epoch on (Trainer construction and the first-epoch
warm-up are excluded on every side).

Three designs:

* **block-interleaved** (the figures in ``summary``): the sides train in threads of one process and
  take turns of ``--block-steps`` (16) training steps, in a fresh random order each round, so a
  change in machine speed hits every side within ~0.2 s; the first step of each turn is not timed,
  so every timed step follows the same side's previous step, as in a lone run. Each run gives each
  side's median step time / plain's; every side takes every thread position once per round (a
  Latin square). A second plain side (``plain_again``) is the design's zero: its ratio shows how
  far two identical sides land apart.
* **step-interleaved** (``step_interleaved``): the same with one step per turn, every step timed.
  It follows machine speed most closely, but each timed step runs right after four other models'
  steps, on caches they filled, so it charges code that only one side runs (the host, the
  plugins) more than a lone run does; kept as the pessimistic bound.
* **run-interleaved** (``run_interleaved``): whole runs one after another, the sides rotated each
  repeat, mean step time. It compares runs seconds apart and, on a noisy VM, cannot resolve 1%.

    python benchmarks/host_overhead.py [--block-rounds 5] [--block-steps 16] [--interleaved-rounds 5] [--repeats 7]

Writes benchmarks/results/host_overhead.json with a ``summary``: ``overhead_ratio`` (batchkit /
plain), ``empty_callback_ratio`` (a do-nothing Lightning callback: the yardstick),
``bare_host_ratio`` (BatchKitCallback with no plugin: the host's own share), ``aa_ratio``, the
goal (overhead_ratio <= empty_callback_ratio + 0.01) and the paired per-run gap to the empty
callback. The callbacks run in their default configuration (the host's per-plugin hook timing
off); one extra run with it on gives the per-plugin figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset

from _common import MALLOC_ENV
from _common import machine
from _common import reexec_with_stable_malloc

from batchkit import Plugin
from batchkit import hookimpl
from batchkit.lightning import BatchKitCallback


class MLP(pl.LightningModule):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class PassThrough(Plugin):
    """Implements every hook and changes nothing."""

    name = "pass_through"
    allow_multiple = True

    @hookimpl
    def batchkit_setup(self, host: Any) -> None: ...
    @hookimpl
    def batchkit_prepare_data(self, dataset: Any) -> None: ...
    @hookimpl
    def batchkit_fit_start(self, ctx: Any) -> None: ...
    @hookimpl
    def batchkit_plan_total_steps(self, total_steps: Any) -> None: ...
    @hookimpl
    def batchkit_before_forward(self, batch: Any) -> None: ...
    @hookimpl
    def batchkit_epoch_start(self, epoch: int) -> None: ...
    @hookimpl
    def batchkit_epoch_end(self, epoch: int) -> None: ...
    @hookimpl
    def batchkit_before_optimizer_step(self, optimizer: Any) -> None: ...
    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None: ...
    @hookimpl
    def batchkit_teardown(self, ctx: Any) -> None: ...
    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any) -> None: ...
    @hookimpl
    def batchkit_wrap_collate(self, collate_fn: Any) -> None: ...
    @hookimpl
    def batchkit_transform_batch(self, batch: Any) -> None: ...
    @hookimpl
    def batchkit_transform_loss(self, loss: Any) -> None: ...
    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer: Any) -> None: ...
    @hookimpl
    def batchkit_state_dict(self) -> dict:
        return {}
    @hookimpl
    def batchkit_load_state_dict(self, state: dict) -> None: ...


class StepTimer(pl.Callback):
    """Mean seconds per training batch (thread CPU time and wall time) from the start of epoch 2,
    and the median thread CPU time of a single step (batch start to the next batch start, the data
    fetch included): a second estimate that a step hit by an interruption does not move."""

    def __init__(self) -> None:
        self.start: tuple[float, float] | None = None
        self.batches = 0
        self.cpu = self.wall = self.cpu_median = 0.0
        self.last_batch_start: float | None = None
        self.steps: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            self.start = (time.thread_time(), time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start is not None:
            now = time.thread_time()
            if self.last_batch_start is not None:
                self.steps.append(now - self.last_batch_start)
            self.last_batch_start = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_batch_start = None  # the epoch boundary is not a step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start is not None:
            self.batches += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.start is not None
        self.cpu = (time.thread_time() - self.start[0]) / self.batches
        self.wall = (time.perf_counter() - self.start[1]) / self.batches
        self.cpu_median = statistics.median(self.steps)


class EmptyCallback(pl.Callback):
    """A callback that does nothing: what Lightning charges for any extra callback."""


def run(side: str, data: TensorDataset, epochs: int, hidden: int, batch_size: int, time_hooks: bool = False) -> tuple[StepTimer, dict]:
    """side: "plain" (no extra callback), "empty" (a do-nothing callback), "bare" (BatchKitCallback
    with no plugin: the host's own work), "batchkit" (3 pass-through plugins). ``time_hooks``: the
    host's per-plugin timing (off by default, as for users; on only for the per-plugin figure)."""
    gc.collect()  # the previous run's Trainer is garbage: collect it now, not inside the next timed window
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    kit = fit_side(side, [timer], data, epochs, hidden, batch_size, time_hooks)
    per_plugin = kit.host.total_seconds() if kit else {}
    return timer, per_plugin


def fit_side(side: str, callbacks: list[pl.Callback], data: TensorDataset, epochs: int, hidden: int, batch_size: int,
             time_hooks: bool = False) -> BatchKitCallback | None:
    """Train the MLP with ``callbacks`` plus what ``side`` adds; returns the BatchKitCallback if any."""
    kit = None
    if side == "empty":
        callbacks = [EmptyCallback(), *callbacks]
    # "plain_again": a second plain side, the step-interleaved design's zero
    if side in ("bare", "batchkit"):
        kit = BatchKitCallback({f"pass{i}": PassThrough() for i in range(3 if side == "batchkit" else 0)}, time_hooks=time_hooks)
        callbacks = [kit, *callbacks]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(MLP(data.tensors[0].shape[1], hidden), DataLoader(data, batch_size=batch_size, shuffle=True))
    return kit


class Baton(pl.Callback):
    """Interleaved designs: each side trains in its own thread and waits for its turn at a batch
    start, so the sides train in turn (in a fresh random order each round) and a change in machine
    speed hits them all within milliseconds. Records this side's thread CPU time per step (its own
    work only: a waiting thread uses none).

    ``block``: the steps a side takes per turn. 1 (step-interleaved): every step is timed, and each
    runs right after the other sides' steps, on caches they have filled. More (block-interleaved):
    the first step of each turn is not timed, so the timed steps follow this side's own step, as in
    a lone run."""

    def __init__(self, index: int, turns: "Turns", block: int = 1) -> None:
        self.index, self.turns, self.block = index, turns, block
        self.steps: list[int] = []
        self.last: int | None = None
        self.taken = 0  # steps since the run started
        self.after_turn = False  # whether the step in progress began right after this side's turn came

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        now = time.thread_time_ns()
        if self.last is not None and trainer.current_epoch >= 1 and (self.block == 1 or not self.after_turn):
            self.steps.append(now - self.last)
        self.taken += 1
        self.after_turn = self.taken % self.block == 0
        if self.after_turn:
            self.turns.pass_on(self.index)
        self.last = time.thread_time_ns()

    def on_train_epoch_end(self, *args: Any) -> None:
        self.last = None

    def on_train_end(self, *args: Any) -> None:
        self.turns.finish(self.index)


class Turns:
    """Whose turn it is among the step-interleaved sides."""

    def __init__(self, n: int, seed: int) -> None:
        import random
        import threading

        self.n, self.rng, self.cond = n, random.Random(seed), threading.Condition()
        self.turn, self.done, self.round = 0, set(), []

    def _advance(self) -> None:
        while True:
            if not self.round:
                self.round = list(range(self.n))
                self.rng.shuffle(self.round)
            nxt = self.round.pop(0)
            if nxt not in self.done or len(self.done) == self.n:
                self.turn = nxt
                return

    def wait(self, index: int) -> None:
        with self.cond:
            while self.turn != index:
                self.cond.wait()

    def pass_on(self, index: int) -> None:
        with self.cond:
            self._advance()
            self.cond.notify_all()
            while self.turn != index:
                self.cond.wait()

    def finish(self, index: int) -> None:
        with self.cond:
            self.done.add(index)
            self._advance()
            self.cond.notify_all()


def run_interleaved(order: list[str], data: TensorDataset, epochs: int, hidden: int, batch_size: int, seed: int,
                    block: int = 1) -> dict[str, float]:
    """One interleaved run of the sides in ``order`` (thread i trains side order[i]), ``block``
    steps per turn (see :class:`Baton`); returns each side's median step time divided by the plain
    side's."""
    import threading

    gc.collect()
    turns = Turns(len(order), seed)
    batons = [Baton(i, turns, block) for i in range(len(order))]

    def train(i: int) -> None:
        turns.wait(i)
        fit_side(order[i], [batons[i]], data, epochs, hidden, batch_size)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(len(order))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    medians = {side: statistics.median(b.steps) for side, b in zip(order, batons)}
    return {side: m / medians["plain"] for side, m in medians.items()}


# the interleaved designs' sides: a second plain side ("plain_again") is their zero
INTERLEAVED_SIDES = ("plain", "plain_again", "empty", "bare", "batchkit")


def interleaved_round(block: int, r: int, data: TensorDataset, epochs: int, hidden: int, batch_size: int) -> dict[str, list[float]]:
    """Round ``r`` of an interleaved design with ``block`` steps per turn: one run per thread
    position of each side (a Latin square); per side, each run's ratio to plain."""
    ratios: dict[str, list[float]] = {side: [] for side in INTERLEAVED_SIDES[1:]}
    for shift in range(len(INTERLEAVED_SIDES)):
        order = list(INTERLEAVED_SIDES[shift:] + INTERLEAVED_SIDES[:shift])
        now = run_interleaved(order, data, epochs, hidden, batch_size, seed=10 * r + shift, block=block)
        for side in INTERLEAVED_SIDES[1:]:
            ratios[side].append(now[side])
        print(f"block {block}, run {r}.{shift} {order}: " + ", ".join(f"{s} {v:.4f}" for s, v in now.items() if s != "plain"))
    return ratios


def figures(ratios: dict[str, list[float]], design: str) -> dict[str, Any]:
    """The summary figures of one interleaved design: medians over runs, the goal, the paired gap."""
    median = {side: statistics.median(v) for side, v in ratios.items()}
    goal = median["empty"] + 0.01
    gaps = [k - e for k, e in zip(ratios["batchkit"], ratios["empty"])]
    return {
        "overhead_ratio": median["batchkit"],
        "empty_callback_ratio": median["empty"],
        "bare_host_ratio": median["bare"],
        "aa_ratio": median["plain_again"],
        "goal_overhead_ratio_at_most": goal,
        "goal_met": median["batchkit"] <= goal,
        "gap_to_empty_median": statistics.median(gaps),
        "runs": len(gaps),
        "design": design,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="run-interleaved repeats (0: skip that design)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run-interleaved run (the interleaved designs train 2 more)")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=784, help="MLP input width")
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared 2-core box)")
    parser.add_argument("--block-steps", type=int, default=16, help="block-interleaved design: steps per turn")
    parser.add_argument("--block-rounds", type=int, default=5,
                        help="block-interleaved design (the summary): rounds of 5 runs, each side once in every thread position")
    parser.add_argument("--interleaved-rounds", type=int, default=5,
                        help="step-interleaved design: rounds of 5 runs (0: skip that design)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "host_overhead.json"))
    args = parser.parse_args()
    if args.block_steps < 2 or args.block_rounds < 1:
        parser.error("--block-steps must be at least 2 and --block-rounds at least 1 (the summary's design)")
    reexec_with_stable_malloc()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.samples, args.dim, generator=g), torch.randint(0, 10, (args.samples,), generator=g))
    sides = ("plain", "empty", "bare", "batchkit")
    # warm up every code path once; the plain run's step time is reported as the scale of the ratios
    plain_alone = {side: run(side, data, 2, args.hidden, args.batch_size)[0] for side in sides}["plain"]
    # The interleaved designs: the sides train in turn inside one process, 2 + epochs - 1 timed
    # epochs per run. Block-interleaved (the summary) and step-interleaved, alternating by round so
    # that both see the same hour of the machine.
    blocked: dict[str, list[float]] = {side: [] for side in INTERLEAVED_SIDES[1:]}
    stepped: dict[str, list[float]] = {side: [] for side in INTERLEAVED_SIDES[1:]}
    for r in range(max(args.block_rounds, args.interleaved_rounds)):
        for block, rounds, into in ((args.block_steps, args.block_rounds, blocked), (1, args.interleaved_rounds, stepped)):
            if r < rounds:
                for side, v in interleaved_round(block, r, data, args.epochs + 2, args.hidden, args.batch_size).items():
                    into[side] += v
    # Run-interleaved design (for comparison): whole runs, the sides rotated within each repeat.
    timers: dict[str, list[StepTimer]] = {side: [] for side in sides}
    for i in range(args.repeats):
        for side in sides[i % len(sides):] + sides[: i % len(sides)]:
            timer, _ = run(side, data, args.epochs, args.hidden, args.batch_size)
            timers[side].append(timer)
        p, e, b, k = (timers[s][-1].cpu for s in sides)
        print(f"repeat {i}: cpu ms/step plain {1e3 * p:.3f}, empty callback {1e3 * e:.3f}, bare host {1e3 * b:.3f}, "
              f"batchkit {1e3 * k:.3f} (ratio {k / p:.4f})")
    # the per-plugin figure from one more run with the host's hook timing on (not in the ratios)
    _, hook_seconds = run("batchkit", data, args.epochs, args.hidden, args.batch_size, time_hooks=True)
    run_design = None
    if args.repeats:
        plain = timers["plain"]

        def run_ratios(side: str, attr: str = "cpu") -> list[float]:
            return [getattr(t, attr) / getattr(p, attr) for t, p in zip(timers[side], plain)]

        run_design = {
            "overhead_ratio": statistics.median(run_ratios("batchkit")),
            "overhead_ratio_wall": statistics.median(run_ratios("batchkit", "wall")),
            "empty_callback_ratio": statistics.median(run_ratios("empty")),
            "bare_host_ratio": statistics.median(run_ratios("bare")),
            "goal_met": statistics.median(run_ratios("batchkit")) <= statistics.median(run_ratios("empty")) + 0.01,
            # the same ratios from each run's median single-step time
            "median_step_ratios": {side: statistics.median(t.cpu_median / p.cpu_median for t, p in zip(timers[side], plain)) for side in sides[1:]},
            "plain_step_ms": 1e3 * statistics.median(p.cpu for p in plain),
            "batchkit_step_ms": 1e3 * statistics.median(k.cpu for k in timers["batchkit"]),
            "ratios": {side: run_ratios(side) for side in sides[1:]},
            "repeats": args.repeats,
            "timed_steps_per_run": (args.epochs - 1) * -(-args.samples // args.batch_size),
            "design": "whole runs one after another, the sides rotated each repeat; mean step CPU time from epoch 2; median over repeats",
        }

    def design_detail(ratios: dict[str, list[float]], design: str) -> dict[str, Any] | None:
        if not ratios["batchkit"]:
            return None
        return {
            **figures(ratios, design),
            "quartiles": {side: statistics.quantiles(v, n=4)[::2] for side, v in ratios.items()} if len(ratios["batchkit"]) > 1 else None,
            "ratios": ratios,
        }

    batches = -(-args.samples // args.batch_size)
    block_design = f"block-interleaved, {args.block_steps} steps per turn, the first step of each turn untimed"
    result = {
        "summary": figures(blocked, block_design),
        "block_interleaved": design_detail(blocked, block_design),
        "step_interleaved": design_detail(stepped, "step-interleaved, 1 step per turn, every step timed"),
        "interleaved_design": "sides in threads taking turns of training steps, random order each round; per run each side's "
        "median step CPU time / plain's; every side in every thread position once per round; median over runs",
        "plain_step_ms": 1e3 * plain_alone.cpu,
        "run_interleaved": run_design,
        "hook_ms_per_step_per_plugin": {k: 1e3 * v / (args.epochs * batches) for k, v in hook_seconds.items()},
        "hook_timing": "per-plugin figure from one extra batchkit run with time_hooks=True; the timed sides run with it off (the default)",
        "machine": machine(),
        "malloc_env": MALLOC_ENV,
        "model": f"MLP {args.dim}-{args.hidden}-{args.hidden}-10, batch {args.batch_size}",
        "command": "python benchmarks/host_overhead.py "
        + f"--block-rounds {args.block_rounds} --block-steps {args.block_steps} --interleaved-rounds {args.interleaved_rounds} "
        + f"--repeats {args.repeats} --epochs {args.epochs} --threads {args.threads} "
        + f"--dim {args.dim} --hidden {args.hidden} --batch-size {args.batch_size} --out {os.path.relpath(args.out)}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    shown = {k: v for k, v in result.items() if k not in ("run_interleaved", "block_interleaved", "step_interleaved")}
    print(json.dumps(shown, indent=2))
    for name in ("block_interleaved", "step_interleaved"):
        if result[name]:
            print(name, json.dumps({k: v for k, v in result[name].items() if k != "ratios"}))

if __name__ == "__main__":
    main()
