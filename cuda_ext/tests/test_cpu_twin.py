"""The CPU twin of the kernels, called directly: input checks, the shared math on odd sizes,
and low-precision rounding."""

from __future__ import annotations

import pytest
import torch

ext = pytest.importorskip("batchkit_cuda_ext")


@pytest.fixture(scope="module", autouse=True)
def built():
    if not ext.is_available("cpu"):
        pytest.skip(f"CPU twin could not be built: {ext.failure_reason('cpu')}")


def _lamb_hyper(**kw):
    base = dict(beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.0, wd_mode=0, bias_correction=1,
                adapt=1, phi_lo=0.0, phi_hi=float("inf"), ratio_lo=0.0, ratio_hi=float("inf"))
    base.update(kw)
    return ext.LambHyper(**base)


def _lamb_inputs(sizes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    m = [torch.zeros(n) for n in sizes]
    v = [torch.zeros(n) for n in sizes]
    steps = [torch.ones(()) for _ in sizes]
    return params, grads, m, v, steps


def test_squared_norms_over_chunk_boundaries():
    """Pass 1 reports per-tensor sum(x^2) across 64K-element chunks, and 0 for empty tensors."""
    sizes = [0, 1, 65_535, 65_536, 65_537, 200_000]
    params, grads, m, v, steps = _lamb_inputs(sizes)
    sq = torch.zeros(len(sizes), 2)
    lr = torch.tensor([1e-3])
    ext.lamb(ext.PASS1, params, grads, m, v, steps, _lamb_hyper(), lr, sq)
    expected = torch.tensor([p.double().square().sum().item() for p in params], dtype=torch.float32)
    torch.testing.assert_close(sq[:, 0], expected, rtol=1e-6, atol=0)
    # first step with bias correction: u = g / (|g| + eps), so ||u||^2 ~ numel
    torch.testing.assert_close(sq[:, 1], torch.tensor(sizes, dtype=torch.float32), rtol=1e-4, atol=1e-3)
    # pass 1 never touches the parameters
    assert all(p.equal(q) for p, q in zip(params, _lamb_inputs(sizes)[0]))


def test_bf16_store_rounds_to_nearest_even_like_torch():
    """x - lr*ratio*u computed in fp32 then stored as bf16 must equal torch's own fp32->bf16 cast."""
    sizes = [1000]
    params, grads, m, v, steps = _lamb_inputs(sizes, dtype=torch.bfloat16)
    x32 = params[0].float()
    sq = torch.zeros(1, 2)
    hyper = _lamb_hyper(adapt=0)
    ext.lamb(ext.BOTH, params, grads, m, v, steps, hyper, torch.tensor([0.01]), sq)
    g = grads[0].float()
    u = (0.1 * g / 0.1) / (((0.001 * g * g) / 0.001).sqrt() + 1e-6)
    assert params[0].equal((x32 - 0.01 * u).to(torch.bfloat16))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.update(grads=[a["grads"][0].double()]), "dtype"),
        (lambda a: a.update(exp_avgs=[torch.zeros(10, dtype=torch.bfloat16)]), "expected torch.float32"),
        (lambda a: a.update(exp_avg_sqs=[torch.zeros(11)]), "11 elements"),
        (lambda a: a.update(params=[torch.zeros(20)[::2]]), "contiguous"),
    ],
)
def test_bad_inputs_are_rejected_before_any_pointer_is_used(mutate, message):
    args = dict(params=[torch.zeros(10)], grads=[torch.zeros(10)], exp_avgs=[torch.zeros(10)],
                exp_avg_sqs=[torch.zeros(10)], steps=[torch.ones(())])
    mutate(args)
    with pytest.raises(ValueError, match=message):
        ext.lamb(ext.BOTH, args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], args["steps"],
                 _lamb_hyper(), torch.tensor([0.1]), torch.zeros(1, 2))


def test_lars_norms_and_first_step_buffer():
    hyper = ext.LarsHyper(momentum=0.9, dampening=0.0, weight_decay=0.0, trust_coeff=0.001, eps=0.0,
                          nesterov=0, trust_clip=0, adapt=1)
    x, g, buf = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8]), torch.full((2,), 123.0)
    sq = torch.zeros(1, 2)
    ext.lars(ext.BOTH, [x], [g], [buf], [torch.ones(())], hyper, torch.tensor([1.0]), sq)
    torch.testing.assert_close(sq, torch.tensor([[25.0, 1.0]]))
    # ratio = 0.001 * 5 / 1; step 1 ignores the old buffer content
    torch.testing.assert_close(buf, torch.tensor([0.003, 0.004]))
    torch.testing.assert_close(x, torch.tensor([2.997, 3.996]))
