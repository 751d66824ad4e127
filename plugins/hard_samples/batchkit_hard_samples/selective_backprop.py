"""Selective backprop: Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest
Losers" (2019), in the form of Composer's SelectiveBackprop, as a batch-stage plugin.

On a selected batch of N samples, a no-grad forward scores every sample, and only n of them go on
to the normal forward and backward::

    should_select(t, i) = start <= t < end  and  (interrupt == 0  or  (i + 1) mod interrupt != 0)
        t: elapsed fraction of training (optimizer steps), i: batch index in the epoch
    l_1 .. l_N      per-sample losses (the module's per_sample_loss(batch), no grad)
    rank            0 for the lowest loss .. N-1 for the highest
    pi_rank         = (rank + 1/2) / N                             rank percentile
    P(rank)         = pi_rank^(1/keep - 1) / sum_r pi_r^(1/keep - 1)
                      (keep = 1/2: P linear in rank; keep -> 0: all mass on the highest loss)
    n               = max(1, floor(keep * N)) samples drawn without replacement from P
                      (method "top_k": the n highest losses instead)

The kept samples keep their order in the batch. Every rank keeps the same n (its batch has the same
N), so shapes stay consistent under DDP and DeepSpeed.

**BatchNorm and dropout.** The scoring forward must not train anything: it runs in the host's
:func:`batchkit.batch.scoring_pass`. ``scoring="eval"`` (default) runs it with every submodule in
eval mode (BatchNorm uses its running statistics, dropout is off) and gives each submodule back its
own training flag afterwards. ``scoring="train"`` scores in the module's current mode, as Composer
does, but saves every BatchNorm running mean, variance and batch counter first and puts them back
afterwards, so the running statistics are untouched. The batch is counted and selected with the
run's :class:`batchkit.batch.BatchSpec` (``ctx.batch_spec``).

**Randomness and state.** The draw for a batch comes from a generator seeded with (seed, rank,
global step, batch index): nothing to checkpoint, and a resumed run draws exactly what the
uninterrupted one did. The counters behind the metrics (batches selected, samples kept and scored)
are checkpointed, so after a resume they continue from the saved values.
"""

from __future__ import annotations

from typing import Any
from typing import Literal

import torch

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl
from batchkit.batch import DEFAULT_LOSS_METHOD
from batchkit.batch import per_sample_losses
from batchkit.batch import resolve_loss_method
from batchkit.batch import scoring_pass


__all__ = ["SelectiveBackprop", "rank_probabilities", "should_select"]


def rank_probabilities(num_samples: int, keep: float) -> torch.Tensor:
    """P(rank) for ranks 0 (lowest loss) .. N-1 (highest loss): ``pi^(1/keep - 1)``, normalised."""
    percentile = (torch.arange(num_samples, dtype=torch.float64) + 0.5) / num_samples  # pi_rank
    weight = percentile ** (1.0 / keep - 1.0)
    return weight / weight.sum()


def should_select(progress: float, batch_idx: int, start: float, end: float, interrupt: int) -> bool:
    """Composer's schedule: inside [start, end) of training, skipping every ``interrupt``-th batch."""
    return start <= progress < end and (interrupt == 0 or (batch_idx + 1) % interrupt != 0)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby steps get unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


class SelectiveBackprop(Plugin):
    """Back-propagate only the higher-loss samples of a batch, chosen by a no-grad scoring pass.

    :param keep: fraction of each selected batch kept for the backward pass, in (0, 1).
    :param start: fraction of training (optimizer steps) at which selection starts.
    :param end: fraction of training at which it stops (exclusive).
    :param interrupt: every ``interrupt``-th batch trains on the full batch (0: never).
    :param method: ``"rank_probability"`` (Composer: draw by rank-based probabilities) or
        ``"top_k"`` (deterministic: the highest losses).
    :param scoring: ``"eval"`` (score in eval mode) or ``"train"`` (score in the current mode,
        BatchNorm statistics restored); see the module docstring.
    :param loss_method: the module's method returning per-sample losses (the per-sample loss protocol).
    :param seed: seed of the selection draws.
    """

    name = "selective_backprop"

    def __init__(
        self,
        keep: float = 0.5,
        start: float = 0.5,
        end: float = 0.9,
        interrupt: int = 2,
        method: Literal["rank_probability", "top_k"] = "rank_probability",
        scoring: Literal["eval", "train"] = "eval",
        loss_method: str = DEFAULT_LOSS_METHOD,
        seed: int = 0,
    ) -> None:
        if not 0.0 < keep < 1.0:
            raise ValueError(f"selective_backprop: keep must be in (0, 1), got {keep}; e.g. keep: 0.5 keeps half of each batch")
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(
                f"selective_backprop: need 0 <= start < end <= 1 (fractions of training), got start={start}, end={end}; "
                "e.g. start: 0.5, end: 0.9"
            )
        if interrupt < 0:
            raise ValueError(f"selective_backprop: interrupt must be >= 0, got {interrupt}; 0 selects on every batch")
        if method not in ("rank_probability", "top_k"):
            raise ValueError(f"selective_backprop: method must be 'rank_probability' or 'top_k', got {method!r}")
        if scoring not in ("eval", "train"):
            raise ValueError(f"selective_backprop: scoring must be 'eval' or 'train', got {scoring!r}")
        self.keep = float(keep)
        self.start = float(start)
        self.end = float(end)
        self.interrupt = int(interrupt)
        self.method = method
        self.scoring = scoring
        self.loss_method = loss_method
        self.seed = int(seed)
        self._per_sample_loss: Any = None
        self._probabilities: dict[int, torch.Tensor] = {}
        self._generator = torch.Generator()
        #: batches selected and samples kept / seen, in this process (for metrics)
        self.selected_batches = 0
        self.kept_samples = 0
        self.scored_samples = 0

    @hookimpl
    def batchkit_setup(self, module: Any, trainer: Any, stage: str) -> None:
        if stage != "fit":
            return
        # The protocol is checked now, not when selection first triggers half-way through training.
        self._per_sample_loss = resolve_loss_method(self.name, module, self.loss_method)
        unbounded = getattr(trainer, "max_steps", -1) == -1 and getattr(trainer, "max_epochs", None) in (-1, None)
        if trainer is not None and (self.start > 0 or self.end < 1) and unbounded:
            raise PluginError(
                f"selective_backprop: start={self.start} and end={self.end} are fractions of training, but the "
                "Trainer has no max_steps or max_epochs, so the length of training is unknown. Set one, or use "
                "start: 0 and end: 1."
            )

    @hookimpl
    def batchkit_epoch_start(self, ctx: Any) -> None:
        if ctx.total_steps is None and (self.start > 0 or self.end < 1):
            raise PluginError(
                "selective_backprop: the number of optimizer steps of this run is unknown (an iterable "
                "dataset without max_steps?), so start/end fractions cannot be placed; set Trainer(max_steps=...) "
                "or use start: 0 and end: 1"
            )

    # -- state: the draws need none (seeded per batch), the counters behind the metrics do ------

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        return {
            "selected_batches": self.selected_batches,
            "kept_samples": self.kept_samples,
            "scored_samples": self.scored_samples,
        }

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self.selected_batches = int(state["selected_batches"])
        self.kept_samples = int(state["kept_samples"])
        self.scored_samples = int(state["scored_samples"])

    def _draw(self, num_samples: int, keep_count: int, rank: int, step: int, batch_idx: int) -> torch.Tensor:
        """``keep_count`` distinct ranks (0 = lowest loss), drawn by P(rank) without replacement."""
        p = self._probabilities.get(num_samples)
        if p is None:
            p = self._probabilities[num_samples] = rank_probabilities(num_samples, self.keep).to(torch.float32)
        self._generator.manual_seed(_mix(self.seed, rank, step, batch_idx))
        return torch.multinomial(p, keep_count, replacement=False, generator=self._generator)

    def choose(self, losses: torch.Tensor, rank: int = 0, step: int = 0, batch_idx: int = 0) -> torch.Tensor:
        """Indices (ascending) of the samples to keep, given their per-sample losses."""
        num_samples = losses.shape[0]
        keep_count = max(1, int(self.keep * num_samples))
        if self.method == "top_k":
            chosen = torch.argsort(losses, descending=True, stable=True)[:keep_count]
        else:
            order = torch.argsort(losses, stable=True)  # ascending: rank 0 = lowest loss
            ranks = self._draw(num_samples, keep_count, rank, step, batch_idx)
            chosen = order[ranks.to(order.device)]
        return torch.sort(chosen).values

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, module: Any, ctx: Any) -> Any:
        if not should_select(ctx.progress, ctx.batch_idx, self.start, self.end, self.interrupt):
            return None
        if self._per_sample_loss is None:  # used outside BatchKitCallback's setup
            self._per_sample_loss = resolve_loss_method(self.name, module, self.loss_method)
        spec = ctx.batch_spec
        num_samples = spec.num_samples(batch)
        if max(1, int(self.keep * num_samples)) >= num_samples:
            return None
        with scoring_pass(module, self.scoring):
            losses = per_sample_losses(self.name, self._per_sample_loss, batch, spec, self.loss_method)
        chosen = self.choose(losses, ctx.rank, ctx.global_step, ctx.batch_idx)
        self.selected_batches += 1
        self.kept_samples += chosen.shape[0]
        self.scored_samples += num_samples
        return spec.select(batch, chosen)

    @hookimpl
    def batchkit_epoch_end(self) -> None:
        if self.scored_samples:
            self.log("kept_fraction", self.kept_samples / self.scored_samples, reduce="mean")
            self.log("selected_batches", self.selected_batches, reduce="mean")
