"""Reference, foreach and fused (CPU twin) paths agree to 1e-6 in fp32 over 100 steps."""

from __future__ import annotations

import pytest
import torch
from batchkit_lamb_lars import Lamb, Lars

def _three_paths(cls, config, h, dtype=torch.float32, steps=100):
    out = {}
    for impl in ("reference", "foreach", "fused"):
        params, opt = h.run_steps(lambda ps: cls(ps, impl=impl, **config), steps=steps, dtype=dtype)
        out[impl] = params
    return out


def test_lamb_paths_agree(lamb_config, h, fused_cpu):
    out = _three_paths(Lamb, lamb_config, h)
    start = h.make_params()
    moved = h.max_abs_diff(out["reference"], start)
    assert moved > 1e-3, "the optimizer did not move the parameters; the comparison would be vacuous"
    assert h.max_abs_diff(out["reference"], out["foreach"]) <= 1e-6
    assert h.max_abs_diff(out["reference"], out["fused"]) <= 1e-6


def test_lars_paths_agree(lars_config, h, fused_cpu):
    out = _three_paths(Lars, lars_config, h)
    assert h.max_abs_diff(out["reference"], h.make_params()) > 1e-4
    assert h.max_abs_diff(out["reference"], out["foreach"]) <= 1e-6
    assert h.max_abs_diff(out["reference"], out["fused"]) <= 1e-6


@pytest.mark.parametrize("cls,name", [(Lamb, "paper"), (Lars, "plain")])
def test_special_tensors(cls, name, h, fused_cpu):
    """Zero-initialised params get ratio 1 (they move); zero-grad params keep still unless decayed."""
    config = h.config_of(cls, name)
    start = h.make_params()
    for impl in ("reference", "foreach", "fused"):
        params, _ = h.run_steps(lambda ps: cls(ps, impl=impl, **{**config, "weight_decay": 0.0}), steps=3)
        assert params[h.ZERO_GRAD].detach().equal(start[h.ZERO_GRAD].detach()), impl
        assert params[0].numel() == 0 and params[1].dim() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,name", [(Lamb, "paper"), (Lars, "plain")])
def test_low_precision_paths_agree_and_state_is_fp32(dtype, cls, name, h, fused_cpu):
    """bf16/fp16 params: fp32 math and state on every path; results equal up to one rounding."""
    config = h.config_of(cls, name)
    out = {}
    for impl in ("reference", "foreach", "fused"):
        params, opt = h.run_steps(lambda ps: cls(ps, impl=impl, **config), steps=10, dtype=dtype)
        for p in params:
            for name, value in opt.state[p].items():
                assert value.dtype == torch.float32, (impl, name)
        out[impl] = params
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for impl in ("foreach", "fused"):
        for a, b in zip(out["reference"], out[impl]):
            if a.numel():
                assert ((a.float() - b.float()).abs() <= ulp * b.float().abs().clamp(min=1.0) + 1e-6).all(), impl


def test_fused_single_call_and_split_passes_agree(h, fused_cpu):
    """The single-process call (BOTH) equals pass 1, a reducer, then pass 2 (what ZeRO uses)."""
    params_a, _ = h.run_steps(lambda ps: Lamb(ps, impl="fused", weight_decay=0.01), steps=20)

    def identity_reduce_factory(ps):
        opt = Lamb(ps, impl="fused", weight_decay=0.01)
        original = opt._group_batches

        def with_reduce(group):
            batches = original(group)
            for b in batches:
                b.reduce = lambda sq: sq.clone()
            return batches

        opt._group_batches = with_reduce
        return opt

    params_b, _ = h.run_steps(identity_reduce_factory, steps=20)
    assert h.max_abs_diff(params_a, params_b) == 0.0


@pytest.mark.parametrize("cls", [Lamb, Lars])
@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
def test_grads_are_never_modified(cls, impl, h, fused_cpu):
    params = h.make_params()
    opt = cls(params, impl=impl, max_grad_norm=0.1, weight_decay=0.01)
    for t in range(3):
        grads = h.make_grads(params, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert p.grad.equal(g)


def test_step_count_is_per_parameter(h):
    params = h.make_params(shapes=[(3,), (4,)])
    opt = Lamb(params, impl="foreach")
    params[0].grad = torch.ones(3)
    params[1].grad = torch.ones(4)
    opt.step()
    params[1].grad = None
    opt.step()
    assert opt.state[params[0]]["step"].item() == 2
    assert opt.state[params[1]]["step"].item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["paper_clip", "decoupled", "l2_no_bias_correction"])
def test_fused_stash_is_bit_identical(name, dtype, h, fused_cpu):
    """Keeping u from pass 1 (stash_update=True) changes where u comes from, not its value."""
    config = h.LAMB_CONFIGS[name]
    a, _ = h.run_steps(lambda ps: Lamb(ps, impl="fused", stash_update=True, **config), steps=15, dtype=dtype)
    b, _ = h.run_steps(lambda ps: Lamb(ps, impl="fused", stash_update=False, **config), steps=15, dtype=dtype)
    assert h.max_abs_diff(a, h.make_params(dtype)) > 0
    assert h.max_abs_diff(a, b) == 0.0


@pytest.mark.parametrize("lr", [0.5, 2.0, 4.0])
def test_larc_zero_norm_tensors_take_a_plain_unclipped_step(lr, h, fused_cpu):
    """trust_clip: where a norm is zero the ratio is 1 and is not clipped (apex LARC), on every
    path. w = 0, g = 1 moves to -lr (clipping the fallback, as timm does, would give -min(lr, 1));
    a zero-gradient tensor decays at the plain lr."""
    for impl in ("reference", "foreach", "fused"):
        w = torch.zeros(3, requires_grad=True)
        w.grad = torch.ones(3)
        z = torch.full((2,), 0.5, requires_grad=True)
        z.grad = torch.zeros(2)
        a = torch.full((4,), 2.0, requires_grad=True)  # both norms nonzero: the ratio is clipped
        a.grad = torch.full((4,), 0.1)
        opt = Lars([w, z, a], lr=lr, momentum=0.9, weight_decay=0.01, trust_clip=True, trust_coeff=0.05, impl=impl)
        opt.step()
        torch.testing.assert_close(w.detach(), torch.full((3,), -lr), rtol=0, atol=1e-7, msg=impl)
        torch.testing.assert_close(z.detach(), torch.full((2,), 0.5 - lr * 0.01 * 0.5), rtol=0, atol=1e-7, msg=impl)
        local = min(0.05 * 4.0 / (0.2 + 0.01 * 4.0 + 1e-8) / lr, 1.0)  # eta ||a|| / (||g|| + wd ||a|| + eps), clipped
        torch.testing.assert_close(a.detach(), torch.full((4,), 2.0 - lr * local * (0.1 + 0.01 * 2.0)),
                                   rtol=0, atol=1e-6, msg=impl)


@pytest.mark.parametrize("lr", [0.5, 2.0, 4.0])
def test_larc_paths_agree_over_100_steps_at_every_lr(lr, h, fused_cpu):
    """The mixed tensors include an all-zero parameter and a zero-gradient one."""
    config = dict(lr=lr, momentum=0.9, weight_decay=1e-4, trust_clip=True)
    out = _three_paths(Lars, config, h)
    start = h.make_params()
    assert h.max_abs_diff([out["reference"][h.ALL_ZERO_PARAM]], [start[h.ALL_ZERO_PARAM]]) > 1e-2
    assert h.max_abs_diff(out["reference"], out["foreach"]) <= 1e-6
    assert h.max_abs_diff(out["reference"], out["fused"]) <= 1e-6
