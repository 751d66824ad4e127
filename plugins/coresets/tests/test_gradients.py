"""Per-example gradient estimates: zeroth-order against the exact directional derivative, exact
against per-example autograd, and both in agreement on a small LM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchkit_coresets import RandomDirection
from batchkit_coresets import directional_derivatives
from batchkit_coresets import exact
from batchkit_coresets import zeroth_order


class Regressor(nn.Module):
    """x -> Linear -> tanh -> Linear, with dropout (must be off while estimating)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 6, dtype=dtype)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(6, 1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.tanh(self.hidden(x)))).squeeze(-1)


def regression_loss(module: nn.Module, batch: dict) -> torch.Tensor:
    return (module(batch["x"]) - batch["y"]) ** 2  # [n]


def autograd_per_example(loss_fn, module: nn.Module, batch: dict, name: str) -> torch.Tensor:
    """∇_θ L_i by one ordinary backward per example, in eval mode: the reference for both estimators."""
    param = module.get_parameter(name)
    n = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    module.eval()
    rows = []
    for i in range(n):
        one = {k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        (g,) = torch.autograd.grad(loss_fn(module, one).sum(), param)
        rows.append(g.flatten())
    module.train()
    return torch.stack(rows)


def regression_batch(n: int = 7, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 5, generator=gen, dtype=dtype), "y": torch.randn(n, generator=gen, dtype=dtype),
            "name": "not per-example"}


def test_zeroth_order_matches_the_directional_derivative_float64() -> None:
    torch.manual_seed(0)
    model = Regressor(torch.float64)
    batch = regression_batch(dtype=torch.float64)
    z = RandomDirection(seed=3).draw(model.hidden.weight.shape).double()
    c = directional_derivatives(regression_loss, model, batch, "hidden.weight", z)
    exact_dd = autograd_per_example(regression_loss, model, batch, "hidden.weight") @ z.flatten()  # <∇L_i, z>
    # central difference: error O(ε²) = O(1e-6) relative
    torch.testing.assert_close(c.double(), exact_dd, rtol=1e-5, atol=1e-6)
    g = zeroth_order(regression_loss, model, batch, "hidden.weight", z)
    assert g.shape == (7, 30)
    torch.testing.assert_close(g.double(), c.double()[:, None] * z.flatten()[None], rtol=1e-6, atol=1e-7)


def test_zeroth_order_float32_on_the_example_lm() -> None:
    text_mixture = pytest.importorskip("batchkit_examples.text_mixture")
    torch.manual_seed(0)
    model = text_mixture.DenseLanguageModel(dim=16, layers=2, heads=2, hidden=32, seq_len=16)
    batch = {"tokens": torch.randint(0, 256, (6, 17)), "source": torch.arange(6)}
    loss_fn = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    name = "blocks.1.moe.fc_out.weight"
    z = RandomDirection(seed=1).draw(model.get_parameter(name).shape)
    c = directional_derivatives(loss_fn, model, batch, name, z)
    exact_dd = exact(loss_fn, model, batch, name) @ z.flatten()
    # float32 losses of ~5.5 differenced over 2ε = 2e-3: absolute error ~1e-3
    torch.testing.assert_close(c, exact_dd, rtol=2e-2, atol=3e-3)
    assert (c.sign() == exact_dd.sign()).all()


def test_exact_equals_per_example_autograd() -> None:
    torch.manual_seed(0)
    model = Regressor()
    batch = regression_batch()
    for name in ("hidden.weight", "out.bias"):
        torch.testing.assert_close(exact(regression_loss, model, batch, name),
                                   autograd_per_example(regression_loss, model, batch, name), rtol=1e-5, atol=1e-6)
    # chunked vectorisation gives the same
    torch.testing.assert_close(exact(regression_loss, model, batch, "hidden.weight", chunk_size=3),
                               exact(regression_loss, model, batch, "hidden.weight"))


def test_exact_on_the_example_lm() -> None:
    text_mixture = pytest.importorskip("batchkit_examples.text_mixture")
    torch.manual_seed(0)
    model = text_mixture.DenseLanguageModel(dim=16, layers=2, heads=2, hidden=32, seq_len=16)
    batch = {"tokens": torch.randint(0, 256, (4, 17)), "source": torch.arange(4)}
    loss_fn = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    name = "blocks.0.qkv.weight"  # upstream of attention: the vmapped backward goes through it
    torch.testing.assert_close(exact(loss_fn, model, batch, name), autograd_per_example(loss_fn, model, batch, name),
                               rtol=1e-4, atol=1e-6)


def test_both_estimators_agree_in_direction() -> None:
    """Averaged over redrawn directions, c_i z converges to ∇L_i (E[z zᵀ] = I): after K draws the
    cosine to the exact gradient is about 1/sqrt(1 + (d + 1)/K), here d = 48, K = 400: ~0.94."""
    text_mixture = pytest.importorskip("batchkit_examples.text_mixture")
    torch.manual_seed(0)
    model = text_mixture.DenseLanguageModel(dim=8, layers=1, heads=2, hidden=6, seq_len=8)
    batch = {"tokens": torch.randint(0, 256, (4, 9)), "source": torch.arange(4)}
    loss_fn = lambda m, b: m.per_sample_loss(b)  # noqa: E731
    name = "blocks.0.moe.fc_out.weight"  # 8 x 6 = 48 coordinates
    directions = RandomDirection(seed=0)
    estimate = torch.zeros(4, 48)
    draws = 400
    for _ in range(draws):
        z = directions.draw((8, 6))
        estimate += zeroth_order(loss_fn, model, batch, name, z) / draws
    truth = exact(loss_fn, model, batch, name)
    cosine = F.cosine_similarity(estimate, truth, dim=1)
    assert (cosine > 0.85).all(), cosine
    # and each estimate is closest to its own example's gradient
    cross = F.cosine_similarity(estimate[:, None], truth[None], dim=2)
    assert (cross.argmax(dim=1) == torch.arange(4)).all(), cross


def test_parameter_restored_bit_for_bit_and_modes_kept() -> None:
    torch.manual_seed(0)
    model = Regressor()
    model.hidden.eval()  # a submodule in its own eval mode must stay so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_training = []

    def loss_fn(module: nn.Module, batch: dict) -> torch.Tensor:
        seen_training.append(any(m.training for m in module.modules()))
        return regression_loss(module, batch)

    batch = regression_batch()
    z = RandomDirection().draw(model.hidden.weight.shape)
    zeroth_order(loss_fn, model, batch, "hidden.weight", z)
    exact(loss_fn, model, batch, "hidden.weight")
    assert seen_training and not any(seen_training)  # everything in eval mode (dropout off) while estimating
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training and model.drop.training and not model.hidden.training


def test_parameter_restored_when_the_loss_raises() -> None:
    model = Regressor()
    before = model.hidden.weight.detach().clone()
    calls = []

    def failing(module: nn.Module, batch: dict) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return regression_loss(module, batch)

    with pytest.raises(RuntimeError, match="boom"):
        zeroth_order(failing, model, regression_batch(), "hidden.weight", torch.ones(6, 5))
    assert torch.equal(model.hidden.weight, before)
    assert model.training


def test_direction_shape_is_checked() -> None:
    with pytest.raises(ValueError, match=r"direction z has shape \(5, 6\), parameter 'hidden.weight' has \(6, 5\)"):
        zeroth_order(regression_loss, Regressor(), regression_batch(), "hidden.weight", torch.ones(5, 6))


def test_random_direction_redraw_fixed_and_resume() -> None:
    stream = RandomDirection(seed=5)
    first, second = stream.draw((3, 4)), stream.draw((3, 4))
    assert not torch.equal(first, second)  # redrawn every step by default
    state = stream.state_dict()
    third = stream.draw((3, 4))
    resumed = RandomDirection(seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.draw((3, 4)), third)  # the stream resumes exactly
    assert torch.equal(RandomDirection(seed=5).draw((3, 4)), first)  # same seed, same stream (every rank)

    fixed = RandomDirection(seed=5, redraw=False)
    a, b = fixed.draw((3, 4)), fixed.draw((3, 4))
    assert torch.equal(a, b) and torch.equal(a, first)
