"""Every fused CUDA kernel variant, two steps each, over tensors at multi-tensor-apply's limits.

Run under compute-sanitizer by test_cuda.py (memcheck: out-of-bounds and misaligned accesses;
racecheck: shared-memory races in the block reductions). Prints "kernels: ok" at the end.
"""

from __future__ import annotations

import warnings

import batchkit_cuda_ext
import torch
from batchkit_lamb_lars import Lamb, Lars

warnings.simplefilter("error")  # a fallback to the foreach path would check nothing
# Small launch tables, so that small tensors cross every boundary: one tensor over several
# launches, chunk edges, more tensors than a launch (5) or a reduce launch (9) takes, empty.
batchkit_cuda_ext.set_cuda_launch_limits(5, 7, 9)
SHAPES = [(7 * 65536 + 513,), (65537,), (0,), (5, 7), *[(257,)] * 8, *[(3,)] * 12, ()]

VARIANTS = [
    (Lamb, dict(weight_decay=0.01, max_grad_norm=1.0, stash_update=False)),
    (Lamb, dict(weight_decay=0.01, stash_update=True)),
    (Lamb, dict(weight_decay=0.05, weight_decay_mode="decoupled")),
    (Lamb, dict(weight_decay=0.01, weight_decay_mode="l2", bias_correction=False)),
    (Lars, dict(momentum=0.9, weight_decay=1e-4, nesterov=True)),
    (Lars, dict(momentum=0.0, weight_decay=1e-4, trust_clip=True)),
]

gen = torch.Generator(device="cuda").manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for cls, config in VARIANTS:
        params = [torch.randn(s, device="cuda", generator=gen).to(dtype).requires_grad_() for s in SHAPES]
        opt = cls(params, impl="fused", lr=1e-2, **config)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen).to(dtype)
            opt.step()
        torch.cuda.synchronize()
        assert all(torch.isfinite(p.float()).all() for p in params), (cls.__name__, config, dtype)
print("kernels: ok")
