"""The per-sample loss protocol helpers: finding the batch size and selecting samples in every
container type a DataLoader produces."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from batchkit import PluginError
from batchkit_hard_samples.protocol import batch_size_of
from batchkit_hard_samples.protocol import check_per_sample_losses
from batchkit_hard_samples.protocol import resolve_loss_method
from batchkit_hard_samples.protocol import select_samples


def test_batch_size_is_the_leading_dimension_of_the_first_tensor() -> None:
    assert batch_size_of("p", [torch.zeros(5, 3), torch.zeros(5)]) == 5
    assert batch_size_of("p", {"meta": {"ids": torch.arange(4)}, "x": torch.zeros(4, 2)}) == 4
    assert batch_size_of("p", (["a", "b"], torch.zeros(2, 1))) == 2
    with pytest.raises(PluginError, match="p: found no tensor with a batch dimension"):
        batch_size_of("p", {"x": torch.tensor(1.0)})


def test_select_samples_keeps_container_types() -> None:
    index = torch.tensor([0, 2])
    x = torch.arange(12).reshape(4, 3)
    Pair = namedtuple("Pair", "x names")
    batch = {"x": x, "pair": Pair(x[:, 0], ("a", "b", "c", "d")), "scale": torch.tensor(2.0), "w": torch.ones(3)}
    out = select_samples(batch, index, 4)
    assert out["x"].tolist() == [[0, 1, 2], [6, 7, 8]]
    assert isinstance(out["pair"], Pair) and out["pair"].x.tolist() == [0, 6] and out["pair"].names == ("a", "c")
    assert out["scale"].item() == 2.0 and out["w"].shape == (3,)  # not per sample: unchanged
    assert select_samples([x, [10, 11, 12, 13]], index, 4)[1] == [10, 12]


def test_loss_method_lookup_and_output_check() -> None:
    class Module:
        def scores(self, batch):
            return batch

    assert resolve_loss_method("p", Module(), "scores")(3) == 3
    with pytest.raises(PluginError, match="option loss_method='nope'"):
        resolve_loss_method("p", Module(), "nope")
    with pytest.raises(PluginError, match="returned list, not a tensor"):
        check_per_sample_losses("p", "scores", [1.0], 1)
    with pytest.raises(PluginError, match=r"shape \(2, 3\), but the batch has 2 samples"):
        check_per_sample_losses("p", "scores", torch.zeros(2, 3), 2)
