"""LAMB: You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2.

Three paths compute the same update (tested to 1e-6 in fp32):

* ``reference``: one tensor at a time, written to read like the paper;
* ``foreach``: ``torch._foreach_*`` multi-tensor ops, per-tensor ratios as a stacked tensor;
* ``fused``: the two-pass kernels of ``batchkit_cuda_ext`` (CUDA, or the CPU/OpenMP twin).

Every path runs pass 1 (moments, squared norms of x and of the update direction), lets the
caller's reducer turn per-tensor squared norms into whole-parameter ones (ZeRO fragments),
then pass 2 (trust ratio and apply). None of them writes into ``p.grad``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ._core import Batch, LayerwiseOptimizer, as_pair, as_real, check_lr, check_nonneg, check_positive

WeightDecayMode = Literal["paper", "decoupled", "l2"]
_WD_MODES = ("paper", "decoupled", "l2")


class Lamb(LayerwiseOptimizer):
    r"""LAMB with apex-compatible options, fp32 state and three interchangeable paths.

    For each parameter (layer) :math:`x` with gradient :math:`g` at step :math:`t`
    (its own counter)::

        g  <- g / max(1, ||g_all|| / max_grad_norm)          (optional global clipping)
        m  <- beta1 m + beta3 g,  beta3 = 1 - beta1 (grad_averaging) or 1
        v  <- beta2 v + (1 - beta2) g^2
        r  <- m_hat / (sqrt(v_hat) + eps)                     (hats: bias correction, optional)
        u  <- r + weight_decay * x                            (weight_decay_mode="paper")
        x  <- x - lr * ratio * u,   ratio = clamp(phi(||x||) / ||u||, *trust_clamp)

    ``ratio`` is 1 where either norm is 0 and for groups with ``adapt=False`` (biases and norm
    weights, see :func:`~batchkit_lamb_lars.layerwise_param_groups`).

    Args:
        params: parameters or param-group dicts (any option below may be set per group).
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to sqrt(v_hat) (> 0). apex and timm use 1e-6.
        weight_decay: lambda (>= 0).
        weight_decay_mode: ``"paper"`` (u = r + lambda x, inside the trust ratio; apex
            ``adam_w_mode=True``, timm default), ``"decoupled"`` (AdamW style:
            x <- x (1 - lr lambda) outside the trust ratio; timm ``decoupled_decay``), or
            ``"l2"`` (g <- g + lambda x before the moments; apex ``adam_w_mode=False``).
        bias_correction: divide m, v by (1 - beta^t).
        grad_averaging: beta3 = 1 - beta1 (True) or 1 (False), as apex.
        max_grad_norm: clip by the global gradient norm before the moments; None or 0
            disables it (0 never zeroes gradients, unlike apex).
        adapt: apply the trust ratio (False: plain Adam step for the group).
        phi: (lower, upper) clamp of ||x||, the paper's scaling function phi; None = identity.
        trust_clamp: (lower, upper) clamp of the ratio; (0, 1) is LAMBC (timm ``trust_clip``),
            (0.01, 10) is DeepSpeed's min/max coefficient. None = unclamped.
        impl: ``"auto"`` (fused when batchkit-cuda-ext serves the device, else foreach),
            ``"reference"``, ``"foreach"`` or ``"fused"``.
        zero_aware: under DeepSpeed ZeRO-1/2, use whole-parameter norms (default). False
            reproduces the naive one-ratio-per-shard behaviour, for comparison only.
        stash_update: fused path only. True keeps the update direction u from pass 1 in a
            scratch buffer (4 more bytes of memory per parameter) so pass 2 reads x and u
            instead of recomputing u from x, m, v. Same bytes moved in total, fewer of them
            read, no second sqrt/division; results are bit-identical. None (default): on for
            CPU, where reads dominate the cost, off for CUDA, where it only costs memory.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        weight_decay_mode: WeightDecayMode = "paper",
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = None,
        adapt: bool = True,
        phi: tuple[float, float] | None = None,
        trust_clamp: tuple[float, float] | None = None,
        impl: Literal["auto", "reference", "foreach", "fused"] = "auto",
        zero_aware: bool = True,
        stash_update: bool | None = None,
    ):
        owner = "Lamb"
        if max_grad_norm is not None:
            max_grad_norm = check_nonneg(owner, "max_grad_norm", max_grad_norm, " Use None (or 0) to disable clipping.")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            weight_decay_mode=weight_decay_mode, bias_correction=bias_correction,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, adapt=adapt,
            phi=phi, trust_clamp=trust_clamp, impl=impl, stash_update=stash_update,
        )
        super().__init__(params, defaults, zero_aware=zero_aware)

    def _validate_group(self, group: dict) -> None:
        owner = "Lamb"
        group["lr"] = check_lr(owner, group["lr"])
        pair = as_pair(group["betas"])
        if pair is None:
            raise ValueError(
                f"{owner}: betas={group['betas']!r} must be a pair (beta1, beta2), e.g. betas=(0.9, 0.999)."
            )
        betas = []
        for i, beta in enumerate(pair):
            value = as_real(beta)
            if value is None or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"{owner}: betas[{i}]={beta!r} is outside [0, 1); use e.g. betas=(0.9, 0.999)."
                )
            betas.append(value)
        group["betas"] = tuple(betas)
        group["eps"] = check_positive(owner, "eps", group["eps"], " Use e.g. eps=1e-6 (apex, timm).")
        group["weight_decay"] = check_nonneg(owner, "weight_decay", group["weight_decay"])
        if group["weight_decay_mode"] not in _WD_MODES:
            raise ValueError(f"{owner}: weight_decay_mode={group['weight_decay_mode']!r}; choose one of {_WD_MODES}.")
        for name in ("phi", "trust_clamp"):
            bounds = group[name]
            if bounds is None:
                continue
            pair = as_pair(bounds)
            low, high = (as_real(b) for b in pair) if pair is not None else (None, None)
            if low is None or high is None or not 0.0 <= low <= high:
                raise ValueError(f"{owner}: {name}={bounds!r} must be None or (lower, upper) with 0 <= lower <= upper.")
            group[name] = (low, high)

    def _stash_views(self, params: list[Tensor], device: torch.device) -> list[Tensor]:
        """fp32 scratch shaped like ``params`` (flat views), kept across steps: reallocating
        hundreds of MB every step would cost page faults on CPU. Not part of the state."""
        key = (device, tuple(p.numel() for p in params))
        cache = self.__dict__.setdefault("_stash_cache", {})
        if key not in cache:
            flat = torch.empty(sum(key[1]), dtype=torch.float32, device=device)
            cache[key] = list(flat.split(list(key[1])))
        return cache[key]

    def _run(self, batch: Batch, group: dict, clip: Tensor | None, impl: str) -> None:
        {"reference": _lamb_reference, "foreach": _lamb_foreach, "fused": _lamb_fused}[impl](
            batch, group, clip, self
        )


# ---------------------------------------------------------------- shared per-tensor math
def _bounds(pair, default_lo=0.0, default_hi=math.inf) -> tuple[float, float]:
    return (default_lo, default_hi) if pair is None else (float(pair[0]), float(pair[1]))


def lamb_trust_ratios(sq: Tensor, lr, group: dict) -> Tensor:
    """ratio_i = clamp(phi(||x_i||) / ||u_i||) from squared norms ``sq`` [n, 2]; 1 on zero norms."""
    if not group["adapt"]:
        return torch.ones(sq.shape[0], dtype=torch.float32, device=sq.device)
    x_norm, u_norm = sq[:, 0].sqrt(), sq[:, 1].sqrt()
    if group["weight_decay_mode"] == "decoupled":  # x is shrunk before the ratio (timm order)
        x_norm = x_norm * abs(1.0 - lr * group["weight_decay"])
    phi_lo, phi_hi = _bounds(group["phi"])
    lo, hi = _bounds(group["trust_clamp"])
    ratio = (x_norm.clamp(phi_lo, phi_hi) / u_norm).clamp(lo, hi)
    return torch.where((x_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


def _bias_corrections(steps: list[Tensor], group: dict) -> tuple[Tensor, Tensor]:
    """(1 / (1 - beta1^t), 1 / sqrt(1 - beta2^t)) per tensor, in float64 then fp32."""
    n = len(steps)
    device = steps[0].device if steps else torch.device("cpu")
    if not group["bias_correction"] or n == 0:
        one = torch.ones(n, dtype=torch.float32, device=device)
        return one, one
    beta1, beta2 = group["betas"]
    t = torch.stack(steps).double()
    inv_bc1 = 1.0 / (1.0 - torch.pow(beta1, t))
    inv_sqrt_bc2 = 1.0 / (1.0 - torch.pow(beta2, t)).sqrt()
    return inv_bc1.float(), inv_sqrt_bc2.float()


# ---------------------------------------------------------------- reference path
def _lamb_reference(batch: Batch, group: dict, clip: Tensor | None, opt: Lamb) -> None:
    beta1, beta2 = group["betas"]
    beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
    eps, wd, mode, lr = group["eps"], group["weight_decay"], group["weight_decay_mode"], group["lr"]
    inv_bc1, inv_sqrt_bc2 = _bias_corrections(batch.steps, group)
    n = len(batch)
    device = batch.params[0].device if n else opt._device()

    # Pass 1, per layer i: moments and the update direction u_t^(i) = r_t^(i) + lambda x_t^(i).
    sq = torch.zeros(n, 2, dtype=torch.float32, device=device)
    directions = []
    for i, (x, g, m, v) in enumerate(zip(batch.params, batch.grads, batch.state["exp_avg"], batch.state["exp_avg_sq"])):
        x_t = x.float()
        g_t = g.float() if clip is None else g.float() / clip  # g_t (globally pre-normalised)
        if mode == "l2":
            g_t = g_t + wd * x_t
        m.mul_(beta1).add_(g_t, alpha=beta3)  # m_t = beta1 m_{t-1} + (1 - beta1) g_t
        v.mul_(beta2).addcmul_(g_t, g_t, value=1.0 - beta2)  # v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        m_hat = m * inv_bc1[i]  # m_hat_t = m_t / (1 - beta1^t)
        sqrt_v_hat = v.sqrt() * inv_sqrt_bc2[i]  # sqrt(v_hat_t), v_hat_t = v_t / (1 - beta2^t)
        r_t = m_hat / (sqrt_v_hat + eps)  # r_t = m_hat_t / (sqrt(v_hat_t) + eps)
        u_t = r_t + wd * x_t if mode == "paper" else r_t  # r_t + lambda x_t
        sq[i, 0] = x_t.square().sum()  # ||x_t^(i)||^2
        sq[i, 1] = u_t.square().sum()  # ||r_t^(i) + lambda x_t^(i)||^2
        directions.append(u_t)

    # Whole-layer norms (sums the fragments of a ZeRO-sharded layer across ranks).
    if batch.reduce is not None:
        sq = batch.reduce(sq)
    ratio = lamb_trust_ratios(sq, lr, group)  # phi(||x_t||) / ||r_t + lambda x_t||

    # Pass 2: x_{t+1}^(i) = x_t^(i) - eta_t * ratio^(i) * (r_t^(i) + lambda x_t^(i))
    for i, (x, u_t) in enumerate(zip(batch.params, directions)):
        x_t = x.float()
        if mode == "decoupled":
            x_t = x_t * (1.0 - lr * wd)
        x.copy_(x_t - (lr * ratio[i]) * u_t)


# ---------------------------------------------------------------- foreach path
def _lamb_foreach(batch: Batch, group: dict, clip: Tensor | None, opt: Lamb) -> None:
    beta1, beta2 = group["betas"]
    beta3 = 1.0 - beta1 if group["grad_averaging"] else 1.0
    eps, wd, mode, lr = group["eps"], group["weight_decay"], group["weight_decay_mode"], group["lr"]
    n = len(batch)
    device = batch.params[0].device if n else opt._device()
    if n == 0:
        sq = torch.zeros(0, 2, dtype=torch.float32, device=device)
        if batch.reduce is not None:
            batch.reduce(sq)  # still join the collective
        return
    params, m, v = batch.params, batch.state["exp_avg"], batch.state["exp_avg_sq"]
    low_precision = params[0].dtype != torch.float32
    x32 = [p.float() for p in params] if low_precision else params
    g32 = [g.float() for g in batch.grads] if batch.grads[0].dtype != torch.float32 else list(batch.grads)
    if clip is not None:
        g32 = torch._foreach_div(g32, clip)
    if mode == "l2":
        g32 = torch._foreach_add(g32, x32, alpha=wd)
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, g32, alpha=beta3)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g32, g32, value=1.0 - beta2)
    del g32

    inv_bc1, inv_sqrt_bc2 = _bias_corrections(batch.steps, group)
    denom = torch._foreach_sqrt(v)
    torch._foreach_mul_(denom, list(inv_sqrt_bc2.unbind()))
    torch._foreach_add_(denom, eps)
    u = torch._foreach_mul(m, list(inv_bc1.unbind()))
    torch._foreach_div_(u, denom)
    del denom
    if mode == "paper":
        torch._foreach_add_(u, x32, alpha=wd)

    sq = torch.stack([torch.stack(torch._foreach_norm(x32)), torch.stack(torch._foreach_norm(u))], dim=1).float().square()
    if batch.reduce is not None:
        sq = batch.reduce(sq)
    ratio = lamb_trust_ratios(sq, lr, group)

    if mode == "decoupled":
        torch._foreach_mul_(x32, 1.0 - lr * wd)
    torch._foreach_mul_(u, list((ratio * -lr).unbind()))
    torch._foreach_add_(x32, u)
    if low_precision:
        torch._foreach_copy_(params, x32)


# ---------------------------------------------------------------- fused path
def lamb_hyper(group: dict):
    from batchkit_cuda_ext import WD_MODES, LambHyper

    beta1, beta2 = group["betas"]
    phi_lo, phi_hi = _bounds(group["phi"])
    lo, hi = _bounds(group["trust_clamp"])
    return LambHyper(
        beta1=beta1, beta2=beta2, beta3=(1.0 - beta1) if group["grad_averaging"] else 1.0,
        eps=group["eps"], weight_decay=group["weight_decay"], wd_mode=WD_MODES[group["weight_decay_mode"]],
        bias_correction=int(bool(group["bias_correction"])), adapt=int(bool(group["adapt"])),
        phi_lo=phi_lo, phi_hi=phi_hi, ratio_lo=lo, ratio_hi=hi,
    )


def _lamb_fused(batch: Batch, group: dict, clip: Tensor | None, opt: Lamb) -> None:
    import batchkit_cuda_ext as ext

    n = len(batch)
    device = batch.params[0].device if n else opt._device()
    sq = torch.zeros(n, 2, dtype=torch.float32, device=device)
    lr = opt._lr_tensor(group["lr"], device)
    hyper = lamb_hyper(group)
    args = (batch.params, batch.grads, batch.state["exp_avg"], batch.state["exp_avg_sq"], batch.steps, hyper, lr)
    stash = group.get("stash_update")
    stash = opt._stash_views(batch.params, device) if (device.type == "cpu" if stash is None else stash) else None
    if batch.reduce is None:
        ext.lamb(ext.BOTH, *args, check=False, sq=sq, clip=clip, stash=stash)
        return
    ext.lamb(ext.PASS1, *args, check=False, sq=sq, clip=clip, stash=stash)
    sq = batch.reduce(sq).contiguous()
    ext.lamb(ext.PASS2, *args, check=False, sq=sq, stash=stash)
