"""The ``multigrid`` plugin: the schedule of :mod:`batchkit_multigrid.schedule` wired into the host.

Stages
------
* **sampler** (:class:`MultigridBatchSampler`, outermost: ``trylast``): iterates what it wraps (this
  rank's shard, cut into the DataLoader's batches of ``b``), joins the batches into one stream of
  samples and cuts it again into the short cycle's batch sizes ``b·β`` of the long-cycle stage the
  loader was built for, each a :class:`~batchkit.data.BatchPlan` whose ``meta`` carries the shape.
  The last incomplete batch of an epoch is dropped, so every rank (same number of samples: the host
  pads the shards) yields the same number of batches at the same shapes, in lockstep.
* **collator** (:class:`MultigridCollate`, innermost: ``tryfirst``): in the DataLoader worker, reads
  the shape with :func:`~batchkit.data.batch_meta` and makes every input that size
  (:func:`~batchkit_multigrid.resize.collate_at_size`: frames strided before the collate copies
  them, then one resize), so small shapes also save the copy and the transfer.
* **long cycle**: at the end of an epoch whose successor trains other shapes, the plugin asks the
  host to rebuild the train loader (``host.request_loader_rebuild``), and returns the schedule's
  exact number of optimizer steps from ``batchkit_plan_total_steps``, so Lightning's progress bar,
  its validation cadence, ``ctx.total_steps`` / ``ctx.progress`` and resume follow each stage.
* **learning rate**: ``host.set_lr_scale(self, β_k)``, the long-cycle batch factor only (never the
  short cycle's), applied by the host inside ``optimizer.step()``; the module's own LR scheduler
  runs untouched and supplies the γ decays at ``schedule.module_lr_milestones``.

Epochs and the learning rate
----------------------------
The plugin's options describe the *baseline* (``baseline_epochs``, ``baseline_lr_milestones``,
``gamma``); the schedule turns them into ``schedule.max_epochs`` multigrid epochs (1.5x by
default). The Trainer must run exactly that many (checked before the first batch, with the
number to set), and the module's step schedule must decay by γ at ``schedule.module_lr_milestones``
(a ``MultiStepLR`` with other milestones or gamma is refused at the start of training, naming
them), so that module LR × β_k is SlowFast's LR at every epoch.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Optional
from typing import Sequence
from typing import Union

import torch
from torch.utils.data import BatchSampler

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl
from batchkit.batch import scoring_pass
from batchkit.data import BatchPlan
from batchkit.data import BatchSamplerWrapper
from batchkit.data import batch_meta
from batchkit_multigrid.resize import _get_input
from batchkit_multigrid.resize import collate_at_size
from batchkit_multigrid.resize import input_size
from batchkit_multigrid.schedule import EPOCH_FACTOR
from batchkit_multigrid.schedule import GAMMA
from batchkit_multigrid.schedule import LONG_CYCLE_FACTORS
from batchkit_multigrid.schedule import SHORT_CYCLE_FACTORS
from batchkit_multigrid.schedule import MultigridSchedule


__all__ = ["SIZE_KEY", "POSITION_KEY", "MultigridBatchSampler", "MultigridCollate", "MultigridPlugin"]

#: ``BatchPlan.meta`` keys: the input size of the batch ((T, H, W) or (H, W)) and its short-cycle position
SIZE_KEY = "multigrid_size"
POSITION_KEY = "multigrid_position"


def stream_length(batch_sampler: Any) -> int:
    """How many samples one epoch of ``batch_sampler`` yields: from a ``BatchSampler``'s sampler and
    ``drop_last`` when it is one (the host's base sampler), else by iterating it once."""
    if isinstance(batch_sampler, BatchSampler) and hasattr(batch_sampler.sampler, "__len__"):
        n = len(batch_sampler.sampler)  # type: ignore[arg-type]
        return n - n % batch_sampler.batch_size if batch_sampler.drop_last else n
    return sum(len(batch) for batch in batch_sampler)


def count_batches(batch_sizes: Sequence[int], num_samples: int) -> int:
    """Batches the short cycle ``batch_sizes`` cuts from ``num_samples`` samples (the last
    incomplete one dropped)."""
    full, rest = divmod(num_samples, sum(batch_sizes))
    count = full * len(batch_sizes)
    for size in batch_sizes:
        if rest < size:
            break
        count, rest = count + 1, rest - size
    return count


class MultigridBatchSampler(BatchSamplerWrapper):
    """Cuts the sample stream of ``inner`` into batches whose sizes cycle through ``cycle``, a list
    of ``(batch_size, input_size)`` (one long-cycle stage's short cycle, restarted every epoch).
    Yields :class:`~batchkit.data.BatchPlan` with ``meta = {SIZE_KEY: input_size, POSITION_KEY: j}``.

    ``num_samples`` is what ``inner`` yields per epoch; ``len()`` is exact and the same on every
    rank when ``num_samples`` is.
    """

    def __init__(self, inner: Any, cycle: Sequence[tuple[int, tuple[int, ...]]], num_samples: int) -> None:
        super().__init__(inner)
        self.cycle = [(int(b), tuple(int(v) for v in size)) for b, size in cycle]
        self.num_samples = int(num_samples)
        self._len = count_batches([b for b, _ in self.cycle], self.num_samples)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[BatchPlan]:
        period = len(self.cycle)
        yielded, position = 0, 0
        batch: list[int] = []
        for indices in self.inner:
            for index in indices:
                batch.append(int(index))
                size, shape = self.cycle[position]
                if len(batch) == size:
                    yield BatchPlan(batch, meta={SIZE_KEY: shape, POSITION_KEY: position})
                    yielded += 1
                    if yielded == self._len:  # the rest cannot fill a batch (or a sampler overran its count)
                        return
                    batch, position = [], (position + 1) % period


class MultigridCollate:
    """The collate stage, in the DataLoader workers: the user's collate, with every input made the
    size the batch's plan carries (picklable; holds no main-process state)."""

    def __init__(self, collate_fn: Callable[[list], Any], input_key: Union[int, str], entry: str) -> None:
        self.collate_fn = collate_fn
        self.input_key = input_key
        self.entry = entry

    def __call__(self, samples: list) -> Any:
        size = batch_meta().get(SIZE_KEY)
        if size is None:
            raise PluginError(
                f"multigrid (entry {self.entry!r}): a training batch reached the collate stage without its multigrid "
                "shape: a sampler-stage plugin that runs after multigrid replaced its BatchPlans by plain index lists. "
                "Keep multigrid the outermost sampler plugin (it is trylast; give the other plugin a lower tier)"
            )
        return collate_at_size(samples, size, self.collate_fn, input_key=self.input_key)


class MultigridPlugin(Plugin):
    """Multigrid training (Wu et al., CVPR 2020): a schedule of mini-batch shapes.

    :param baseline_epochs: the baseline's number of epochs (SlowFast's ``SOLVER.MAX_EPOCH``); the
        multigrid run trains ``schedule.max_epochs`` (``epoch_factor`` times as many, at far fewer
        steps): set the Trainer's ``max_epochs`` to it (the plugin says the value if it differs).
    :param baseline_lr_milestones: the baseline's LR decay epochs (``SOLVER.STEPS`` without 0), at
        least one: the long cycle repeats in every LR stage but the last, which becomes the
        fine-tune at the base shape.
    :param long_cycle: vary the shape per range of epochs.
    :param short_cycle: vary the spatial size per iteration.
    :param long_cycle_factors: (temporal, spatial) factors ending with (1, 1); default the paper's
        four for clips, ((1, 1/√2), (1, 1)) for images.
    :param short_cycle_factors: spatial factors of the *base* size (SlowFast's short cycle).
    :param epoch_factor: multigrid trains this many times the baseline's epochs.
    :param gamma: the baseline's LR decay per milestone; the module's ``MultiStepLR`` must use it.
    :param base_size: the input size ``(T, H, W)`` or ``(H, W)``; default: read from the training
        dataset's first sample (``input_size``).
    :param input_key: where the input is in a sample (tuple/list position or dict key).
    :param allow_early_stop: let the Trainer stop before the schedule ends (``max_epochs`` smaller
        than ``schedule.max_epochs``: a shortened run, for a quick check); off, any other
        ``max_epochs`` is refused.
    :param check_shapes: at the start of training, run the model once (no grad, eval mode, state
        restored) on two samples at every shape of the schedule, and stop with a clear error if it
        cannot take one (a model without adaptive pooling).
    """

    name = "multigrid"
    scales_lr = True  # the long cycle's batch factor, through host.set_lr_scale
    # hard_batches scores and re-trains whole fixed mini-batches, which multigrid regroups into
    # batches of other sizes; the super-batch selectors (jest, cabs, colm) must keep the user's
    # batch size b while multigrid's batches are b·β (the host's super-batch plan has one size).
    conflicts = ("hard_batches", "jest", "cabs", "colm")

    def __init__(
        self,
        baseline_epochs: int,
        baseline_lr_milestones: list[int],
        long_cycle: bool = True,
        short_cycle: bool = True,
        long_cycle_factors: Optional[list[tuple[float, float]]] = None,
        short_cycle_factors: list[float] = list(SHORT_CYCLE_FACTORS),  # noqa: B006 (never mutated)
        epoch_factor: float = EPOCH_FACTOR,
        gamma: float = GAMMA,
        base_size: Optional[list[int]] = None,
        input_key: Union[int, str] = 0,
        allow_early_stop: bool = False,
        check_shapes: bool = True,
    ) -> None:
        self.options = dict(
            max_epochs=baseline_epochs, lr_milestones=list(baseline_lr_milestones), long_cycle=long_cycle,
            short_cycle=short_cycle, long_cycle_factors=None if long_cycle_factors is None else [tuple(f) for f in long_cycle_factors],
            short_cycle_factors=tuple(short_cycle_factors), epoch_factor=epoch_factor, gamma=gamma,
        )
        self.input_key = input_key
        self.allow_early_stop = bool(allow_early_stop)
        self.check_shapes = bool(check_shapes)
        self.base_size = None if base_size is None else tuple(int(v) for v in base_size)
        # The options are checked now against the given size, or a nominal one (every check but the
        # ones that depend on the size: those run again on the dataset's size before training).
        self._make_schedule(self.base_size or self._nominal_size())
        self.schedule: MultigridSchedule | None = None
        self._dataset: Any = None
        self._inner_collate: Callable[[list], Any] | None = None
        self._built: tuple[int, Any] | None = None  # (epoch, its shapes) the current loader was built for
        self._num_samples: int | None = None  # samples per epoch on this rank
        self._batch_size: int | None = None  # b
        self._loaded_schedule: dict[str, Any] | None = None
        self._loaded_stage: tuple[Any, Any] = (None, None)
        self._epoch_len = 0  # batches per epoch of the current loader
        #: where the schedule stands (the saved state)
        self.epoch = 0
        #: the epoch the next train loader is for (the next epoch once this one has trained every batch)
        self.loader_epoch = 0
        #: batches trained per input size in this process (what the collate stage produced)
        self.batches_by_size: Counter[tuple[int, ...]] = Counter()

    # -- the schedule -------------------------------------------------------------------------

    def _nominal_size(self) -> tuple[int, ...]:
        """A size for checking the options before the dataset is known: an image when no factor is
        temporal, else a clip whose T every temporal factor 1/k divides (a factor that is not 1/k
        can never shorten a clip by striding, whatever its T)."""
        factors = self.options["long_cycle_factors"]
        if factors is not None and all(t == 1 for t, _ in factors):
            return (224, 224)
        strides = []
        for index, (t, _) in enumerate(factors or LONG_CYCLE_FACTORS):
            k = round(1 / t) if t > 0 else 0
            if k < 1 or abs(1 / t - k) > 1e-6 * k:
                raise ValueError(
                    f"multigrid: the temporal factor {t:g} of long_cycle_factors[{index}] is not 1/k for a whole k: "
                    "clips are shortened by keeping every k-th frame; use 1, 1/2, 1/4, ... (dividing the clips' T)")
            strides.append(k)
        return (math.lcm(*strides), 224, 224)

    def _make_schedule(self, base_size: Sequence[int], batch_size: int = 1) -> MultigridSchedule:
        options = dict(self.options)
        if options["long_cycle_factors"] is None:
            options.pop("long_cycle_factors")
        return MultigridSchedule(base_size, base_batch_size=batch_size, **options)

    def _error(self, message: str) -> PluginError:
        return PluginError(f"multigrid (entry {self.instance_name!r}): {message}")

    def _run_epochs(self, ctx: Any) -> int:
        """The epochs this run trains: the schedule's, or fewer when the Trainer stops early."""
        assert self.schedule is not None
        if ctx.max_epochs is not None and ctx.max_epochs > 0:
            return min(ctx.max_epochs, self.schedule.max_epochs)
        return self.schedule.max_epochs

    def _shapes(self, epoch: int) -> list[tuple[int, tuple[int, ...]]]:
        """(batch size, input size) per short-cycle position in ``epoch``."""
        assert self.schedule is not None and self._batch_size is not None
        return [(self._batch_size * g.batch_factor, g.size) for g in self.schedule.cycle_shapes(epoch)]

    def _signature(self) -> dict[str, Any]:
        assert self.schedule is not None
        return {"base_size": list(self.schedule.base_size), "max_epochs": self.schedule.max_epochs,
                "lr_steps": list(self.schedule.lr_steps), "batch_size": self._batch_size}

    # -- setup --------------------------------------------------------------------------------

    @hookimpl
    def batchkit_setup(self, host: Any, stage: str) -> None:
        if stage != "fit":
            return
        for name, plugin in host.plugins.items():
            if plugin is self:
                continue
            factor = getattr(plugin, "load_factor", None)
            if factor not in (None, 1):
                raise self._error(
                    f"plugin {name!r} selects from super-batches (load_factor={factor}), which must hold the user's "
                    "batch size, but multigrid changes the batch size every iteration; they cannot run together. "
                    "Remove one of the two entries")
            if getattr(plugin, "global_batches", False) and host.has_impls("batchkit_wrap_batch_sampler") and \
                    plugin in host.implementers("batchkit_wrap_batch_sampler"):
                raise self._error(
                    f"plugin {name!r} builds global batches across ranks, which multigrid would cut into batches of "
                    "other sizes; they cannot run together. Remove one of the two entries")

    @hookimpl
    def batchkit_prepare_data(self, dataset: Any, ctx: Any) -> None:
        try:
            base = self.base_size or input_size(dataset, input_key=self.input_key)
            self.schedule = self._make_schedule(base)
        except ValueError as exc:
            raise self._error(str(exc).removeprefix("multigrid: ")) from None
        self._dataset = dataset
        expected, got = self.schedule.max_epochs, ctx.max_epochs
        if got != expected and not (self.allow_early_stop and got is not None and 0 < got < expected):
            raise self._error(
                f"the schedule trains {expected} epochs (the baseline's {self.options['max_epochs']} x epoch_factor "
                f"{self.options['epoch_factor']:g}, at far fewer steps), but the Trainer has max_epochs={got}; set "
                f"Trainer(max_epochs={expected}) (trainer.max_epochs: {expected} in YAML), and decay the module's LR "
                f"at epochs {self.schedule.module_lr_milestones} (MultigridSchedule.module_lr_milestones)"
                + ("" if self.allow_early_stop else "; to stop earlier on purpose, set allow_early_stop: true"))

    # -- sampler and collate stages -----------------------------------------------------------

    @hookimpl(trylast=True)
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any, dataset: Any, ctx: Any) -> MultigridBatchSampler:
        if self.schedule is None:  # the host prepares data before it builds the loader; be safe anyway
            self.batchkit_prepare_data(dataset, ctx)
        assert self.schedule is not None
        plan = ctx.super_batch
        self._batch_size = int(plan.train_size if plan is not None else batch_sampler.batch_size)
        if self._loaded_schedule is not None:  # a resumed run: the same schedule, or nothing is exact
            if self._loaded_schedule != self._signature():
                raise self._error(
                    f"the checkpoint was saved with the schedule {self._loaded_schedule}, but this run's options, "
                    f"dataset and batch size give {self._signature()}; resume with the options, the dataset and the "
                    "DataLoader batch size the checkpoint was trained with")
        self._num_samples = stream_length(batch_sampler)
        for stage in {self.schedule.stage_at(e).long_cycle: e for e in range(self._run_epochs(ctx))}.values():
            shapes = self._shapes(stage)
            if count_batches([b for b, _ in shapes], self._num_samples) == 0:
                raise self._error(
                    f"the schedule's first batch at epoch {stage} holds {shapes[0][0]} samples (b = {self._batch_size} x "
                    f"batch factor {shapes[0][0] // self._batch_size} at {shapes[0][1]}), but this rank has only "
                    f"{self._num_samples} samples per epoch, so that stage would have no batch at all; lower the "
                    "DataLoader's batch_size, use more data, or use smaller factors (short_cycle_factors, "
                    "long_cycle_factors)")
        epoch = self.loader_epoch
        self._built = (epoch, self._shapes(epoch))
        sampler = MultigridBatchSampler(batch_sampler, self._built[1], self._num_samples)
        # Tell the chain now which epoch it serves: with worker processes the DataLoader draws its
        # first batches when Lightning creates the iterator, before it sets the sampler's epoch, and
        # a resumed run keeps that iterator (it would train the epoch-0 order; see the README).
        sampler.set_epoch(epoch)
        self._epoch_len = len(sampler)
        return sampler

    @hookimpl(tryfirst=True)
    def batchkit_wrap_collate(self, collate_fn: Callable[[list], Any]) -> MultigridCollate:
        self._inner_collate = collate_fn
        return MultigridCollate(collate_fn, self.input_key, self.instance_name)

    @hookimpl
    def batchkit_plan_total_steps(self, total_steps: Optional[int], ctx: Any) -> Optional[int]:
        if self.schedule is None or self._num_samples is None:
            return None
        accumulate = max(1, int(ctx.accumulate_grad_batches))
        steps = sum(math.ceil(count_batches([b for b, _ in self._shapes(e)], self._num_samples) / accumulate)
                    for e in range(self._run_epochs(ctx)))
        return min(steps, ctx.max_steps) if ctx.max_steps is not None and ctx.max_steps > 0 else steps

    # -- the long cycle: learning rate and loader rebuilds --------------------------------------

    def _enter_epoch(self, ctx: Any) -> None:
        if self.schedule is None or self._built is None:  # no train loader was built (limit_train_batches=0)
            return
        epoch = ctx.epoch
        self.epoch = epoch
        if self._shapes(epoch) != self._built[1]:
            raise self._error(
                f"epoch {epoch} trains the shapes {self._shapes(epoch)}, but the train loader was built for epoch "
                f"{self._built[0]}'s {self._built[1]} and was not rebuilt (a batchkit host bug or a Trainer setting "
                "that keeps the loader); please report it")
        scale = self.schedule.lr_scale(epoch)
        self.host.set_lr_scale(self, scale)
        self.log("lr_scale", scale)
        self.log("long_cycle_shape", self.schedule.stage_at(epoch).long_cycle)

    @hookimpl
    def batchkit_fit_start(self, module: Any, ctx: Any) -> None:
        if self.schedule is None or self._built is None:
            return
        self._enter_epoch(ctx)  # also after a mid-epoch resume, where no epoch_start comes
        self._check_lr_scheduler(ctx)
        if self.check_shapes:
            self._check_model_takes_every_shape(module, ctx)

    @hookimpl
    def batchkit_epoch_start(self, ctx: Any) -> None:
        self._enter_epoch(ctx)

    @hookimpl
    def batchkit_before_forward(self, ctx: Any) -> None:
        size = ctx.batch_meta.get(SIZE_KEY)
        if size is not None:
            self.batches_by_size[tuple(size)] += 1

    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None:
        # A checkpoint written after the last batch of an epoch resumes in the next epoch.
        if self._built is not None and ctx.train_progress.batches_done >= self._epoch_len:
            self.loader_epoch = ctx.epoch + 1

    @hookimpl
    def batchkit_epoch_end(self, epoch: int, ctx: Any) -> None:
        self.loader_epoch = epoch + 1
        if self.schedule is None or self._built is None:
            return
        if epoch + 1 < self._run_epochs(ctx) and self._shapes(epoch + 1) != self._built[1]:
            stage = self.schedule.stage_at(epoch + 1)
            self.host.request_loader_rebuild(
                f"multigrid: epoch {epoch + 1} starts the long-cycle shape {stage.shape.size} "
                f"(batch factor {stage.shape.batch_factor})")

    # -- checks at the start of training ------------------------------------------------------

    def _check_lr_scheduler(self, ctx: Any) -> None:
        """A ``MultiStepLR`` stepped per epoch must decay at the multigrid LR stages (other
        schedulers are the user's choice and are not checked)."""
        assert self.schedule is not None
        trainer = ctx.trainer
        expected = self.schedule.module_lr_milestones
        for config in getattr(trainer, "lr_scheduler_configs", None) or ():
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) or config.interval != "epoch":
                continue
            milestones = sorted(scheduler.milestones.elements())
            if milestones != expected or not math.isclose(scheduler.gamma, self.schedule.gamma):
                raise self._error(
                    f"the module's MultiStepLR decays by {scheduler.gamma:g} at epochs {milestones}, but under multigrid "
                    f"the baseline's LR stages (milestones {self.options['lr_milestones']} of "
                    f"{self.options['max_epochs']} epochs) begin at epochs {expected} of the {self.schedule.max_epochs} "
                    f"multigrid epochs; build it with milestones={expected} and gamma={self.schedule.gamma:g} "
                    "(MultigridSchedule.module_lr_milestones). Multigrid multiplies that LR by the long-cycle batch "
                    "factor itself")

    def _check_model_takes_every_shape(self, module: Any, ctx: Any) -> None:
        """Run the model on two samples at every input size of the run (no grad, eval mode, random
        streams and state restored); a size it cannot take is a clear error now, not a shape error
        deep inside the first step at that size."""
        assert self.schedule is not None
        if self._dataset is None or self._inner_collate is None or not callable(module):
            return
        samples = [self._dataset[i] for i in range(min(2, len(self._dataset)))]
        sizes = sorted({size for e in range(ctx.epoch, self._run_epochs(ctx)) for _, size in self._shapes(e)},
                       key=lambda s: -math.prod(s))
        device = ctx.device if ctx.device is not None else torch.device("cpu")

        def forward(size: Optional[tuple[int, ...]]) -> tuple[int, ...]:
            x = _get_input(collate_at_size(samples, size, self._inner_collate, input_key=self.input_key), self.input_key)
            module(x.to(device))
            return tuple(x.shape)

        with scoring_pass(module):
            try:
                forward(None)
            except Exception:  # noqa: BLE001 - the module's forward does not take the bare input: nothing to probe
                return
            for size in sizes:
                try:
                    forward(size)
                except Exception as exc:  # noqa: BLE001
                    kind = "clips" if len(size) == 3 else "images"
                    pool = "nn.AdaptiveAvgPool3d(1)" if len(size) == 3 else "nn.AdaptiveAvgPool2d(1)"
                    detail = " ".join(str(exc).split())[:300]
                    raise self._error(
                        f"the model cannot take {kind} of size {size}, a shape of the schedule (base "
                        f"{self.schedule.base_size}): {type(exc).__name__}: {detail}. Multigrid trains the same model "
                        f"on smaller inputs, so it must accept every shape: pool adaptively before the classifier "
                        f"(e.g. {pool} and a Linear over the channels, in place of a Flatten or a fixed pooling "
                        "kernel over the full size), or leave out the shapes it cannot take (long_cycle_factors, "
                        "short_cycle_factors); check_shapes: false skips this check") from None

    # -- state --------------------------------------------------------------------------------

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "loader_epoch": self.loader_epoch}
        if self.schedule is None or self._batch_size is None:  # nothing trained since the state was loaded
            stage, lr_scale = self._loaded_stage
            return {**state, "stage": stage, "lr_scale": lr_scale, "schedule": self._loaded_schedule}
        # where the schedule stands: the stage (index into schedule.stages) and its LR scale
        stage = self.schedule.stages.index(self.schedule.stage_at(self.epoch))
        return {**state, "stage": stage, "lr_scale": self.schedule.lr_scale(self.epoch), "schedule": self._signature()}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.loader_epoch = int(state["loader_epoch"])
        self._loaded_schedule = state["schedule"]
        self._loaded_stage = (state["stage"], state["lr_scale"])
