"""Optimizer-stage plugins: swap the module's optimizer for LAMB or LARS.

YAML::

    plugins:
      lamb: {plugin: lamb, weight_decay: 0.01, max_grad_norm: 1.0}

The replacement keeps each of the module's param groups (their lr and, unless given here,
their weight decay). With ``exclude: true`` (default) each group is split into an adapted part
and an excluded part (biases, norm weights: no trust ratio, no decay), which changes the number
of groups: return the optimizer alone from ``configure_optimizers`` (no LR scheduler bound to
the old groups), or set ``exclude: false``.
"""

# No `from __future__ import annotations`: the host checks YAML options against real annotations.
from typing import Literal

import torch

from batchkit import Plugin, hookimpl

from .groups import is_excluded
from .lamb import Lamb
from .lars import Lars

_GROUP_KEYS_KEPT = ("lr", "initial_lr")


def _split_groups(optimizer: torch.optim.Optimizer, module: torch.nn.Module, exclude: bool,
                  weight_decay: float | None, default_wd: float, lr: float | None) -> list[dict]:
    """The module's param groups, each split into adapted / excluded parts when ``exclude``."""
    names = {id(p): n for n, p in module.named_parameters()}
    owners = {}
    for module_name, sub in module.named_modules():
        for param_name, p in sub.named_parameters(recurse=False):
            owners[id(p)] = sub
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    groups = []
    for source in optimizer.param_groups:
        kept = {k: source[k] for k in _GROUP_KEYS_KEPT if k in source}
        if lr is not None:
            kept["lr"] = lr
        wd = weight_decay if weight_decay is not None else source.get("weight_decay", default_wd)
        adapted, excluded = [], []
        for p in source["params"]:
            name = names.get(id(p), "")
            if exclude and (name in skip or is_excluded(name, p, owners.get(id(p)))):
                excluded.append(p)
            else:
                adapted.append(p)
        if adapted or not exclude:
            groups.append({**kept, "params": adapted, "weight_decay": wd, "adapt": True})
        if excluded:
            groups.append({**kept, "params": excluded, "weight_decay": 0.0, "adapt": False})
    return [g for g in groups if g["params"]]


class LambPlugin(Plugin):
    """Replace the module's optimizer by :class:`~batchkit_lamb_lars.Lamb` (see its options).

    ``lr`` / ``weight_decay`` left at None are taken from the module's optimizer groups.
    """

    name = "lamb"
    conflicts = ("lars",)

    def __init__(
        self,
        lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float | None = None,
        weight_decay_mode: Literal["paper", "decoupled", "l2"] = "paper",
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = None,
        phi: tuple[float, float] | None = None,
        trust_clamp: tuple[float, float] | None = None,
        exclude: bool = True,
        impl: Literal["auto", "reference", "foreach", "fused"] = "auto",
    ):
        super().__init__()
        self.lr, self.weight_decay, self.exclude = lr, weight_decay, exclude
        self.options = dict(
            betas=betas, eps=eps, weight_decay_mode=weight_decay_mode, bias_correction=bias_correction,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, phi=phi, trust_clamp=trust_clamp,
            impl=impl,
        )
        # Fail at configuration time, not at the first step: build a throwaway optimizer.
        Lamb([torch.zeros(1, requires_grad=True)], lr=lr if lr is not None else 1e-3,
             weight_decay=weight_decay or 0.0, **self.options)

    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer, module):
        groups = _split_groups(optimizer, module, self.exclude, self.weight_decay, 0.01, self.lr)
        return Lamb(groups, lr=optimizer.param_groups[0]["lr"] if self.lr is None else self.lr, **self.options)


class LarsPlugin(Plugin):
    """Replace the module's optimizer by :class:`~batchkit_lamb_lars.Lars` (see its options).

    ``lr`` / ``momentum`` / ``weight_decay`` left at None come from the module's optimizer
    groups (torch SGD's keys), else Lars' defaults.
    """

    name = "lars"
    conflicts = ("lamb",)

    def __init__(
        self,
        lr: float | None = None,
        momentum: float | None = None,
        dampening: float = 0.0,
        weight_decay: float | None = None,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        max_grad_norm: float | None = None,
        exclude: bool = True,
        impl: Literal["auto", "reference", "foreach", "fused"] = "auto",
        momentum_form: Literal["sgd", "paper"] = "sgd",
    ):
        super().__init__()
        self.lr, self.momentum, self.weight_decay, self.exclude = lr, momentum, weight_decay, exclude
        self.options = dict(
            dampening=dampening, nesterov=nesterov, trust_coeff=trust_coeff, eps=eps,
            trust_clip=trust_clip, max_grad_norm=max_grad_norm, impl=impl, momentum_form=momentum_form,
        )
        Lars([torch.zeros(1, requires_grad=True)], lr=lr if lr is not None else 0.1,
             momentum=momentum if momentum is not None else 0.9, weight_decay=weight_decay or 0.0,
             **self.options)

    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer, module):
        groups = _split_groups(optimizer, module, self.exclude, self.weight_decay, 0.0, self.lr)
        momentum = self.momentum
        if momentum is None:
            momentum = optimizer.param_groups[0].get("momentum", 0.9)
        return Lars(groups, lr=optimizer.param_groups[0]["lr"] if self.lr is None else self.lr,
                    momentum=momentum, **self.options)
