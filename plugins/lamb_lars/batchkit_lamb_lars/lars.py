"""LARS: You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks".

Per layer l with weights w and gradient grad (paper symbols: eta trust coefficient,
beta weight decay, m momentum, gamma global lr)::

    local_lr = eta * ||w|| / (||grad|| + beta * ||w|| + eps)      (1 if a norm is 0)
    d        = local_lr * (grad + beta * w)
    buf      = d (first step) | m * buf + (1 - dampening) * d
    w        <- w - gamma * (d + m * buf if nesterov else buf)

This is the torch.optim.SGD ordering (gamma outside the buffer), as timm and apex's LARC;
the paper's ``v = m v + gamma * local_lr * (...)`` is the same update at a constant gamma.
``trust_clip`` is LARC's clip mode: local_lr <- min(local_lr / gamma, 1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._core import Batch, LayerwiseOptimizer, check_lr, check_nonneg, check_positive


class Lars(LayerwiseOptimizer):
    """LARS with fp32 momentum, per-parameter steps and three interchangeable paths.

    Args:
        params: parameters or param-group dicts (options below may be set per group).
        lr: global learning rate gamma (>= 0).
        momentum: m (>= 0); 0 keeps no buffer.
        dampening: as torch.optim.SGD.
        weight_decay: beta (>= 0), added to the gradient and to the ratio's denominator.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        trust_coeff: eta (> 0), 0.001 in the paper.
        eps: added to the ratio's denominator (>= 0).
        trust_clip: LARC clip mode, local_lr <= 1 relative to lr.
        adapt: apply the local lr (False: plain SGD for the group; see
            :func:`~batchkit_lamb_lars.layerwise_param_groups`).
        impl, zero_aware: as :class:`~batchkit_lamb_lars.Lamb`.
        max_grad_norm: optional global gradient-norm clipping before the step (None = off).
    """

    state_names = ("momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        adapt: bool = True,
        max_grad_norm: float | None = None,
        impl: Literal["auto", "reference", "foreach", "fused"] = "auto",
        zero_aware: bool = True,
    ):
        if max_grad_norm is not None:
            check_nonneg("Lars", "max_grad_norm", max_grad_norm, " Use None (or 0) to disable clipping.")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, adapt=adapt,
            max_grad_norm=max_grad_norm, impl=impl,
        )
        super().__init__(params, defaults, zero_aware=zero_aware)

    def _validate_group(self, group: dict) -> None:
        owner = "Lars"
        check_lr(owner, group["lr"])
        check_nonneg(owner, "momentum", group["momentum"], " Use e.g. momentum=0.9.")
        check_nonneg(owner, "dampening", group["dampening"])
        check_nonneg(owner, "weight_decay", group["weight_decay"])
        check_positive(owner, "trust_coeff", group["trust_coeff"], " The paper uses trust_coeff=0.001.")
        check_nonneg(owner, "eps", group["eps"], " Use e.g. eps=1e-8.")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Lars: nesterov=True needs momentum > 0 and dampening=0.")
        if group["trust_clip"] and not (float(group["lr"]) > 0):
            raise ValueError("Lars: trust_clip=True divides by lr, so lr must be > 0.")

    def _needs_state(self, name: str, group: dict) -> bool:
        return group["momentum"] != 0

    def _run(self, batch: Batch, group: dict, clip: Tensor | None, impl: str) -> None:
        if group["momentum"] != 0:  # momentum switched on after the state was created
            bufs = batch.state["momentum_buffer"]
            for i, (p, buf) in enumerate(zip(batch.params, bufs)):
                if buf is None:
                    bufs[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    batch.first[i] = True
        {"reference": _lars_reference, "foreach": _lars_foreach, "fused": _lars_fused}[impl](
            batch, group, clip, self
        )


def lars_trust_ratios(sq: Tensor, lr, group: dict) -> Tensor:
    """eta ||w|| / (||grad|| + beta ||w|| + eps) from squared norms ``sq`` [n, 2]; 1 on zero norms."""
    if not group["adapt"]:
        return torch.ones(sq.shape[0], dtype=torch.float32, device=sq.device)
    w_norm, g_norm = sq[:, 0].sqrt(), sq[:, 1].sqrt()
    ratio = group["trust_coeff"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
    ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
    if group["trust_clip"]:
        ratio = (ratio / lr).clamp(max=1.0)
    return ratio


def _scaled_grads(batch: Batch, clip: Tensor | None) -> list[Tensor]:
    grads = [g.float() for g in batch.grads]  # copies for bf16/fp16; aliases for fp32 (never written)
    if clip is not None:
        grads = torch._foreach_div(grads, clip)
    return grads


# ---------------------------------------------------------------- reference path
def _lars_reference(batch: Batch, group: dict, clip: Tensor | None, opt: Lars) -> None:
    eta_global, mu, beta = group["lr"], group["momentum"], group["weight_decay"]
    damp, nesterov = group["dampening"], group["nesterov"]
    n = len(batch)
    device = batch.params[0].device if n else opt._device()
    grads = _scaled_grads(batch, clip)

    sq = torch.zeros(n, 2, dtype=torch.float32, device=device)
    for i, (w, grad) in enumerate(zip(batch.params, grads)):
        sq[i, 0] = w.float().square().sum()  # ||w^l||^2
        sq[i, 1] = grad.square().sum()  # ||grad L(w^l)||^2
    if batch.reduce is not None:
        sq = batch.reduce(sq)  # whole-layer norms across ZeRO shards
    local_lr = lars_trust_ratios(sq, eta_global, group)  # lambda^l

    for i, (w, grad) in enumerate(zip(batch.params, grads)):
        w_t = w.float()
        d = local_lr[i] * (grad + beta * w_t)  # lambda^l (grad L(w^l) + beta w^l)
        if mu != 0:
            buf = batch.state["momentum_buffer"][i]
            if batch.first[i]:
                buf.copy_(d)
            else:
                buf.mul_(mu).add_(d, alpha=1.0 - damp)  # v^l <- m v^l + lambda^l (...)
            d = d + mu * buf if nesterov else buf
        w.copy_(w_t - eta_global * d)  # w^l <- w^l - gamma v^l


# ---------------------------------------------------------------- foreach path
def _lars_foreach(batch: Batch, group: dict, clip: Tensor | None, opt: Lars) -> None:
    lr, mu, beta = group["lr"], group["momentum"], group["weight_decay"]
    damp, nesterov = group["dampening"], group["nesterov"]
    n = len(batch)
    device = batch.params[0].device if n else opt._device()
    if n == 0:
        if batch.reduce is not None:
            batch.reduce(torch.zeros(0, 2, dtype=torch.float32, device=device))
        return
    params = batch.params
    low_precision = params[0].dtype != torch.float32
    x32 = [p.float() for p in params] if low_precision else params
    grads = _scaled_grads(batch, clip)

    sq = torch.stack([torch.stack(torch._foreach_norm(x32)), torch.stack(torch._foreach_norm(grads))], dim=1).float().square()
    if batch.reduce is not None:
        sq = batch.reduce(sq)
    ratio = lars_trust_ratios(sq, lr, group)

    d = torch._foreach_add(grads, x32, alpha=beta) if beta != 0 else torch._foreach_mul(grads, 1.0)
    torch._foreach_mul_(d, list(ratio.unbind()))
    if mu != 0:
        bufs = batch.state["momentum_buffer"]
        fresh = [i for i in range(n) if batch.first[i]]
        old = [i for i in range(n) if not batch.first[i]]
        if fresh:
            torch._foreach_copy_([bufs[i] for i in fresh], [d[i] for i in fresh])
        if old:
            old_bufs = [bufs[i] for i in old]
            torch._foreach_mul_(old_bufs, mu)
            torch._foreach_add_(old_bufs, [d[i] for i in old], alpha=1.0 - damp)
        if nesterov:
            torch._foreach_add_(d, bufs, alpha=mu)
        else:
            d = bufs
    step = torch._foreach_mul(d, -lr) if torch.is_tensor(lr) else None
    if step is not None:
        torch._foreach_add_(x32, step)
    else:
        torch._foreach_add_(x32, d, alpha=-lr)
    if low_precision:
        torch._foreach_copy_(params, x32)


# ---------------------------------------------------------------- fused path
def lars_hyper(group: dict):
    from batchkit_cuda_ext import LarsHyper

    return LarsHyper(
        momentum=group["momentum"], dampening=group["dampening"], weight_decay=group["weight_decay"],
        trust_coeff=group["trust_coeff"], eps=group["eps"], nesterov=int(bool(group["nesterov"])),
        trust_clip=int(bool(group["trust_clip"])), adapt=int(bool(group["adapt"])),
    )


def _lars_fused(batch: Batch, group: dict, clip: Tensor | None, opt: Lars) -> None:
    import batchkit_cuda_ext as ext

    n = len(batch)
    device = batch.params[0].device if n else opt._device()
    grads = batch.grads
    if clip is not None:  # rare path: clipped copies (LARS has no moment pass to fold it into)
        grads = torch._foreach_div(list(grads), clip)
    sq = torch.zeros(n, 2, dtype=torch.float32, device=device)
    lr = opt._lr_tensor(group["lr"], device)
    bufs = batch.state["momentum_buffer"]
    args = (batch.params, grads, bufs, batch.steps, lars_hyper(group), lr)
    if batch.reduce is None:
        ext.lars(ext.BOTH, *args, check=False, sq=sq)
        return
    ext.lars(ext.PASS1, *args, check=False, sq=sq)
    sq = batch.reduce(sq).contiguous()
    ext.lars(ext.PASS2, *args, check=False, sq=sq)
