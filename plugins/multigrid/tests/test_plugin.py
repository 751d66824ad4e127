"""The multigrid plugin on the host: the short cycle through the real sampler (hand cases), ranks
in lockstep, the resize in the workers, the long cycle (loader rebuilds, step count, learning rate
next to the module's scheduler) in real runs, and the errors for bad options, data and models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import BatchSampler
from torch.utils.data import DataLoader
from torch.utils.data import DistributedSampler
from torch.utils.data import SequentialSampler

from batchkit import Plugin
from batchkit import PluginConflictError
from batchkit import PluginError
from batchkit import hookimpl
from batchkit.cache import ArtifactCache
from batchkit.config import build_plugins
from batchkit.data import BatchPlan
from batchkit.data import build_train_loader
from batchkit.errors import ConfigError
from batchkit.host import PluginHost
from batchkit.host import TrainProgress
from batchkit.lightning import BatchKitCallback
from batchkit.testing import IndexedDataset
from batchkit.testing import make_trainer
from batchkit_multigrid import MultigridBatchSampler
from batchkit_multigrid import MultigridPlugin
from batchkit_multigrid.plugin import POSITION_KEY
from batchkit_multigrid.plugin import SIZE_KEY
from batchkit_multigrid.testing import FixedSizeModule
from batchkit_multigrid.testing import IndexedClips
from batchkit_multigrid.testing import IndexedImages
from batchkit_multigrid.testing import TinyShapeModule
from batchkit_multigrid.testing import image_loader


def host_loader(plugin: MultigridPlugin, loader: DataLoader, max_epochs: int) -> DataLoader:
    """The train DataLoader the host builds around ``plugin`` (its real sampler and collate chains)."""
    host = PluginHost([plugin])
    host.ctx.max_epochs = max_epochs
    return build_train_loader(loader, host, progress=host.ctx.train_progress, prepared=set(), cache=ArtifactCache("/nonexistent"))


# ------------------------------------------------------------------ the short cycle, by hand


def test_short_cycle_hand_case_images_through_the_host_loader():
    """Images 16 x 16, b = 4, baseline 2 epochs with a milestone at 1: multigrid epochs
    [0, 1) at the long-cycle shape 11 x 11 (β = round(256/121) = 2), then the base.

    Epoch 0's short cycle: 8 x 8 (batch 4·2·round(121/64) = 16), 11 x 11 (4·2·round(121/128) = 8),
    11 x 11 (4·2 = 8). 40 samples in order: [0..15] [16..23] [24..31], and the last 8 cannot
    fill a batch of 16 (dropped)."""
    plugin = MultigridPlugin(2, [1])
    loader = host_loader(plugin, DataLoader(IndexedImages(n=40), batch_size=4), max_epochs=3)
    batches = list(loader)
    assert len(loader) == 3
    assert [b[2].tolist() for b in batches] == [list(range(16)), list(range(16, 24)), list(range(24, 32))]
    assert [tuple(b[0].shape) for b in batches] == [(16, 1, 8, 8), (8, 1, 11, 11), (8, 1, 11, 11)]
    # what the sampler told the collate stage
    plans = list(loader.batch_sampler.inner)
    assert all(isinstance(p, BatchPlan) for p in plans)
    assert [(p.meta[SIZE_KEY], p.meta[POSITION_KEY]) for p in plans] == [((8, 8), 0), ((11, 11), 1), ((11, 11), 2)]
    # the collate stage resized the samples' 16 x 16 images (antialiased bilinear)
    data = IndexedImages(n=40)
    expected = torch.nn.functional.interpolate(data.x[:16], size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(batches[0][0], expected, atol=1e-6)
    assert torch.equal(batches[0][1], data.base.y[:16])


def test_short_cycle_hand_case_clips_regroups_the_sample_stream():
    """Clips 16 x 64 x 64 (phase 1's hand case), b = 3: the long-cycle shape of epoch 0 is
    (4, 45, 45) with β = 8; its short cycle (4, 32, 32), (4, 45, 45), (4, 45, 45) with batches
    3·8·2 = 48, 3·8·1 = 24, 24. The DataLoader's batches of 3 are joined and cut again."""
    plugin = MultigridPlugin(10, [8], base_size=[16, 64, 64])
    plugin.schedule = plugin._make_schedule((16, 64, 64))
    plugin._batch_size = 3
    inner = BatchSampler(SequentialSampler(range(200)), 3, drop_last=True)  # 66 batches: 198 samples
    sampler = MultigridBatchSampler(inner, plugin._shapes(0), num_samples=198)
    plans = list(sampler)
    assert [len(p) for p in plans] == [48, 24, 24, 48, 24, 24]  # 192 samples; 6 left, short of a batch of 48
    assert len(sampler) == 6
    assert [i for p in plans for i in p] == list(range(192))
    assert [p.meta[SIZE_KEY] for p in plans] == [(4, 32, 32), (4, 45, 45), (4, 45, 45)] * 2
    assert [p.meta[POSITION_KEY] for p in plans] == [0, 1, 2, 0, 1, 2]
    # the last long-cycle stage (the fine-tune at the base shape): 12 (4x), 6 (2x), 3
    assert plugin._shapes(14) == [(12, (16, 32, 32)), (6, (16, 45, 45)), (3, (16, 64, 64))]
    # 198 = 9 cycles of 21 (27 batches) + 9, short of the next batch of 12
    assert len(MultigridBatchSampler(inner, plugin._shapes(14), num_samples=198)) == 27


def test_ranks_get_the_same_shapes_and_number_of_batches():
    """Two ranks of a padded shard (the host's base sampler): the same len(), shapes in the same
    order, disjoint samples."""
    data = IndexedImages(n=50)
    plugin = MultigridPlugin(2, [1])
    plugin.schedule = plugin._make_schedule((16, 16))
    plugin._batch_size = 4
    per_rank = []
    for rank in (0, 1):
        shard = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        shard.set_epoch(1)
        inner = BatchSampler(shard, 4, drop_last=False)  # 25 samples per rank (one padded)
        sampler = MultigridBatchSampler(inner, plugin._shapes(1), num_samples=25)
        per_rank.append((len(sampler), list(sampler)))
    (len0, plans0), (len1, plans1) = per_rank
    assert len0 == len1 == len(plans0) == len(plans1) == 2  # [16, 8, 4] from 25: 16 + 8, 1 left
    assert [(len(p), p.meta) for p in plans0] == [(len(p), p.meta) for p in plans1]
    assert not {i for p in plans0 for i in p} & {i for p in plans1 for i in p}


def test_the_worker_resizes_to_the_plan(tmp_path: Path):
    """With a DataLoader worker process the collate stage still reads each batch's shape."""
    plugin = MultigridPlugin(2, [1])
    loader = host_loader(plugin, DataLoader(IndexedClips(n=40), batch_size=2, num_workers=1), max_epochs=3)
    shapes = [tuple(b[0].shape) for b in loader]
    # clips 8 x 16 x 16, b = 2: epoch 0 is (2, 11, 11) with β = 8: batches 32 at 2x8x8, 16 at 2x11x11
    assert shapes == [(32, 1, 2, 8, 8)]  # 40 samples: 32, then 8 < 16


# ------------------------------------------------------------------ the long cycle in a real run


def fit(tmp_path: Path, plugin: MultigridPlugin, module: Any = None, loader: DataLoader | None = None, **trainer_kwargs: Any):
    module = module if module is not None else TinyShapeModule(milestones=[2])
    callback = BatchKitCallback([plugin])
    trainer = make_trainer(tmp_path, [callback], **{"max_epochs": 3, **trainer_kwargs})
    trainer.fit(module, loader if loader is not None else image_loader())
    return module, trainer, callback


def test_a_run_follows_the_schedule_with_rebuilds_step_count_and_lr(tmp_path: Path):
    """96 images, b = 4: epoch 0 at 11 x 11 (cycle 16, 8, 8: 9 batches), epochs 1-2 at the base
    (cycle 16, 8, 4: 3 cycles of 28 = 9 batches, 12 left over). LR 0.05 · γ^(epoch >= 2) · β with
    β = 2, 1, 1: the module's MultiStepLR(milestones=[2]) keeps its own values."""
    plugin = MultigridPlugin(2, [1])
    module, trainer, callback = fit(tmp_path, plugin)
    sizes = [(s[0], tuple(s[2:])) for s in module.shapes]
    epoch0 = [(16, (8, 8)), (8, (11, 11)), (8, (11, 11))] * 3
    later = [(16, (8, 8)), (8, (11, 11)), (4, (16, 16))] * 3
    assert sizes == epoch0 + later + later
    assert trainer.global_step == 27 == callback.host.ctx.total_steps and callback.host.ctx.progress == 1.0
    assert trainer.num_training_batches == 9
    assert module.lr_in_step == pytest.approx([0.1] * 9 + [0.05] * 9 + [0.005] * 9)
    # between steps the scheduler's own values (Lightning steps it after the last batch of epoch 1, before this hook)
    assert module.lr_between_steps == pytest.approx([0.05] * 17 + [0.005] * 10)
    assert plugin.batches_by_size == {(8, 8): 9, (11, 11): 12, (16, 16): 6}
    assert trainer.reload_dataloaders_every_n_epochs == 0  # the host put the Trainer's setting back


class LoaderLengths(Plugin):
    """Records, at every epoch start, what Lightning and the host say about the epoch."""

    name = "lengths"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int | None]] = []

    @hookimpl
    def batchkit_epoch_start(self, ctx: Any) -> None:
        self.seen.append((ctx.epoch, int(ctx.trainer.num_training_batches), ctx.total_steps))


def test_lightning_sees_each_stage_length_and_validates_on_its_cadence(tmp_path: Path):
    """Clips 8 x 16 x 16, b = 2, 48 samples: epochs of 2, 4 and 9 batches (three long-cycle
    stages, two rebuilds), under gradient accumulation 2: ceil(2/2) + ceil(4/2) + ceil(9/2) = 8
    optimizer steps. Validation every half epoch follows each epoch's own length."""

    class WithValidation(TinyShapeModule):
        def __init__(self) -> None:
            super().__init__(clips=True)
            self.validated_at: list[tuple[int, int]] = []

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                self.validated_at.append((self.current_epoch, self.trainer.fit_loop.epoch_loop.batch_progress.current.completed))

    lengths = LoaderLengths()
    plugin = MultigridPlugin(2, [1])
    module = WithValidation()
    callback = BatchKitCallback([plugin, lengths])
    trainer = make_trainer(tmp_path, [callback], max_epochs=3, accumulate_grad_batches=2, val_check_interval=0.5,
                           num_sanity_val_steps=0)
    data = IndexedClips(n=48)
    trainer.fit(module, DataLoader(data, batch_size=2, shuffle=True), DataLoader(data, batch_size=16))
    assert [len(s) for s in module.shapes] == [5] * 15
    assert [s[0] for s in module.shapes] == [32, 16] + [16, 8, 4, 16] + [8, 4, 2] * 3
    assert [tuple(s[2:]) for s in module.shapes[:6]] == [(2, 8, 8), (2, 11, 11), (4, 8, 8), (4, 11, 11), (4, 16, 16), (4, 8, 8)]
    assert lengths.seen == [(0, 2, 8), (1, 4, 8), (2, 9, 8)]
    assert trainer.global_step == 8
    # every int(0.5 * length) batches of each epoch's own length: 1, 2 and 4 (without the rebuild, 1 throughout)
    assert module.validated_at == [(0, 1), (0, 2), (1, 2), (1, 4), (2, 4), (2, 8)]


def test_the_short_cycle_alone_keeps_the_lr(tmp_path: Path):
    """long_cycle: false: the base shape throughout, short cycle per iteration, no LR scale; the
    schedule runs 1.5x the epochs with the milestone scaled (SlowFast's short-cycle-only mode)."""
    plugin = MultigridPlugin(2, [1], long_cycle=False)
    module, trainer, _ = fit(tmp_path, plugin, module=TinyShapeModule(milestones=[1]))
    assert [tuple(s[2:]) for s in module.shapes[:3]] == [(8, 8), (11, 11), (16, 16)]
    assert module.lr_in_step == pytest.approx([0.05] * 9 + [0.005] * 18)


# ------------------------------------------------------------------ errors


def test_a_model_without_adaptive_pooling_is_refused_before_the_first_step(tmp_path: Path):
    module = FixedSizeModule(milestones=[2])
    with pytest.raises(PluginError) as info:
        fit(tmp_path, MultigridPlugin(2, [1]), module=module)
    message = str(info.value)
    for words in ("multigrid (entry 'multigrid')", "cannot take images of size (11, 11)", "nn.AdaptiveAvgPool2d(1)",
                  "long_cycle_factors", "check_shapes: false"):
        assert words in message, message
    assert module.seen == []  # nothing was trained


def test_a_model_that_takes_every_shape_passes_the_check_and_the_check_leaves_it_untouched(tmp_path: Path):
    torch.manual_seed(0)
    a = TinyShapeModule(milestones=[2])
    b = TinyShapeModule(milestones=[2])
    b.load_state_dict(a.state_dict())
    fit(tmp_path / "a", MultigridPlugin(2, [1], check_shapes=True), module=a)
    fit(tmp_path / "b", MultigridPlugin(2, [1], check_shapes=False), module=b)
    assert a.seen == b.seen
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name  # the probe changed no weight, BatchNorm statistic or random draw


def test_a_temporal_factor_that_does_not_divide_the_clip(tmp_path: Path):
    """T = 8 clips with a temporal factor 1/3: only the dataset tells, so it is refused when the
    loader is first built (before any batch)."""
    plugin = MultigridPlugin(2, [1], long_cycle_factors=[(1 / 3, 1), (1, 1)])
    with pytest.raises(PluginError, match=r"multigrid \(entry 'multigrid'\): the temporal factor 0.333333 of "
                                          r"long_cycle_factors\[0\].*does not divide the clip's T = 8.*1/2, 1/4, 1/8"):
        fit(tmp_path, plugin, module=TinyShapeModule(clips=True), loader=DataLoader(IndexedClips(n=48), batch_size=2))


def test_a_dataset_without_a_clip_or_image_shape(tmp_path: Path):
    with pytest.raises(PluginError, match=r"multigrid \(entry 'multigrid'\): the dataset's samples have no clip or image "
                                          r"shape.*\(8,\).*base_size"):
        fit(tmp_path, MultigridPlugin(2, [1]), loader=DataLoader(IndexedDataset(n=48), batch_size=4))


@pytest.mark.parametrize("options, words", [
    ({"long_cycle_factors": [[1, 1.5], [1, 1]]}, ["long_cycle_factors[0]", "batch factor", "is 0", "<= 1"]),
    ({"long_cycle_factors": [[1, 0.4], [1, 1]]}, ["short_cycle_factors[1]", "is 0", "no larger"]),
    ({"baseline_lr_milestones": []}, ["lr_milestones is empty"]),
    ({"baseline_lr_milestones": [2]}, ["lr_milestones must increase strictly inside (0, max_epochs = 2)"]),
    ({"long_cycle_factors": [[0.5, 1]]}, ["must end with [1, 1]"]),
    ({"epoch_factor": 0}, ["epoch_factor must be a number > 0"]),
    ({"long_cycle_factors": [[0.3, 1], [1, 1]]}, ["temporal factor 0.3 of long_cycle_factors[0] is not 1/k"]),
])
def test_bad_options_are_refused_when_the_config_is_read(options, words):
    """A factor giving a batch of 0 and the like fail before any data is read, naming the option."""
    entry = {"mg": {"plugin": "multigrid", "baseline_epochs": 2, "baseline_lr_milestones": [1], **options}}
    with pytest.raises(ConfigError) as info:
        build_plugins(entry)
    message = str(info.value)
    assert message.startswith("batchkit: entry 'mg' (plugin 'multigrid'): multigrid: "), message
    for word in words:
        assert word in message, message


def test_a_batch_larger_than_the_epoch_is_refused(tmp_path: Path):
    with pytest.raises(PluginError, match=r"first batch at epoch 0 holds 16 samples.*only 12 samples per epoch.*lower the "
                                          r"DataLoader's batch_size"):
        fit(tmp_path, MultigridPlugin(2, [1]), loader=image_loader(n=12))


def test_the_trainer_must_run_the_schedules_epochs(tmp_path: Path):
    with pytest.raises(PluginError, match=r"the schedule trains 3 epochs \(the baseline's 2 x epoch_factor 1.5.*max_epochs=2; "
                                          r"set Trainer\(max_epochs=3\).*at epochs \[2\].*allow_early_stop: true"):
        fit(tmp_path, MultigridPlugin(2, [1]), max_epochs=2)
    with pytest.raises(PluginError, match=r"max_epochs=4"):
        fit(tmp_path, MultigridPlugin(2, [1], allow_early_stop=True), max_epochs=4)
    module, trainer, callback = fit(tmp_path, MultigridPlugin(2, [1], allow_early_stop=True), max_epochs=2)
    assert trainer.global_step == 18 == callback.host.ctx.total_steps  # the first two epochs of the schedule


def test_the_modules_multistep_milestones_must_be_the_multigrid_lr_stages(tmp_path: Path):
    module = TinyShapeModule(milestones=[1])  # the baseline's milestone, in baseline epochs
    with pytest.raises(PluginError, match=r"MultiStepLR decays by 0.1 at epochs \[1\].*begin at epochs \[2\] of the 3 "
                                          r"multigrid epochs; build it with milestones=\[2\] and gamma=0.1"):
        fit(tmp_path, MultigridPlugin(2, [1]), module=module)
    assert module.seen == []


def test_plugins_that_cannot_run_with_multigrid_are_refused_before_training(tmp_path: Path):
    class SuperBatches(Plugin):
        name = "keeps_half"
        load_factor = 2.0

        @hookimpl
        def batchkit_transform_batch(self, batch: Any, ctx: Any) -> Any:
            return ctx.batch_spec.select(batch, torch.arange(ctx.super_batch.keep_size(self)))

    module = TinyShapeModule(milestones=[2])
    trainer = make_trainer(tmp_path, [BatchKitCallback([MultigridPlugin(2, [1]), SuperBatches()])], max_epochs=3)
    with pytest.raises(PluginError, match=r"plugin 'keeps_half' selects from super-batches \(load_factor=2.0\)"):
        trainer.fit(module, image_loader())
    entries = {"mg": {"plugin": "multigrid", "baseline_epochs": 2, "baseline_lr_milestones": [1]},
               "hard": {"plugin": "hard_batches"}}
    trainer = make_trainer(tmp_path, [BatchKitCallback(entries)], max_epochs=3)
    with pytest.raises(PluginConflictError, match=r"'mg' \(multigrid\) declares a conflict with 'hard'"):
        trainer.fit(module, image_loader())
    assert module.seen == []


def test_resuming_with_other_options_is_refused(tmp_path: Path):
    plugin = MultigridPlugin(2, [1])
    fit(tmp_path, plugin)
    state = plugin.batchkit_state_dict()
    assert state == {"epoch": 2, "loader_epoch": 3, "stage": 2, "lr_scale": 1.0,
                     "schedule": {"base_size": [16, 16], "max_epochs": 3, "lr_steps": [0, 1, 2, 2], "batch_size": 4}}
    other = MultigridPlugin(2, [1])
    other.batchkit_load_state_dict(state)
    other.loader_epoch = 0
    with pytest.raises(PluginError, match=r"the checkpoint was saved with the schedule .*'batch_size': 4.*'batch_size': 2"):
        fit(tmp_path / "other", other, loader=image_loader(batch_size=2))


def test_stream_length_of_the_host_base_and_of_any_sampler():
    from batchkit_multigrid.plugin import stream_length

    assert stream_length(BatchSampler(SequentialSampler(range(10)), 4, drop_last=True)) == 8
    assert stream_length(BatchSampler(SequentialSampler(range(10)), 4, drop_last=False)) == 10
    assert stream_length([[1, 2, 3], [4, 5]]) == 5


def test_the_entry_point_and_yaml_options():
    (plugin,) = build_plugins({"mg": {"plugin": "multigrid", "baseline_epochs": 10, "baseline_lr_milestones": [7, 9],
                                      "long_cycle_factors": [[0.5, 0.7071], [1, 1]], "base_size": [16, 64, 64]}})
    assert isinstance(plugin, MultigridPlugin) and plugin.instance_name == "mg"
    schedule = plugin._make_schedule(plugin.base_size)
    assert [s.shape.size for s in schedule.stages][:2] == [(8, 45, 45), (16, 64, 64)]
    with pytest.raises(ConfigError, match="missing required option 'baseline_epochs'"):
        build_plugins({"mg": {"plugin": "multigrid", "baseline_lr_milestones": [1]}})
