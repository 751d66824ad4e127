"""Resume exactly from a state_dict (fp32 state kept fp32), and reject bad input clearly."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from batchkit_lamb_lars import Lamb, Lars, layerwise_param_groups

IMPLS = ["reference", "foreach", "fused"]
CASES = [(Lamb, dict(lr=1e-2, weight_decay=0.01, max_grad_norm=1.0)), (Lars, dict(lr=0.5, momentum=0.9, weight_decay=1e-4))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls,config", CASES, ids=["lamb", "lars"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_equals_uninterrupted(cls, config, impl, dtype, h, fused_cpu):
    k, total = 4, 10
    straight, _ = h.run_steps(lambda ps: cls(ps, impl=impl, **config), steps=total, dtype=dtype)

    first, opt = h.run_steps(lambda ps: cls(ps, impl=impl, **config), steps=k, dtype=dtype)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in first], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    restored = [p.clone().requires_grad_() for p in saved["params"]]
    opt2 = cls(restored, impl=impl, **config)
    opt2.load_state_dict(saved["opt"])
    for p in restored:  # torch's own load would have cast these to bf16
        for name, value in opt2.state[p].items():
            assert value.dtype == torch.float32, name
    resumed, _ = h.run_steps(None, steps=total - k, start=k, params=restored, opt=opt2)
    assert h.max_abs_diff(resumed, straight) == 0.0


def test_torch_default_load_would_downcast(h):
    """Shows what the load_state_dict override protects against (so the test above can fail)."""
    params, opt = h.run_steps(lambda ps: Lamb(ps, impl="foreach"), steps=2, dtype=torch.bfloat16)
    plain = torch.optim.Optimizer.__new__(Lamb)
    plain.__dict__.update(opt.__dict__)
    torch.optim.Optimizer.load_state_dict(plain, opt.state_dict())
    assert plain.state[params[2]]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(lr=-1e-3), "lr=-0.001"),
        (dict(betas=(1.0, 0.999)), "betas[0]=1.0"),
        (dict(betas=(0.9, -0.1)), "betas[1]=-0.1"),
        (dict(eps=0.0), "eps=0.0"),
        (dict(eps=-1e-8), "eps=-1e-08"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(weight_decay_mode="adamw"), "weight_decay_mode='adamw'"),
        (dict(max_grad_norm=-1.0), "max_grad_norm=-1.0"),
        (dict(impl="cuda"), "impl='cuda'"),
        (dict(trust_clamp=(2.0, 1.0)), "trust_clamp=(2.0, 1.0)"),
        (dict(betas=0.9), "betas=0.9 must be a pair (beta1, beta2), e.g. betas=(0.9, 0.999)"),
        (dict(betas=(0.9, 0.99, 0.999)), "must be a pair"),
        (dict(betas="ab"), "betas='ab' must be a pair"),
        (dict(phi=(1.0,)), "phi=(1.0,)"),
        (dict(eps=float("nan")), "eps=nan"),
    ],
)
def test_lamb_rejects_bad_options(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        Lamb([torch.zeros(2, requires_grad=True)], **kwargs)
    assert fragment in str(info.value)


def test_bad_option_in_a_param_group_is_caught():
    with pytest.raises(ValueError, match=r"lr=-1"):
        Lamb([{"params": [torch.zeros(2, requires_grad=True)], "lr": -1}])


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(lr=-0.1), "lr=-0.1"),
        (dict(momentum=-0.9), "momentum=-0.9"),
        (dict(trust_coeff=0.0), "trust_coeff=0.0"),
        (dict(eps=-1.0), "eps=-1.0"),
        (dict(nesterov=True, momentum=0.0), "nesterov=True"),
        (dict(trust_clip=True, lr=0.0), "trust_clip=True"),
        (dict(momentum=1.5), "momentum=1.5 is invalid; it must be a number in [0, 1)"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(dampening=2), "dampening=2 is invalid; it must be a number in [0, 1]"),
        (dict(momentum=float("nan")), "momentum=nan"),
        (dict(lr=float("inf")), "lr=inf"),
        (dict(lr=True), "lr=True"),
        (dict(weight_decay="0.1"), "weight_decay='0.1'"),
        (dict(momentum_form="timm"), "momentum_form='timm'; choose 'sgd'"),
    ],
)
def test_lars_rejects_bad_options(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        Lars([torch.zeros(2, requires_grad=True)], **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize("cls", [Lamb, Lars])
@pytest.mark.parametrize("impl", IMPLS)
def test_sparse_gradients_fail_at_first_step(cls, impl):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(emb.parameters(), impl=impl)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*sparse=False"):
        opt.step()


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_mixed_devices_fail_at_construction(cls):
    with pytest.raises(ValueError, match=r"several devices \(cpu, meta\).*model.to"):
        cls([torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)])
    opt = cls([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="several devices"):
        opt.add_param_group({"params": [torch.zeros(2, device="meta", requires_grad=True)]})


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_state_left_behind_by_a_model_move_is_refused(cls):
    """Moving the parameters after steps would hand the fused kernels state on another device."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = cls([p], impl="foreach", momentum=0.9) if cls is Lars else cls([p], impl="foreach")
    p.grad = torch.ones(3)
    opt.step()
    # The state now sits on another device than the parameter, as after model.to(other) (CPU
    # tensors cannot be re-pointed at another device here, so the state moves instead).
    opt.state[p] = {k: v.to("meta") for k, v in opt.state[p].items()}
    with pytest.raises(RuntimeError, match="moved after the optimizer took steps.*build a new optimizer"):
        opt.step()


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_state_of_the_wrong_size_is_refused_on_load(cls):
    """The fused kernels trust state sizes; a state_dict of another model must not reach them."""
    small, large = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(5))
    kwargs = {"momentum": 0.9} if cls is Lars else {}
    opt = cls([small], **kwargs)
    small.grad = torch.ones(3)
    opt.step()
    with pytest.raises(ValueError, match="has 3 elements for a parameter of 5.*another model"):
        cls([large], **kwargs).load_state_dict(opt.state_dict())


def test_max_grad_norm_zero_disables_clipping_instead_of_zeroing(h):
    """apex divides by max_grad_norm=0 and zeroes every gradient; 0 means 'off' here."""
    a, _ = h.run_steps(lambda ps: Lamb(ps, impl="foreach", max_grad_norm=0.0), steps=3)
    b, _ = h.run_steps(lambda ps: Lamb(ps, impl="foreach", max_grad_norm=None), steps=3)
    assert h.max_abs_diff(a, b) == 0.0 and h.max_abs_diff(a, h.make_params()) > 0


def test_fused_falls_back_to_foreach_with_one_warning(monkeypatch, h):
    from batchkit_cuda_ext import FusedUnavailableWarning, _loader

    def no_compiler(kind):
        raise OSError("no compiler (simulated)")

    _loader._reset_for_tests()
    monkeypatch.setattr(_loader, "_build", no_compiler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused, _ = h.run_steps(lambda ps: Lamb(ps, impl="fused"), steps=3)
            Lars(h.make_params(), impl="fused").step()  # a second optimizer: still no new warning
        relevant = [w for w in caught if issubclass(w.category, FusedUnavailableWarning)]
        assert len(relevant) == 1
        assert "no compiler (simulated)" in str(relevant[0].message) and "foreach" in str(relevant[0].message)
        foreach, _ = h.run_steps(lambda ps: Lamb(ps, impl="foreach"), steps=3)
        assert h.max_abs_diff(fused, foreach) == 0.0
    finally:
        _loader._reset_for_tests()


def test_layerwise_param_groups_excludes_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2, bias=False))
    groups = layerwise_param_groups(model, weight_decay=0.05)
    adapted, excluded = groups
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in excluded["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert adapted["weight_decay"] == 0.05 and adapted["adapt"]
    assert excluded["weight_decay"] == 0.0 and not excluded["adapt"]
    opt = Lamb(groups, lr=1e-2)
    before = model[1].weight.detach().clone()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    # excluded => plain Adam step of size ~lr per element, not a trust-ratio-scaled one
    assert (model[1].weight.detach() - before).abs().max().item() == pytest.approx(1e-2, rel=1e-3)


def test_lars_momentum_and_dampening_out_of_range_together_are_refused():
    with pytest.raises(ValueError, match=r"Lars: momentum=1.5 is invalid.*momentum=0.9"):
        Lars([torch.zeros(2, requires_grad=True)], momentum=1.5, dampening=2)
    with pytest.raises(ValueError, match=r"Lars: dampening=2 is invalid"):
        Lars([torch.zeros(2, requires_grad=True)], momentum=0.5, dampening=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_numpy_and_tensor_scalars_are_accepted_as_numbers(impl, h, fused_cpu):
    """np.float32 / np.float64 / np.int64 / 0-dim tensors work like Python floats, with the same result."""
    np = pytest.importorskip("numpy")
    lamb_np = dict(lr=np.float32(1e-2), weight_decay=np.float64(0.01), betas=(np.float32(0.9), np.float64(0.999)),
                   eps=np.float32(1e-6), max_grad_norm=np.int64(1), trust_clamp=np.array([0.0, 10.0]))
    lamb_py = dict(lr=float(np.float32(1e-2)), weight_decay=0.01, betas=(float(np.float32(0.9)), 0.999),
                   eps=float(np.float32(1e-6)), max_grad_norm=1.0, trust_clamp=(0.0, 10.0))
    lars_np = dict(lr=np.float32(0.5), momentum=np.float64(0.9), weight_decay=torch.tensor(1e-4, dtype=torch.float64),
                   trust_coeff=np.float32(0.02), dampening=np.int32(0))
    lars_py = dict(lr=0.5, momentum=0.9, weight_decay=1e-4, trust_coeff=float(np.float32(0.02)), dampening=0.0)
    for cls, given, plain in ((Lamb, lamb_np, lamb_py), (Lars, lars_np, lars_py)):
        a, opt = h.run_steps(lambda ps: cls(ps, impl=impl, **given), steps=3)
        b, _ = h.run_steps(lambda ps: cls(ps, impl=impl, **plain), steps=3)
        assert h.max_abs_diff(a, b) == 0.0, cls.__name__
        group = opt.param_groups[0]
        assert type(group["lr"]) is float and type(group["weight_decay"]) is float
        if cls is Lamb:
            assert all(type(beta) is float for beta in group["betas"])


def test_a_resumed_lars_keeps_the_momentum_form_its_buffer_was_written_in():
    """The buffer holds lr * (SGD form's buffer) in the paper's form: a checkpoint must not be read
    in the other form. Old checkpoints (no momentum_form key) load as the SGD form."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lars([p], lr=0.5, momentum_form="paper")
    p.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()
    resumed = Lars([torch.nn.Parameter(p.detach().clone())], lr=0.5)  # built with the default form
    resumed.load_state_dict(state)
    assert resumed.param_groups[0]["momentum_form"] == "paper"
    old_groups = [{k: v for k, v in g.items() if k != "momentum_form"} for g in state["param_groups"]]
    old = {**state, "param_groups": old_groups}
    q = torch.nn.Parameter(p.detach().clone())
    legacy = Lars([q], lr=0.5, momentum_form="paper")
    legacy.load_state_dict(old)
    q.grad = torch.ones(3)
    legacy.step()  # runs as the SGD form: w - lr * (m buf + d)
    expected = Lars([torch.nn.Parameter(p.detach().clone())], lr=0.5)
    expected.load_state_dict(old)
    r = expected.param_groups[0]["params"][0]
    r.grad = torch.ones(3)
    expected.step()
    assert torch.equal(q.detach(), r.detach())
