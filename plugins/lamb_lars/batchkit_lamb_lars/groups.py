"""Param groups that exclude biases and normalisation weights from adaptation and decay.

Every LAMB/LARS recipe (BERT, ResNet, SimCLR, VICReg) keeps biases and norm scales out of the
trust ratio and the weight decay: their norms are tiny or meaningless, and adapting them
makes them collapse or underflow. Exclusion is done with param groups, never by name inside
the optimizer, so it survives state_dict round trips and ZeRO wrapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_excluded(name: str, param: torch.Tensor, module: nn.Module | None = None) -> bool:
    """Default rule: biases, 0/1-d tensors, and weights of normalisation layers."""
    if param.ndim <= 1 or name.endswith("bias"):
        return True
    return module is not None and isinstance(module, NORM_LAYERS)


def layerwise_param_groups(
    model: nn.Module | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float = 0.01,
    exclude: Callable[[str, torch.Tensor, nn.Module | None], bool] = is_excluded,
    no_weight_decay: Iterable[str] = (),
    **excluded_overrides,
) -> list[dict]:
    """Two param groups for :class:`Lamb` / :class:`Lars`.

    * adapted: trust ratio on, ``weight_decay`` as given;
    * excluded (``exclude(name, param, owner_module)`` is True, or the name is listed in
      ``no_weight_decay`` or in ``model.no_weight_decay()``): ``adapt=False``,
      ``weight_decay=0``, plus ``excluded_overrides`` (e.g. ``lr=...``).

    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    """
    skip = set(no_weight_decay)
    if isinstance(model, nn.Module):
        if hasattr(model, "no_weight_decay"):
            skip |= set(model.no_weight_decay())
        owners = {}
        for module_name, module in model.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                owners[f"{module_name}.{param_name}" if module_name else param_name] = module
        named = list(model.named_parameters())
    else:
        owners, named = {}, list(model)
    adapted, excluded = [], []
    for name, param in named:
        if not param.requires_grad:
            continue
        if name in skip or exclude(name, param, owners.get(name)):
            excluded.append(param)
        else:
            adapted.append(param)
    groups = []
    if adapted:
        groups.append({"params": adapted, "weight_decay": weight_decay, "adapt": True})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "adapt": False, **excluded_overrides})
    return groups
