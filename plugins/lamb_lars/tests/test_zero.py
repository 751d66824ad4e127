"""Under DeepSpeed ZeRO-1/2/3 (2 CPU processes, gloo) trust ratios use whole-parameter norms:
20 steps equal the single-process run to 1e-5, for LAMB and LARS, and the same run with
shard-local norms (zero_aware=False, the naive behaviour) does not.

Tests marked ``multiprocess`` start 2 processes (about 15-25 s per run); the others check the
fragment layout in one process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent
FUSED_SCENARIOS = ["lamb_groups", "lamb_clip_one_group", "lars_groups", "lamb_stage1", "lamb_shard_local",
                   "lars_shard_local", "lamb_stage3", "lars_stage3", "lamb_stage3_shard_local"]
FOREACH_SCENARIOS = ["lamb_groups", "lars_groups"]


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], out: Path) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=420)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    out = {}
    for impl, scenarios in (("auto", FUSED_SCENARIOS), ("foreach", FOREACH_SCENARIOS)):
        folder = tmp_path_factory.mktemp(f"zero_{impl}")
        _run([sys.executable, str(HERE / "zero_worker.py"), str(folder), impl, *scenarios], folder)
        for s in scenarios:
            out[(impl, s)] = (torch.load(folder / f"{s}.pt"), torch.load(folder / f"{s}.single.pt"))
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "impl,scenario",
    [("auto", s) for s in FUSED_SCENARIOS if "shard_local" not in s] + [("foreach", s) for s in FOREACH_SCENARIOS],
)
def test_zero_matches_single_process(deepspeed_runs, impl, scenario):
    zero, single = deepspeed_runs[(impl, scenario)]
    assert _max_diff(zero, single) <= 1e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", ["lamb_shard_local", "lars_shard_local", "lamb_stage3_shard_local"])
def test_shard_local_norms_are_caught(deepspeed_runs, scenario):
    """The bug this guards against (DeepSpeed #490) is visible at the same tolerance."""
    zero, single = deepspeed_runs[("auto", scenario)]
    assert _max_diff(zero, single) > 1e-3


LIGHTNING_CASES = ["lamb_stage2_acc1", "lars_stage2_acc1", "lamb_stage2_acc2", "lars_stage2_acc2", "lamb_stage3_acc2"]


def _lightning_job():
    spec = importlib.util.spec_from_file_location("lightning_zero_job", HERE / "lightning_zero_job.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """Every Lightning case in one torchrun launch of 2 processes."""
    pytest.importorskip("batchkit.lightning")
    folder = tmp_path_factory.mktemp("lightning_zero")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(HERE / "lightning_zero_job.py"), str(folder), *LIGHTNING_CASES], folder)
    return {case: torch.load(folder / f"{case}.pt") for case in LIGHTNING_CASES}


def _single_process_plugin_run(job, name: str, accumulate: int, loss_scale: float = 1.0) -> dict:
    from batchkit_lamb_lars import Lamb, Lars, layerwise_param_groups

    model = job.build_model()
    options = job.PLUGIN_OPTIONS[name]
    cls = Lamb if name == "lamb" else Lars
    opt = cls(layerwise_param_groups(model, weight_decay=options["weight_decay"]),
              **{k: v for k, v in options.items() if k != "weight_decay"})
    for x, y in job.global_batches(accumulate):
        opt.zero_grad()
        (loss_scale * torch.nn.functional.mse_loss(model(x), y)).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", LIGHTNING_CASES)
def test_lightning_cpu_deepspeed_strategy_with_plugin(lightning_runs, case):
    """The plugin path end to end: Lightning + batchkit.CPUDeepSpeedStrategy, with and without
    gradient accumulation: the DeepSpeed run equals one process stepping on the same global batches."""
    job = _lightning_job()
    name, _, accumulate = job.parse_case(case)
    result = lightning_runs[case]
    assert result["optimizer_type"] == ("Lamb" if name == "lamb" else "Lars")
    assert _max_diff(result["params"], _single_process_plugin_run(job, name, accumulate)) <= 1e-5
    if accumulate > 1:
        # DeepSpeed's second division of the loss (batchkit/deepspeed_compat.py) would show:
        # even LAMB, nearly scale-invariant, moves 6e-4 away over these 10 steps
        halved = _single_process_plugin_run(job, name, accumulate, loss_scale=1 / accumulate)
        assert _max_diff(result["params"], halved) > 1e-4


def test_max_grad_norm_with_several_groups_under_zero_is_refused():
    """DeepSpeed shows one group's gradient shard at a time, so a global norm is not visible:
    the optimizer refuses instead of clipping by a partial norm."""
    from batchkit_lamb_lars import Lamb

    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))
    opt = Lamb([{"params": [a]}, {"params": [b]}], max_grad_norm=1.0)
    flat = torch.nn.Parameter(torch.ones(3))  # what a ZeRO wrapper puts in param_groups
    flat.grad = torch.ones(3)
    a._hp_mapping = None
    b._hp_mapping = None
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match="gradient_clipping"):
        opt.step()


def _fake_zero_flatten(opt, params, pad=3):
    """What DeepSpeed ZeRO-1/2 does to a 1-rank group: one flat fp32 shard (with tail padding)
    in param_groups, and an _hp_mapping with each parameter's fragment address on the params."""
    from types import SimpleNamespace

    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params] + [torch.zeros(pad)]))
    start = 0
    for p in params:
        address = SimpleNamespace(start=start, numel=p.numel())
        p._hp_mapping = SimpleNamespace(get_hp_fragment_address=lambda a=address: a)
        start += p.numel()
    opt.param_groups[0]["params"] = [flat]
    return flat


@pytest.mark.parametrize("cls", ["Lamb", "Lars"])
@pytest.mark.parametrize("impl", ["reference", "foreach", "fused"])
def test_flat_shard_layout_matches_unflattened_single_process(cls, impl):
    """Fragment views of a flat shard give exactly the per-parameter update (no DeepSpeed needed);
    treating the shard as one tensor (zero_aware=False) does not."""
    import batchkit_lamb_lars as lib

    opt_cls = getattr(lib, cls)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4,), (7,)]
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = {}
    for mode in ("plain", "zero", "naive"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in ref]
        opt = opt_cls(params, impl=impl, weight_decay=0.01, zero_aware=(mode != "naive"))
        flat = _fake_zero_flatten(opt, params) if mode != "plain" else None
        for step_grads in grads:
            if flat is None:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
            else:
                flat.grad = torch.cat([g.reshape(-1) for g in step_grads] + [torch.zeros(3)])
            opt.step()
        if flat is None:
            results[mode] = torch.cat([p.detach().reshape(-1) for p in params])
        else:
            assert flat.detach()[-3:].eq(0).all(), "padding must stay untouched"
            results[mode] = flat.detach()[:-3]
    assert (results["zero"] - results["plain"]).abs().max() < 1e-7
    assert (results["naive"] - results["plain"]).abs().max() > 1e-4


def test_zero_stage3_clipping_inside_the_optimizer_is_refused():
    """ZeRO-3 steps one sub-group at a time: no global gradient norm is visible to the optimizer."""
    from batchkit_lamb_lars import Lamb

    p = torch.nn.Parameter(torch.ones(4))
    p.ds_id = 0  # what ZeRO-3 puts on every parameter
    opt = Lamb([p], max_grad_norm=1.0)
    flat = torch.nn.Parameter(torch.ones(2))
    flat.grad = torch.ones(2)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(ValueError, match="stage 3.*gradient_clipping"):
        opt.step()


def test_zero_stage3_unknown_layout_is_refused():
    """A flat tensor that does not name the sub-group's parameters would get shard-level ratios."""
    from batchkit_lamb_lars import Lamb

    p = torch.nn.Parameter(torch.ones(4))
    p.ds_id = 0
    opt = Lamb([p])
    flat = torch.nn.Parameter(torch.ones(2))  # no ds_id: not a ZeRO-3 sub-group flat
    flat.grad = torch.ones(2)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="stage 3.*do not map"):
        opt.step()