"""Optimizer-stage plugins: swap the module's optimizer for LAMB or LARS.

YAML::

    plugins:
      lamb: {plugin: lamb, weight_decay: 0.01, max_grad_norm: 1.0}

The replacement keeps each of the module's param groups and every per-group setting that means
the same thing in the replacement, unless the entry sets it: ``lr`` (and a scheduler's
``initial_lr``), the weight decay, Adam's ``betas`` (LAMB), SGD's ``momentum``, ``dampening`` and
``nesterov`` (LARS). A group the module keeps at ``weight_decay=0`` while it decays others (its
biases, norms, embeddings) stays at 0, also when the entry sets ``weight_decay``. The settings the
replacement changes (``eps 1e-08 -> 1e-06``, ``amsgrad=True`` with no counterpart, an entry's own
value) are listed once in a warning.

With ``exclude: true`` (default) each group is split into an adapted part and an excluded part
(biases, norm weights: no trust ratio, no decay), which changes the number of groups: a module
whose ``configure_optimizers`` also returns an LR scheduler (bound to its groups) needs
``exclude: false``, which keeps its groups as they are.

A checkpoint whose optimizer state another optimizer wrote (a run saved with ``lamb``, resumed
with ``lars``) is refused with an error naming both, instead of failing inside the step.
"""

# No `from __future__ import annotations`: the host checks YAML options against real annotations.
import warnings
from typing import Literal

import torch

from batchkit import Plugin, PluginError, dist, hookimpl

from .groups import replaced_settings, replacement_param_groups
from .lamb import Lamb
from .lars import Lars


class _OptimizerReplacement(Plugin):
    """What the LAMB and LARS plugins share: the module's groups rebuilt for the replacement, one
    report of the settings it changes, and a refusal of another optimizer's checkpointed state."""

    #: the replacement, as users name it
    optimizer_name = ""
    #: group keys every state_dict of the replacement has (another optimizer's state lacks them)
    state_keys: tuple = ()
    #: module group keys that mean the same thing in the replacement (carried when not set here)
    carried_keys: tuple = ()

    exclude = True
    _reported = False

    @property
    def keep_param_groups_hint(self):
        """How to keep the module's parameter groups (shown when an LR scheduler is bound to them)."""
        if not self.exclude:
            return None
        entry = self.instance_name
        return (
            f"set exclude: false on entry {entry!r} (batchkit.plugins.{entry}.exclude=false), which keeps "
            "the module's parameter groups and their weight decay (put biases and norms in a group with "
            "weight_decay=0 in configure_optimizers to keep them undecayed)"
        )

    def _groups(self, optimizer, module, lr, weight_decay, default_weight_decay, explicit):
        carry = [key for key in self.carried_keys if key not in explicit]
        return replacement_param_groups(
            optimizer, module, exclude=self.exclude, lr=lr, weight_decay=weight_decay,
            default_weight_decay=default_weight_decay, carry=carry,
        )

    def _finish(self, old, new, origins):
        self._report(old, new, origins)
        new.register_load_state_dict_pre_hook(self._refuse_foreign_state)
        return new

    def _report(self, old, new, origins):
        if self._reported or dist.get_rank() != 0:
            return
        self._reported = True
        changes = replaced_settings(old, new, origins)
        if not changes:
            return
        carried = ", ".join(["lr", "weight_decay", *self.carried_keys])
        excluded = (
            " Biases, norm weights and 0/1-d tensors get no trust ratio and no weight decay (exclude: true)."
            if self.exclude else ""
        )
        warnings.warn(
            f"{self.name} (entry {self.instance_name!r}) replaces the module's {type(old).__name__} by "
            f"{type(new).__name__}, keeping per group what means the same in both ({carried}, unless the "
            f"entry sets them). Settings replaced: {'; '.join(changes)}. Set an option on the entry to "
            f"choose another value.{excluded}",
            UserWarning,
            stacklevel=2,
        )

    def _refuse_foreign_state(self, optimizer, state_dict):
        for group in state_dict.get("param_groups", ()):
            missing = [key for key in self.state_keys if key not in group]
            if not missing:
                continue
            writer = "LAMB or Adam" if "betas" in group else "LARS or SGD" if "momentum" in group else "another optimizer"
            raise PluginError(
                f"{self.name} (entry {self.instance_name!r}): the checkpoint's optimizer state was written by "
                f"{writer}, not {self.optimizer_name}: its parameter groups have no {', '.join(map(repr, missing))}. "
                "A run cannot change its optimizer when it resumes. Resume with the plugin list the checkpoint "
                "was saved with, or start a new run from the checkpoint's weights only (load its 'state_dict' "
                "into the module instead of passing ckpt_path)."
            )
        return None


class LambPlugin(_OptimizerReplacement):
    """Replace the module's optimizer by :class:`~batchkit_lamb_lars.Lamb` (see its options).

    ``lr``, ``weight_decay`` and ``betas`` left at None are taken from each of the module's
    optimizer groups (Adam's ``betas``), else Lamb's defaults.
    """

    name = "lamb"
    conflicts = ("lars",)
    optimizer_name = "LAMB"
    state_keys = ("betas", "weight_decay_mode")
    carried_keys = ("betas",)

    def __init__(
        self,
        lr: float | None = None,
        betas: tuple[float, float] | None = None,
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
            eps=eps, weight_decay_mode=weight_decay_mode, bias_correction=bias_correction,
            grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, phi=phi, trust_clamp=trust_clamp,
            impl=impl,
        )
        if betas is not None:  # else each group's own (Adam's), or Lamb's default
            self.options["betas"] = betas  # Lamb checks it: betas=0.9 gets a clear message, not a TypeError
        # Fail at configuration time, not at the first step: build a throwaway optimizer.
        Lamb([torch.zeros(1, requires_grad=True)], lr=lr if lr is not None else 1e-3,
             weight_decay=weight_decay or 0.0, **self.options)

    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer, module):
        groups, origins = self._groups(optimizer, module, self.lr, self.weight_decay, 0.01, set(self.options))
        new = Lamb(groups, lr=optimizer.param_groups[0]["lr"] if self.lr is None else self.lr, **self.options)
        return self._finish(optimizer, new, origins)


class LarsPlugin(_OptimizerReplacement):
    """Replace the module's optimizer by :class:`~batchkit_lamb_lars.Lars` (see its options).

    ``lr``, ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay`` left at None come from
    each of the module's optimizer groups (torch SGD's keys), else Lars' defaults.
    """

    name = "lars"
    conflicts = ("lamb",)
    optimizer_name = "LARS"
    state_keys = ("momentum", "trust_coeff")
    carried_keys = ("momentum", "dampening", "nesterov")

    def __init__(
        self,
        lr: float | None = None,
        momentum: float | None = None,
        dampening: float | None = None,
        weight_decay: float | None = None,
        nesterov: bool | None = None,
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
        self.dampening, self.nesterov = dampening, nesterov
        self.options = dict(trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, max_grad_norm=max_grad_norm, impl=impl,
                            momentum_form=momentum_form)
        Lars([torch.zeros(1, requires_grad=True)], lr=lr if lr is not None else 0.1,
             weight_decay=weight_decay or 0.0, **self._defaults(), **self.options)

    def _defaults(self):
        """momentum, dampening and nesterov: the entry's values, else Lars' defaults."""
        return dict(
            momentum=0.9 if self.momentum is None else self.momentum,
            dampening=0.0 if self.dampening is None else self.dampening,
            nesterov=False if self.nesterov is None else self.nesterov,
        )

    @hookimpl
    def batchkit_wrap_optimizer(self, optimizer, module):
        explicit = {k for k in ("momentum", "dampening", "nesterov") if getattr(self, k) is not None}
        groups, origins = self._groups(optimizer, module, self.lr, self.weight_decay, 0.0, explicit)
        new = Lars(groups, lr=optimizer.param_groups[0]["lr"] if self.lr is None else self.lr,
                   **self._defaults(), **self.options)
        return self._finish(optimizer, new, origins)
