"""Where the host overhead goes: an interleaved design of host_overhead.py (step-interleaved by
default, block-interleaved with ``--block-steps``) with the training thread's CPU time split into
sections of the training step, per side, as the difference from plain (microseconds per step,
median over runs of each run's median step).

Sections, in the order Lightning runs them under automatic optimization:

    lightning_pre   on_train_batch_start -> the module's training_step is entered (Lightning's own
                    batch handling; BatchKitCallback's on_train_batch_start runs before the mark)
    wrapper_pre     -> the user's training_step starts (batchkit's wrapper: sample count,
                    transform_batch and before_forward chains)
    forward         the user's training_step
    post            -> on_before_zero_grad (batchkit's transform_loss chain, Lightning's closure)
    zero_grad       -> on_before_backward
    backward        -> on_after_backward
    after_backward  -> on_before_optimizer_step (batchkit's before_optimizer_step chain)
    step_end        -> on_train_batch_end (optimizer.step; batchkit's step_end chain)
    fetch           on_train_batch_end -> the next on_train_batch_start (loader, collate)

    python benchmarks/host_overhead_sections.py [--rounds 2] [--block-steps 1]

A second use: ``--fit-only SIDE --epochs N`` trains one side and exits, for counting executed
instructions with valgrind (the per-step count is the difference between N = 3 and N = 1 over
the 2 x 64 extra steps; see docs/benchmarks.md):

    valgrind --tool=cachegrind --cache-sim=no python benchmarks/host_overhead_sections.py \\
        --fit-only batchkit --epochs 3 --samples 4096
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import threading
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

import host_overhead as ho
from _common import reexec_with_stable_malloc

SIDES = ("plain", "empty", "bare", "batchkit")
_current = threading.local()  # the section timer of the side this thread trains


class SectionTimer(ho.Baton):
    """The interleaved baton, also recording the thread CPU time of each section (with ``block`` > 1
    not for the first step of a turn, as the baton itself)."""

    def __init__(self, index: int, turns: ho.Turns, block: int = 1) -> None:
        super().__init__(index, turns, block)
        self.sections: dict[str, list[int]] = collections.defaultdict(list)
        self.mark_at: int | None = None
        self.batch_end: int | None = None

    def mark(self, trainer: pl.Trainer, section: str) -> None:
        now = time.thread_time_ns()
        if self.mark_at is not None and trainer.current_epoch >= 1 and (self.block == 1 or not self.after_turn):
            self.sections[section].append(now - self.mark_at)
        self.mark_at = now

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # outermost wrapper of training_step (BatchKitCallback patched it in setup, before this)
        inner, mark = pl_module.training_step, self.mark

        def training_step(*args: Any, **kwargs: Any) -> Any:
            mark(trainer, "lightning_pre")
            return inner(*args, **kwargs)

        pl_module.training_step = training_step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.batch_end is not None and trainer.current_epoch >= 1 and (self.block == 1 or not self.after_turn):
            self.sections["fetch"].append(time.thread_time_ns() - self.batch_end)
        super().on_train_batch_start(trainer, *args)
        self.mark_at = time.thread_time_ns()

    def on_before_zero_grad(self, trainer: pl.Trainer, *args: Any) -> None:
        self.mark(trainer, "post")

    def on_before_backward(self, trainer: pl.Trainer, *args: Any) -> None:
        self.mark(trainer, "zero_grad")

    def on_after_backward(self, trainer: pl.Trainer, *args: Any) -> None:
        self.mark(trainer, "backward")

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        self.mark(trainer, "after_backward")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.mark(trainer, "step_end")
        self.batch_end, self.mark_at = time.thread_time_ns(), None

    def on_train_epoch_end(self, *args: Any) -> None:
        super().on_train_epoch_end(*args)
        self.batch_end = None


class SectionMLP(ho.MLP):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        timer = _current.timer
        timer.mark(self.trainer, "wrapper_pre")
        loss = super().training_step(batch, batch_idx)
        timer.mark(self.trainer, "forward")
        return loss


ORDER = ("lightning_pre", "wrapper_pre", "forward", "post", "zero_grad", "backward", "after_backward", "step_end", "fetch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 4 interleaved runs")
    parser.add_argument("--block-steps", type=int, default=1, help="steps per turn (1: step-interleaved; see host_overhead.Baton)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--fit-only", choices=SIDES, help="train this side once and exit (for valgrind)")
    args = parser.parse_args()
    if not args.fit_only:
        reexec_with_stable_malloc()  # under valgrind, set MALLOC_ENV yourself
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.samples, 784, generator=g), torch.randint(0, 10, (args.samples,), generator=g))
    if args.fit_only:
        ho.fit_side(args.fit_only, [], data, args.epochs, 256, 64)
        return
    ho.MLP = SectionMLP  # fit_side builds the model from here
    diffs: dict[str, dict[str, list[float]]] = {s: collections.defaultdict(list) for s in SIDES[1:]}
    plain_us: dict[str, list[float]] = collections.defaultdict(list)
    for r in range(args.rounds):
        for shift in range(len(SIDES)):
            order = SIDES[shift:] + SIDES[:shift]
            gc.collect()
            turns = ho.Turns(len(order), seed=1000 + 10 * r + shift)
            timers = [SectionTimer(i, turns, args.block_steps) for i in range(len(order))]

            def train(i: int) -> None:
                _current.timer = timers[i]
                turns.wait(i)
                ho.fit_side(order[i], [timers[i]], data, args.epochs, 256, 64)

            threads = [threading.Thread(target=train, args=(i,)) for i in range(len(order))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            by_side = dict(zip(order, timers))
            for section in ORDER:
                plain = statistics.median(by_side["plain"].sections[section]) / 1e3
                plain_us[section].append(plain)
                for side in SIDES[1:]:
                    diffs[side][section].append(statistics.median(by_side[side].sections[section]) / 1e3 - plain)
            print(f"run {r}.{shift} done", flush=True)
    print(f"{'section':15s} {'plain us':>9s} " + " ".join(f"{s:>9s}" for s in SIDES[1:]))
    for section in ORDER:
        print(f"{section:15s} {statistics.median(plain_us[section]):9.1f} "
              + " ".join(f"{statistics.median(diffs[s][section]):+9.2f}" for s in SIDES[1:]))
    print(f"{'sum of medians':15s} {sum(statistics.median(plain_us[x]) for x in ORDER):9.1f} "
          + " ".join(f"{sum(statistics.median(diffs[s][x]) for x in ORDER):+9.2f}" for s in SIDES[1:]))


if __name__ == "__main__":
    main()
