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


def replacement_param_groups(
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    *,
    exclude: bool,
    lr: float | None = None,
    weight_decay: float | None = None,
    default_weight_decay: float = 0.0,
    carry: Iterable[str] = (),
) -> tuple[list[dict], list[int]]:
    """The param groups of ``optimizer`` (the module's own), rebuilt for a replacement optimizer.

    Each of the module's groups keeps its ``lr`` (unless ``lr`` is given), its ``initial_lr`` (an
    LR scheduler's base), and every key in ``carry`` it has: settings that mean the same thing in
    the replacement (Adam's ``betas`` for LAMB; SGD's ``momentum``, ``dampening``, ``nesterov`` for
    LARS). Weight decay:

    * ``weight_decay`` given: it replaces the decay of every group the module decays. A group the
      module keeps at ``weight_decay=0`` while another of its groups decays is a *no-decay group*
      (biases, norms, embeddings) and stays at 0.
    * not given: each group keeps its own (``default_weight_decay`` if it has none).

    With ``exclude``, each group is split into an adapted part and an excluded part (biases, 0/1-d
    tensors and norm weights, or names in ``module.no_weight_decay()``: ``adapt=False``, no decay),
    which changes the number of groups. Empty groups are dropped.

    Returns the groups and, for each, the index of the module's group it came from.
    """
    names = {id(p): n for n, p in module.named_parameters()}
    owners = {}
    for _, sub in module.named_modules():
        for _, p in sub.named_parameters(recurse=False):
            owners[id(p)] = sub
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    carry = tuple(carry)
    decays = [float(g.get("weight_decay", default_weight_decay)) for g in optimizer.param_groups]
    module_decays_some = any(wd > 0 for wd in decays)
    groups: list[dict] = []
    origins: list[int] = []
    for index, source in enumerate(optimizer.param_groups):
        kept = {k: source[k] for k in ("lr", "initial_lr", *carry) if k in source}
        if lr is not None:
            kept["lr"] = lr
        no_decay_group = module_decays_some and decays[index] == 0
        if weight_decay is None:
            wd = decays[index]
        else:
            wd = 0.0 if no_decay_group else weight_decay
        adapted, excluded = [], []
        for p in source["params"]:
            name = names.get(id(p), "")
            if exclude and (name in skip or is_excluded(name, p, owners.get(id(p)))):
                excluded.append(p)
            else:
                adapted.append(p)
        if adapted or not exclude:
            groups.append({**kept, "params": adapted, "weight_decay": wd, "adapt": True})
            origins.append(index)
        if excluded:
            groups.append({**kept, "params": excluded, "weight_decay": 0.0, "adapt": False})
            origins.append(index)
    pairs = [(g, o) for g, o in zip(groups, origins) if g["params"]]
    return [g for g, _ in pairs], [o for _, o in pairs]


#: Keys of a torch optimizer's param groups that choose an implementation, not the update.
_IMPLEMENTATION_KEYS = frozenset(
    {"params", "param_names", "initial_lr", "foreach", "fused", "capturable", "differentiable",
     "decoupled_weight_decay", "impl", "stash_update"}
)


def replaced_settings(old: torch.optim.Optimizer, new: torch.optim.Optimizer, origins: list[int]) -> list[str]:
    """What the replacement changes of the module's optimizer settings, one phrase per setting:
    ``"eps 1e-08 -> 1e-06"`` for a value that differs, ``"amsgrad=True (no counterpart)"`` for a
    setting the replacement does not have (listed only when it is switched on or non-zero)."""
    changed: dict[str, str] = {}
    for group, origin in zip(new.param_groups, origins):
        source = old.param_groups[origin]
        for key, value in source.items():
            if key in _IMPLEMENTATION_KEYS or key in changed:
                continue
            if key == "weight_decay" and not group.get("adapt", True):
                continue  # an excluded tensor (bias, norm): no decay by design, reported by the plugin
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if key in group:
                if _differs(value, group[key]):
                    changed[key] = f"{key} {_fmt(value)} -> {_fmt(group[key])}"
            elif value not in (False, 0, 0.0, None):
                changed[key] = f"{key}={_fmt(value)} (no counterpart)"
    return list(changed.values())


def _differs(a: object, b: object) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return float(a) != float(b)  # type: ignore[arg-type]
    return a != b


def _fmt(value: object) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) else f"{value}"
