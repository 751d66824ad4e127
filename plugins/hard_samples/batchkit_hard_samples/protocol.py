"""The per-sample loss protocol, and the batch helpers that selecting samples needs.

**The protocol.** A plugin that ranks the samples of a batch asks the LightningModule for the loss
of every sample, unreduced::

    class MyModule(LightningModule):
        def per_sample_loss(self, batch) -> torch.Tensor:   # shape [batch size], one loss per sample
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="none")

``batch`` is the training batch exactly as ``training_step`` receives it (tuple, list, dict or a
tensor). The plugin calls it under ``torch.no_grad()``; it must not change the module (no
optimizer steps, no logging). A plugin option ``loss_method`` names another method of the module
when ``per_sample_loss`` is taken. The plugins check for it in ``batchkit_setup``, so a module
without it fails before the first batch, not when selection first triggers.

The mini-batch loss that hard-batch selection ranks needs nothing extra: it is the loss that
``training_step`` already returns (the mean of the per-sample losses for a usual loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import Callable

import torch

from batchkit import PluginError


DEFAULT_LOSS_METHOD = "per_sample_loss"


def resolve_loss_method(plugin: str, module: Any, loss_method: str) -> Callable[[Any], torch.Tensor]:
    """The module's per-sample loss method, or a :class:`PluginError` that says how to add it."""
    method = getattr(module, loss_method, None)
    if callable(method):
        return method
    what = type(module).__name__
    if loss_method == DEFAULT_LOSS_METHOD:
        raise PluginError(
            f"{plugin}: the module {what} has no {loss_method}(batch) method, which {plugin} needs to rank "
            f"the samples of a batch. Add one that returns the unreduced loss of every sample, e.g.\n"
            f"    def {loss_method}(self, batch):\n"
            f"        x, y = batch\n"
            f"        return torch.nn.functional.cross_entropy(self(x), y, reduction='none')\n"
            f"or point the option loss_method at an existing method of {what} with that contract."
        )
    raise PluginError(
        f"{plugin}: option loss_method={loss_method!r}, but the module {what} has no callable {loss_method!r}. "
        f"Give the name of a method of {what} that takes the training batch and returns one loss per sample "
        f"(a 1-d tensor), or remove the option to use {DEFAULT_LOSS_METHOD}(batch)."
    )


def check_per_sample_losses(plugin: str, loss_method: str, losses: Any, batch_size: int) -> torch.Tensor:
    """Refuse anything but a 1-d floating tensor with one entry per sample."""
    if not isinstance(losses, torch.Tensor):
        raise PluginError(
            f"{plugin}: {loss_method}(batch) returned {type(losses).__name__}, not a tensor; return the "
            f"unreduced loss of every sample (e.g. cross_entropy(..., reduction='none'))"
        )
    if losses.dim() != 1 or losses.shape[0] != batch_size:
        raise PluginError(
            f"{plugin}: {loss_method}(batch) returned a tensor of shape {tuple(losses.shape)}, but the batch has "
            f"{batch_size} samples; return shape [{batch_size}] (reduction='none', and average any "
            "per-token or per-pixel losses within each sample)"
        )
    return losses


def _is_per_sample_list(value: Any, batch_size: int) -> bool:
    """A list/tuple of plain values, one per sample (file names, captions, ids)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == batch_size
        and all(isinstance(v, (str, bytes, int, float, bool)) or v is None for v in value)
    )


def batch_size_of(plugin: str, batch: Any) -> int:
    """The leading dimension of the first tensor found in the batch (depth first)."""
    if isinstance(batch, torch.Tensor) and batch.dim() >= 1:
        return int(batch.shape[0])
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        try:
            return batch_size_of(plugin, item)
        except PluginError:
            continue
    raise PluginError(
        f"{plugin}: found no tensor with a batch dimension in the batch ({type(batch).__name__}); the batch "
        "stage selects samples along dimension 0 of the batch's tensors"
    )


def select_samples(batch: Any, index: torch.Tensor, batch_size: int) -> Any:
    """The batch restricted to the samples ``index`` (1-d, ascending), in the same container types.

    Tensors whose first dimension is ``batch_size`` are indexed along it; lists/tuples of plain
    values with one entry per sample are indexed too; containers (tuple, list, named tuple, dict)
    are rebuilt around their selected contents; anything else (a scalar, a tensor of another length)
    is passed through unchanged.
    """
    if isinstance(batch, torch.Tensor):
        if batch.dim() >= 1 and batch.shape[0] == batch_size:
            return batch.index_select(0, index.to(batch.device))
        return batch
    if isinstance(batch, Mapping):
        selected = {k: select_samples(v, index, batch_size) for k, v in batch.items()}
        try:
            return type(batch)(selected)
        except TypeError:  # a mapping type that cannot be built from a dict
            return selected
    if _is_per_sample_list(batch, batch_size):
        picked = [batch[i] for i in index.tolist()]
        return type(batch)(picked) if isinstance(batch, list) else tuple(picked)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(select_samples(v, index, batch_size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(select_samples(v, index, batch_size) for v in batch)
    return batch
