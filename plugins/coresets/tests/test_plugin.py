"""The colm plugin in one process: options and bad input, the selection of a real Lightning run
against select_coreset on its own large batches, the model left as found, and a short run on the
real text mixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from colm_support import RecordingCoLM
from colm_support import replay_global
from torch.utils.data import DataLoader

from batchkit import PluginError
from batchkit.config import build_plugins
from batchkit.errors import ConfigError
from batchkit.host import PluginHost
from batchkit.host import SuperBatchPlan
from batchkit.lightning import BatchKitCallback
from batchkit.testing import IndexedDataset
from batchkit.testing import TinyModule
from batchkit.testing import make_trainer
from batchkit_coresets import CoLM
from batchkit_coresets import proportional_budget
from batchkit_coresets.plugin import read_field
from batchkit_coresets.testing import SMALL_SOURCE
from batchkit_coresets.testing import SourceDataset
from batchkit_coresets.testing import SourceModule
from batchkit_coresets.testing import source_loader


# -- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"large_batch_factor": 0.5}, r"large_batch_factor=0.5 makes the large batch B smaller than the batch b.*"
                                  r"large_batch_factor: 2"),
    ({"large_batch_factor": 1}, r"B = b, so there is nothing to select"),
    ({"estimator": "first_order"}, r"estimator must be 'zeroth_order' or 'exact'"),
    ({"scope": "world"}, r"scope must be 'global' or 'rank'"),
    ({"eps": 0.0}, r"eps must be > 0"),
    ({"dims": 0}, r"dims must be a positive number"),
    ({"adam_betas": (0.9, 1.0)}, r"betas must lie in \[0, 1\).*adam_betas: \[0.9, 0.999\]"),
    ({"source_field": ""}, r"source_field must be a field path"),
])
def test_bad_options_are_refused_naming_the_option_and_the_fix(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoLM(**options)


def test_yaml_entry_builds_colm() -> None:
    (plugin,) = build_plugins({"coreset": {"plugin": "colm", "large_batch_factor": 4, "small_sources": [5, 6],
                                           "param": "net.0.weight", "source_field": "meta.source",
                                           "adam_betas": [0.8, 0.99]}})
    assert isinstance(plugin, CoLM) and plugin.instance_name == "coreset"
    assert plugin.load_factor == 4.0  # the host loads B = 4b
    assert plugin.small_sources == (5, 6) and plugin.source_field == "meta.source"
    assert (plugin.normalizer.beta1, plugin.normalizer.beta2) == (0.8, 0.99)
    with pytest.raises(ConfigError, match="B < b"):
        build_plugins({"coreset": {"plugin": "colm", "large_batch_factor": 0.5}})


def test_read_field_follows_paths() -> None:
    batch = {"x": torch.zeros(2), "meta": {"source": torch.tensor([1, 2])}, "pair": [torch.ones(2), [3, 4]]}
    assert read_field(batch, "meta.source").tolist() == [1, 2]
    assert read_field(batch, "pair.1") == [3, 4]
    for missing in ("source", "meta.id", "pair.2", "x.0"):
        with pytest.raises(KeyError):
            read_field(batch, missing)


# -- bad input: before or at the first step ---------------------------------------------------------

def test_an_unknown_parameter_fails_at_setup_naming_param(tmp_path: Path) -> None:
    module = SourceModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback([CoLM(param="net.9.weight")])], max_epochs=1)
    with pytest.raises(PluginError, match=r"option `param`='net.9.weight' matches no parameter of SourceModule.*"
                                          r"did you mean net.3.weight.*e.g. a Linear weight: net.0.weight"):
        trainer.fit(module, source_loader())
    assert module.seen == []  # before any step


def test_a_model_without_a_default_parameter_fails_at_setup(tmp_path: Path) -> None:
    class OneLinear(SourceModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 3))

    with pytest.raises(PluginError, match="option `param` is not set and its default .* needs at least two nn.Linear"):
        make_trainer(tmp_path, [BatchKitCallback([CoLM()])], max_epochs=1).fit(OneLinear(), source_loader())


def test_a_batch_without_source_ids_fails_at_the_first_step_naming_source_field(tmp_path: Path) -> None:
    module = TinyModule()  # (x, y, index) batches: no source
    trainer = make_trainer(tmp_path, [BatchKitCallback([CoLM()])], max_epochs=1)
    with pytest.raises(PluginError, match=r"the batch has no field 'source' \(option `source_field`\).*"
                                          r"fields of this batch: 0, 1, 2"):
        trainer.fit(module, DataLoader(IndexedDataset(n=32), batch_size=4))
    assert module.seen == []


def test_source_ids_from_a_callable_and_bad_ids_refused() -> None:
    batch = {"x": torch.randn(4, 8), "y": torch.zeros(4, dtype=torch.long), "index": torch.arange(4),
             "meta": ["a", "b", "a", "c"]}
    by_name = CoLM(source_field=lambda b: [{"a": 0, "b": 1, "c": 2}[m] for m in b["meta"]])
    assert by_name.source_ids(batch, 4).tolist() == [0, 1, 0, 2]
    with pytest.raises(PluginError, match=r"field 'x' \(option `source_field`\) must give one integer source id per "
                                          r"example \(\[4\] integers\), got a torch.float32 tensor of shape \(4, 8\)"):
        CoLM(source_field="x").source_ids(batch, 4)
    with pytest.raises(PluginError, match="must give one integer source id per example"):
        CoLM(source_field="meta").source_ids(batch, 4)


def test_a_partitioned_parameter_is_refused() -> None:
    plugin, module = CoLM(), SourceModule()
    plugin._resolve(module)
    module.net[0].weight.ds_id = 7  # what DeepSpeed ZeRO-3 attaches to the parameters it partitions
    with pytest.raises(PluginError, match="ZeRO stage 3.*Use ZeRO stage 1 or 2"):
        plugin._theta(module)


# -- the selection in a real run ----------------------------------------------------------------------

def test_a_run_trains_the_coreset_of_every_large_batch(tmp_path: Path) -> None:
    plugin = RecordingCoLM(small_sources=[SMALL_SOURCE], dims=32, seed=5)
    module = SourceModule()
    callback = BatchKitCallback([plugin])
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(module, source_loader(n=192, batch_size=8))
    # Lightning's accounting: an epoch is one pass over the data as loaded, in large batches of 16
    assert trainer.num_training_batches == 12 and trainer.global_step == 24
    progress = callback.host.ctx.train_progress
    assert progress.samples_loaded == 2 * progress.samples_trained == 2 * 24 * 8
    records = plugin.records
    replayed, normalizer = replay_global([records], 8, tuple(module.net[0].weight.shape), seed=5,
                                         small_sources=(SMALL_SOURCE,), dims=32)
    sources = SourceDataset(n=192).source
    for record, chosen, seen in zip(records, replayed, module.seen):
        assert record["chosen"] == chosen  # select_coreset on this step's estimates and the tracked moments
        assert seen == record["trained_ids"] == [record["super_ids"][i] for i in chosen]
        large = sources[record["super_ids"]]
        is_small = large == SMALL_SOURCE
        assert is_small[chosen].sum() == is_small.sum()  # every small-source example kept
        ids, counts = large[~is_small].unique(return_counts=True)
        assert [int((large[chosen] == s).sum()) for s in ids] == proportional_budget(counts.tolist(), 8 - int(is_small.sum()))
    state = callback.host.state_dict()["colm"]
    assert state["param"] == "net.0.weight" and state["normalizer"]["t"] == normalizer.t == 24
    assert torch.equal(state["normalizer"]["m_prev"], normalizer.m_prev)


def test_the_selection_leaves_the_model_as_it_found_it() -> None:
    torch.manual_seed(0)
    module = SourceModule()
    module.train()
    module.net[1].eval()  # a submodule in its own mode stays so
    plugin = CoLM(small_sources=[SMALL_SOURCE])
    host = PluginHost([plugin])
    host.ctx.super_batch = SuperBatchPlan.build(4, [("colm", 2.0)])
    batch = next(iter(source_loader(batch_size=8)))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    selected = host.chain("batchkit_transform_batch", batch, module=module, ctx=host.ctx)
    assert len(selected["index"]) == 4 and set(selected["index"].tolist()) <= set(batch["index"].tolist())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key  # θ restored bit for bit, BatchNorm statistics untouched
    assert module.training and module.net[0].training and not module.net[1].training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in module.parameters())


def test_without_normalisation_and_state_mismatches_refused() -> None:
    module = SourceModule()
    batch = next(iter(source_loader(batch_size=8)))
    raw = CoLM(normalize=False, small_sources=[SMALL_SOURCE], dims=None)
    host = PluginHost([raw])
    host.ctx.super_batch = SuperBatchPlan.build(4, [("colm", 2.0)])
    assert len(host.chain("batchkit_transform_batch", batch, module=module, ctx=host.ctx)["index"]) == 4
    state = raw.batchkit_state_dict()
    assert state["normalizer"] is None and state["param"] == "net.0.weight"
    with pytest.raises(PluginError, match="saved with normalize=False; set the same to resume"):
        CoLM().batchkit_load_state_dict(state)
    other = CoLM(param="net.3.weight")
    other._resolve(module)
    with pytest.raises(PluginError, match="moments belong to parameter 'net.0.weight'.*set param: net.0.weight"):
        other.batchkit_load_state_dict(CoLM().batchkit_state_dict() | {"param": "net.0.weight"})


def test_exact_estimator_in_a_run(tmp_path: Path) -> None:
    plugin = RecordingCoLM(estimator="exact", small_sources=[SMALL_SOURCE], dims=None)
    module = SourceModule()
    make_trainer(tmp_path, [BatchKitCallback([plugin])], max_epochs=1).fit(module, source_loader(n=64, batch_size=8))
    replayed, _ = replay_global([plugin.records], 8, None, small_sources=(SMALL_SOURCE,), dims=None)
    assert [r["chosen"] for r in plugin.records] == replayed and len(replayed) == 4
    assert len(plugin.records[0]["features"][0]) == module.net[0].weight.numel()  # g_i = ∇_θ L_i, flattened


def test_a_loader_built_before_batchkit_wrapped_it_is_a_clear_error(tmp_path: Path) -> None:
    class EarlyLoader(SourceModule):
        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            self.trainer.estimated_stepping_batches  # noqa: B018  (Lightning loads the train loader here)
            return super().configure_optimizers()

    trainer = make_trainer(tmp_path, [BatchKitCallback([CoLM()])], max_epochs=1)
    with pytest.raises(PluginError, match=r"not loaded as a large batch.*Trainer\(max_epochs=-1, max_steps=N\)"):
        trainer.fit(EarlyLoader(), source_loader())


# -- the real text mixture ------------------------------------------------------------------------------

def test_a_short_run_on_the_real_mixture_keeps_the_small_sources(tmp_path: Path) -> None:
    """On the skewed standard-library mixture, every small-source window of each large batch is
    trained, so the small sources' share of what is trained is about B / b times their share of the
    data, and the LM learns."""
    tm = pytest.importorskip("batchkit_examples.text_mixture")
    torch.manual_seed(0)
    train, _ = tm.mixture_datasets(seq_len=32, max_val_windows=1)
    small = [tm.DEFAULT_SOURCES.index(s) for s in tm.SMALL_SOURCES]
    plugin = RecordingCoLM(small_sources=small, dims=256)
    model = tm.DenseLanguageModel(dim=16, layers=2, heads=2, hidden=32, seq_len=32, warmup_steps=5)
    # max_epochs=-1: the model's configure_optimizers reads trainer.estimated_stepping_batches, which with
    # max_epochs set makes Lightning build the train loader before batchkit wraps it (see the README)
    trainer = make_trainer(tmp_path, [BatchKitCallback([plugin])], max_epochs=-1, max_steps=40, limit_val_batches=0)
    trainer.fit(model, DataLoader(train, batch_size=8, shuffle=True))
    assert plugin._param_name == "blocks.1.moe.fc_out.weight"
    loaded = trained = 0
    for record in plugin.records:
        sources = torch.tensor(record["sources"])
        is_small = torch.isin(sources, torch.tensor(small))
        assert set(is_small.nonzero().flatten().tolist()) <= set(record["chosen"])
        loaded += int(is_small.sum())
        trained += int(is_small[record["chosen"]].sum())
    assert trained == loaded > 0 and len(plugin.records) == 40
    assert trainer.logged_metrics["train_loss"] < 5.0  # from ln 256 = 5.55 at initialisation
