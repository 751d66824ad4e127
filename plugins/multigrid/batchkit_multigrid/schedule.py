"""The multigrid schedule of mini-batch shapes: Wu, Girshick, He, Feichtenhofer and Krähenbühl,
"A Multigrid Method for Efficiently Training Video Models" (CVPR 2020), as SlowFast runs it.

The method
----------
Train on a *grid* of mini-batch shapes (B, T, H, W) instead of the one base shape (B0, T0, H0, W0),
keeping the work per iteration B·T·H·W about constant: a coarser shape gets a proportionally larger
batch, so an epoch takes fewer iterations. The model does not change (it must pool adaptively).

Long cycle (per epoch range). Shape factors (t_k, s_k), k = 0 .. K-1, default the paper's four::

    (1/4, 1/√2), (1/2, 1/√2), (1/2, 1), (1, 1)                      (temporal, spatial)
    T_k = T0·t_k,  H_k = round(H0·s_k),  W_k = round(W0·s_k)

Short cycle (per iteration, period 3 by default). Inside long-cycle shape k, iterations cycle
through the spatial factors σ_j ∈ (1/2, 1/√2) *of the base shape* (SlowFast: ``round(σ_j·S0)``,
so for a long-cycle shape at 1/√2 the short cycle is 1/2, 1/√2, 1/√2) and then shape k itself::

    iteration i of an epoch uses position p = i mod 3:  (T_k, round(σ_0·H0), round(σ_0·W0)),
                                                        (T_k, round(σ_1·H0), round(σ_1·W0)),
                                                        (T_k, H_k, W_k)

Batch factor = base volume / shape volume, rounded::

    β_k      = round(T0·H0·W0 / (T_k·H_k·W_k))                    long-cycle shape k
    β_{k,j}  = β_k · round(H_k·W_k / (σ_j·H0 · σ_j·W0))            short-cycle position j
    batch    = b · β                                              b: the base batch size (per process)

Epochs. The baseline's LR stages [m_0 = 0, m_1, ..., m_n] (``lr_milestones`` = m_1..m_n) keep their
role: the long cycle runs once inside every LR stage but the last, giving each shape k the same
number of *iterations*; the last stage becomes a fine-tune at the base shape. With
ᾱ_k = mean of the batch factors over shape k's short cycle (β_k alone without short cycles)::

    e_{i,k}    = (m_{i+1} - m_i) · ᾱ_k / Σ_k ᾱ_k                  epochs of shape k in LR stage i
    saving     = m_n / Σ_{i,k} (e_{i,k} / ᾱ_k)                     iterations saved over the baseline
    e_ft       = (max_epochs - m_n) / saving · ᾱ_{K-1}             fine-tune epochs, same saving
    x          = max_epochs · epoch_factor / (Σ e_{i,k} + e_ft)    epoch factor: train 1.5x the epochs
    end epochs = round(x · cumulative sum of the epochs above)

Learning rate: linear in the long-cycle batch factor only (never changed per short-cycle
iteration): stage (i, k) runs at γ^i · β_k times the base LR. SlowFast's ``SOLVER.STEPS`` are the
stage start epochs, with the fine-tune split in two halves, the second one γ times smaller.

For SlowFast's defaults (Kinetics SlowFast 8x8: T0 = 32, S0 = 224, steps [0, 94, 154, 196],
MAX_EPOCH 239, γ = 0.1) this module reproduces SlowFast's ``MultigridSchedule`` exactly (tested):
STEPS [0, 73, 110, 142, 158, 205, 228, 248, 259, 291, 308, 322, 329, 343], MAX_EPOCH 358.

Our units
---------
A base batch size ``b`` (what one process's DataLoader yields at the base shape), a base input size
``(T, H, W)`` for clips or ``(H, W)`` for images (images have no temporal factor: every long-cycle
factor must have t = 1), and the baseline's ``max_epochs`` and LR milestones. Epoch ``e`` of the
multigrid run is a full pass over the data at the shapes :meth:`MultigridSchedule.batch_shape`
gives. Temporal factors must divide T (shapes are made by striding frames); spatial sizes are
rounded (shapes are made by resizing), as SlowFast rounds its crop sizes.

Where we differ from SlowFast's code
------------------------------------
* ``short_cycle_factors`` may have any length L (period L + 1); SlowFast hard-codes two.
* ``long_cycle`` without ``short_cycle`` works (SlowFast indexes a third short-cycle shape there).
* :meth:`MultigridSchedule.batches_in_epoch` is the exact number of batches the short cycle makes;
  SlowFast's ``ShortCycleBatchSampler.__len__`` divides by the mean batch size, which can differ.
* Bad options fail at construction with a :class:`ValueError` that names the option and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple
from typing import Sequence


__all__ = [
    "EPOCH_FACTOR",
    "EVAL_FREQ",
    "GAMMA",
    "IMAGE_LONG_CYCLE_FACTORS",
    "LONG_CYCLE_FACTORS",
    "SHORT_CYCLE_FACTORS",
    "BatchShape",
    "GridShape",
    "MultigridSchedule",
    "Stage",
    "short_cycle_batches",
]

#: The paper's long cycle, as (temporal, spatial) factors of the base shape (SlowFast's defaults).
LONG_CYCLE_FACTORS: tuple[tuple[float, float], ...] = ((0.25, 0.5**0.5), (0.5, 0.5**0.5), (0.5, 1.0), (1.0, 1.0))
#: Images have no T: the paper's spatial factors alone, in order (our default, not the paper's).
IMAGE_LONG_CYCLE_FACTORS: tuple[tuple[float, float], ...] = ((1.0, 0.5**0.5), (1.0, 1.0))
#: The paper's short cycle: spatial factors of the base shape, before the long-cycle shape itself.
SHORT_CYCLE_FACTORS: tuple[float, ...] = (0.5, 0.5**0.5)
#: Train this many times the baseline's epochs (at far fewer iterations).
EPOCH_FACTOR = 1.5
#: The baseline's LR decay per stage (SlowFast's SOLVER.GAMMA default).
GAMMA = 0.1
#: Evaluations per long-cycle stage (SlowFast's MULTIGRID.EVAL_FREQ).
EVAL_FREQ = 3

_PREFIX = "multigrid"


class GridShape(NamedTuple):
    """One mini-batch shape: the batch is ``batch_factor`` times the base batch size, and every
    input is resized to ``size`` ((T, H, W) for clips, (H, W) for images)."""

    batch_factor: int
    size: tuple[int, ...]


class BatchShape(NamedTuple):
    """What the sampler stage tells the collate stage about one mini-batch."""

    batch_size: int
    size: tuple[int, ...]
    cycle_position: int  # 0 .. L-1: short-cycle shape j; L: the long-cycle shape itself


@dataclass(frozen=True)
class Stage:
    """A range of epochs trained at one long-cycle shape."""

    lr_stage: int  # i: the baseline's LR stage (γ^i); the fine-tune is stage n
    long_cycle: int  # k: index into the long-cycle factors (the fine-tune uses the last, the base)
    shape: GridShape  # the long-cycle shape (T_k, H_k, W_k) and its batch factor β_k
    start_epoch: int
    end_epoch: int  # exclusive; equal to start_epoch when rounding left the stage empty
    fine_tune: bool = False


def short_cycle_batches(indices: Sequence[int], batch_sizes: Sequence[int], drop_last: bool = True):
    """Split one epoch's sample indices into consecutive batches whose sizes cycle through
    ``batch_sizes`` (SlowFast's ``ShortCycleBatchSampler``, with its counter reset every epoch).

    Yields ``(batch, cycle_position)``. The last, incomplete batch is dropped when ``drop_last``
    (needed so that every rank yields the same number of batches at the same shapes).
    """
    position, start = 0, 0
    period = len(batch_sizes)
    while start < len(indices):
        size = batch_sizes[position % period]
        batch = list(indices[start : start + size])
        if len(batch) < size and drop_last:
            return
        yield batch, position % period
        start += size
        position += 1


class MultigridSchedule:
    """Where multigrid training stands at any (epoch, iteration): shape, batch size, learning rate.

    Args:
        base_size: the base input size, ``(T, H, W)`` for clips or ``(H, W)`` for images.
        max_epochs: the baseline's number of epochs (SlowFast's ``SOLVER.MAX_EPOCH``).
        lr_milestones: the baseline's LR decay epochs, increasing, in (0, max_epochs) (SlowFast's
            ``SOLVER.STEPS`` without the leading 0). The long cycle repeats in every LR stage but
            the last, which becomes the fine-tune at the base shape; so at least one is needed.
        base_batch_size: ``b``, the batch size of the baseline (per process).
        long_cycle: vary the shape per epoch range (``MULTIGRID.LONG_CYCLE``).
        short_cycle: vary the spatial size per iteration (``MULTIGRID.SHORT_CYCLE``).
        long_cycle_factors: (temporal, spatial) factors; must end with (1, 1), the base shape.
            Default :data:`LONG_CYCLE_FACTORS` for clips, :data:`IMAGE_LONG_CYCLE_FACTORS` for images.
        short_cycle_factors: spatial factors of the base shape, default :data:`SHORT_CYCLE_FACTORS`.
        epoch_factor: multigrid trains ``epoch_factor`` times the baseline's epochs (default 1.5).
        gamma: the baseline's LR decay per milestone (default 0.1).
        eval_freq: evaluations per long-cycle stage, for :meth:`is_eval_epoch` (default 3).
    """

    def __init__(
        self,
        base_size: Sequence[int],
        max_epochs: int,
        lr_milestones: Sequence[int],
        *,
        base_batch_size: int = 1,
        long_cycle: bool = True,
        short_cycle: bool = True,
        long_cycle_factors: Sequence[Sequence[float]] | None = None,
        short_cycle_factors: Sequence[float] = SHORT_CYCLE_FACTORS,
        epoch_factor: float = EPOCH_FACTOR,
        gamma: float = GAMMA,
        eval_freq: int = EVAL_FREQ,
    ) -> None:
        self.base_size = _check_base_size(base_size)
        self.is_clip = len(self.base_size) == 3
        self.baseline_max_epochs = _check_int("max_epochs", max_epochs, minimum=1)
        self.base_batch_size = _check_int("base_batch_size", base_batch_size, minimum=1)
        self.long_cycle, self.short_cycle = bool(long_cycle), bool(short_cycle)
        if not (self.long_cycle or self.short_cycle):
            raise ValueError(f"{_PREFIX}: long_cycle and short_cycle are both off, so there is nothing to schedule; "
                             "turn on at least one of them (the paper uses both)")
        if long_cycle_factors is None:
            long_cycle_factors = LONG_CYCLE_FACTORS if self.is_clip else IMAGE_LONG_CYCLE_FACTORS
        self.long_cycle_factors = self._check_long_cycle_factors(long_cycle_factors)
        self.short_cycle_factors = self._check_short_cycle_factors(short_cycle_factors) if self.short_cycle else ()
        self.epoch_factor = _check_positive("epoch_factor", epoch_factor)
        self.gamma = _check_positive("gamma", gamma)
        self.eval_freq = _check_int("eval_freq", eval_freq, minimum=1)
        self.steps = [0] + self._check_milestones(lr_milestones)  # the baseline's LR stage starts

        # Every long-cycle shape with its batch factor, then its short-cycle shapes (sampler factors).
        self.long_cycle_shapes = [self._long_cycle_shape(k) for k in range(len(self.long_cycle_factors))]
        self._cycles = [self._short_cycle_shapes(k) for k in range(len(self.long_cycle_factors))]

        if self.long_cycle:
            self.stages = self._long_cycle_stages()
            ends = [s.end_epoch for s in self.stages]
            # SOLVER.STEPS: each stage's start; the fine-tune is split in two halves.
            self.lr_steps = [0] + ends
            self.lr_steps[-1] = (self.lr_steps[-2] + self.lr_steps[-1]) // 2
            # SOLVER.LRS (relative to the base LR): γ^i · β_k; the first fine-tune half keeps the
            # LR of the stage before it, the second half is the fine-tune stage's own.
            lrs = [self.gamma**s.lr_stage * s.shape.batch_factor for s in self.stages]
            self.lr_factors = lrs[:-1] + [lrs[-2], lrs[-1]]
            self.max_epochs = ends[-1]
        else:
            # Short cycle alone (SlowFast): the base shape throughout, epochs scaled by epoch_factor.
            self.lr_steps = [int(s * self.epoch_factor) for s in self.steps]
            self.max_epochs = int(self.baseline_max_epochs * self.epoch_factor)
            self.lr_factors = [self.gamma**i for i in range(len(self.lr_steps))]
            base = self.long_cycle_shapes[-1]
            bounds = self.lr_steps + [self.max_epochs]
            self.stages = [Stage(i, len(self.long_cycle_factors) - 1, base, bounds[i], bounds[i + 1])
                           for i in range(len(self.lr_steps))]

    # ---------------------------------------------------------------- construction

    def _long_cycle_shape(self, k: int) -> GridShape:
        """(T_k, H_k, W_k) and β_k = round(V0 / V_k)."""
        t_factor, s_factor = self.long_cycle_factors[k]
        size = self._spatial(s_factor, "long_cycle_factors", k)
        if self.is_clip:
            size = (self._frames(t_factor, k),) + size
        factor = round(self._volume(self.base_size) / self._volume(size))
        if factor < 1:
            raise ValueError(
                f"{_PREFIX}: long_cycle_factors[{k}] = {tuple(self.long_cycle_factors[k])} gives the shape {size}, "
                f"more than twice the base {self.base_size}, so its batch factor round(V0 / V) is 0 and its batch "
                "would be empty; use shape factors <= 1")
        return GridShape(factor, size)

    def _short_cycle_shapes(self, k: int) -> list[GridShape]:
        """The shapes of one short cycle inside long-cycle shape k, in iteration order, with the
        sampler's batch factors β_k · round(H_k·W_k / (σ_j·H0·σ_j·W0))."""
        long_shape = self.long_cycle_shapes[k]
        h_k, w_k = long_shape.size[-2:]
        h0, w0 = self.base_size[-2:]
        shapes = []
        for j, sigma in enumerate(self.short_cycle_factors):
            spatial = round((h_k / (sigma * h0)) * (w_k / (sigma * w0)))
            if spatial < 1:
                raise ValueError(
                    f"{_PREFIX}: short_cycle_factors[{j}] = {sigma:g} is larger than the spatial factor "
                    f"{self.long_cycle_factors[k][1]:g} of long_cycle_factors[{k}], so its batch factor "
                    f"round(({h_k}·{w_k}) / ({sigma * h0:g}·{sigma * w0:g})) is 0 and its batch would be empty; "
                    "use short-cycle factors no larger than the smallest long-cycle spatial factor")
            size = self._spatial(sigma, "short_cycle_factors", j)
            if self.is_clip:
                size = (long_shape.size[0],) + size
            shapes.append(GridShape(long_shape.batch_factor * spatial, size))
        return shapes + [long_shape]

    def _mean_batch_factor(self, k: int) -> float:
        """ᾱ_k as SlowFast's schedule computes it: from the *nominal* short-cycle sizes σ·S0
        (unrounded) and the long-cycle shape itself."""
        long_shape = self.long_cycle_shapes[k]
        volumes = []
        if self.short_cycle:
            h0, w0 = self.base_size[-2:]
            t = long_shape.size[0] if self.is_clip else 1
            volumes = [t * (sigma * h0) * (sigma * w0) for sigma in self.short_cycle_factors]
        volumes.append(self._volume(long_shape.size))
        factors = [round(self._volume(self.base_size) / v) for v in volumes]
        return sum(factors) / len(factors)

    def _long_cycle_stages(self) -> list[Stage]:
        """SlowFast's ``get_long_cycle_schedule``: the long cycle inside every LR stage, then the
        fine-tune, scaled to ``max_epochs · epoch_factor`` epochs and rounded cumulatively."""
        mean_factors = [self._mean_batch_factor(k) for k in range(len(self.long_cycle_factors))]
        planned = []  # (lr_stage, k, epochs) before the epoch factor
        total_iters = 0.0  # in units of "baseline epochs' worth of iterations"
        for i in range(len(self.steps) - 1):
            stage_epochs = self.steps[i + 1] - self.steps[i]
            for k, alpha in enumerate(mean_factors):
                epochs = stage_epochs * alpha / sum(mean_factors)  # equal iterations for every shape
                total_iters += epochs / alpha
                planned.append((i, k, epochs))
        iter_saving = self.steps[-1] / total_iters
        # The fine-tune saves as many iterations as the rest of training.
        ft_epochs = (self.baseline_max_epochs - self.steps[-1]) / iter_saving * mean_factors[-1]
        planned.append((len(self.steps) - 1, len(mean_factors) - 1, ft_epochs))
        self.iteration_saving = iter_saving

        x = self.baseline_max_epochs * self.epoch_factor / sum(p[-1] for p in planned)
        stages, total, start = [], 0.0, 0
        for n, (i, k, epochs) in enumerate(planned):
            total += epochs * x
            end = int(round(total))
            stages.append(Stage(i, k, self.long_cycle_shapes[k], start, end, fine_tune=n == len(planned) - 1))
            start = end
        return stages

    # ---------------------------------------------------------------- lookups

    def stage_at(self, epoch: int) -> Stage:
        """The stage that trains ``epoch`` (epochs past the end stay in the last stage)."""
        if epoch < 0:
            raise ValueError(f"{_PREFIX}: epoch must be >= 0, got {epoch}")
        for stage in self.stages:
            if epoch < stage.end_epoch:
                return stage
        return self.stages[-1]

    def long_cycle_shape(self, epoch: int) -> GridShape:
        """The long-cycle shape of ``epoch`` (T_k, H_k, W_k) and its batch factor β_k."""
        return self.stage_at(epoch).shape

    def cycle_shapes(self, epoch: int) -> list[GridShape]:
        """The shapes one short cycle goes through in ``epoch``, in iteration order (just the
        long-cycle shape when the short cycle is off)."""
        return list(self._cycles[self.stage_at(epoch).long_cycle])

    def batch_sizes(self, epoch: int) -> list[int]:
        """The batch size of each short-cycle position in ``epoch``."""
        return [self.base_batch_size * s.batch_factor for s in self.cycle_shapes(epoch)]

    def batch_shape(self, epoch: int, iteration: int) -> BatchShape:
        """Batch size and input size of batch ``iteration`` (counted from 0 in every epoch)."""
        shapes = self.cycle_shapes(epoch)
        position = iteration % len(shapes)
        shape = shapes[position]
        return BatchShape(self.base_batch_size * shape.batch_factor, shape.size, position)

    def batches_in_epoch(self, epoch: int, num_samples: int, drop_last: bool = True) -> int:
        """The exact number of batches the short cycle makes from ``num_samples`` samples."""
        sizes = self.batch_sizes(epoch)
        full_cycles, rest = divmod(num_samples, sum(sizes))
        count = full_cycles * len(sizes)
        for size in sizes:
            if rest >= size:
                count, rest = count + 1, rest - size
            else:
                return count + (1 if rest > 0 and not drop_last else 0)
        return count

    def lr_factor(self, epoch: float) -> float:
        """SlowFast's learning rate at ``epoch`` (may be fractional), relative to the base LR:
        γ^i · β_k (``steps_with_relative_lrs``, warm-up aside)."""
        index = 0
        for n, step in enumerate(self.lr_steps):
            if epoch >= step:
                index = n
        return self.lr_factors[index]

    def lr_scale(self, epoch: float) -> float:
        """The multigrid part of the LR alone: β_k of the long-cycle shape at ``epoch`` (the short
        cycle never changes the LR). Multiply the baseline's own (decaying) LR by it."""
        if not self.long_cycle:
            return 1.0
        return float(self.long_cycle_shape(int(epoch)).batch_factor)

    @property
    def module_lr_milestones(self) -> list[int]:
        """The epochs (of the multigrid run) at which the module's own step LR schedule decays by
        γ, so that module LR × :meth:`lr_scale` is SlowFast's LR at every epoch::

            base_lr · γ^(number of milestones <= e) · lr_scale(e) == base_lr · lr_factor(e)

        With the long cycle: the start of every repeated LR stage but the first, then the middle
        of the fine-tune (SlowFast's last ``STEPS`` entry). Without it: ``lr_steps[1:]``. A
        milestone may repeat (two decays at once) when rounding left a stage empty."""
        if not self.long_cycle:
            return list(self.lr_steps[1:])
        starts = [next(s.start_epoch for s in self.stages if s.lr_stage == i) for i in range(1, len(self.steps) - 1)]
        return starts + [self.lr_steps[-1]]

    def is_eval_epoch(self, epoch: int) -> bool:
        """SlowFast's evaluation cadence: ``eval_freq`` times per stage, always at a stage's last
        epoch and at the last epoch of training (its ``misc.is_eval_epoch``)."""
        if epoch + 1 == self.max_epochs:
            return True
        previous_end = 0
        for stage in self.stages:
            if epoch < stage.end_epoch:
                period = max((stage.end_epoch - previous_end) // self.eval_freq + 1, 1)
                return (stage.end_epoch - 1 - epoch) % period == 0
            previous_end = stage.end_epoch
        return False

    def describe(self) -> str:
        """One line per stage: epochs, LR stage, long-cycle shape, the short cycle's batch factors."""
        lines = ["epochs      lr_stage  size              batch factors (short cycle)"]
        for s in self.stages:
            factors = [g.batch_factor for g in self._cycles[s.long_cycle]]
            tag = "  fine-tune" if s.fine_tune else ""
            lines.append(f"{s.start_epoch:>4}-{s.end_epoch:<6} {s.lr_stage:>8}  {str(s.shape.size):<17} {factors}{tag}")
        return "\n".join(lines)

    # ---------------------------------------------------------------- validation helpers

    @staticmethod
    def _volume(size: Sequence[float]) -> float:
        return float(math.prod(size))

    def _frames(self, t_factor: float, k: int) -> int:
        t0 = self.base_size[0]
        frames = t0 * t_factor
        if abs(frames - round(frames)) > 1e-6 or round(frames) < 1 or t0 % round(frames):
            divisors = [f"1/{t0 // d}" if d < t0 else "1" for d in range(t0, 0, -1) if t0 % d == 0]
            raise ValueError(
                f"{_PREFIX}: the temporal factor {t_factor:g} of long_cycle_factors[{k}] gives {frames:g} frames, "
                f"which does not divide the clip's T = {t0} (shorter clips are made by striding frames); "
                f"use a temporal factor in {', '.join(divisors)}")
        return int(round(frames))

    def _spatial(self, s_factor: float, option: str, index: int) -> tuple[int, int]:
        h0, w0 = self.base_size[-2:]
        size = (int(round(h0 * s_factor)), int(round(w0 * s_factor)))
        if min(size) < 1:
            raise ValueError(f"{_PREFIX}: the spatial factor {s_factor:g} of {option}[{index}] leaves no pixel of "
                             f"the base size {h0}x{w0}; use a larger factor")
        return size

    def _check_long_cycle_factors(self, factors: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
        pairs = []
        for k, pair in enumerate(factors):
            try:
                t, s = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise ValueError(f"{_PREFIX}: long_cycle_factors[{k}] = {pair!r} is not a (temporal, spatial) pair of "
                                 "numbers; write e.g. [[0.25, 0.7071], [0.5, 0.7071], [0.5, 1], [1, 1]]") from None
            if t <= 0 or s <= 0:
                raise ValueError(f"{_PREFIX}: long_cycle_factors[{k}] = {pair!r} has a factor <= 0; use factors in (0, 1]")
            if not self.is_clip and t != 1:
                raise ValueError(f"{_PREFIX}: long_cycle_factors[{k}] = {pair!r} has a temporal factor, but the inputs "
                                 f"are images of size {self.base_size} with no T; give temporal factor 1, e.g. "
                                 f"long_cycle_factors={[list(p) for p in IMAGE_LONG_CYCLE_FACTORS]}")
            pairs.append((t, s))
        if not pairs:
            raise ValueError(f"{_PREFIX}: long_cycle_factors is empty; give at least [[1, 1]] (the base shape)")
        if pairs[-1] != (1.0, 1.0):
            raise ValueError(f"{_PREFIX}: long_cycle_factors must end with [1, 1]: the last long-cycle shape is the "
                             f"base shape, which the final fine-tune trains at (got {pairs[-1]}); append [1, 1]")
        return pairs

    def _check_short_cycle_factors(self, factors: Sequence[float]) -> list[float]:
        out = []
        for j, sigma in enumerate(factors):
            if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma:
                raise ValueError(f"{_PREFIX}: short_cycle_factors[{j}] = {sigma!r} is not a spatial factor > 0; "
                                 "use e.g. [0.5, 0.7071]")
            out.append(float(sigma))
        if not out:
            raise ValueError(f"{_PREFIX}: short_cycle_factors is empty; give e.g. [0.5, 0.7071] or set short_cycle=False")
        return out

    def _check_milestones(self, milestones: Sequence[int]) -> list[int]:
        values = [int(m) for m in milestones]
        if any(int(m) != m for m in milestones):
            raise ValueError(f"{_PREFIX}: lr_milestones must be whole epochs, got {list(milestones)}")
        if self.long_cycle and not values:
            raise ValueError(
                f"{_PREFIX}: lr_milestones is empty, but the long cycle runs inside each LR stage of the baseline and "
                "turns its last stage into the fine-tune at the base shape; give at least one milestone, e.g. "
                f"lr_milestones=[{max(1, int(0.8 * self.baseline_max_epochs))}] (one long cycle, then a 20% fine-tune)")
        previous = 0
        for m in values:
            if not previous < m < self.baseline_max_epochs:
                raise ValueError(f"{_PREFIX}: lr_milestones must increase strictly inside (0, max_epochs = "
                                 f"{self.baseline_max_epochs}), got {values}")
            previous = m
        return values


def _check_base_size(size: Sequence[int]) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in size)
    except (TypeError, ValueError):
        values = ()
    if len(values) not in (2, 3) or any(v < 1 for v in values) or any(int(v) != v for v in size):
        raise ValueError(f"{_PREFIX}: base_size must be (T, H, W) for clips or (H, W) for images, positive "
                         f"integers, got {size!r}")
    return values


def _check_int(option: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_PREFIX}: {option} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_positive(option: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{_PREFIX}: {option} must be a number > 0, got {value!r}")
    return float(value)
