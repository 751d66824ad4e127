"""The skewed standard-library text mixture and the dense LM on it."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from batchkit_examples import text_mixture as tm

os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def data() -> tuple:
    return tm.mixture_datasets(seq_len=64, max_val_windows=64)


def test_sources_are_skewed_and_split(data: tuple) -> None:
    train, val = data
    counts = tm.source_counts(train)
    assert len(counts) == len(tm.DEFAULT_SOURCES) and set(val) == set(tm.DEFAULT_SOURCES)
    assert max(counts) / min(counts) > 20  # naturally skewed: a few large, several small
    by_name = dict(zip(tm.DEFAULT_SOURCES, counts))
    total = sum(counts)
    assert all(by_name[s] / total < 0.04 for s in tm.SMALL_SOURCES)
    assert all(by_name[s] / total > 0.08 for s in tm.DEFAULT_SOURCES if s not in tm.SMALL_SOURCES)
    assert all(len(v) > 0 for v in val.values())


def test_validation_text_is_held_out(data: tuple) -> None:
    """Validation windows are other positions of the text than the training windows (the split
    rule, below); identical windows in both are only the standard library repeating itself
    (asyncio has the same method in two files), well under 1%."""
    train, val = data
    repeated = held_out = 0
    for index, source in enumerate(tm.DEFAULT_SOURCES):
        seen = {bytes(w.tolist()) for w in train.datasets[index].windows}
        held = [bytes(w.tolist()) for w in val[source].windows]
        repeated += sum(w in seen for w in held)
        held_out += len(held)
    assert repeated <= 0.01 * held_out


def test_split_rule() -> None:
    docs = [("a.py", bytes(range(40))), ("b.py", bytes(range(100, 130)))]  # 8 + 6 windows of 5 bytes
    train, val = tm.split_windows("x", docs, seq_len=4, val_block=2, val_every=3)
    # blocks of 2 windows, block j held out when j % 3 == 2: windows 4, 5, 10, 11
    assert len(train) == 10 and len(val) == 4
    assert val[0].tolist() == list(range(20, 25)) and val[2].tolist() == list(range(110, 115))
    with pytest.raises(ValueError, match="too few to split"):
        tm.split_windows("x", docs[:1], seq_len=4, val_block=8, val_every=3)


def test_batches_carry_the_source(data: tuple) -> None:
    train, _ = data
    batch = next(iter(DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert set(batch) == {tm.TOKENS_KEY, tm.SOURCE_KEY}
    assert batch[tm.TOKENS_KEY].shape == (16, 65) and batch[tm.TOKENS_KEY].dtype == torch.int64
    assert batch[tm.SOURCE_KEY].shape == (16,) and batch[tm.SOURCE_KEY].dtype == torch.int64
    offsets = torch.tensor([0] + tm.source_counts(train)).cumsum(0)
    assert 0 <= batch[tm.SOURCE_KEY].min() and batch[tm.SOURCE_KEY].max() < len(tm.DEFAULT_SOURCES)
    assert offsets[-1] == len(train)


def test_unknown_source() -> None:
    with pytest.raises(ValueError, match="unknown source 'nosuchpackage'"):
        tm.mixture_datasets(sources=("json", "nosuchpackage"))


def test_per_sample_loss_and_training_step() -> None:
    torch.manual_seed(0)
    model = tm.DenseLanguageModel(dim=16, layers=1, heads=2, hidden=32, seq_len=16)
    batch = {"tokens": torch.randint(0, 256, (5, 17)), "source": torch.tensor([0, 1, 1, 2, 0])}
    losses = model.per_sample_loss(batch)
    assert losses.shape == (5,)
    one = model.per_sample_loss({"tokens": batch["tokens"][2:3], "source": batch["source"][2:3]})
    torch.testing.assert_close(losses[2:3], one)
    torch.testing.assert_close(model.training_step(batch, 0), losses.mean())


def test_training_lowers_every_source_and_logs_mean_and_worst(tmp_path) -> None:
    pl.seed_everything(0)
    data = tm.TextMixtureDataModule(seq_len=32, batch_size=16, val_batch_size=128, max_val_windows=32)
    model = tm.DenseLanguageModel(dim=32, layers=1, heads=2, hidden=64, seq_len=32, lr=1e-2, warmup_steps=5)
    trainer = pl.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    before = trainer.validate(model, data, verbose=False)[0]
    trainer.fit(model, data)
    after = trainer.validate(model, data, verbose=False)[0]
    names = [f"val_loss/{s}" for s in tm.DEFAULT_SOURCES]
    for metrics in (before, after):
        per_source = torch.tensor([metrics[n] for n in names])
        assert metrics["val_loss/mean"] == pytest.approx(per_source.mean().item(), rel=1e-5)
        assert metrics["val_loss/worst"] == pytest.approx(per_source.max().item(), rel=1e-5)
    assert before["val_loss/worst"] > 5.0  # ~ln 256 untrained
    for n in names:  # 60 steps of byte statistics help every source
        assert after[n] < before[n] - 1.0, n
