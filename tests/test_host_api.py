"""The host features the selection, mining and shape methods build on, in real single-process
Lightning runs: super-batches, per-batch metadata from the sampler to the workers, the prepare-data
step and its artefact cache, loader rebuilds with a revised step count, the learning-rate scale,
training progress, and what the host refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from host_api_plugins import KeepLowestIndices
from host_api_plugins import TagBatches
from torch.utils.data import DataLoader

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl
from batchkit.batch import BatchSpec
from batchkit.cache import ArtifactCache
from batchkit.cache import fingerprint
from batchkit.data import BatchSamplerWrapper
from batchkit.lightning import BatchKitCallback
from batchkit.selection import assign_to_ranks
from batchkit.selection import select_across_ranks
from batchkit.testing import IndexedDataset
from batchkit.testing import TinyModule
from batchkit.testing import make_trainer


def loader(n: int = 64, batch_size: int = 8, **kwargs: Any) -> DataLoader:
    return DataLoader(IndexedDataset(n=n), batch_size=batch_size, shuffle=True, **kwargs)


# -- super-batches ----------------------------------------------------------------------------


def test_a_super_batch_plugin_loads_r_times_the_batch_and_training_sees_the_batch_size(tmp_path: Path) -> None:
    plugin = KeepLowestIndices(load_factor=2.0)
    callback = BatchKitCallback([plugin])
    module = TinyModule()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(module, loader())
    # 64 samples in super-batches of 16: 4 steps per epoch, Lightning's accounting included
    assert trainer.num_training_batches == 4 and trainer.global_step == 8
    assert trainer.train_dataloader.batch_sampler.batch_size == 8  # what DeepSpeed's config reads
    assert plugin.received == [16] * 8 and [len(s) for s in module.seen] == [8] * 8
    plan = callback.host.ctx.super_batch
    assert (plan.train_size, plan.load_size, plan.keep_size(plugin)) == (8, 16, 8)
    progress = callback.progress
    assert (progress.samples_loaded, progress.samples_trained, progress.batch_size) == (128, 64, 8)
    # each epoch covers the dataset once in super-batches, and the kept half is the lowest indices
    epoch = sorted(i for s in module.seen[:4] for i in s)
    assert len(set(epoch)) == 32 and max(epoch) < 64


class HalveInPlace(Plugin):
    """Cuts the (mutable, list) batch to its first half in place and returns nothing."""

    name = "halve_in_place"

    @hookimpl
    def batchkit_transform_batch(self, batch: Any) -> None:
        half = len(batch[0]) // 2
        batch[:] = [field[:half] for field in batch]


def test_progress_counts_a_batch_cut_in_place(tmp_path: Path) -> None:
    callback = BatchKitCallback([HalveInPlace()])
    module = TinyModule()
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(module, loader(n=32))
    assert [len(s) for s in module.seen] == [4] * 4
    progress = callback.progress
    assert (progress.samples_loaded, progress.samples_trained, progress.batch_size) == (32, 16, 4)


def test_super_batch_factors_multiply_and_each_plugin_keeps_its_share(tmp_path: Path) -> None:
    first, second = KeepLowestIndices(load_factor=2.0), KeepLowestIndices(load_factor=1.5)
    callback = BatchKitCallback({"first": first, "second": second})
    module = TinyModule()
    make_trainer(tmp_path, [callback], max_epochs=1).fit(module, loader(n=96))
    # b = 8: the second keeps 8 of 12, the first 12 of 24
    assert first.received == [24] * 4 and second.received == [12] * 4 and [len(s) for s in module.seen] == [8] * 4


def test_under_accumulation_every_micro_batch_is_selected_on_its_own(tmp_path: Path) -> None:
    plugin = KeepLowestIndices(load_factor=2.0)
    module = TinyModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback([plugin])], max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(module, loader())
    assert plugin.received == [16] * 4 and trainer.global_step == 2  # 4 micro-batches, 2 optimizer steps


def test_a_super_batch_plugin_returning_the_wrong_size_is_stopped(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [BatchKitCallback([KeepLowestIndices(wrong_size=True)])], max_epochs=1)
    with pytest.raises(PluginError, match="'keep_lowest' selects from super-batches of 16 samples and must return 8.*returned 7"):
        trainer.fit(TinyModule(), loader())


def test_a_load_factor_that_loads_nothing_more_is_refused(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [BatchKitCallback([KeepLowestIndices(load_factor=1.01)])], max_epochs=1)
    with pytest.raises(PluginError, match="load_factor=1.01.*loads 8 samples, no more than it keeps"):
        trainer.fit(TinyModule(), loader())


# -- metadata from the sampler to the workers -------------------------------------------------


class MetaModule(TinyModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.meta_seen = getattr(self, "meta_seen", []) + [batch[3].tolist()]
        return super().training_step(batch[:3], batch_idx)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_metadata_reaches_the_collate_in_the_workers_and_the_batch_stage(tmp_path: Path, workers: int) -> None:
    plugin = TagBatches()
    module = MetaModule()
    callback = BatchKitCallback([plugin])
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(module, loader(n=32, num_workers=workers))
    expected = [[p, e, s[0]] for e in range(2) for p, s in zip(range(4), module.seen[4 * e:4 * e + 4])]
    assert module.meta_seen == expected  # the collate in the worker read each batch's own metadata
    assert plugin.ctx_meta == [{"position": p, "epoch": e, "first": f} for p, e, f in expected]
    assert callback.progress.lookahead == (2 * 2 if workers else 0)  # num_workers * prefetch_factor


def test_metadata_is_kept_only_when_a_plugin_put_a_sampler_in_place(tmp_path: Path) -> None:
    from batchkit.data import PlannedDataset
    from batchkit.data import build_train_loader
    from batchkit.host import PluginHost

    class LeavesSampler(Plugin):
        name = "leaves"

        @hookimpl
        def batchkit_wrap_batch_sampler(self, batch_sampler: Any) -> None:
            return None

    def build(plugin: Plugin) -> Any:
        host = PluginHost([plugin])
        return build_train_loader(loader(n=32), host, progress=host.ctx.train_progress, prepared=set(), cache=None)

    plain, tagged = build(LeavesSampler()), build(TagBatches())
    # nothing wrapped: the base sampler's index lists carry no metadata, so none is tracked
    assert not plain.resumable.track_meta and not isinstance(plain.dataset, PlannedDataset)
    assert tagged.resumable.track_meta and isinstance(tagged.dataset, PlannedDataset)
    assert len(list(plain)) == 4 and not plain.resumable.pending_meta
    list(tagged)
    assert tagged.resumable.pop_meta()["position"] == 0
    # in training the batch stage sees an empty mapping
    seen: list[dict] = []

    class Reads(LeavesSampler):
        name = "reads"

        @hookimpl
        def batchkit_transform_batch(self, ctx: Any) -> None:
            seen.append(dict(ctx.batch_meta))

    trainer = make_trainer(tmp_path, [BatchKitCallback([Reads()])], max_epochs=1)
    trainer.fit(TinyModule(), loader(n=32))
    assert seen == [{}] * 4


# -- prepare-data and the artefact cache ------------------------------------------------------

BUILDS: list[int] = []


class Miner(Plugin):
    """Mines a per-dataset artefact once, keeps only its key in its state."""

    name = "miner"

    def __init__(self, option: int = 1) -> None:
        self.option = option
        self.prepared = 0
        self.key: str | None = None
        self.artefact: Any = None

    @hookimpl
    def batchkit_prepare_data(self, dataset: Any, cache: ArtifactCache, ctx: Any) -> None:
        self.prepared += 1
        assert ctx.device is not None  # the model is on its device by now
        self.key = cache.key("miner", dataset.x, {"option": self.option})
        self.artefact = cache.get_or_create(self.key, lambda: self.build(dataset))

    def build(self, dataset: Any) -> dict[str, Any]:
        BUILDS.append(self.option)
        return {"order": torch.argsort(dataset.x[:, 0]), "option": self.option}

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        return {"key": self.key}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self.key = state["key"]


def test_prepare_data_runs_once_per_fit_and_the_cache_is_reused_until_an_option_changes(tmp_path: Path) -> None:
    BUILDS.clear()
    cache_dir = tmp_path / "cache"

    def fit(option: int) -> Miner:
        miner = Miner(option)
        trainer = make_trainer(tmp_path, [BatchKitCallback([miner], cache_dir=cache_dir)], max_epochs=2,
                               reload_dataloaders_every_n_epochs=1)
        trainer.fit(TinyModule(), loader(n=16))
        return miner

    first = fit(1)
    assert first.prepared == 1 and BUILDS == [1]  # once per fit, though the loader was rebuilt every epoch
    second = fit(1)
    assert second.prepared == 1 and BUILDS == [1] and second.key == first.key  # loaded, not rebuilt
    assert torch.equal(second.artefact["order"], first.artefact["order"])
    third = fit(2)
    assert BUILDS == [1, 2] and third.key != first.key  # an option changed: a new artefact
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([f"{first.key}.pt", f"{third.key}.pt"])


def test_fingerprints_follow_content_and_refuse_what_they_cannot_hash() -> None:
    assert fingerprint([1, "a"], {"b": 2, "a": torch.arange(3)}) == fingerprint([1, "a"], {"a": torch.arange(3), "b": 2})
    assert fingerprint(torch.arange(3)) != fingerprint(torch.arange(3).float())
    assert fingerprint(torch.arange(3)) != fingerprint(torch.tensor([0, 1, 3]))
    with pytest.raises(PluginError, match="cannot fingerprint a object"):
        fingerprint(object())


def test_a_failed_build_leaves_no_artefact_and_a_missing_one_names_the_fix(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)

    def broken() -> None:
        raise RuntimeError("teacher exploded")

    with pytest.raises(RuntimeError, match="teacher exploded"):
        cache.get_or_create("k-1", broken)
    assert not list(tmp_path.iterdir())
    with pytest.raises(PluginError, match="artefact 'k-1' is not in the cache.*BATCHKIT_CACHE_DIR"):
        cache.load("k-1")


# -- loader rebuilds, the step count and the learning-rate scale ------------------------------


class Merge(BatchSamplerWrapper):
    def __init__(self, inner: Any, factor: int) -> None:
        super().__init__(inner)
        self.factor = factor

    def __len__(self) -> int:
        return -(-len(self.inner) // self.factor)

    def __iter__(self) -> Any:
        batch: list[int] = []
        for i, b in enumerate(self.inner):
            batch += b
            if (i + 1) % self.factor == 0:
                yield batch
                batch = []
        if batch:
            yield batch


class GrowBatches(Plugin):
    """From epoch 1 on: batches twice as large (a loader rebuild) and twice the learning rate."""

    name = "grow"
    scales_lr = True

    def __init__(self) -> None:
        self.factor = 1

    @hookimpl
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any) -> Any:
        return Merge(batch_sampler, self.factor)

    @hookimpl
    def batchkit_plan_total_steps(self, ctx: Any) -> int:
        return 8 + 4 * (ctx.max_epochs - 1)  # 64 samples: 8 batches of 8, then 4 of 16

    @hookimpl
    def batchkit_epoch_end(self, epoch: int) -> None:
        if epoch == 0:
            self.factor = 2
            self.host.request_loader_rebuild("twice the batch size")
            self.host.set_lr_scale(self, 2.0)


class WithScheduler(TinyModule):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}

    def on_train_start(self) -> None:
        self.lr_in_step: list[float] = []
        opt = self.trainer.optimizers[0]
        opt.register_step_pre_hook(lambda o, a, k: self.lr_in_step.append(o.param_groups[0]["lr"]))


def test_a_plugin_rebuilds_the_loader_and_scales_the_lr_without_touching_the_scheduler(tmp_path: Path) -> None:
    callback = BatchKitCallback([GrowBatches()])
    module = WithScheduler()
    trainer = make_trainer(tmp_path, [callback], max_epochs=3)
    trainer.fit(module, loader())
    assert [len(s) for s in module.seen] == [8] * 8 + [16] * 8
    assert trainer.global_step == 16 and callback.host.ctx.total_steps == 16 and callback.host.ctx.progress == 1.0
    assert trainer.num_training_batches == 4  # Lightning's own count followed the rebuild
    # the scheduler halves the lr every epoch; the plugin's scale applies inside step() only
    assert module.lr_in_step == pytest.approx([0.1] * 8 + [0.05 * 2] * 4 + [0.025 * 2] * 4)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0125)  # the scheduler's value
    assert trainer.reload_dataloaders_every_n_epochs == 0  # the Trainer's setting is back


def test_the_lr_scale_step_hooks_exist_only_for_plugins_that_declare_scales_lr(tmp_path: Path) -> None:
    class Undeclared(Plugin):
        name = "undeclared"

        @hookimpl
        def batchkit_epoch_end(self, epoch: int) -> None:
            self.host.set_lr_scale(self, 2.0)

    import lightning.pytorch as pl

    class CountStepHooks(pl.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            opt = trainer.optimizers[0]
            self.hooks = len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)

    quiet, scaling = CountStepHooks(), CountStepHooks()
    make_trainer(tmp_path, [BatchKitCallback([KeepLowestIndices(load_factor=2)]), quiet], max_epochs=1).fit(TinyModule(), loader())
    assert quiet.hooks == 0  # no plugin scales the lr: no per-step hook calls
    make_trainer(tmp_path, [BatchKitCallback([GrowBatches()]), scaling], max_epochs=1).fit(WithScheduler(), loader())
    assert scaling.hooks == 2  # one pre- and one post-step hook
    with pytest.raises(PluginError, match="'undeclared' called set_lr_scale but does not declare scales_lr = True"):
        make_trainer(tmp_path, [BatchKitCallback([Undeclared()])], max_epochs=1).fit(TinyModule(), loader())


# -- what the host refuses --------------------------------------------------------------------


class AddLoss(Plugin):
    name = "add_loss"

    @hookimpl
    def batchkit_transform_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss + 1e6


class Manual(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_loss_plugins_with_manual_optimization_are_refused_at_setup(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [BatchKitCallback([AddLoss()])], max_epochs=1)
    with pytest.raises(PluginError, match=r"loss-stage plugins \['add_loss'\].*manual optimization"):
        trainer.fit(Manual(), loader())


# -- global selection, in one process ---------------------------------------------------------


def test_global_choice_assignment_keeps_own_samples_first() -> None:
    # 2 ranks x 4 samples, keep 2 each: rank 0 was chosen 3 times, rank 1 once
    assert assign_to_ranks(torch.tensor([6, 0, 1, 3]), per_rank=4, world_size=2, keep=2) == [[0, 1], [6, 3]]
    with pytest.raises(PluginError, match="exactly 4"):
        assign_to_ranks(torch.tensor([0, 1, 2]), per_rank=4, world_size=2, keep=2)
    with pytest.raises(PluginError, match="distinct"):
        assign_to_ranks(torch.tensor([0, 0, 1, 2]), per_rank=4, world_size=2, keep=2)


def test_select_across_ranks_in_one_process_is_a_local_choice() -> None:
    batch = {"x": torch.arange(6.0), "names": list("abcdef")}
    chosen = select_across_ranks(batch, {"score": torch.tensor([5.0, 1, 4, 2, 6, 3])},
                                 lambda f, k: torch.argsort(f["score"], descending=True)[:k], keep=3, spec=BatchSpec())
    assert chosen.chosen.tolist() == [4, 0, 2] and chosen.assigned.tolist() == [0, 2, 4]
    assert chosen.batch["names"] == ["a", "c", "e"]
