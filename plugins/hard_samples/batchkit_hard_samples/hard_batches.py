"""Hard mini-batch selection: Sahayam, Zakkam and Jayaraman, "Can we learn better with hard
samples?" (arXiv 2304.03486), as a sampler-stage plugin.

The method
----------
The training data is a *fixed* partition into M mini-batches B_0 .. B_{M-1}. One ordinary epoch
trains every mini-batch once (the warm-up); after it, training runs in rounds, and round r trains
only the k mini-batches with the highest last-seen loss, in index order::

    k      = max(1, floor(delta * M))                        delta: the paper's δ, in (0, 1]
    l_j    = loss of B_j the last time it was trained        (the training step's loss, before the update)
    S_r    = sorted(top_k { l_j : j = 0 .. M-1 })            ties go to the lower index
    round r trains B_j for j in S_r; batches not selected keep their stale l_j

No extra forward pass: l_j is the loss ``training_step`` returns anyway (read in the loss stage).
The sampler yields only the selected mini-batches, so unselected ones are never loaded.

How the run is counted
----------------------
All training is one stream of mini-batch *positions* p = 0, 1, 2, ...; a Lightning epoch is always
M positions, exactly as long as the baseline's epoch, so ``max_epochs`` / ``max_steps`` give the
same number of optimizer steps as the baseline (the paper's code also counts an "epoch" of its
method as M optimizer steps). Rounds run back to back across epoch boundaries::

    p < M                  warm-up          batch p
    p >= M                 round r = 1 + (p - M) // k, slot s = (p - M) % k      batch S_r[s]

S_r is chosen when the sampler reaches the first position of round r, from the losses of every
position before it. With ``num_workers > 0`` the DataLoader draws indices ahead of training; the
option ``lookahead`` (default 0) then says how many of the most recent positions a choice may
ignore, and the plugin refuses to run if the loader gets further ahead than that (so a run, and
its resumption from a checkpoint, always choose from exactly the same losses).

Distributed (DDP, DeepSpeed)
----------------------------
Each rank holds its own shard; global mini-batch j is the union of the ranks' batch j, and its
loss is the mean of the ranks' losses. Losses stay on each rank's device until a round is
chosen; then the round's new losses are all-reduced once (one collective per round, none per step)
and every rank computes the same S_r from the same table, so all ranks train the same ids and take
the same number of steps.
"""

from __future__ import annotations

import bisect
import time
import zlib
from array import array
from typing import Any
from typing import Iterator
from typing import Optional

import torch

from batchkit import Plugin
from batchkit import PluginError
from batchkit import dist
from batchkit import hookimpl
from batchkit.data import BatchSamplerWrapper


__all__ = ["HardBatchSelection", "HardBatchSampler", "top_delta_batches"]


def top_delta_batches(losses: torch.Tensor | list[float], k: int) -> list[int]:
    """S = sorted(top-k indices of ``losses``): the k highest losses, ties to the lower index, in
    ascending index order (the order a round trains them in)."""
    table = torch.as_tensor(losses, dtype=torch.float64)
    if not 1 <= k <= table.numel():
        raise ValueError(f"hard_batches: k must be in [1, {table.numel()}], got {k}")
    order = torch.argsort(-table, stable=True)  # descending loss; stable keeps lower index first on ties
    return sorted(order[:k].tolist())


def _fixed_partition(batch_sampler: Any) -> list[list[int]]:
    """The batches the wrapped sampler gives at epoch 0: the fixed partition, every epoch."""
    set_epoch = getattr(batch_sampler, "set_epoch", None)
    if callable(set_epoch):  # the host's samplers and BatchSamplerWrapper all take set_epoch
        set_epoch(0)
    return [[int(i) for i in batch] for batch in batch_sampler]


def _checksum(partition: list[list[int]]) -> int:
    flat = array("q", [len(partition)])
    for batch in partition:
        flat.append(len(batch))
        flat.extend(batch)
    return zlib.crc32(flat.tobytes())


class HardBatchSampler(BatchSamplerWrapper):
    """The batch sampler hard-batch selection puts in the chain: yields, for the epoch it was last
    given by ``set_epoch``, the index lists of the M positions of that epoch. All state lives in the
    plugin, so a rebuilt loader (``reload_dataloaders_every_n_epochs``) carries on unchanged."""

    def __init__(self, plugin: HardBatchSelection, inner: Any) -> None:
        super().__init__(inner)
        self.plugin = plugin

    def __len__(self) -> int:
        return self.plugin.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        return self.plugin._iterate_epoch(self.epoch)


class HardBatchSelection(Plugin):
    """Train only the top ``delta`` fraction of a fixed set of mini-batches by their last-seen loss.

    :param delta: fraction of the M mini-batches trained per round (the paper's δ), in (0, 1].
        ``delta=1`` trains every mini-batch every round: plain training over the fixed partition.
    :param lookahead: how many batches the DataLoader may draw ahead of training; a round's choice
        ignores the losses of its last ``lookahead`` positions. Default: the host's
        ``ctx.train_progress.lookahead`` (0 with ``num_workers=0``, ``num_workers * prefetch_factor``
        otherwise), recorded in the checkpoint; set it only to keep a larger margin.
    """

    name = "hard_batches"
    # l_j must be the loss of the whole mini-batch j: a plugin that trains only part of each batch
    # (selective backprop's hardest half, a super-batch's selection) would skew every round's choice.
    conflicts = ("selective_backprop", "jest", "cabs", "colm")

    def __init__(self, delta: float = 0.5, lookahead: Optional[int] = None) -> None:
        if not 0.0 < delta <= 1.0:
            raise ValueError(
                f"hard_batches: delta must be in (0, 1], got {delta}; it is the fraction of mini-batches "
                "trained per round (the paper's δ), e.g. delta: 0.5"
            )
        if lookahead is not None and lookahead < 0:
            raise ValueError(
                f"hard_batches: lookahead must be >= 0, got {lookahead}; use 0 with num_workers=0, "
                "or num_workers * prefetch_factor"
            )
        self.delta = float(delta)
        #: the option as given (None: follow the loader)
        self.lookahead_option = lookahead
        self.lookahead = 0 if lookahead is None else int(lookahead)
        self._reset()

    def _reset(self) -> None:
        #: M, the number of fixed mini-batches (per rank), and k, the mini-batches per round
        self.num_batches: int = 0
        self.round_size: int = 0
        self._partition: list[list[int]] = []
        self._partition_crc: list[int] | None = None
        self._world_size: int | None = None
        #: l_j: the last-seen (rank-averaged) loss of every mini-batch; +inf until first trained
        self.table: torch.Tensor | None = None
        #: the losses of positions < applied_upto are in the table
        self.applied_upto = 0
        #: one past the last position whose loss was recorded
        self.recorded_upto = 0
        #: S_r for the rounds chosen so far that reach into the current epoch or later
        self.selections: dict[int, list[int]] = {}
        # losses recorded but not yet in the table, in position order (values stay on the device)
        self._pending_pos: list[int] = []
        self._pending_ids: list[int] = []
        self._pending_vals: list[torch.Tensor] = []
        self._restored_rows: torch.Tensor | None = None  # [world, n] pending values from a checkpoint
        self._restored_lookahead = False
        self._device = torch.device("cpu")
        self._sampler: HardBatchSampler | None = None
        self._iter_epoch = 0
        self._yielded_upto = 0
        self._records = 0
        self._first_step_checked = False
        #: time spent choosing rounds (in the sampler, so not in the host's hook timings)
        self.choice_seconds = 0.0

    # -- positions and rounds -----------------------------------------------------------------

    def round_of(self, position: int) -> tuple[int, int]:
        """(round, slot) of a position; round 0 is the warm-up epoch."""
        m, k = self.num_batches, self.round_size
        if position < m:
            return 0, position
        return 1 + (position - m) // k, (position - m) % k

    def round_start(self, r: int) -> int:
        return 0 if r == 0 else self.num_batches + (r - 1) * self.round_size

    def _batch_at(self, position: int) -> int:
        r, slot = self.round_of(position)
        if r == 0:
            return slot
        chosen = self.selections.get(r)
        if chosen is None:
            chosen = self._choose_round(r)
        return chosen[slot]

    # -- the sampler stage --------------------------------------------------------------------

    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any, ctx: Any) -> HardBatchSampler:
        partition = _fixed_partition(batch_sampler)
        if not partition:
            raise PluginError("hard_batches: the training loader has no batches; nothing to select from")
        # every rank's checksum (each rank holds its own shard), so any rank can check a checkpoint
        crc = [int(c) for c in dist.all_gather_object(_checksum(partition))]
        if self._partition_crc is None:  # a fresh run
            self.num_batches = len(partition)
            self.round_size = max(1, int(self.delta * self.num_batches))
            self.table = torch.full((self.num_batches,), float("inf"), dtype=torch.float64)
            self._partition_crc = crc
            self._world_size = ctx.world_size
        elif crc != self._partition_crc or len(partition) != self.num_batches or ctx.world_size != self._world_size:
            raise PluginError(
                f"hard_batches: the training data is not split as it was when the loss table was built "
                f"({self.num_batches} mini-batches per rank on {self._world_size} ranks then, {len(partition)} "
                f"on {ctx.world_size} now, or different samples in them). Resume with the same dataset, "
                "batch size, number of processes and seed, or start a fresh run."
            )
        self._partition = partition
        if self.lookahead_option is None and not self._restored_lookahead:
            self.lookahead = int(ctx.train_progress.lookahead)
        self._device = ctx.device or torch.device("cpu")
        if self._restored_rows is not None:  # this rank's pending losses from the checkpoint
            rows = self._restored_rows
            self._pending_vals = list(rows[ctx.rank].to(torch.float32).unbind(0)) if rows.numel() else []
            self._restored_rows = None
        self._sampler = HardBatchSampler(self, batch_sampler)
        return self._sampler

    def _iterate_epoch(self, epoch: int) -> Iterator[list[int]]:
        m = self.num_batches
        start = epoch * m
        self._iter_epoch = epoch
        self._yielded_upto = start
        # rounds that ended before this epoch are no longer needed (nor saved)
        for r in [r for r in self.selections if self.round_start(r) + self.round_size <= start]:
            del self.selections[r]
        for position in range(start, start + m):
            j = self._batch_at(position)
            self._yielded_upto = position + 1
            yield self._partition[j]

    def _choose_round(self, r: int) -> list[int]:
        started = time.perf_counter_ns()
        q = self.round_start(r)
        if self.recorded_upto > q:
            raise PluginError(
                f"hard_batches: round {r} (from position {q}) was already trained but its choice is not in "
                "the restored state; the checkpoint does not belong to this run"
            )
        horizon = q - self.lookahead
        epoch_start = self._iter_epoch * self.num_batches
        if horizon > epoch_start and self.recorded_upto < horizon:
            raise PluginError(
                f"hard_batches: choosing round {r} needs the losses of the mini-batches up to position "
                f"{horizon - 1}, but only those before {self.recorded_upto} were recorded. Either the DataLoader "
                f"draws batches {horizon - self.recorded_upto} further ahead of training than lookahead="
                f"{self.lookahead} allows (set lookahead: num_workers * prefetch_factor), or training_step "
                "returned no loss for some batches (hard_batches needs the loss of every batch)."
            )
        self._apply_pending(horizon)
        assert self.table is not None
        chosen = top_delta_batches(self.table, self.round_size)
        self.selections[r] = chosen
        selected = self.table[chosen]
        self.log("round", r)
        self.log("selected_loss", float(selected[torch.isfinite(selected)].mean()) if torch.isfinite(selected).any() else float("nan"))
        finite = self.table[torch.isfinite(self.table)]
        self.log("table_loss", float(finite.mean()) if finite.numel() else float("nan"))
        self.choice_seconds += (time.perf_counter_ns() - started) / 1e9
        return chosen

    def _apply_pending(self, horizon: int) -> None:
        """Put the recorded losses of positions < horizon into the table: one all-reduce."""
        n = bisect.bisect_left(self._pending_pos, horizon)
        if n == 0:
            return
        values = torch.stack([v.to(self._device) for v in self._pending_vals[:n]]).to(torch.float32)
        values = dist.all_reduce(values, "mean").to("cpu", torch.float64)  # l_j = mean over ranks
        assert self.table is not None
        for j, value in zip(self._pending_ids[:n], values.tolist()):  # later positions overwrite earlier
            self.table[j] = value
        del self._pending_pos[:n], self._pending_ids[:n], self._pending_vals[:n]
        self.applied_upto = max(self.applied_upto, horizon)

    # -- the loss stage: record l_j for free ------------------------------------------------

    @hookimpl(tryfirst=True)  # before other loss plugins add auxiliary terms
    def batchkit_transform_loss(self, loss: torch.Tensor, ctx: Any) -> None:
        if self._sampler is None:
            raise PluginError(
                "hard_batches: a training step ran but no hard_batches sampler was built; the train "
                "DataLoader must be a map-style loader that batchkit rebuilds (BatchKitCallback)"
            )
        position = self._iter_epoch * self.num_batches + ctx.batch_idx
        ahead = self._yielded_upto - position - 1
        if ahead > self.lookahead or ahead < 0:
            if ahead < 0:
                raise PluginError(
                    f"hard_batches: training batch {ctx.batch_idx} of epoch {self._iter_epoch} was not produced "
                    "by the hard_batches sampler; use it with a single train DataLoader"
                )
            raise PluginError(
                f"hard_batches: the DataLoader draws {ahead} batches ahead of training but lookahead="
                f"{self.lookahead}; set the option lookahead: {ahead} (or leave it unset to follow the loader's "
                "num_workers * prefetch_factor) so that rounds are chosen from the same losses in every run and "
                "after a resume"
            )
        progress = ctx.train_progress
        if progress.loaded_batch_size and progress.batch_size != progress.loaded_batch_size:
            raise PluginError(
                f"hard_batches: mini-batch {ctx.batch_idx} was loaded with {progress.loaded_batch_size} samples but "
                f"trained on {progress.batch_size}: a batch-stage plugin selected part of it, so its loss is not the "
                "mini-batch's loss hard_batches ranks. Run hard_batches without batch-stage selection plugins."
            )
        self._pending_pos.append(position)
        self._pending_ids.append(self._batch_at(position))
        self._pending_vals.append(loss.detach().to(torch.float32, copy=True))  # stays on the device: no sync
        self.recorded_upto = position + 1
        self._records += 1

    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None:
        if not self._first_step_checked:
            self._first_step_checked = True
            if self._records == 0:
                raise PluginError(
                    "hard_batches: the first optimizer step finished without a loss reaching the loss stage; "
                    "training_step must return the mini-batch loss (a tensor, or a dict with 'loss')"
                )

    # -- state --------------------------------------------------------------------------------

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        if self._partition_crc is None:
            return {"fresh": True}
        n = len(self._pending_vals)
        values = torch.stack([v.to(self._device) for v in self._pending_vals]) if n else torch.zeros(0, device=self._device)
        if self._restored_rows is not None:  # restored, and no sampler built since: save what was restored
            rows = self._restored_rows
        elif dist.is_distributed() and n:
            # Lightning builds the checkpoint on every rank and saves rank 0's: keep every rank's
            # unreduced losses of the current round so all ranks resume exactly.
            rows = dist.all_gather(values)
        else:
            rows = values.unsqueeze(0)
        assert self.table is not None
        return {
            "delta": self.delta,
            "lookahead": self.lookahead,
            "num_batches": self.num_batches,
            "round_size": self.round_size,
            "partition_crc": self._partition_crc,
            "world_size": self._world_size,
            "table": self.table.clone(),
            "applied_upto": self.applied_upto,
            "recorded_upto": self.recorded_upto,
            "selections": {int(r): list(s) for r, s in self.selections.items()},
            "pending_positions": list(self._pending_pos),
            "pending_ids": list(self._pending_ids),
            "pending_values": rows.detach().to("cpu", torch.float32).clone(),
        }

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        if state.get("fresh"):
            return
        if state["delta"] != self.delta:
            raise PluginError(
                f"hard_batches: the checkpoint was saved with delta={state['delta']}, this run has "
                f"delta={self.delta}; a different value changes the rounds already chosen. "
                f"Resume with delta: {state['delta']}."
            )
        if self.lookahead_option is not None and state["lookahead"] != self.lookahead_option:
            raise PluginError(
                f"hard_batches: the checkpoint was saved with lookahead={state['lookahead']}, this run has "
                f"lookahead={self.lookahead_option}; a different value changes the rounds already chosen. "
                f"Resume with lookahead: {state['lookahead']} (or leave it unset)."
            )
        # The rounds already chosen used this margin: keep it, whatever the resumed loader's lookahead.
        self.lookahead = int(state["lookahead"])
        self._restored_lookahead = True
        self.num_batches = int(state["num_batches"])
        self.round_size = int(state["round_size"])
        self._partition_crc = [int(c) for c in state["partition_crc"]]
        self._world_size = int(state["world_size"])
        self.table = state["table"].clone().to(torch.float64)
        self.applied_upto = int(state["applied_upto"])
        self.recorded_upto = int(state["recorded_upto"])
        self.selections = {int(r): list(s) for r, s in state["selections"].items()}
        self._pending_pos = list(state["pending_positions"])
        self._pending_ids = list(state["pending_ids"])
        self._restored_rows = state["pending_values"]
        self._first_step_checked = True  # the check ran in the run that wrote the checkpoint
