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
        MIXED_SHAPES=MIXED_SHAPES, ALL_ZERO_PARAM=ALL_ZERO_PARAM, ZERO_GRAD=ZERO_GRAD,
    )
