"""Adam normalisation with tracked moments: the formulas on hand-computed values, and resume."""

from __future__ import annotations

import math

import pytest
import torch

from batchkit_coresets import AdamNormalizer


def test_first_step_is_the_sign() -> None:
    # t = 0, m_prev = v_prev = 0: m̂ = g, v̂ = g², so u = g / (|g| + eps) = sign(g) up to eps
    norm = AdamNormalizer(beta1=0.5, beta2=0.75, eps=1e-8)
    g = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, -4.0]])
    u, m, v = norm.normalize(g)
    torch.testing.assert_close(m, 0.5 * g)
    torch.testing.assert_close(v, 0.25 * g ** 2)
    torch.testing.assert_close(u, g.sign(), atol=1e-7, rtol=0)
    assert norm.t == 0 and norm.m_prev is None  # normalize leaves the state alone


def test_two_steps_by_hand() -> None:
    b1, b2, eps = 0.5, 0.75, 1e-8
    norm = AdamNormalizer(beta1=b1, beta2=b2, eps=eps)
    g1 = torch.tensor([[1.0, -2.0], [3.0, 0.0], [5.0, 2.0]])
    _, m, v = norm.normalize(g1)
    norm.update(m[[0, 2]], v[[0, 2]])  # examples 0 and 2 selected
    # m_prev = mean(0.5 * [1, -2], 0.5 * [5, 2]) = [1.5, 0]; v_prev = mean(0.25 * [1, 4], 0.25 * [25, 4]) = [3.25, 1]
    torch.testing.assert_close(norm.m_prev, torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(norm.v_prev, torch.tensor([3.25, 1.0]))
    assert norm.t == 1

    g2 = torch.tensor([[2.0, 4.0]])
    u, m, v = norm.normalize(g2)
    m_expected = torch.tensor([[0.5 * 1.5 + 0.5 * 2.0, 0.5 * 0.0 + 0.5 * 4.0]])        # [1.75, 2.0]
    v_expected = torch.tensor([[0.75 * 3.25 + 0.25 * 4.0, 0.75 * 1.0 + 0.25 * 16.0]])  # [3.4375, 4.75]
    torch.testing.assert_close(m, m_expected)
    torch.testing.assert_close(v, v_expected)
    # bias corrections with t + 1 = 2
    u_expected = (m_expected / (1 - b1 ** 2)) / ((v_expected / (1 - b2 ** 2)).sqrt() + eps)
    torch.testing.assert_close(u, u_expected)
    assert math.isclose(u[0, 0].item(), (1.75 / 0.75) / math.sqrt(3.4375 / 0.4375), rel_tol=1e-6)


def test_state_round_trip_resumes_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    norm = AdamNormalizer()
    for _ in range(3):
        _, m, v = norm.normalize(torch.randn(5, 4, generator=gen))
        norm.update(m[:2], v[:2])
    state = norm.state_dict()
    g = torch.randn(5, 4, generator=gen)
    resumed = AdamNormalizer()
    resumed.load_state_dict(state)
    assert resumed.t == 3
    for a, b in zip(norm.normalize(g), resumed.normalize(g)):
        assert torch.equal(a, b)
    # the saved state is a copy: later updates do not change it
    _, m, v = norm.normalize(g)
    norm.update(m, v)
    assert state["t"] == 3 and not torch.equal(state["m_prev"], norm.m_prev)


def test_errors() -> None:
    norm = AdamNormalizer()
    _, m, v = norm.normalize(torch.ones(2, 3))
    norm.update(m, v)
    with pytest.raises(ValueError, match="3 dimensions, the estimates 4: the parameter changed"):
        norm.normalize(torch.ones(2, 4))
    with pytest.raises(ValueError, match="configure the same values"):
        AdamNormalizer(beta1=0.8).load_state_dict(norm.state_dict())
    with pytest.raises(ValueError, match="k >= 1"):
        norm.update(m[:0], v[:0])
    with pytest.raises(ValueError, match=r"betas must lie in \[0, 1\)"):
        AdamNormalizer(beta2=1.0)
