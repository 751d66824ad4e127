"""Plugins that exercise the host API in the tests (single-process and the 2-process job)."""

from __future__ import annotations

from typing import Any
from typing import Iterator

import torch

from batchkit import Plugin
from batchkit import hookimpl
from batchkit.data import BatchPlan
from batchkit.data import BatchSamplerWrapper
from batchkit.data import batch_meta
from batchkit.selection import select_across_ranks


class KeepLowestIndices(Plugin):
    """A super-batch plugin: loads ``load_factor`` times the batch and keeps the samples with the
    lowest dataset indices (deterministic, so tests can predict it)."""

    name = "keep_lowest"
    allow_multiple = True

    def __init__(self, load_factor: float = 2.0, wrong_size: bool = False) -> None:
        self.load_factor = load_factor
        self.wrong_size = wrong_size
        self.received: list[int] = []

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, ctx: Any) -> Any:
        spec = ctx.batch_spec
        self.received.append(spec.num_samples(batch))
        keep = ctx.super_batch.keep_size(self) - (1 if self.wrong_size else 0)
        return spec.select(batch, torch.argsort(batch[2])[:keep])


class SelectGlobally(Plugin):
    """A super-batch plugin choosing over every rank's samples with the host helper: the samples
    with the lowest dataset indices of the global super-batch."""

    name = "select_globally"
    load_factor = 2.0

    def __init__(self, scope: str = "global") -> None:
        self.scope = scope
        self.chosen: list[list[int]] = []  # global positions chosen, per step
        self.super_ids: list[list[int]] = []  # this rank's super-batch dataset ids, per step

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, ctx: Any) -> Any:
        self.super_ids.append(batch[2].tolist())

        def lowest(features: dict[str, torch.Tensor], k: int) -> torch.Tensor:
            return torch.argsort(features["index"])[:k]

        result = select_across_ranks(batch, {"index": batch[2].float()}, lowest, ctx.super_batch.keep_size(self),
                                     scope=self.scope, spec=ctx.batch_spec)
        self.chosen.append(result.chosen.tolist())
        return result.batch


class Tagging(BatchSamplerWrapper):
    def __iter__(self) -> Iterator[list[int]]:
        for position, batch in enumerate(self.inner):
            yield BatchPlan(batch, {"position": position, "epoch": self.epoch, "first": int(batch[0])})


class TagBatches(Plugin):
    """Sampler stage: attaches metadata to every batch. Collate stage: appends the metadata it
    reads in the worker as a fourth field. Batch stage: records what the host says it is."""

    name = "tag_batches"

    def __init__(self, global_batches: bool = False) -> None:
        self.global_batches = global_batches
        self.ctx_meta: list[dict[str, Any]] = []
        self.sampler_lengths: list[int] = []

    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any) -> Any:
        self.sampler_lengths.append(len(batch_sampler))
        return Tagging(batch_sampler)

    @hookimpl
    def batchkit_wrap_collate(self, collate_fn: Any) -> Any:
        return AppendMeta(collate_fn)

    @hookimpl
    def batchkit_transform_batch(self, ctx: Any) -> None:
        self.ctx_meta.append(dict(ctx.batch_meta))


class AppendMeta:
    """Picklable collate wrapper (it runs in the workers)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, samples: list) -> list:
        meta = batch_meta()
        x, y, idx = self.inner(samples)
        return [x, y, idx, torch.tensor([meta["position"], meta["epoch"], meta["first"]])]


class PrepareOnceScaleAndRebuild(Plugin):
    """prepare-data through the artefact cache (rank 0 builds, every rank loads); from epoch 1 on,
    a loader rebuild and an lr scale of 3; records the lr each step() sees."""

    name = "prepare_scale_rebuild"
    scales_lr = True

    def __init__(self, out: str) -> None:
        self.out = out
        self.artefact: Any = None
        self.lr_in_step: list[float] = []

    @hookimpl
    def batchkit_prepare_data(self, dataset: Any, cache: Any, ctx: Any) -> None:
        def build() -> dict[str, Any]:
            with open(f"{self.out}/builds.txt", "a") as f:
                f.write(f"{ctx.rank}\n")
            return {"n": len(dataset), "first": dataset.x[0]}

        self.artefact = cache.get_or_create(cache.key("job", dataset.x), build)

    @hookimpl
    def batchkit_fit_start(self, ctx: Any) -> None:
        from batchkit import _compat

        for optimizer in _compat.torch_optimizers(ctx.trainer):
            optimizer.register_step_pre_hook(lambda opt, a, k: self.lr_in_step.append(float(opt.param_groups[0]["lr"])))

    @hookimpl
    def batchkit_epoch_end(self, epoch: int) -> None:
        if epoch == 0:
            self.host.request_loader_rebuild("test")
            self.host.set_lr_scale(self, 3.0)
