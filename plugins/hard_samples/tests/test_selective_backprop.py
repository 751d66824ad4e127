"""selective_backprop: the rank-based probabilities and the schedule on hand-computed cases, the
draw, BatchNorm statistics, tuple/list/dict batches, the protocol check at setup, and real
Lightning runs (which batches are pruned, exact resume)."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hard_samples_support import LABEL_NOISE
from hard_samples_support import RecordingNet
from hard_samples_support import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl
from batchkit.batch import BatchSpec
from batchkit.host import BatchKitContext
from batchkit.lightning import BatchKitCallback
from batchkit_hard_samples import SelectiveBackprop
from batchkit_hard_samples import rank_probabilities
from batchkit_hard_samples import should_select
from batchkit.testing import FailAtStep
from batchkit.testing import IndexedDataset


# -- formulas -----------------------------------------------------------------------------------


def test_probabilities_for_keep_one_half_are_linear_in_rank() -> None:
    # pi = (rank + 1/2) / N = 1/8, 3/8, 5/8, 7/8; exponent 1/keep - 1 = 1 -> P = pi / sum(pi) = (2 rank + 1) / 16
    assert rank_probabilities(4, 0.5).tolist() == pytest.approx([1 / 16, 3 / 16, 5 / 16, 7 / 16])
    p = rank_probabilities(10, 0.5)
    steps = p[1:] - p[:-1]
    assert torch.allclose(steps, torch.full_like(steps, 2 / 100))  # equal steps: linear in rank


def test_probabilities_for_other_keep_values() -> None:
    # keep = 1/4: exponent 3 -> P = pi^3 / sum = (1, 27, 125, 343) / 496
    assert rank_probabilities(4, 0.25).tolist() == pytest.approx([1 / 496, 27 / 496, 125 / 496, 343 / 496])
    # keep = 2/3: exponent 1/2 -> P = sqrt(pi) / sum(sqrt(pi))
    pi = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert rank_probabilities(2, 2 / 3).tolist() == pytest.approx((pi.sqrt() / pi.sqrt().sum()).tolist())


def test_schedule_follows_start_end_and_interrupt() -> None:
    # start 0.5, end 0.9, interrupt 2: inside [0.5, 0.9) and on batches 0, 2, 4, ... (every 2nd is skipped)
    assert [should_select(0.6, i, 0.5, 0.9, 2) for i in range(4)] == [True, False, True, False]
    assert not should_select(0.49, 0, 0.5, 0.9, 2)
    assert should_select(0.5, 0, 0.5, 0.9, 2)
    assert not should_select(0.9, 0, 0.5, 0.9, 2)  # end is exclusive
    assert [should_select(0.6, i, 0.5, 0.9, 3) for i in range(6)] == [True, True, False, True, True, False]
    assert all(should_select(0.6, i, 0.5, 0.9, 0) for i in range(5))  # interrupt 0: every batch


def test_the_draw_follows_the_rank_probabilities() -> None:
    plugin = SelectiveBackprop(keep=0.5)
    losses = torch.tensor([3.0, 1.0])  # sample 1 has rank 0 (P = 1/4), sample 0 rank 1 (P = 3/4)
    picks = [int(plugin.choose(losses, step=s)[0]) for s in range(4000)]  # N = 2 keeps n = 1
    assert picks.count(0) / 4000 == pytest.approx(0.75, abs=0.03)
    # N = 8, keep 1/2: 4 distinct samples, sorted; the same (seed, rank, step, batch) draws the same
    losses = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.5, 0.4])
    chosen = plugin.choose(losses, rank=0, step=5, batch_idx=3)
    assert chosen.tolist() == sorted(set(chosen.tolist())) and len(chosen) == 4
    assert torch.equal(chosen, plugin.choose(losses, rank=0, step=5, batch_idx=3))
    draws = {tuple(plugin.choose(losses, step=s).tolist()) for s in range(50)}
    assert len(draws) > 5  # ... and other steps draw otherwise


def test_top_k_keeps_the_highest_losses() -> None:
    plugin = SelectiveBackprop(keep=0.5, method="top_k")
    losses = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.5, 0.4])
    assert plugin.choose(losses).tolist() == [1, 3, 5, 6]
    assert SelectiveBackprop(keep=0.3, method="top_k").choose(losses).tolist() == [1, 3]  # floor(0.3 * 8) = 2


def test_bad_options_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"selective_backprop: keep must be in \(0, 1\)"):
        SelectiveBackprop(keep=1.0)
    with pytest.raises(ValueError, match="need 0 <= start < end <= 1"):
        SelectiveBackprop(start=0.9, end=0.5)
    with pytest.raises(ValueError, match="interrupt must be >= 0"):
        SelectiveBackprop(interrupt=-1)


# -- the batch stage on one batch ---------------------------------------------------------------


class ScoredNet(nn.Module):
    """Per-sample loss = a fixed score per sample; BatchNorm and dropout in the scoring path."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 1))
        self.head[0].eval()  # a submodule the user keeps in eval mode

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x = batch["x"] if isinstance(batch, dict) else batch[0]
        self.head(self.bn(x))  # moves the running statistics in train mode
        return x[:, 0]  # the score: the first feature


def ctx_at(progress: float = 0.6, batch_idx: int = 0, spec: BatchSpec | None = None) -> BatchKitContext:
    ctx = BatchKitContext(total_steps=100, batch_spec=spec or BatchSpec())
    ctx.global_step = int(progress * 100)
    ctx.batch_idx = batch_idx
    return ctx


def scored_batch(n: int = 6) -> torch.Tensor:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    x[:, 0] = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7][:n])
    return x


@pytest.mark.parametrize("scoring", ["eval", "train"])
def test_scoring_leaves_batchnorm_statistics_and_training_flags_untouched(scoring: str) -> None:
    model = ScoredNet().train()
    model.head[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plugin = SelectiveBackprop(keep=0.5, method="top_k", scoring=scoring, start=0.0, end=1.0, interrupt=0)
    x, y = scored_batch(), torch.arange(6)
    out = plugin.batchkit_transform_batch([x, y], model, ctx_at())
    assert out[1].tolist() == [1, 3, 5]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running_mean, running_var, num_batches_tracked
    assert model.training and model.bn.training and not model.head[0].training
    # control: the same forward outside the plugin does move the statistics
    model.per_sample_loss([x, y])
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])


def test_tuple_list_dict_and_named_tuple_batches() -> None:
    model = ScoredNet()
    plugin = SelectiveBackprop(keep=0.5, method="top_k", start=0.0, end=1.0, interrupt=0)
    x, y = scored_batch(), torch.arange(6)
    names = ["a", "b", "c", "d", "e", "f"]
    weight = torch.tensor([1.0, 2.0])  # not per sample: declared shared, passed through

    out = plugin.batchkit_transform_batch((x, y), model, ctx_at())
    assert isinstance(out, tuple) and out[1].tolist() == [1, 3, 5] and torch.equal(out[0], x[[1, 3, 5]])
    with pytest.raises(PluginError, match="different lengths .*'3': 2"):  # the host does not guess
        plugin.batchkit_transform_batch([x, y, names, weight], model, ctx_at())
    out = plugin.batchkit_transform_batch([x, y, names, weight], model, ctx_at(spec=BatchSpec(shared=["3"])))
    assert isinstance(out, list) and out[2] == ["b", "d", "f"] and torch.equal(out[3], weight)
    out = plugin.batchkit_transform_batch({"x": x, "labels": y, "meta": {"id": y * 10}}, model, ctx_at())
    assert isinstance(out, dict) and out["labels"].tolist() == [1, 3, 5] and out["meta"]["id"].tolist() == [10, 30, 50]
    Batch = namedtuple("Batch", "x y")
    out = plugin.batchkit_transform_batch(Batch(x, y), model, ctx_at())
    assert isinstance(out, Batch) and out.y.tolist() == [1, 3, 5]


def test_outside_the_schedule_the_batch_is_untouched() -> None:
    plugin = SelectiveBackprop(keep=0.5)  # start 0.5, end 0.9, interrupt 2
    batch = [scored_batch(), torch.arange(6)]
    assert plugin.batchkit_transform_batch(batch, ScoredNet(), ctx_at(progress=0.3)) is None
    assert plugin.batchkit_transform_batch(batch, ScoredNet(), ctx_at(progress=0.6, batch_idx=1)) is None
    assert plugin.batchkit_transform_batch(batch, ScoredNet(), ctx_at(progress=0.6, batch_idx=2)) is not None


def test_a_wrong_per_sample_loss_shape_is_explained() -> None:
    class MeanLoss(ScoredNet):
        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            return batch[0].mean()

    plugin = SelectiveBackprop(start=0.0, end=1.0, interrupt=0)
    with pytest.raises(PluginError, match=r"per_sample_loss\(batch\) returned a tensor of shape \(\), .* shape \[6\]"):
        plugin.batchkit_transform_batch([scored_batch(), torch.arange(6)], MeanLoss(), ctx_at())


# -- real Lightning runs ------------------------------------------------------------------------


def fit(tmp_path: Path, plugins: list, module: pl.LightningModule | None = None, **kwargs: Any) -> tuple[Any, pl.Trainer]:
    pl.seed_everything(0)
    module = module or RecordingNet()
    fit_kwargs = kwargs.pop("fit_kwargs", {})
    trainer = make_trainer(tmp_path, [BatchKitCallback(plugins), *kwargs.pop("callbacks", [])], **kwargs)
    trainer.fit(module, DataLoader(IndexedDataset(n=64, noise=LABEL_NOISE), batch_size=8, shuffle=True), **fit_kwargs)  # 8 batches/epoch
    return module, trainer


def test_a_module_without_the_protocol_fails_at_setup(tmp_path: Path) -> None:
    class NoProtocol(RecordingNet):
        per_sample_loss = None

    module = NoProtocol()
    with pytest.raises(PluginError, match=r"(?s)selective_backprop: the module NoProtocol has no per_sample_loss\(batch\) method.*loss_method"):
        fit(tmp_path, [SelectiveBackprop()], module=module)
    assert module.seen == []  # before the first batch, not at 50% of training
    with pytest.raises(PluginError, match="option loss_method='scores', but the module RecordingNet has no callable 'scores'"):
        fit(tmp_path, [SelectiveBackprop(loss_method="scores")])


def test_batches_in_the_window_are_pruned_to_the_kept_fraction(tmp_path: Path) -> None:
    module, trainer = fit(tmp_path, [SelectiveBackprop(keep=0.5)], max_epochs=4)  # 32 steps
    assert trainer.global_step == 32
    sizes = [len(s) for s in module.seen]
    # t = step / 32 in [0.5, 0.9) -> steps 16..28; interrupt 2 -> even batch index (= even step here)
    expected = [4 if 16 <= step < 29 and step % 2 == 0 else 8 for step in range(32)]
    assert sizes == expected
    # the kept samples belong to the batch that was drawn
    full, _ = fit(tmp_path / "full", [], max_epochs=4)
    assert all(set(s) <= set(f) for s, f in zip(module.seen, full.seen))


def test_top_k_keeps_the_samples_with_the_highest_scoring_losses(tmp_path: Path) -> None:
    class Spy(Plugin):
        """Runs before selective_backprop and scores the full batch the same way (eval mode)."""

        name = "spy"
        order = -1

        def __init__(self) -> None:
            self.expected: list[list[int]] = []

        @hookimpl
        def batchkit_transform_batch(self, batch: Any, module: Any) -> None:
            module.eval()
            with torch.no_grad():
                losses = module.per_sample_loss(batch)
            module.train()
            top = losses.topk(2).indices
            self.expected.append(sorted(int(batch[2][i]) for i in top))

    spy = Spy()
    module, _ = fit(tmp_path, [spy, SelectiveBackprop(keep=0.25, method="top_k", start=0.0, end=1.0, interrupt=0)], max_epochs=1)
    assert [sorted(s) for s in module.seen] == spy.expected and all(len(s) == 2 for s in module.seen)



def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    plugins = lambda: [SelectiveBackprop(keep=0.5, start=0.25, end=1.0, interrupt=3)]  # noqa: E731
    full_plugins, resumed_plugins = plugins(), plugins()
    full, _ = fit(tmp_path / "full", full_plugins, max_epochs=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=11, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "part", [*plugins(), FailAtStep(13)], max_epochs=3, callbacks=[ckpt], enable_checkpointing=True)
    (path,) = (tmp_path / "ckpt").glob("*step=11.ckpt")  # mid epoch 1, inside the selection window
    resumed, _ = fit(tmp_path / "resumed", resumed_plugins, max_epochs=3, fit_kwargs={"ckpt_path": path})
    assert full.seen[:11] + resumed.seen == full.seen
    assert any(len(s) == 4 for s in resumed.seen)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # the counters behind the metrics continue from the checkpoint: the whole run's counts, not the
    # resumed part's only
    (a,), (b,) = full_plugins, resumed_plugins
    counts = lambda p: (p.selected_batches, p.kept_samples, p.scored_samples)  # noqa: E731
    pruned_after_resume = sum(len(s) == 4 for s in resumed.seen)
    assert 0 < pruned_after_resume < a.selected_batches
    assert counts(b) == counts(a) == (a.selected_batches, 4 * a.selected_batches, 8 * a.selected_batches)
