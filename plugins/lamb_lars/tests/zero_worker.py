"""2-process DeepSpeed ZeRO run on CPU (gloo) for test_zero.py; also computes the single-process
reference. Run as a script:  python zero_worker.py OUT_DIR SCENARIO [SCENARIO ...]

Each scenario trains the same small model for STEPS steps on a fixed global batch split over
the ranks and saves the final parameters (rank 0) to OUT_DIR/<scenario>.pt. The model's sizes
are odd on purpose, so ZeRO's equal-size flat shards cut parameters in the middle.
"""

from __future__ import annotations

import json
import os
import socket
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
from batchkit.testing import exit_rank_job

STEPS = 20
GLOBAL_BATCH = 8
WORLD = 2

SCENARIOS = {
    # name: (optimizer, kwargs, use layer-wise groups, zero stage, zero_aware)
    "lamb_groups": ("lamb", dict(lr=2e-2, weight_decay=0.01), True, 2, True),
    "lamb_clip_one_group": ("lamb", dict(lr=2e-2, weight_decay=0.01, max_grad_norm=0.05), False, 2, True),
    "lars_groups": ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coeff=0.02), True, 2, True),
    "lamb_stage1": ("lamb", dict(lr=2e-2, weight_decay=0.01), True, 1, True),
    "lamb_stage3": ("lamb", dict(lr=2e-2, weight_decay=0.01), True, 3, True),
    "lars_stage3": ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coeff=0.02), True, 3, True),
    "lamb_stage3_shard_local": ("lamb", dict(lr=2e-2, weight_decay=0.01), True, 3, False),
    "lamb_shard_local": ("lamb", dict(lr=2e-2, weight_decay=0.01), True, 2, False),
    "lars_shard_local": ("lars", dict(lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coeff=0.02), True, 2, False),
}


def build_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 37),
        torch.nn.LayerNorm(37),
        torch.nn.Tanh(),
        torch.nn.Linear(37, 29),
        torch.nn.Tanh(),
        torch.nn.Linear(29, 3),
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 13, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen)


def build_optimizer(model, name, kwargs, groups, impl, zero_aware=True):
    from batchkit_lamb_lars import Lamb, Lars, layerwise_param_groups

    params = layerwise_param_groups(model, weight_decay=kwargs.get("weight_decay", 0.0)) if groups else model.parameters()
    cls = Lamb if name == "lamb" else Lars
    return cls(params, impl=impl, zero_aware=zero_aware, **kwargs)


def single_process(scenario: str, impl: str) -> dict[str, torch.Tensor]:
    name, kwargs, groups, _, _ = SCENARIOS[scenario]
    model = build_model()
    opt = build_optimizer(model, name, kwargs, groups, impl)
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str, scenarios: list[str], impl: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for scenario in scenarios:
        name, kwargs, groups, stage, zero_aware = SCENARIOS[scenario]
        model = build_model()
        opt = build_optimizer(model, name, kwargs, groups, impl, zero_aware)
        config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            # DeepSpeed 0.19 clips at 1.0 unless told otherwise; the reference run does not clip.
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        per_rank = GLOBAL_BATCH // WORLD
        for step in range(STEPS):
            x, y = batch(step)
            x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        # ZeRO-3 keeps only partitions on each rank: gather the whole parameters (every rank joins)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{scenario}.pt"))
            torch.save(single_process(scenario, impl), os.path.join(out_dir, f"{scenario}.single.pt"))
        engine.destroy()
        torch.distributed.barrier()
    exit_rank_job()  # everything is saved: see batchkit.testing.exit_rank_job


def main() -> None:
    out_dir, impl, scenarios = sys.argv[1], sys.argv[2], sys.argv[3:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, out_dir, scenarios, impl), nprocs=WORLD, join=True)
    with open(os.path.join(out_dir, "done.json"), "w") as f:
        json.dump(scenarios, f)


if __name__ == "__main__":
    main()
