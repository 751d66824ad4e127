"""Lightning + DeepSpeed with gradient accumulation: one optimizer step equals the DDP step.

Lightning divides each micro-batch loss by ``accumulate_grad_batches`` and DeepSpeed's
``engine.backward`` divides it again unless told ``scale_wrt_gas=False``
(batchkit/deepspeed_compat.py). The 2-process tests run every case of tests/ds_accumulation_job.py
in one torchrun launch and compare each SGD update with the single-process update on the same
global batch, computed here in float64. The other tests check the correction's decisions on
stand-ins, without processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from batchkit import deepspeed_compat

JOB = Path(__file__).parent / "ds_accumulation_job.py"


def _job_module():
    spec = importlib.util.spec_from_file_location("ds_accumulation_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_accumulation")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop(deepspeed_compat.ENV_VAR, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(JOB), str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=out,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return types.SimpleNamespace(updates=json.loads((out / "updates.json").read_text()),
                                 log=(out / "log0.txt").read_text(), module=_job_module())


def single_process_step(job, case: dict) -> dict[str, torch.Tensor]:
    """SGD on the mean loss of the whole global batch (both ranks, all micro-batches), in float64."""
    x, y = (t.double() for t in job.module.dataset(case["accumulate"]).tensors)
    w = torch.tensor(case["before"]["layer.weight"], dtype=torch.float64).reshape(1, 4).requires_grad_()
    b = torch.tensor(case["before"]["layer.bias"], dtype=torch.float64).requires_grad_()
    torch.nn.functional.mse_loss(x @ w.T + b, y).backward()
    return {"layer.weight": (w - job.module.LR * w.grad).detach().reshape(-1),
            "layer.bias": (b - job.module.LR * b.grad).detach()}


def _diff(case: dict, expected: dict[str, torch.Tensor]) -> float:
    return max((torch.tensor(case["after"][k], dtype=torch.float64) - v).abs().max().item()
               for k, v in expected.items())


def _scaled(case: dict, expected: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """The update ``factor`` times as large as ``expected``'s."""
    return {k: torch.tensor(case["before"][k], dtype=torch.float64)
            + factor * (v - torch.tensor(case["before"][k], dtype=torch.float64)) for k, v in expected.items()}


@pytest.mark.multiprocess
@pytest.mark.parametrize("accumulate", [1, 2, 4])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_cpu_deepspeed_update_equals_single_process(job, stage, accumulate):
    case = job.updates[f"deepspeed_stage{stage}_n{accumulate}"]
    expected = single_process_step(job, case)
    assert _diff(case, _scaled(case, expected, 0.0)) > 1e-2  # the step moved the weights
    assert _diff(case, expected) <= 1e-6
    if accumulate > 1:  # what both divisions give is far outside the tolerance
        assert _diff(case, _scaled(case, expected, 1 / accumulate)) > 1e-3


@pytest.mark.multiprocess
def test_lightning_deepspeed_alone_divides_twice(job):
    """The bug itself, on the installed Lightning and DeepSpeed: 1/N of the single-process update.
    (If this starts failing, upstream changed and the correction must be revisited.)"""
    case = job.updates["uncorrected_stage2_n4"]
    assert _diff(case, _scaled(case, single_process_step(job, case), 1 / 4)) <= 1e-6


@pytest.mark.multiprocess
def test_the_callback_corrects_lightnings_deepspeed_strategy(job):
    case = job.updates["callback_stage2_n4"]
    assert _diff(case, single_process_step(job, case)) <= 1e-6


@pytest.mark.multiprocess
def test_opt_out_keeps_lightnings_behaviour(job):
    case = job.updates["opted_out_stage2_n2"]
    assert _diff(case, _scaled(case, single_process_step(job, case), 1 / 2)) <= 1e-6


@pytest.mark.multiprocess
def test_ddp_equals_single_process(job):
    case = job.updates["ddp_n4"]
    assert _diff(case, single_process_step(job, case)) <= 1e-6


@pytest.mark.multiprocess
def test_the_correction_is_logged_once(job):
    assert job.log.count("calling engine.backward with scale_wrt_gas=False") == 1
    assert deepspeed_compat.ENV_VAR in job.log


# ---------------------------------------------------------------- decisions, without processes
@pytest.fixture
def fresh(monkeypatch):
    """The module's once-per-process flags reset for one test."""
    monkeypatch.setattr(deepspeed_compat, "_logged", False)
    monkeypatch.setattr(deepspeed_compat, "_verified", False)
    monkeypatch.setattr(deepspeed_compat, "_warned", set())
    monkeypatch.delenv(deepspeed_compat.ENV_VAR, raising=False)
    return deepspeed_compat


class FakeEngine:
    """Records backward calls; divides by the accumulation count unless told not to, or always
    (``ignores_flag``: a DeepSpeed that takes the argument and does not honour it)."""

    def __init__(self, steps: int, ignores_flag: bool = False) -> None:
        self.steps, self.ignores_flag, self.calls = steps, ignores_flag, []

    def gradient_accumulation_steps(self) -> int:
        return self.steps

    def backward(self, loss, retain_graph=False, scale_wrt_gas=True):
        self.calls.append(scale_wrt_gas)
        return loss / self.steps if (scale_wrt_gas or self.ignores_flag) else loss


def fake_strategy(engine: FakeEngine, automatic: bool = True):
    strategy = types.SimpleNamespace(lightning_module=types.SimpleNamespace(automatic_optimization=automatic),
                                     deepspeed_engine=engine)

    def backward(closure_loss, optimizer, *args, **kwargs):  # what Lightning's chain ends in
        return engine.backward(closure_loss, *args, **kwargs)

    return strategy, backward


def test_installed_deepspeed_takes_scale_wrt_gas_through_its_nvtx_wrapper(fresh):
    pytest.importorskip("deepspeed")
    assert fresh.engine_accepts_scale_wrt_gas()

    def inner(loss, retain_graph=False):
        return loss

    def wrapper(*args, **kwargs):  # like deepspeed's instrument_w_nvtx: no functools.wraps
        return inner(*args, **kwargs)

    assert fresh._parameters(wrapper) == {"loss", "retain_graph"}


def test_automatic_optimization_passes_scale_wrt_gas_false_and_logs_once(fresh, caplog):
    engine = FakeEngine(steps=4)
    strategy, backward = fake_strategy(engine)
    loss = torch.tensor(2.0)
    with caplog.at_level("INFO"):
        for _ in range(3):
            fresh.corrected_backward(strategy, backward, loss, None)
    assert engine.calls == [False, False, False]
    assert sum("scale_wrt_gas=False" in r.getMessage() for r in caplog.records) == 1


def test_manual_optimization_and_the_opt_out_are_left_alone(fresh, monkeypatch):
    engine = FakeEngine(steps=1)
    strategy, backward = fake_strategy(engine, automatic=False)
    fresh.corrected_backward(strategy, backward, torch.tensor(1.0), None)
    monkeypatch.setenv(fresh.ENV_VAR, "0")
    strategy, backward = fake_strategy(engine, automatic=True)
    fresh.corrected_backward(strategy, backward, torch.tensor(1.0), None)
    assert engine.calls == [True, True]


def test_a_deepspeed_without_the_argument_gets_nothing_and_a_warning(fresh, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setattr(fresh, "engine_accepts_scale_wrt_gas", lambda: False)
    engine = FakeEngine(steps=2)
    strategy, backward = fake_strategy(engine)
    with pytest.warns(RuntimeWarning, match="has no scale_wrt_gas argument"):
        fresh.corrected_backward(strategy, backward, torch.tensor(1.0), None)
    assert engine.calls == [True]


def test_a_deepspeed_that_ignores_the_argument_is_reported(fresh):
    pytest.importorskip("deepspeed")
    engine = FakeEngine(steps=2, ignores_flag=True)
    strategy, backward = fake_strategy(engine)
    with pytest.warns(RuntimeWarning, match="still divided the loss"):
        fresh.corrected_backward(strategy, backward, torch.tensor(3.0), None)
    assert "backward" not in vars(engine)  # the probe is gone after the first call
    honest = FakeEngine(steps=2)
    strategy, backward = fake_strategy(honest)
    fresh._verified = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.corrected_backward(strategy, backward, torch.tensor(3.0), None)


def test_the_callback_patches_only_deepspeed_strategies_that_do_not_correct(fresh):
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DDPStrategy

    from batchkit.lightning import CPUDeepSpeedStrategy

    job = _job_module()
    assert fresh.backward_for(CPUDeepSpeedStrategy(stage=2)) is None  # corrects itself
    assert fresh.backward_for(DDPStrategy()) is None
    assert callable(fresh.backward_for(job.UncorrectedDeepSpeed(stage=2)))


@pytest.mark.multiprocess
def test_the_documented_reproduction_reproduces(tmp_path):
    """docs/config.md's standalone script (no batchkit) still shows the upstream bug: 0.5 at N = 2."""
    pytest.importorskip("deepspeed")
    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    block = text.split("<!-- deepspeed-accumulation-repro", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "batchkit" not in block
    script = tmp_path / "repro.py"
    script.write_text(block)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "DeepSpeed update / plain update = 0.5000" in proc.stdout
