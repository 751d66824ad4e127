"""The hook contract between the batchkit host and its plugins.

Every hook a plugin may implement is declared here, once, with what it receives, when it is called
and what its return value means. Plugins implement a hook by defining a method of the same name
decorated with :data:`batchkit.hookimpl`; like pluggy, an implementation may accept any *subset*
of the declared arguments, so new arguments can be added here without breaking plugins.

Two kinds of hook:

* **Transform chains** (``batchkit_wrap_*``, ``batchkit_transform_*``): the host calls the
  implementations one after another in *chain order* and feeds each one the value the previous one
  returned. Returning ``None`` means "leave it as it is". Chain order is, per hook: ``tryfirst``
  implementations, then ordinary ones, then ``trylast`` ones; within each tier by the plugin's
  ``order`` (lower first), then by registration order. ``batchkit plugins`` and
  :meth:`batchkit.host.PluginHost.chain_order` show it. For the wrapping stages (sampler,
  collator, optimizer) the first plugin wraps the original object and the last plugin's wrapper is
  outermost.
* **Notifications** (setup, epoch, step, teardown): every implementation is called, in chain order;
  return values are ignored.

``batchkit_state_dict`` / ``batchkit_load_state_dict`` are called per plugin by the host, which
keys each plugin's state by its instance name in checkpoints.

The ``ctx`` argument is the host's :class:`batchkit.host.BatchKitContext`: the trainer, the module,
epoch, batch index, optimizer step, micro-step within gradient accumulation, rank and world size,
and the elapsed fraction of training. It is one object, updated in place by the host; read it, do
not keep references to its fields across steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any
from typing import Callable

import pluggy


if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from batchkit.host import BatchKitContext
    from batchkit.host import PluginHost

PROJECT = "batchkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------------------------------
# Lifecycle hooks
# -------------------------------------------------------------------------------------------------


@hookspec
def batchkit_setup(host: PluginHost, trainer: Any, module: Any, stage: str) -> None:
    """Called once when training is being set up, before any data is loaded or any optimizer built.

    This is the place to check that the user's module offers what the plugin needs (for example a
    per-sample loss) and to raise a clear error *now* rather than half-way through training.

    :param host: the :class:`~batchkit.host.PluginHost` the plugin is registered with.
    :param trainer: the ``lightning.pytorch.Trainer`` (``None`` outside Lightning).
    :param module: the ``LightningModule`` (or plain ``nn.Module`` outside Lightning).
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.

    Notification hook: every implementation is called, return values are ignored.
    """


@hookspec
def batchkit_epoch_start(epoch: int, ctx: BatchKitContext) -> None:
    """Called at the start of every training epoch, before its first batch is drawn.

    Not called for the epoch a run resumes into from a mid-epoch checkpoint: that epoch already
    started before the checkpoint, and the plugin's restored state carries on from there
    (``ctx.epoch`` is still right).

    :param epoch: the 0-based epoch about to start.
    :param ctx: the host's context.

    Notification hook.
    """


@hookspec
def batchkit_epoch_end(epoch: int, ctx: BatchKitContext) -> None:
    """Called at the end of every training epoch, after its last optimizer step.

    :param epoch: the 0-based epoch that just ended.
    :param ctx: the host's context.

    Notification hook.
    """


@hookspec
def batchkit_before_optimizer_step(optimizer: torch.optim.Optimizer, ctx: BatchKitContext) -> None:
    """Called once per *real* optimizer step, after the backward of its last micro-batch and before
    the parameters change.

    Correct under gradient accumulation and under DeepSpeed: Lightning calls its own
    ``on_before_optimizer_step`` on every micro-batch under DeepSpeed, the host filters those so this
    hook sees only step boundaries (``ctx.is_last_micro_batch`` is true).

    :param optimizer: the optimizer about to step (under DeepSpeed, the user-level optimizer that
        DeepSpeed wraps).
    :param ctx: the host's context.

    Notification hook.
    """


@hookspec
def batchkit_step_end(ctx: BatchKitContext) -> None:
    """Called after every optimizer-step boundary, once the step has been taken.

    ``ctx.global_step`` already counts the step just taken. Buffers that accumulate over the
    micro-batches of one optimizer step (for example expert counts) are reset here.

    :param ctx: the host's context.

    Notification hook.
    """


@hookspec
def batchkit_teardown(ctx: BatchKitContext) -> None:
    """Called once when training ends, normally or by an exception.

    Notification hook.
    """


# -------------------------------------------------------------------------------------------------
# Stage 1: sampler (main process, while the train DataLoader is built)
# -------------------------------------------------------------------------------------------------


@hookspec
def batchkit_wrap_batch_sampler(batch_sampler: Any, dataset: Dataset, ctx: BatchKitContext) -> Any:
    """Wrap the batch sampler of the training DataLoader.

    Called each time the train DataLoader is built. The first plugin in the chain receives the
    host's base batch sampler: this rank's shard of the dataset (a ``DistributedSampler`` with one
    replica when not distributed), shuffled as the user's DataLoader was, cut into the user's batch
    size. Each plugin gets the previous plugin's result.

    A batch sampler is an iterable of lists of dataset indices with a ``__len__``. It must:

    * yield only indices of this rank's shard (``ctx.rank``), or indices the plugin has agreed on
      across ranks, so that ranks never train the same samples twice;
    * have the same ``len()`` on every rank (the host checks this and raises otherwise), since a
      rank that runs out of batches early leaves the others hung in a collective;
    * produce its order for an epoch deterministically from its state and the epoch, so resuming
      mid-epoch reproduces it (the host skips the batches already trained).

    Wrappers should expose ``set_epoch(epoch)`` and forward it to what they wrap; the host calls it
    on the outermost sampler at the start of every epoch.

    :param batch_sampler: the batch sampler built so far.
    :param dataset: the DataLoader's dataset.
    :param ctx: the host's context.
    :return: a new batch sampler, or ``None`` to keep ``batch_sampler``.

    Transform chain.
    """


# -------------------------------------------------------------------------------------------------
# Stage 2: collator (DataLoader workers)
# -------------------------------------------------------------------------------------------------


@hookspec
def batchkit_wrap_collate(collate_fn: Callable[[list[Any]], Any], ctx: BatchKitContext) -> Callable[[list[Any]], Any]:
    """Wrap the collate function of the training DataLoader.

    Called each time the train DataLoader is built. The first plugin receives the user's collate
    function (``default_collate`` if none was given). The returned callable runs in the DataLoader
    worker processes, so it must be picklable and must not rely on state the main process changes
    after the DataLoader starts its workers.

    The host turns a top-level tuple produced by the chain into a list, so the batch stage and the
    user's ``training_step`` always receive a mutable container.

    :param collate_fn: the collate function built so far: ``list of samples -> batch``.
    :param ctx: the host's context.
    :return: a new collate function, or ``None`` to keep ``collate_fn``.

    Transform chain.
    """


# -------------------------------------------------------------------------------------------------
# Stage 3: batch (on the device, right before the user's training_step)
# -------------------------------------------------------------------------------------------------


@hookspec
def batchkit_transform_batch(batch: Any, module: Any, ctx: BatchKitContext) -> Any:
    """Transform a training batch after it reached the device, before ``training_step`` sees it.

    The batch may be returned smaller (selection), reshaped or replaced. A plugin may run the model
    on it, but only under ``torch.no_grad()`` and without changing the model's state (for example
    BatchNorm running statistics: put the model in ``eval()`` for the scoring pass and restore
    the mode afterwards).

    :param batch: the batch as the DataLoader produced it (tuple, list, dict or tensor), on device.
    :param module: the LightningModule.
    :param ctx: the host's context (``ctx.batch_idx``, ``ctx.is_last_micro_batch``, ...).
    :return: the new batch, or ``None`` to keep it.

    Transform chain.
    """


# -------------------------------------------------------------------------------------------------
# Stage 4: loss (after the user's training_step)
# -------------------------------------------------------------------------------------------------


@hookspec
def batchkit_transform_loss(loss: torch.Tensor, outputs: Any, batch: Any, module: Any, ctx: BatchKitContext) -> torch.Tensor:
    """Transform the loss ``training_step`` returned, before Lightning runs backward on it.

    Auxiliary terms (for example a load-balancing loss) are added here with their gradient.

    :param loss: the scalar loss (the ``"loss"`` entry if ``training_step`` returned a dict).
    :param outputs: what ``training_step`` returned, unchanged.
    :param batch: the batch ``training_step`` received (after the batch stage).
    :param module: the LightningModule.
    :param ctx: the host's context.
    :return: the new loss tensor, or ``None`` to keep it.

    Transform chain. Not called when ``training_step`` returns ``None`` (skipped step).
    """


# -------------------------------------------------------------------------------------------------
# Stage 5: optimizer
# -------------------------------------------------------------------------------------------------


@hookspec
def batchkit_wrap_optimizer(optimizer: torch.optim.Optimizer, module: Any, ctx: BatchKitContext) -> torch.optim.Optimizer:
    """Replace or wrap the optimizer that the module's ``configure_optimizers`` built.

    Called once per fit, before the strategy (DDP, DeepSpeed) sees the optimizer, so a replacement
    is what DeepSpeed wraps. Learning-rate schedulers the module returned are re-pointed at the
    replacement when it has the same number of parameter groups; otherwise the host raises.

    :param optimizer: the optimizer built so far (the module's, or the previous plugin's).
    :param module: the LightningModule, for its ``named_parameters()``.
    :param ctx: the host's context.
    :return: a new optimizer, or ``None`` to keep ``optimizer``.

    Transform chain.
    """


# -------------------------------------------------------------------------------------------------
# State
# -------------------------------------------------------------------------------------------------


@hookspec
def batchkit_state_dict() -> dict[str, Any]:
    """Return everything the plugin needs to resume exactly after a restart.

    Called per plugin when a checkpoint is saved; the host stores the result under the plugin's
    instance name. Tensors may be included; return copies, not live buffers.

    :return: a picklable dict.
    """


@hookspec
def batchkit_load_state_dict(state: dict[str, Any]) -> None:
    """Restore what :func:`batchkit_state_dict` returned.

    Called per plugin when a checkpoint is loaded, before the train DataLoader is built for the
    resumed run, so sampler-stage plugins see their restored state when their batch sampler is
    created.

    :param state: the dict this plugin returned when the checkpoint was saved.
    """
