"""Shared fixtures of the LAMB/LARS tests: tensor mixes, a step driver, timm's optimizers."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

# Shapes that break naive multi-tensor code: empty, scalar, odd sizes, several chunks.
MIXED_SHAPES = [(0,), (), (7,), (33, 17), (3, 5, 7), (70_000,), (4, 4), (1,)]
ALL_ZERO_PARAM = 6  # index of a parameter initialised to zeros (trust ratio must be 1)
ZERO_GRAD = 7  # index of a parameter whose gradient is always zero


# Settings every path is compared under (test_parity.py on the CPU, test_cuda.py on a GPU).
LAMB_CONFIGS = {
    "paper": dict(lr=1e-2, weight_decay=0.01),
    "paper_clip": dict(lr=1e-2, weight_decay=0.01, max_grad_norm=0.5),
    "decoupled": dict(lr=1e-2, weight_decay=0.05, weight_decay_mode="decoupled"),
    "l2_no_bias_correction": dict(lr=1e-2, weight_decay=0.01, weight_decay_mode="l2", bias_correction=False),
    "no_grad_averaging_lambc": dict(lr=1e-2, grad_averaging=False, trust_clamp=(0.0, 1.0)),
    "phi_clamped": dict(lr=1e-2, phi=(0.5, 3.0), trust_clamp=(0.01, 10.0)),
    "no_adapt": dict(lr=1e-3, adapt=False),
}

LARS_CONFIGS = {
    "plain": dict(lr=0.5, momentum=0.9, weight_decay=1e-4),
    "nesterov": dict(lr=0.5, momentum=0.9, weight_decay=1e-4, nesterov=True),
    "larc_dampening": dict(lr=0.5, momentum=0.8, dampening=0.1, weight_decay=5e-4, trust_clip=True),
    "no_momentum_clip": dict(lr=0.5, momentum=0.0, weight_decay=1e-4, max_grad_norm=0.3),
    "no_adapt": dict(lr=0.01, momentum=0.9, adapt=False),
    # lr > 1 with LARC: the zero-weight and zero-gradient tensors keep ratio 1, unclipped (apex LARC)
    "larc_lr2": dict(lr=2.0, momentum=0.9, weight_decay=1e-4, trust_clip=True),
    "larc_lr4_no_momentum": dict(lr=4.0, momentum=0.0, weight_decay=1e-4, trust_clip=True),
    # the paper's form: lr inside the momentum buffer
    "paper_form": dict(lr=0.5, momentum=0.9, weight_decay=1e-4, momentum_form="paper"),
    "paper_form_nesterov_larc": dict(lr=2.0, momentum=0.9, weight_decay=5e-4, nesterov=True, trust_clip=True,
                                     momentum_form="paper"),
}



def pytest_generate_tests(metafunc):
    """`lamb_config` / `lars_config` arguments run once per entry of the tables above."""
    for arg, table in (("lamb_config", LAMB_CONFIGS), ("lars_config", LARS_CONFIGS)):
        if arg in metafunc.fixturenames:
            metafunc.parametrize(arg, list(table.values()), ids=list(table))


def make_params(dtype=torch.float32, seed=0, shapes=MIXED_SHAPES):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=gen) * 0.5
        if i == ALL_ZERO_PARAM:
            p.zero_()
        params.append(p.to(dtype).requires_grad_())
    return params


def make_grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    grads = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (0.1 + 0.05 * (step % 3))
        if i == ZERO_GRAD:
            g.zero_()
        grads.append(g.to(p.dtype))
    return grads


def run_steps(opt_factory, steps=100, dtype=torch.float32, shapes=MIXED_SHAPES, start=0, params=None, opt=None):
    """Build params + optimizer, feed deterministic grads for ``steps`` steps; returns both."""
    params = params if params is not None else make_params(dtype, shapes=shapes)
    opt = opt if opt is not None else opt_factory(params)
    for t in range(start, start + steps):
        for p, g in zip(params, make_grads(params, t)):
            p.grad = g
        opt.step()
    return params, opt


def config_of(cls, name: str) -> dict:
    """LAMB_CONFIGS[name] for a LAMB class, LARS_CONFIGS[name] for a LARS one."""
    return (LAMB_CONFIGS if "lamb" in cls.__name__.lower() else LARS_CONFIGS)[name]


def max_abs_diff(a, b) -> float:
    return max((x.detach().float() - y.detach().float()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))


def _load_timm_optim(module: str) -> types.ModuleType:
    """timm.optim.<module> without importing timm/__init__ (which needs torchvision)."""
    name = f"_timm_optim_isolated.{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (test-only dependency: pip install --no-deps timm)")
    root = Path(list(spec.submodule_search_locations)[0]) / "optim"
    if "_timm_optim_isolated" not in sys.modules:
        pkg = types.ModuleType("_timm_optim_isolated")
        pkg.__path__ = [str(root)]
        sys.modules["_timm_optim_isolated"] = pkg
    file_spec = importlib.util.spec_from_file_location(name, root / f"{module}.py")
    mod = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = mod
    file_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def timm_lamb():
    return _load_timm_optim("lamb").Lamb


@pytest.fixture(scope="session")
def timm_lars():
    return _load_timm_optim("lars").Lars


@pytest.fixture(scope="session")
def fused_cpu():
    ext = pytest.importorskip("batchkit_cuda_ext")
    if not ext.is_available("cpu"):
        pytest.skip(f"CPU twin could not be built: {ext.failure_reason('cpu')}")
    return ext


@pytest.fixture(scope="session")
def h():
    """The helpers above (test modules cannot import conftest under --import-mode=importlib)."""
    return types.SimpleNamespace(
        make_params=make_params, make_grads=make_grads, run_steps=run_steps, max_abs_diff=max_abs_diff,
        MIXED_SHAPES=MIXED_SHAPES, LAMB_CONFIGS=LAMB_CONFIGS, LARS_CONFIGS=LARS_CONFIGS, config_of=config_of, ALL_ZERO_PARAM=ALL_ZERO_PARAM, ZERO_GRAD=ZERO_GRAD,
    )
