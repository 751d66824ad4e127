"""The CUDA kernels on a GPU; skipped where there is none (CI). On a GPU machine:

    pytest plugins/lamb_lars/tests/test_cuda.py

The comparisons of test_parity.py with the CPU reference path as the yardstick, plus what only
a GPU shows: multi-tensor-apply's launch boundaries, no host sync inside ``step()``, capture in
a CUDA graph, and compute-sanitizer's memcheck and racecheck over every kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from batchkit_lamb_lars import Lamb, Lars

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
JOB = Path(__file__).with_name("cuda_sanitize_job.py")


@pytest.fixture(scope="module")
def fused_cuda():
    import batchkit_cuda_ext as ext

    if not ext.is_available("cuda"):
        pytest.fail(f"a GPU is present but the CUDA library did not build: {ext.failure_reason('cuda')}")
    return ext


def run_on(device, cls, config, impl, h, steps=100, dtype=torch.float32, shapes=None):
    """``steps`` steps with the deterministic gradients of conftest, parameters on ``device``."""
    shapes = shapes or h.MIXED_SHAPES
    start = h.make_params(dtype, shapes=shapes)
    params = [p.detach().to(device).requires_grad_() for p in start]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent fallback to foreach would make this vacuous
        opt = cls(params, impl=impl, **config)
        for t in range(steps):
            grads = [g.to(device) for g in h.make_grads(start, t)]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            for p, g in zip(params, grads):
                assert p.grad.equal(g), "the optimizer wrote into p.grad"
    return [p.detach().cpu() for p in params], opt


def check_cuda_paths_match_cpu_reference(cls, config, h, moved_at_least):
    want, _ = run_on("cpu", cls, config, "reference", h)
    assert h.max_abs_diff(want, h.make_params()) > moved_at_least, "nothing moved: a vacuous comparison"
    for impl in ("fused", "foreach", "reference"):
        got, _ = run_on(CUDA, cls, config, impl, h)
        assert h.max_abs_diff(want, got) <= 1e-6, impl


def test_lamb_cuda_paths_match_cpu_reference(lamb_config, h, fused_cuda):
    check_cuda_paths_match_cpu_reference(Lamb, lamb_config, h, 1e-3)


def test_lars_cuda_paths_match_cpu_reference(lars_config, h, fused_cuda):
    check_cuda_paths_match_cpu_reference(Lars, lars_config, h, 1e-4)


@pytest.mark.parametrize("stash", [False, True])
def test_lamb_cuda_stash_is_bit_identical(stash, h, fused_cuda):
    config = h.LAMB_CONFIGS["paper_clip"]
    a, _ = run_on(CUDA, Lamb, {**config, "stash_update": stash}, "fused", h, steps=20)
    b, _ = run_on(CUDA, Lamb, {**config, "stash_update": not stash}, "fused", h, steps=20)
    assert h.max_abs_diff(a, b) == 0.0


@pytest.fixture
def launch_limits(fused_cuda):
    """Sets the kernels' launch-table sizes for one test; returns the compiled maxima."""
    yield fused_cuda.set_cuda_launch_limits
    fused_cuda.set_cuda_launch_limits()


def boundary_shapes(max_tensors: int, max_blocks: int, max_reduce: int) -> list[tuple[int, ...]]:
    """Shapes that cross every multi-tensor-apply limit: one tensor cut across launches,
    chunk edges, more tensors than a launch or a reduce launch takes, empty and scalar."""
    chunk = 65536
    return [(max_blocks * chunk + 1000,), (chunk,), (chunk + 1,), (0,), *[(chunk - 1,)] * (max_tensors + 6),
            *[(3,)] * (max_reduce + 7), ()]


@pytest.mark.parametrize("limits", ["small", "compiled"])
@pytest.mark.parametrize("cls,name", [(Lamb, "paper_clip"), (Lars, "nesterov")])
def test_launch_boundaries(cls, name, limits, h, launch_limits):
    maxima = launch_limits()
    if limits == "small":  # every tensor of a few chunks crosses a launch
        launch_limits(5, 7, 9)
        shapes = boundary_shapes(5, 7, 9)
    else:  # the compiled sizes (about 100M elements in one tensor on CUDA 12.1+)
        shapes = boundary_shapes(*maxima)
    config = h.config_of(cls, name)
    start = h.make_params(shapes=shapes)
    want, _ = run_on(CUDA, cls, config, "reference", h, steps=3, shapes=shapes)
    got, _ = run_on(CUDA, cls, config, "fused", h, steps=3, shapes=shapes)
    for i, (a, b, s) in enumerate(zip(want, got, start)):
        if a.numel():
            assert not a.equal(s), f"tensor {i} did not move"
            assert (a - b).abs().max().item() <= 1e-6, f"tensor {i} of shape {tuple(a.shape)}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,name", [(Lamb, "paper"), (Lars, "plain")])
def test_low_precision_on_cuda(dtype, cls, name, h, fused_cuda, fused_cpu):
    """bf16/fp16 parameters: fp32 state, and the CUDA kernels equal the CPU twin up to one rounding."""
    config = h.config_of(cls, name)
    cpu, _ = run_on("cpu", cls, config, "fused", h, steps=10, dtype=dtype)
    gpu, opt = run_on(CUDA, cls, config, "fused", h, steps=10, dtype=dtype)
    for state in opt.state.values():
        assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in state.values())
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for a, b in zip(cpu, gpu):
        if a.numel():
            assert ((a.float() - b.float()).abs() <= ulp * a.float().abs().clamp(min=1.0) + 1e-6).all()


@pytest.mark.parametrize("cls,name", [(Lamb, "paper_clip"), (Lamb, "decoupled"), (Lars, "nesterov")])
def test_step_never_waits_for_the_gpu(cls, name, h, fused_cuda):
    """Step count, lr and the clip divisor are read on the device: no host sync in step()."""
    config = h.config_of(cls, name)
    params = [p.detach().cuda().requires_grad_() for p in h.make_params()]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = cls(params, impl="fused", **config)
    opt.step()  # creates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("cls,name", [(Lamb, "paper_clip"), (Lars, "plain")])
def test_step_replays_from_a_cuda_graph(cls, name, h, fused_cuda):
    """Captured once, replayed with new gradients: the same parameters as eager steps."""
    config = h.config_of(cls, name)
    start = h.make_params()
    eager, _ = run_on(CUDA, cls, config, "fused", h, steps=8)

    params = [p.detach().cuda().requires_grad_() for p in start]
    grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt = cls(params, impl="fused", **config)

    def load_grads(t):
        for g, new in zip(grads, h.make_grads(start, t)):
            g.copy_(new)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps (state creation) outside the capture
        for t in range(2):
            load_grads(t)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for t in range(2, 8):
        load_grads(t)
        graph.replay()
    torch.cuda.synchronize()
    assert h.max_abs_diff(eager, [p.detach().cpu() for p in params]) == 0.0


def test_resume_on_cuda_is_exact(h, fused_cuda):
    config = h.LAMB_CONFIGS["paper"]
    whole, _ = run_on(CUDA, Lamb, config, "fused", h, steps=12)
    start = h.make_params()
    params = [p.detach().cuda().requires_grad_() for p in start]
    opt = Lamb(params, impl="fused", **config)
    for t in range(12):
        if t == 5:  # save, rebuild from the saved tensors, go on
            saved = opt.state_dict()
            params = [p.detach().clone().requires_grad_() for p in params]
            opt = Lamb(params, impl="fused", **config)
            opt.load_state_dict(saved)
        for p, g in zip(params, h.make_grads(start, t)):
            p.grad = g.cuda()
        opt.step()
    assert h.max_abs_diff(whole, [p.detach().cpu() for p in params]) == 0.0


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "compute-sanitizer").exists():
            return str(Path(root) / "bin" / "compute-sanitizer")
    return None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_kernels_pass_compute_sanitizer(tool, fused_cuda):
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "3", "--target-processes", "all", sys.executable, str(JOB)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert "kernels: ok" in proc.stdout, tail


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_gpu_run_with_the_plugin(precision, fused_cuda, monkeypatch, tmp_path):
    """The YAML-level user path on a GPU: Lightning, BatchKitCallback, the `lamb` plugin; the
    fused CUDA kernels do the steps and the model learns."""
    from batchkit import BatchKitCallback
    from batchkit_lamb_lars.plugin import LambPlugin
    from lightning.pytorch import LightningModule, Trainer

    calls = []
    real_lamb = fused_cuda.lamb
    monkeypatch.setattr(fused_cuda, "lamb", lambda *a, **k: (calls.append(a[1][0].device), real_lamb(*a, **k))[1])

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=gen)
    y = (x @ torch.randn(32, generator=gen) > 0).long()  # a linear teacher
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True)

    class Classifier(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(),
                                           torch.nn.Linear(64, 2))
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.losses.append(loss.detach())
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            # the state as training uses it (Lightning moves it to the CPU at teardown)
            opt = self.trainer.optimizers[0]
            opt = getattr(opt, "optimizer", opt)
            self.state_kinds = {(v.dtype, v.device.type) for s in opt.state.values() for v in s.values()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)  # the plugin swaps in LAMB with this lr

    model = Classifier()
    trainer = Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=4, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[BatchKitCallback([LambPlugin(weight_decay=0.01)])])
    trainer.fit(model, loader)

    opt = trainer.optimizers[0]
    opt = getattr(opt, "optimizer", opt)
    assert isinstance(opt, Lamb)
    assert calls and all(d.type == "cuda" for d in calls), "the fused CUDA kernels did not run"
    assert model.state_kinds == {(torch.float32, "cuda")}
    first, last = torch.stack(model.losses[:8]).mean().item(), torch.stack(model.losses[-8:]).mean().item()
    assert last < 0.5 * first, (first, last)
