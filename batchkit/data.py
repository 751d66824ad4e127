"""The training DataLoader that batchkit builds: a rank's shard, the sampler chain, the collate
chain, and the bookkeeping that lets a run resume mid-epoch exactly.

The host rebuilds the user's train DataLoader once (each time Lightning asks for it):

* the **base batch sampler** is this rank's shard (``DistributedSampler``, one replica when not
  distributed), shuffled if the user's loader shuffled, seeded from ``PL_GLOBAL_SEED`` like
  Lightning's own injection, padded so every rank has the same number of samples, then cut into
  the user's batch size;
* the sampler-stage plugins wrap it (``batchkit_wrap_batch_sampler``);
* a host-owned :class:`ResumableBatchSampler` sits outermost: it forwards ``set_epoch`` and skips
  the batches already trained when resuming mid-epoch;
* the collate-stage plugins wrap the user's collate function, and :class:`MutableCollate` turns a
  top-level tuple into a list so the batch stage always gets a mutable container.

Because the loader's ``sampler`` is already a ``DistributedSampler``, Lightning does not inject
its own (``_requires_distributed_sampler`` checks exactly that), and every rank sees a disjoint
shard whose length is the same on all ranks.
"""

from __future__ import annotations

import os
from typing import Any
from typing import Callable
from typing import Iterator

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


class MutableCollate:
    """Calls the collate chain and returns a list where it produced a plain tuple.

    Lightning hands the batch to callbacks by reference; a list (or dict) can be changed in place,
    a tuple cannot. Named tuples and other types pass through unchanged.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        batch = self.collate_fn(samples)
        if type(batch) is tuple:
            return list(batch)
        return batch


class ResumableBatchSampler:
    """The outermost batch sampler: forwards ``set_epoch`` down the chain and, after a restart,
    skips the batches of the interrupted epoch that were already trained."""

    def __init__(self, inner: Any, base_sampler: Any, batch_size: int) -> None:
        self.inner = inner
        #: the user's batch size (plugins may yield other sizes); DeepSpeed's config reads it
        self.batch_size = batch_size
        # Lightning calls set_epoch on ``batch_sampler.sampler``: point it at the shard sampler.
        self.sampler = base_sampler
        self.epoch: int | None = None  # the epoch the chain was last told about
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained)

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
        for i, batch in enumerate(self.inner):
            if i >= skip:
                yield batch

    def __len__(self) -> int:
        return len(self.inner)


class BatchKitDataLoader(DataLoader):
    """A DataLoader whose ``sampler`` reports the shard sampler and whose position in the epoch
    is saved in checkpoints (Lightning saves loaders that have ``state_dict``/``load_state_dict``).
    """

    def __init__(self, dataset: Dataset, *, batch_sampler: ResumableBatchSampler, progress: Any, **kwargs: Any) -> None:
        self._shard_sampler = batch_sampler.sampler
        self.resumable: ResumableBatchSampler = batch_sampler
        self._progress = progress
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

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._progress.epoch), "batches_done": int(self._progress.batches_done)}

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


def build_train_loader(loader: DataLoader, host: Any, *, progress: Any) -> DataLoader:
    """Rebuild the user's train DataLoader with batchkit's sampler and collate chains."""
    if isinstance(loader, BatchKitDataLoader) or not isinstance(loader, DataLoader):
        return loader
    ctx = host.ctx
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
    if isinstance(loader.dataset, IterableDataset):
        if host.has_impls("batchkit_wrap_batch_sampler"):
            raise PluginError(
                "batchkit: sampler-stage plugins "
                f"{host.chain_order('batchkit_wrap_batch_sampler')} need a map-style dataset "
                "(with __getitem__ and __len__), but the train dataset is an IterableDataset"
            )
        return DataLoader(loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    if loader.batch_size is None:
        raise PluginError(
            "batchkit: the train DataLoader has a custom batch_sampler or batch_size=None; give it a "
            "batch_size (and shuffle) and put custom batching in a sampler-stage plugin"
        )
    shard = DistributedSampler(
        loader.dataset,
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=_shuffles(loader),
        seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        drop_last=False,  # pad: every rank gets the same number of samples
    )
    base = BatchSampler(shard, loader.batch_size, loader.drop_last)
    chained = host.chain("batchkit_wrap_batch_sampler", base, dataset=loader.dataset, ctx=ctx)
    outer = ResumableBatchSampler(chained, shard, loader.batch_size)
    check_same_length_on_all_ranks(outer, host)
    return BatchKitDataLoader(loader.dataset, batch_sampler=outer, progress=progress, **common)


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
