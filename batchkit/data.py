"""The training DataLoader that batchkit builds: a rank's shard (or global batches split across
ranks), super-batches, the sampler chain, per-batch metadata to the workers, the collate chain, and
the bookkeeping that lets a run resume mid-epoch exactly.

The host rebuilds the user's train DataLoader each time Lightning asks for it:

* the **base batch sampler** is this rank's shard (``DistributedSampler``, one replica when not
  distributed), shuffled if the user's loader shuffled, seeded from the run's seed like Lightning's
  own injection, padded so every rank has the same number of samples, cut into batches of
  ``ctx.super_batch.load_size`` (the user's batch size unless a batch-stage plugin asked for
  super-batches; super-batches are always whole, the last incomplete one of an epoch is dropped);
* if a sampler-stage plugin sets ``global_batches = True``, the base is instead the *unsharded*
  dataset cut into global batches of ``world_size`` times that size, the same on every rank, and
  after the chain :class:`RankSplitBatchSampler` gives each rank its slice of each global batch;
* the sampler-stage plugins wrap it (``batchkit_wrap_batch_sampler``); a batch is a list of indices
  or a :class:`BatchPlan` carrying metadata;
* a host-owned :class:`ResumableBatchSampler` sits outermost: it forwards ``set_epoch``, skips the
  batches already trained when resuming mid-epoch, and records what it yielded (so the host knows
  the metadata of the batch being trained and how far the loader has run ahead);
* the collate-stage plugins wrap the user's collate function, and :class:`MutableCollate` turns a
  top-level tuple into a list so the batch stage always gets a mutable container, and makes the
  batch's metadata readable through :func:`batch_meta` while the chain runs, in the worker.

Because the loader's ``sampler`` is a ``DistributedSampler``, Lightning does not inject its own
(``_requires_distributed_sampler`` checks exactly that), and every rank sees a disjoint shard whose
length is the same on all ranks.
"""

from __future__ import annotations

import contextvars
import os
from collections import deque
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Mapping

from torch.utils.data import BatchSampler
from torch.utils.data import DataLoader
from torch.utils.data import Dataset
from torch.utils.data import DistributedSampler
from torch.utils.data import IterableDataset
from torch.utils.data import RandomSampler
from torch.utils.data import SequentialSampler
from torch.utils.data import default_collate

from batchkit import dist
from batchkit.errors import PluginError


# -------------------------------------------------------------------------------------------------
# Batches with metadata
# -------------------------------------------------------------------------------------------------


class BatchPlan(list):
    """A batch of dataset indices with metadata for the collate stage (the shape of this step, the
    clusters it holds, ...). It is a list of indices, so it goes wherever an index list goes; the
    dataset is never modified and receives plain indices.

    >>> BatchPlan([4, 9, 1], meta={"shape": (8, 56, 56)})
    """

    def __init__(self, indices: Iterable[int] = (), meta: Mapping[str, Any] | None = None) -> None:
        super().__init__(indices)
        self.meta: dict[str, Any] = dict(meta or {})

    def __repr__(self) -> str:
        return f"BatchPlan({list(self)!r}, meta={self.meta!r})"

    def __reduce_ex__(self, protocol: Any) -> Any:  # keep meta when pickled to the workers
        return (BatchPlan, (list(self), self.meta))


_NO_META: Mapping[str, Any] = {}
_current_meta: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("batchkit_batch_meta", default=_NO_META)


def batch_meta() -> Mapping[str, Any]:
    """The metadata of the batch being collated, from inside a collate function (in the DataLoader
    worker or in-process); an empty mapping for a plain index list or outside a collate."""
    return _current_meta.get()


class _Samples(list):
    """The samples of one batch, with the plan's metadata, from the dataset fetch to the collate."""

    meta: Mapping[str, Any] = _NO_META


class PlannedDataset(Dataset):
    """The user's dataset, unchanged, seen through a fetch that keeps a :class:`BatchPlan`'s
    metadata with the samples (DataLoader calls ``__getitems__`` with the batch's index list).
    Attribute access reaches the wrapped dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        inner = getattr(self.dataset, "__getitems__", None)
        samples = _Samples(inner(list(indices)) if callable(inner) else [self.dataset[i] for i in indices])
        samples.meta = getattr(indices, "meta", _NO_META)
        return samples

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class MutableCollate:
    """Calls the collate chain with the batch's metadata readable through :func:`batch_meta`, and
    returns a list where the chain produced a plain tuple.

    Lightning hands the batch to callbacks by reference; a list (or dict) can be changed in place,
    a tuple cannot. Named tuples and other types pass through unchanged.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        meta = getattr(samples, "meta", _NO_META)
        if meta is _NO_META:  # a plain index list: batch_meta() already reads the empty mapping
            batch = self.collate_fn(samples)
        else:
            token = _current_meta.set(meta)
            try:
                batch = self.collate_fn(samples)
            finally:
                _current_meta.reset(token)
        if type(batch) is tuple:
            return list(batch)
        return batch


# -------------------------------------------------------------------------------------------------
# Batch samplers
# -------------------------------------------------------------------------------------------------


class BatchSamplerWrapper:
    """Base class for batch samplers that wrap another: forwards ``set_epoch`` and, by default,
    ``len()`` and iteration. Override ``__iter__`` (and ``__len__`` if the count changes)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_epoch = getattr(self.inner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.inner)


class ShardBatchSampler(BatchSampler):
    """The host's base batch sampler: a ``BatchSampler`` over the shard sampler that also takes
    ``set_epoch``, so wrappers can forward it uniformly."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]


def split_global_batch(batch: list[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous slice of a global batch: ``ceil(n / world_size)`` indices, the
    batch padded by repeating its first indices when ``n`` is not a multiple of the world size (so
    every rank gets the same number); a :class:`BatchPlan` keeps its metadata."""
    n = len(batch)
    per = -(-n // world_size)
    padded = list(batch) + [batch[i % n] for i in range(per * world_size - n)] if n else []
    part = padded[rank * per:(rank + 1) * per]
    return BatchPlan(part, batch.meta) if isinstance(batch, BatchPlan) else part


class RankSplitBatchSampler(BatchSamplerWrapper):
    """After a chain of global batches: each rank's slice of every global batch."""

    def __init__(self, inner: Any, rank: int, world_size: int) -> None:
        super().__init__(inner)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.inner:
            yield split_global_batch(batch, self.rank, self.world_size)


class ResumableBatchSampler:
    """The outermost batch sampler: forwards ``set_epoch`` down the chain, skips the batches of the
    interrupted epoch that were already trained after a restart, and records the metadata of every
    batch it yields (popped by the host as each batch is trained)."""

    def __init__(self, inner: Any, base_sampler: Any, batch_size: int, progress: Any, track_meta: bool = True) -> None:
        self.inner = inner
        #: whether batches may carry metadata (false when no sampler-stage plugin wrapped the base
        #: sampler, whose plain index lists have none): nothing is recorded then
        self.track_meta = track_meta
        #: the size of the batches training_step receives; DeepSpeed's config and Lightning's
        #: batch-size inference read it
        self.batch_size = batch_size
        # Lightning calls set_epoch on ``batch_sampler.sampler``: point it at the shard sampler.
        self.sampler = base_sampler
        self.progress = progress
        self.epoch: int | None = None  # the epoch the chain was last told about
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained)
        self.pending_meta: deque[Mapping[str, Any]] = deque()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for obj in (self.inner, self.sampler):
            set_epoch = getattr(obj, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches the next time epoch ``epoch`` is iterated."""
        self._resume = (epoch, batches_done)

    def clear_resume(self) -> None:
        self._resume = None

    def __iter__(self) -> Iterator[list[int]]:
        # Lightning sets the epoch on the shard sampler only, and on resume it creates the iterator
        # before any epoch-start hook runs: bring the plugin chain to the shard's epoch here.
        if self.epoch != self.sampler.epoch:
            self.set_epoch(self.sampler.epoch)
        # The skip is tied to the epoch and cleared only once training has moved on (clear_resume),
        # so an iterator Lightning creates and discards does not consume it.
        skip = self._resume[1] if self._resume and self._resume[0] == self.epoch else 0
        self.pending_meta.clear()
        self.progress.yielded = skip
        track_meta, pending_meta, progress = self.track_meta, self.pending_meta, self.progress
        for i, batch in enumerate(self.inner):
            if i >= skip:
                if track_meta:
                    pending_meta.append(getattr(batch, "meta", _NO_META))
                progress.yielded = i + 1
                yield batch

    def pop_meta(self) -> Mapping[str, Any]:
        """The metadata of the next batch to be trained (in the order the batches were yielded)."""
        return self.pending_meta.popleft() if self.pending_meta else _NO_META

    def __len__(self) -> int:
        return len(self.inner)


class BatchKitDataLoader(DataLoader):
    """A DataLoader whose ``sampler`` reports the shard sampler (so Lightning injects none) and whose
    position in the epoch is saved in checkpoints."""

    def __init__(self, dataset: Dataset, *, batch_sampler: ResumableBatchSampler, user_dataset: Dataset, **kwargs: Any) -> None:
        self._shard_sampler = batch_sampler.sampler
        self.resumable: ResumableBatchSampler = batch_sampler
        #: the user's dataset (``dataset`` may be the metadata-keeping view of it)
        self.user_dataset = user_dataset
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    # DataLoader stores a SequentialSampler placeholder in ``sampler`` when given a batch_sampler.
    # Lightning decides whether to inject a DistributedSampler by looking at ``sampler``, so report
    # the real shard sampler instead; the placeholder is never used for iteration.
    @property  # type: ignore[override]
    def sampler(self) -> Any:
        return self._shard_sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        pass

    # Lightning saves the state of loaders that have one and warns about mid-epoch resumes of those
    # that do not. The position is the host's TrainProgress (saved with the callback, which also
    # applies it when the loader is rebuilt); these are a view of it.
    def state_dict(self) -> dict[str, int]:
        progress = self.resumable.progress
        return {"epoch": int(progress.epoch), "batches_done": int(progress.batches_done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resumable.resume_at(int(state["epoch"]), int(state["batches_done"]))


def _shuffles(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        if sampler.replacement or sampler.num_samples != len(sampler.data_source):
            raise PluginError(
                "batchkit: the train DataLoader samples with replacement or a fixed num_samples "
                "(RandomSampler(replacement=True / num_samples=...)); batchkit's sampler stage needs "
                "each sample once per epoch. Use shuffle=True instead."
            )
        return True
    if isinstance(sampler, (SequentialSampler, DistributedSampler)):
        return bool(getattr(sampler, "shuffle", False))
    raise PluginError(
        f"batchkit: the train DataLoader uses a custom sampler ({type(sampler).__name__}); batchkit "
        "builds the shard sampler itself. Use shuffle=True/False, or do the custom sampling in a "
        "sampler-stage plugin (batchkit_wrap_batch_sampler)."
    )


def loader_lookahead(loader: DataLoader) -> int:
    """How many batches beyond the one being trained the loader may have drawn from its sampler:
    ``num_workers * prefetch_factor`` with worker processes (the DataLoader keeps that many index
    batches in flight), 0 in-process (Lightning's fetcher does not read ahead of a sized loader)."""
    return loader.num_workers * (loader.prefetch_factor or 2) if loader.num_workers > 0 else 0


def build_train_loader(loader: DataLoader, host: Any, *, progress: Any, prepared: set[int], cache: Any) -> DataLoader:
    """Rebuild the user's train DataLoader with batchkit's sampler and collate chains (running the
    prepare-data hooks first, once per dataset per fit)."""
    if isinstance(loader, BatchKitDataLoader) or not isinstance(loader, DataLoader):
        return loader
    ctx = host.ctx
    if id(loader.dataset) not in prepared:
        prepared.add(id(loader.dataset))
        host.notify("batchkit_prepare_data", dataset=loader.dataset, cache=cache, ctx=ctx)
    collate = MutableCollate(host.chain("batchkit_wrap_collate", loader.collate_fn or default_collate, ctx=ctx))
    common = dict(
        num_workers=loader.num_workers,
        collate_fn=collate,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        common["prefetch_factor"] = loader.prefetch_factor
    progress.lookahead = loader_lookahead(loader)
    if isinstance(loader.dataset, IterableDataset):
        if host.has_impls("batchkit_wrap_batch_sampler"):
            raise PluginError(
                "batchkit: sampler-stage plugins "
                f"{host.chain_order('batchkit_wrap_batch_sampler')} need a map-style dataset "
                "(with __getitem__ and __len__), but the train dataset is an IterableDataset"
            )
        plan = host.super_batch_plan(loader.batch_size or 1)
        if plan.active:
            raise PluginError(
                f"batchkit: plugins {list(plan.sizes)} select from super-batches, which need a map-style dataset "
                "(with __getitem__ and __len__), but the train dataset is an IterableDataset"
            )
        ctx.super_batch = plan
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    if loader.batch_size is None:
        raise PluginError(
            "batchkit: the train DataLoader has a custom batch_sampler or batch_size=None; give it a "
            "batch_size (and shuffle) and put custom batching in a sampler-stage plugin"
        )
    plan = host.super_batch_plan(loader.batch_size)
    ctx.super_batch = plan
    drop_last = loader.drop_last or plan.active
    global_batches = any(getattr(p, "global_batches", False) for p in host.implementers("batchkit_wrap_batch_sampler"))
    seed = _run_seed()
    if global_batches:
        shard = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=_shuffles(loader), seed=seed)
        base = ShardBatchSampler(shard, plan.load_size * ctx.world_size, drop_last)
    else:
        shard = DistributedSampler(
            loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=_shuffles(loader), seed=seed,
            drop_last=False,  # pad: every rank gets the same number of samples
        )
        base = ShardBatchSampler(shard, plan.load_size, drop_last)
    chained = host.chain("batchkit_wrap_batch_sampler", base, dataset=loader.dataset, ctx=ctx)
    # Only a sampler a plugin put in place can yield BatchPlans; the base sampler's index lists
    # carry no metadata, so when every plugin left it as it was there is none to keep.
    may_carry_meta = chained is not base
    if global_batches:
        chained = RankSplitBatchSampler(chained, ctx.rank, ctx.world_size)
    outer = ResumableBatchSampler(chained, shard, plan.train_size, progress, track_meta=may_carry_meta)
    check_same_length_on_all_ranks(outer, host)
    dataset = PlannedDataset(loader.dataset) if may_carry_meta else loader.dataset
    return BatchKitDataLoader(dataset, batch_sampler=outer, user_dataset=loader.dataset, **common)


def _run_seed() -> int:
    # Lightning's seed_everything records the seed here; its own DistributedSampler injection uses it too.
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def check_same_length_on_all_ranks(batch_sampler: Any, host: Any) -> None:
    """Ranks with different numbers of batches hang in the first collective after the shortest
    one stops: refuse to start instead."""
    if not dist.is_distributed():
        return
    lengths = dist.all_gather_object(len(batch_sampler))
    if len(set(lengths)) > 1:
        raise PluginError(
            f"batchkit: ranks would run different numbers of batches per epoch ({lengths}); the "
            f"sampler chain {host.chain_order('batchkit_wrap_batch_sampler')} must give every rank the "
            "same len()"
        )
