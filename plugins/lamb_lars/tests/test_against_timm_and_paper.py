"""LAMB and LARS match timm's implementations at matched settings, and the paper's equations
on a step worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from batchkit_lamb_lars import Lamb, Lars

IMPLS = ["reference", "foreach", "fused"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (dict(weight_decay=0.01), dict(weight_decay=0.01)),
        (dict(weight_decay=0.05, weight_decay_mode="decoupled"), dict(weight_decay=0.05, decoupled_decay=True)),
        (dict(weight_decay=0.01, max_grad_norm=1.0, trust_clamp=(0.0, 1.0)),
         dict(weight_decay=0.01, max_grad_norm=1.0, trust_clip=True)),
        (dict(weight_decay=0.0, grad_averaging=False, bias_correction=False),
         dict(weight_decay=0.0, grad_averaging=False, bias_correction=False)),
    ],
    ids=["paper", "decoupled", "clip_lambc", "no_averaging_no_bc"],
)
def test_lamb_matches_timm(impl, ours, theirs, timm_lamb, h, fused_cpu):
    common = dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-6)
    theirs = {"max_grad_norm": None, **theirs}
    a, _ = h.run_steps(lambda ps: Lamb(ps, impl=impl, **common, **ours), steps=30)
    # timm adapts only where weight_decay != 0 unless always_adapt; ours adapts every group by default.
    b, _ = h.run_steps(lambda ps: timm_lamb(ps, always_adapt=True, foreach=False, **common, **theirs), steps=30)
    assert h.max_abs_diff(a, h.make_params()) > 1e-3
    # fp32 rounding only: timm decays as x + x * (-lr wd) and we as x * (1 - lr wd), a few ulps
    # apart after 30 steps at |x| ~ 2; everything else rounds alike.
    assert h.max_abs_diff(a, b) <= (5e-6 if "decoupled_decay" in theirs else 1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "config",
    [
        dict(momentum=0.9, weight_decay=1e-4),
        dict(momentum=0.9, weight_decay=1e-4, nesterov=True),
        dict(momentum=0.8, dampening=0.1, weight_decay=5e-4, trust_clip=True),
        dict(momentum=0.0, weight_decay=0.0),
    ],
    ids=["momentum", "nesterov", "larc", "plain"],
)
def test_lars_matches_timm(impl, config, timm_lars, h, fused_cpu):
    common = dict(lr=0.5, trust_coeff=0.001, eps=1e-8)
    a, _ = h.run_steps(lambda ps: Lars(ps, impl=impl, **common, **config), steps=30)
    b, _ = h.run_steps(lambda ps: timm_lars(ps, always_adapt=True, foreach=False, **common, **config), steps=30)
    assert h.max_abs_diff(a, h.make_params()) > 1e-4
    assert h.max_abs_diff(a, b) <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_lamb_two_element_step_by_hand(impl, fused_cpu):
    """Algorithm 2, t = 1, on x = (3, 4), g = (0.5, -1): every quantity spelled out."""
    lr, beta1, beta2, eps, lam = 0.1, 0.9, 0.999, 1e-6, 0.01
    x, g = [3.0, 4.0], [0.5, -1.0]
    m = [(1 - beta1) * gi for gi in g]  # m_1 = (1 - beta1) g
    v = [(1 - beta2) * gi * gi for gi in g]  # v_1 = (1 - beta2) g^2
    m_hat = [mi / (1 - beta1) for mi in m]  # = g
    v_hat = [vi / (1 - beta2) for vi in v]  # = g^2
    r = [mh / (math.sqrt(vh) + eps) for mh, vh in zip(m_hat, v_hat)]  # ~ sign(g)
    u = [ri + lam * xi for ri, xi in zip(r, x)]  # r + lambda x
    x_norm = math.hypot(*x)  # 5
    u_norm = math.hypot(*u)
    expected = [xi - lr * x_norm / u_norm * ui for xi, ui in zip(x, u)]
    assert expected[0] == pytest.approx(3.0 - 0.1 * 5 / math.hypot(1.03, -0.96) * 1.03, abs=1e-5)

    p = torch.tensor(x, requires_grad=True)
    p.grad = torch.tensor(g)
    opt = Lamb([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=lam, impl=impl)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.tensor(m), rtol=0, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], torch.tensor(v), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_lars_two_element_step_by_hand(impl, fused_cpu):
    """local_lr = eta ||w|| / (||g|| + beta ||w||) = 0.001 * 5 / (0.5 + 0.1 * 5) = 0.005;
    w <- w - lr * local_lr * (g + beta w) = (3, 4) - 1 * 0.005 * (0.6, 0.8)."""
    p = torch.tensor([3.0, 4.0], requires_grad=True)
    p.grad = torch.tensor([0.3, 0.4])
    opt = Lars([p], lr=1.0, momentum=0.9, weight_decay=0.1, trust_coeff=0.001, eps=0.0, impl=impl)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([2.997, 3.996]), rtol=0, atol=1e-6)
    # first step: the momentum buffer starts as the scaled gradient itself (torch SGD convention)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([0.003, 0.004]), rtol=0, atol=1e-7)
    p.grad = torch.tensor([0.3, 0.4])
    opt.step()
    w1 = torch.tensor([2.997, 3.996])
    local = 0.001 * w1.norm() / (0.5 + 0.1 * w1.norm())
    buf = 0.9 * torch.tensor([0.003, 0.004]) + local * (torch.tensor([0.3, 0.4]) + 0.1 * w1)
    torch.testing.assert_close(p.detach(), w1 - buf, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lr", [0.5, 2.0, 4.0])
def test_larc_against_timm_where_the_readings_differ(impl, lr, timm_lars, h, fused_cpu):
    """timm clips the zero-norm fallback ratio too (min(1/lr, 1)); ours, like apex LARC, does not.
    Equal while lr <= 1; at lr > 1 apart on the all-zero tensor (its first step) and on the
    zero-gradient one (whose weight decay timm scales by 1/lr), equal everywhere else."""
    config = dict(lr=lr, momentum=0.9, weight_decay=1e-4, trust_clip=True, trust_coeff=0.001, eps=1e-8)
    a, _ = h.run_steps(lambda ps: Lars(ps, impl=impl, **config), steps=5)
    b, _ = h.run_steps(lambda ps: timm_lars(ps, always_adapt=True, foreach=False, **config), steps=5)
    special = (h.ALL_ZERO_PARAM, h.ZERO_GRAD)
    others = [i for i in range(len(a)) if i not in special]
    assert h.max_abs_diff([a[i] for i in others], [b[i] for i in others]) <= 1e-6
    zero_weight, zero_grad = (h.max_abs_diff([a[i]], [b[i]]) for i in special)
    if lr <= 1:
        assert max(zero_weight, zero_grad) <= 1e-6
    else:
        assert zero_weight > 1e-2 and zero_grad > 1e-5


def paper_lars(params, grads_per_step, lrs, momentum, weight_decay, trust_coeff, eps):
    """You, Gitman, Ginsburg 2017, Algorithm 1, in float64, written from the paper:

        lambda^l = eta ||w^l|| / (||grad^l|| + beta ||w^l|| + eps)   (1 where a norm is 0)
        v^l      = m v^l + gamma_t lambda^l (grad^l + beta w^l)       (v^l = 0 before the first step)
        w^l      = w^l - v^l
    """
    w = [p.detach().double().clone() for p in params]
    v = [torch.zeros_like(x) for x in w]
    for gamma, grads in zip(lrs, grads_per_step):
        for layer, g in enumerate(grads):
            g = g.double()
            w_norm, g_norm = w[layer].norm(), g.norm()
            local = trust_coeff * w_norm / (g_norm + weight_decay * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
            v[layer] = momentum * v[layer] + gamma * local * (g + weight_decay * w[layer])
            w[layer] = w[layer] - v[layer]
    return w


def warmup_then_step_decay(steps=60, peak=2.0, warmup=20, decay_at=(35, 50)):
    """Linear warm-up from peak / warmup to peak, then x0.1 at each decay step (Goyal et al. style)."""
    return [peak * (t + 1) / warmup if t < warmup else peak * 0.1 ** sum(t >= d for d in decay_at)
            for t in range(steps)]


@pytest.mark.parametrize("impl", IMPLS)
def test_lars_paper_form_matches_the_paper_under_warmup_and_step_decay(impl, h, fused_cpu):
    lrs = warmup_then_step_decay()
    options = dict(momentum=0.9, weight_decay=5e-4, trust_coeff=0.02, eps=1e-9)
    shapes = [(33, 17), (3, 5, 7), (70_000,), (4, 4), (7,)]  # odd, multi-chunk; (4, 4) starts at zero
    start = h.make_params(shapes=shapes)
    start[3].detach().zero_()
    grads = [h.make_grads(start, t) for t in range(len(lrs))]
    expected = paper_lars(start, grads, lrs, **options)

    def run(form):
        params = [p.detach().clone().requires_grad_() for p in start]
        opt = Lars(params, lr=lrs[0], impl=impl, momentum_form=form, **options)
        for lr, step_grads in zip(lrs, grads):
            opt.param_groups[0]["lr"] = lr  # what an LR scheduler does
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return params

    paper, sgd = run("paper"), run("sgd")
    moved = h.max_abs_diff(expected, start)
    assert moved > 0.05
    assert h.max_abs_diff(paper, expected) <= 1e-5  # fp32 against float64: 2.9e-6 after moving 5.2
    # the SGD form (lr outside the buffer) is a different trajectory under this schedule
    assert h.max_abs_diff(sgd, expected) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_lars_paper_form_two_steps_by_hand(impl, fused_cpu):
    """lr 1 then 0.5 on w = (3, 4), g = (0.3, 0.4), m 0.9, beta 0.1, eta 0.001:
    v1 = 1 * 0.005 (0.6, 0.8); w1 = w - v1; v2 = 0.9 v1 + 0.5 lambda_2 (g + 0.1 w1); w2 = w1 - v2.
    The SGD form would take w1 - 0.5 (0.9 buf1 + lambda_2 (g + 0.1 w1)) instead."""
    p = torch.tensor([3.0, 4.0], requires_grad=True)
    opt = Lars([p], lr=1.0, momentum=0.9, weight_decay=0.1, trust_coeff=0.001, eps=0.0, impl=impl,
               momentum_form="paper")
    p.grad = torch.tensor([0.3, 0.4])
    opt.step()
    v1 = torch.tensor([0.003, 0.004])
    w1 = torch.tensor([3.0, 4.0]) - v1
    torch.testing.assert_close(p.detach(), w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], v1, rtol=0, atol=1e-7)
    opt.param_groups[0]["lr"] = 0.5
    p.grad = torch.tensor([0.3, 0.4])
    opt.step()
    local = 0.001 * w1.norm() / (0.5 + 0.1 * w1.norm())
    d = local * (torch.tensor([0.3, 0.4]) + 0.1 * w1)
    v2 = 0.9 * v1 + 0.5 * d
    torch.testing.assert_close(p.detach(), w1 - v2, rtol=0, atol=1e-6)
    sgd_form = w1 - 0.5 * (0.9 * v1 + d)
    assert (sgd_form - (w1 - v2)).abs().max() > 1e-4
