"""mixup's formula on a hand-checked case, its option checks, and its resumable random stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchkit.host import BatchKitContext
from batchkit_mixup import MixupPlugin

CTX = BatchKitContext(logs_this_step=True)


def test_mixes_inputs_and_one_hot_labels_with_the_drawn_lambda_and_permutation() -> None:
    plugin = MixupPlugin(alpha=0.5, num_classes=3, seed=7)
    rng = np.random.default_rng(7)  # the same stream, to know lambda and the permutation
    lam = float(rng.beta(0.5, 0.5))
    perm = rng.permutation(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 2])
    mixed_x, mixed_y = plugin.batchkit_transform_batch([x, y], CTX)
    onehot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert plugin.last_lambda == pytest.approx(lam)
    assert torch.allclose(mixed_x, lam * x + (1 - lam) * x[perm])
    assert torch.allclose(mixed_y, lam * onehot + (1 - lam) * onehot[perm])
    assert torch.allclose(mixed_y.sum(1), torch.ones(2))
    # further fields (sample ids) pass through untouched
    assert plugin.batchkit_transform_batch([x, y, torch.tensor([5, 9])], CTX)[2].tolist() == [5, 9]


def test_state_round_trip_continues_the_same_stream() -> None:
    a = MixupPlugin(seed=1)
    a.batchkit_transform_batch([torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)], CTX)
    state = a.batchkit_state_dict()
    b = MixupPlugin(seed=99)
    b.batchkit_load_state_dict(state)
    batch = [torch.randn(4, 2), torch.tensor([0, 1, 2, 3])]
    out_a, out_b = a.batchkit_transform_batch(batch, CTX), b.batchkit_transform_batch(batch, CTX)
    assert all(torch.equal(p, q) for p, q in zip(out_a, out_b))


def test_bad_options_and_bad_batches_name_the_fix() -> None:
    from batchkit import PluginError

    with pytest.raises(ValueError, match=r"mixup: alpha must be > 0, got 0.0; use e.g. alpha: 0.2"):
        MixupPlugin(alpha=0.0)
    with pytest.raises(ValueError, match=r"num_classes must be >= 2"):
        MixupPlugin(num_classes=1)
    with pytest.raises(PluginError, match=r"expects \(inputs, labels, \.\.\.\) batches"):
        MixupPlugin().batchkit_transform_batch(torch.zeros(3), CTX)
    with pytest.raises(PluginError, match=r"labels are already probabilities"):
        MixupPlugin().batchkit_transform_batch([torch.zeros(2, 1), torch.zeros(2, 3)], CTX)


def test_token_id_inputs_are_refused_before_the_model_sees_them() -> None:
    """A mix of two token ids is no token id; without this check the embedding fails with nothing
    pointing at mixup."""
    from batchkit import PluginError

    plugin = MixupPlugin(num_classes=2)
    plugin._instance_name = "mix"
    tokens = torch.randint(0, 256, (4, 16))  # a language-model batch: (token ids, domain labels)
    state = plugin.batchkit_state_dict()
    with pytest.raises(PluginError) as info:
        plugin.batchkit_transform_batch([tokens, torch.tensor([0, 1, 0, 1])], CTX)
    message = str(info.value)
    assert message.startswith("mixup (entry 'mix'): the inputs are a torch.int64 tensor of shape (4, 16) (token ids")
    assert "remove the mixup entry for this model" in message
    assert plugin.batchkit_state_dict() == state  # refused before drawing: the random stream is untouched


def test_byte_images_are_still_mixed() -> None:
    """uint8 images (a model that scales them itself) are not token ids: mixed as before."""
    images = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8)
    mixed, _ = MixupPlugin(num_classes=2).batchkit_transform_batch([images, torch.tensor([0, 1, 0, 1])], CTX)
    assert mixed.dtype == torch.float32 and mixed.shape == images.shape
