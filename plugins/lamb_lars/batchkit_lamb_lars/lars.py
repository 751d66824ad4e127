"""LARS: You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks".

Per layer l with weights w and gradient grad (paper symbols: eta trust coefficient,
beta weight decay, m momentum, gamma global lr)::

    local_lr = eta * ||w|| / (||grad|| + beta * ||w|| + eps)      (1 if a norm is 0)
    d        = local_lr * (grad + beta * w)

then one of two momentum forms (``momentum_form``)::

    "sgd"   (default; torch.optim.SGD, timm, apex LARC)    "paper"  (Algorithm 1)
    buf = d (first step) | m * buf + (1 - dampening) * d    v = gamma d (first step) | m v + (1 - dampening) * gamma d
    w  <- w - gamma * (d + m * buf if nesterov else buf)    w <- w - (gamma d + m v if nesterov else v)

They agree while gamma is constant. Under a schedule the paper's buffer keeps each step's own
gamma, while the SGD form rescales the whole remembered history by the current gamma.
``trust_clip`` is LARC's clip mode: local_lr <- min(local_lr / gamma, 1), applied only where both
norms are nonzero (apex LARC); the fallback ratio 1 of a zero-norm tensor is never clipped.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._core import Batch, LayerwiseOptimizer, check_lr, check_nonneg, check_positive, check_real

MOMENTUM_FORMS = ("sgd", "paper")


class Lars(LayerwiseOptimizer):
    """LARS with fp32 momentum, per-parameter steps and three interchangeable paths.

    Args:
        params: parameters or param-group dicts (options below may be set per group).
        lr: global learning rate gamma (>= 0).
        momentum: m in [0, 1); 0 keeps no buffer.
        dampening: in [0, 1], as torch.optim.SGD.
        weight_decay: beta (>= 0), added to the gradient and to the ratio's denominator.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        trust_coeff: eta (> 0), 0.001 in the paper.
        eps: added to the ratio's denominator (>= 0).
        trust_clip: LARC clip mode: local_lr <- min(local_lr / lr, 1) where both norms are
            nonzero (apex LARC); zero-norm tensors keep ratio 1, unclipped.
        momentum_form: ``"sgd"`` (lr outside the momentum buffer, as torch.optim.SGD and timm)
            or ``"paper"`` (lr inside it, You et al. Algorithm 1: v = m v + lr * local_lr * (g + beta w),
            w <- w - v). Equal at a constant lr; they differ under warm-up and decay. The
            buffer means different things in the two forms: do not switch forms mid-run.
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
        momentum_form: Literal["sgd", "paper"] = "sgd",
    ):
        if max_grad_norm is not None:
            max_grad_norm = check_nonneg("Lars", "max_grad_norm", max_grad_norm,
                                         " Use None (or 0) to disable clipping.")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, adapt=adapt,
            max_grad_norm=max_grad_norm, impl=impl, momentum_form=momentum_form,
        )
        super().__init__(params, defaults, zero_aware=zero_aware)

    def _validate_group(self, group: dict) -> None:
        owner = "Lars"
        group["lr"] = check_lr(owner, group["lr"])
        # momentum 1 never forgets (the step grows without bound); dampening 1 ignores new gradients
        group["momentum"] = check_real(owner, "momentum", group["momentum"], high=1.0, high_open=True,
                                       hint=" Use e.g. momentum=0.9 (0 = no momentum).")
        group["dampening"] = check_real(owner, "dampening", group["dampening"], high=1.0,
                                        hint=" Use dampening=0 (torch.optim.SGD's default).")
        group["weight_decay"] = check_nonneg(owner, "weight_decay", group["weight_decay"])
        group["trust_coeff"] = check_positive(owner, "trust_coeff", group["trust_coeff"],
                                              " The paper uses trust_coeff=0.001.")
        group["eps"] = check_nonneg(owner, "eps", group["eps"], " Use e.g. eps=1e-8.")
        if group.get("momentum_form", "sgd") not in MOMENTUM_FORMS:
            raise ValueError(
                f"Lars: momentum_form={group['momentum_form']!r}; choose 'sgd' (lr outside the momentum "
                "buffer, torch.optim.SGD) or 'paper' (lr inside it, You et al. 2017)."
            )
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
    """eta ||w|| / (||grad|| + beta ||w|| + eps) from squared norms ``sq`` [n, 2], LARC-clipped
    if asked; 1 (never clipped: apex LARC) where a norm is 0."""
    if not group["adapt"]:
        return torch.ones(sq.shape[0], dtype=torch.float32, device=sq.device)
    w_norm, g_norm = sq[:, 0].sqrt(), sq[:, 1].sqrt()
    ratio = group["trust_coeff"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
    if group["trust_clip"]:
        ratio = (ratio / lr).clamp(max=1.0)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _scaled_grads(batch: Batch, clip: Tensor | None) -> list[Tensor]:
    grads = [g.float() for g in batch.grads]  # copies for bf16/fp16; aliases for fp32 (never written)
    if clip is not None:
        grads = torch._foreach_div(grads, clip)
    return grads


# ---------------------------------------------------------------- reference path
def _lars_reference(batch: Batch, group: dict, clip: Tensor | None, opt: Lars) -> None:
    eta_global, mu, beta = group["lr"], group["momentum"], group["weight_decay"]
    damp, nesterov = group["dampening"], group["nesterov"]
    paper = group.get("momentum_form", "sgd") == "paper"
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
        if paper:
            d = eta_global * d  # gamma_t lambda^l (...): the paper keeps gamma_t inside v
        if mu != 0:
            buf = batch.state["momentum_buffer"][i]
            if batch.first[i]:
                buf.copy_(d)
            else:
                buf.mul_(mu).add_(d, alpha=1.0 - damp)  # v^l <- m v^l + [gamma_t] lambda^l (...)
            d = d + mu * buf if nesterov else buf
        if paper:
            w.copy_(w_t - d)  # w^l <- w^l - v^l
        else:
            w.copy_(w_t - eta_global * d)  # w^l <- w^l - gamma v^l


# ---------------------------------------------------------------- foreach path
def _lars_foreach(batch: Batch, group: dict, clip: Tensor | None, opt: Lars) -> None:
    lr, mu, beta = group["lr"], group["momentum"], group["weight_decay"]
    damp, nesterov = group["dampening"], group["nesterov"]
    paper = group.get("momentum_form", "sgd") == "paper"
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
    if paper:  # gamma_t inside the buffer
        torch._foreach_mul_(d, lr)
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
    if paper:
        step = torch._foreach_neg(d)
    else:
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
        lr_in_buffer=int(group.get("momentum_form", "sgd") == "paper"),
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
