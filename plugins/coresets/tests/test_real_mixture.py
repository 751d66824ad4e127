"""The whole selection on the real text mixture: estimates from the example LM on a large batch of
the skewed standard-library mixture, then the coreset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from batchkit_coresets import AdamNormalizer
from batchkit_coresets import RandomDirection
from batchkit_coresets import exact
from batchkit_coresets import proportional_budget
from batchkit_coresets import resolve_parameter
from batchkit_coresets import select_coreset
from batchkit_coresets import zeroth_order

tm = pytest.importorskip("batchkit_examples.text_mixture")


def test_coreset_of_a_real_large_batch() -> None:
    torch.manual_seed(0)
    train, _ = tm.mixture_datasets(seq_len=32, max_val_windows=1)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(3))
    model = tm.DenseLanguageModel(dim=32, layers=2, heads=2, hidden=64, seq_len=32)
    small = [tm.DEFAULT_SOURCES.index(s) for s in tm.SMALL_SOURCES]
    name = resolve_parameter(model)
    assert name == "blocks.1.moe.fc_out.weight"  # 32 x 64 = 2048 coordinates
    loss_fn = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    directions, normalizer = RandomDirection(seed=0), AdamNormalizer()
    batches = iter(loader)
    for step in range(3):
        batch = next(batches)
        sources = batch[tm.SOURCE_KEY]
        z = directions.draw(model.get_parameter(name).shape)
        grads = zeroth_order(loss_fn, model, batch, name, z)
        chosen = select_coreset(grads, sources, 32, small_sources=small, normalizer=normalizer, dims=512)
        assert len(chosen) == 32 and chosen.unique().numel() == 32
        is_small = torch.isin(sources, torch.tensor(small))
        assert is_small[chosen].sum() == is_small.sum()  # every small-source example kept
        large_ids, large_counts = sources[~is_small].unique(return_counts=True)
        budget = proportional_budget(large_counts.tolist(), 32 - int(is_small.sum()))
        assert [(sources[chosen] == s).sum().item() for s in large_ids.tolist()] == budget
        assert normalizer.t == step + 1
    # the exact estimator feeds the same selection
    grads = exact(loss_fn, model, batch, name)
    assert grads.shape == (64, 2048)
    assert len(select_coreset(grads, batch[tm.SOURCE_KEY], 32, small_sources=small, dims=512)) == 32
