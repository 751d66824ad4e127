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
