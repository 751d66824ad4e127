"""The hook contract between the batchkit host and its plugins.

Every hook a plugin may implement is declared here, once: what it receives, when it is called, what
its return value means, and (through the decorator that declares it) its *kind* and *stage*. The
host, the ``batchkit plugins`` table and ``docs/hooks.md`` all read the kind from the declaration,
so a new hook is one function here plus its call site. Plugins implement a hook by defining a method
of the same name decorated with :data:`batchkit.hookimpl`; like pluggy, an implementation may accept
any *subset* of the declared arguments, so new arguments can be added without breaking plugins.

Three kinds of hook:

* **Transform chains** (declared with :func:`chain_hook`): the host calls the implementations one
  after another in *chain order* and feeds each one the value the previous one returned (the
  hook's *carrier* argument). Returning ``None`` means "leave it as it is". Chain order is, per
  hook: ``tryfirst`` implementations, then ordinary ones, then ``trylast`` ones (the three *tiers*);
  within a tier by the plugin's ``order`` (lower first), then by registration order. ``order``
  never moves a plugin across tiers. ``batchkit plugins --config`` and
  :meth:`batchkit.host.PluginHost.chain_order` show it. For the wrapping stages (sampler, collator,
  optimizer) the first plugin wraps the original object and the last plugin's wrapper is outermost.
* **Notifications** (:func:`notification_hook`): every implementation is called, in chain order;
  return values are ignored.
* **Per-plugin** hooks (:func:`per_plugin_hook`): the host calls each plugin's implementation on its
  own (state saving and loading, keyed by the plugin's instance name).

Pluggy's ``wrapper``/``hookwrapper``/``historic`` options are refused on every hook at registration:
the host calls implementations itself, in the order above.

How the host calls them: for each hook it prepares, once per plugin list, one function that calls
every implementation in chain order with the arguments that implementation declares
(:meth:`batchkit.host.PluginHost.caller`; ``chain`` and ``notify`` use it), so a plugin's per-step
hook costs about one Python call. Code that runs a hook on every step (the host's training_step
wrapper and per-batch callback hooks) fetches that function once per fit and passes the arguments
in declaration order (``host.caller(hook, positional=(...))`` checks the order against the
declaration). An exception raised by an implementation carries a note naming the plugin and the
hook. Per-plugin timing of every call (``PluginHost.timings``) is off unless
asked for (``BatchKitCallback(time_hooks=True)`` or ``print_summary=True``), as with a profiler.

The ``ctx`` argument is the host's :class:`batchkit.host.BatchKitContext`: where training stands
(``ctx.train_progress``: epoch, batch in the epoch, optimizer step, samples trained, the loader's
lookahead), the micro-step within gradient accumulation, rank and world size, the device, the
run's limits (``max_steps``, ``max_epochs``, ``total_steps``, ``log_every_n_steps``), the
super-batch plan, the batch spec and the current batch's sampler metadata. It is one object,
updated in place by the host; read it, do not keep references to its fields across steps.
``ctx.trainer`` and ``ctx.module`` are there for the rare plugin that needs them; everything a
plugin usually needs has its own field, so plugins do not depend on Lightning's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import Callable
from typing import Literal

import pluggy


if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from batchkit.cache import ArtifactCache
    from batchkit.host import BatchKitContext
    from batchkit.host import PluginHost

PROJECT = "batchkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Kind = Literal["chain", "notification", "per_plugin"]
Stage = Literal["lifecycle", "sampler", "collator", "batch", "loss", "optimizer", "state"]


@dataclass(frozen=True)
class HookKind:
    """What the declaration says about a hook: its kind, its stage, and (chains) its carrier."""

    name: str
    kind: Kind
    stage: Stage
    carrier: str | None = None


_KIND_ATTRIBUTE = "batchkit_hook_kind"


def _declare(kind: Kind, stage: Stage, carrier: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def declare(function: Callable[..., Any]) -> Callable[..., Any]:
        setattr(function, _KIND_ATTRIBUTE, HookKind(function.__name__, kind, stage, carrier))
        return hookspec(function)

    return declare


def chain_hook(carrier: str, stage: Stage) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a transform chain whose value travels in the argument ``carrier``."""
    return _declare("chain", stage, carrier)


def notification_hook(stage: Stage = "lifecycle") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a notification: every implementation is called, return values are ignored."""
    return _declare("notification", stage)


def per_plugin_hook() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a hook the host calls per plugin (state)."""
    return _declare("per_plugin", "state")


def hook_kinds() -> dict[str, HookKind]:
    """Every declared hook, in declaration order."""
    found = {}
    for value in globals().values():
        kind = getattr(value, _KIND_ATTRIBUTE, None)
        if isinstance(kind, HookKind):
            found[kind.name] = kind
    return found


# -------------------------------------------------------------------------------------------------
# Lifecycle hooks
# -------------------------------------------------------------------------------------------------


@notification_hook()
def batchkit_setup(host: PluginHost, trainer: Any, module: Any, stage: str) -> None:
    """Called once when training is being set up, before any data is loaded or any optimizer built.

    This is the place to check that the user's module offers what the plugin needs (for example a
    per-sample loss) and to raise a clear :class:`~batchkit.PluginError` *now* rather than half-way
    through training. The model is not on its device yet (see :func:`batchkit_fit_start`).

    :param host: the :class:`~batchkit.host.PluginHost` the plugin is registered with.
    :param trainer: the ``lightning.pytorch.Trainer`` (``None`` outside Lightning).
    :param module: the ``LightningModule`` (or plain ``nn.Module`` outside Lightning).
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    """


@notification_hook()
def batchkit_prepare_data(dataset: Dataset, cache: ArtifactCache, ctx: BatchKitContext) -> None:
    """Called once per fit for each training dataset, before its DataLoader is first built: when the
    fit loop first asks for the train loader, after the strategy has put the model on its device
    (``ctx.device``) and after a checkpoint's plugin state was restored.

    The place for offline work over the whole dataset (mining, embedding with a teacher, indexing).
    It runs on **every** rank, in the same order, so collectives and barriers are allowed; to do the
    work once, build the result with ``cache.get_or_create(key, build)``: rank 0 builds and saves it
    under ``key`` while the other ranks wait, then every rank loads it. Make the key with
    :meth:`~batchkit.cache.ArtifactCache.key` from everything the result depends on (the data, the
    teacher, the options), keep only the key in the plugin's state, and a second run, or a resumed
    one, loads the artefact instead of rebuilding it. To share the work, ``batchkit.dist.shard_range``
    gives each rank its slice and ``batchkit.dist.all_gather_object`` collects the pieces.

    Not called again when Lightning reloads the loader, nor when a plugin asks for a rebuild.

    :param dataset: the train DataLoader's dataset, unmodified.
    :param cache: the host's on-disk :class:`~batchkit.cache.ArtifactCache`.
    :param ctx: the host's context (``rank``, ``world_size``, ``device``).
    """


@notification_hook()
def batchkit_fit_start(module: Any, ctx: BatchKitContext) -> None:
    """Called once per fit when training starts (Lightning's ``on_train_start``): the strategy has
    placed the model on its device and built the optimizers (DDP wrapping and DeepSpeed's engine
    included), a checkpoint's plugin state has been restored (under every strategy), the train
    loader has been built, and no batch has been drawn yet.

    The place to move auxiliary models (a frozen reference model, a teacher) to ``ctx.device``, and
    to read the optimizers.

    :param module: the LightningModule, on its device.
    :param ctx: the host's context (``ctx.device`` is set).
    """


@notification_hook()
def batchkit_epoch_start(epoch: int, ctx: BatchKitContext) -> None:
    """Called at the start of every training epoch, before its first batch is drawn.

    Not called for the epoch a run resumes into from a mid-epoch checkpoint: that epoch already
    started before the checkpoint, and the plugin's restored state carries on from there
    (``ctx.epoch`` is still right).

    :param epoch: the 0-based epoch about to start.
    :param ctx: the host's context.
    """


@notification_hook()
def batchkit_epoch_end(epoch: int, ctx: BatchKitContext) -> None:
    """Called at the end of every training epoch, after its last optimizer step.

    A plugin that needs a new train DataLoader for the next epoch (another batch size, another
    collate) calls ``host.request_loader_rebuild(reason)`` here; the host makes Lightning rebuild
    the loader before the next epoch starts, so its length, the progress bar and the validation
    cadence follow.

    :param epoch: the 0-based epoch that just ended.
    :param ctx: the host's context.
    """


@notification_hook()
def batchkit_before_optimizer_step(optimizer: torch.optim.Optimizer, ctx: BatchKitContext) -> None:
    """Called once per *real* optimizer step, after the backward of its last micro-batch and before
    the parameters change.

    Correct under gradient accumulation and under DeepSpeed: Lightning calls its own
    ``on_before_optimizer_step`` on every micro-batch under DeepSpeed, the host filters those so this
    hook sees only step boundaries (``ctx.is_last_micro_batch`` is true).

    :param optimizer: the optimizer about to step (under DeepSpeed, the user-level optimizer that
        DeepSpeed wraps).
    :param ctx: the host's context.
    """


@notification_hook()
def batchkit_step_end(ctx: BatchKitContext) -> None:
    """Called after every optimizer-step boundary, once the step has been taken.

    ``ctx.global_step`` already counts the step just taken. Buffers that accumulate over the
    micro-batches of one optimizer step (for example expert counts) are reset here.

    :param ctx: the host's context.
    """


@notification_hook()
def batchkit_teardown(ctx: BatchKitContext) -> None:
    """Called once when training ends, normally or by an exception.

    :param ctx: the host's context.
    """


# -------------------------------------------------------------------------------------------------
# Stage 1: sampler (main process, while the train DataLoader is built)
# -------------------------------------------------------------------------------------------------


@chain_hook("batch_sampler", "sampler")
def batchkit_wrap_batch_sampler(batch_sampler: Any, dataset: Dataset, ctx: BatchKitContext) -> Any:
    """Wrap the batch sampler of the training DataLoader.

    Called each time the train DataLoader is built. The first plugin in the chain receives the
    host's *base* batch sampler:

    * by default, this rank's shard of the dataset (a ``DistributedSampler``, one replica when not
      distributed), shuffled as the user's DataLoader was, cut into batches of
      ``ctx.super_batch.load_size`` (the user's batch size unless a batch-stage plugin asked for
      super-batches);
    * if a plugin in the chain sets ``global_batches = True``, the **unsharded** dataset cut into
      *global* batches of ``world_size`` times that size, identical on every rank; after the chain
      the host gives each rank its slice of every global batch
      (:func:`batchkit.data.split_global_batch`), so a plugin can build global batches (whole
      clusters, say) without knowing about ranks.

    A batch sampler is an iterable of batches with a ``__len__``. A batch is a list of dataset
    indices, or a :class:`batchkit.data.BatchPlan` (the indices plus a ``meta`` dict that reaches the
    collate stage in the DataLoader workers through :func:`batchkit.data.batch_meta`, and the batch
    stage through ``ctx.batch_meta``). It must:

    * yield only indices of this rank's shard (``ctx.rank``), or global batches when the chain works
      on global batches, so that ranks never train the same samples twice;
    * have the same ``len()`` on every rank (the host checks this and raises otherwise), since a
      rank that runs out of batches early leaves the others hung in a collective;
    * produce its order for an epoch deterministically from its state and the epoch, so resuming
      mid-epoch reproduces it (the host skips the batches already trained).

    Wrappers should subclass :class:`batchkit.data.BatchSamplerWrapper`, which forwards
    ``set_epoch(epoch)`` to what they wrap; the host calls it on the outermost sampler at the start
    of every epoch.

    :param batch_sampler: the batch sampler built so far.
    :param dataset: the DataLoader's dataset.
    :param ctx: the host's context.
    :return: a new batch sampler, or ``None`` to keep ``batch_sampler``.
    """


@chain_hook("total_steps", "sampler")
def batchkit_plan_total_steps(total_steps: int | None, ctx: BatchKitContext) -> int | None:
    """Revise the number of optimizer steps the run will take.

    The host starts from Lightning's estimate (``max_steps``, or the length of the train loader
    times ``max_epochs`` divided by the accumulation) and asks again after every loader rebuild. A
    plugin whose epochs change length (a batch-size schedule) returns its own count, so that
    ``ctx.total_steps`` and ``ctx.progress`` stay right.

    :param total_steps: the count so far (``None`` when unknown).
    :param ctx: the host's context.
    :return: the revised count, or ``None`` to keep it.
    """


# -------------------------------------------------------------------------------------------------
# Stage 2: collator (DataLoader workers)
# -------------------------------------------------------------------------------------------------


@chain_hook("collate_fn", "collator")
def batchkit_wrap_collate(collate_fn: Callable[[list[Any]], Any], ctx: BatchKitContext) -> Callable[[list[Any]], Any]:
    """Wrap the collate function of the training DataLoader.

    Called each time the train DataLoader is built. The first plugin receives the user's collate
    function (``default_collate`` if none was given). The returned callable runs in the DataLoader
    worker processes, so it must be picklable and must not rely on state the main process changes
    after the DataLoader starts its workers. The metadata the batch sampler attached to the batch
    being collated is :func:`batchkit.data.batch_meta` (an empty dict for plain index lists).

    The host turns a top-level tuple produced by the chain into a list, so the batch stage and the
    user's ``training_step`` always receive a mutable container.

    :param collate_fn: the collate function built so far: ``list of samples -> batch``.
    :param ctx: the host's context.
    :return: a new collate function, or ``None`` to keep ``collate_fn``.
    """


# -------------------------------------------------------------------------------------------------
# Stage 3: batch (on the device, right before the user's training_step)
# -------------------------------------------------------------------------------------------------


@chain_hook("batch", "batch")
def batchkit_transform_batch(batch: Any, module: Any, ctx: BatchKitContext) -> Any:
    """Transform a training batch after it reached the device, before ``training_step`` sees it.

    Called once per **micro-batch** (under gradient accumulation, once for each of the step's
    micro-batches, each selected on its own). The batch may be returned smaller (selection),
    reshaped or replaced. Select and split with :mod:`batchkit.batch` (``ctx.batch_spec`` says which
    fields are per-sample), score with :func:`batchkit.batch.scoring_pass`, and select across ranks
    with :func:`batchkit.selection.select_across_ranks`. A scoring pass must leave the model as it
    found it (parameters, BatchNorm statistics, training flags).

    **Super-batches.** A plugin with a ``load_factor`` attribute r > 1 asks for r times more samples
    than it keeps: the host loads ``ctx.super_batch.load_size`` samples per micro-batch and, after
    the chain, checks that every rank's batch holds ``ctx.super_batch.train_size`` samples (the
    user's batch size). With several such plugins the factors multiply and each one keeps
    ``ctx.super_batch.keep_size(plugin)`` of what it receives.

    :param batch: the batch as the DataLoader produced it (tuple, list, dict or tensor), on device.
    :param module: the LightningModule.
    :param ctx: the host's context (``ctx.batch_idx``, ``ctx.is_last_micro_batch``, ...).
    :return: the new batch, or ``None`` to keep it.
    """


@notification_hook("batch")
def batchkit_before_forward(batch: Any, module: Any, ctx: BatchKitContext) -> None:
    """Called after the batch chain, right before ``training_step`` runs on the final batch.

    Read-only: the place to start per-step recording (for example router statistics) without
    depending on where other plugins sit in the batch chain.

    :param batch: the batch ``training_step`` is about to receive.
    :param module: the LightningModule.
    :param ctx: the host's context.
    """


# -------------------------------------------------------------------------------------------------
# Stage 4: loss (after the user's training_step)
# -------------------------------------------------------------------------------------------------


@chain_hook("loss", "loss")
def batchkit_transform_loss(loss: torch.Tensor, outputs: Any, batch: Any, module: Any, ctx: BatchKitContext) -> torch.Tensor:
    """Transform the loss ``training_step`` returned, before Lightning runs backward on it.

    Auxiliary terms (for example a load-balancing loss) are added here with their gradient. Needs
    Lightning's automatic optimization: with ``automatic_optimization = False`` the module calls
    backward itself, so the host refuses loss-stage plugins at setup.

    Not called when ``training_step`` returns ``None`` (a skipped step).

    :param loss: the scalar loss (the ``"loss"`` entry if ``training_step`` returned a dict).
    :param outputs: what ``training_step`` returned, unchanged.
    :param batch: the batch ``training_step`` received (after the batch stage).
    :param module: the LightningModule.
    :param ctx: the host's context.
    :return: the new loss tensor, or ``None`` to keep it.
    """


# -------------------------------------------------------------------------------------------------
# Stage 5: optimizer
# -------------------------------------------------------------------------------------------------


@chain_hook("optimizer", "optimizer")
def batchkit_wrap_optimizer(optimizer: torch.optim.Optimizer, module: Any, ctx: BatchKitContext) -> torch.optim.Optimizer:
    """Replace or wrap the optimizer that the module's ``configure_optimizers`` built.

    Called once per fit, before the strategy (DDP, DeepSpeed) sees the optimizer, so a replacement
    is what DeepSpeed wraps. Learning-rate schedulers the module returned are re-pointed at the
    replacement when it has the same number of parameter groups; otherwise the host raises.

    A plugin that needs the learning rate scaled for some steps (a batch-size schedule) does not
    edit ``param_groups``: it declares ``scales_lr = True`` and calls
    ``host.set_lr_scale(name, scale)``, and the host multiplies every group's lr by the product of
    the plugins' scales for the duration of each ``step()`` only, so the module's LR schedulers
    see their own values.

    :param optimizer: the optimizer built so far (the module's, or the previous plugin's).
    :param module: the LightningModule, for its ``named_parameters()``.
    :param ctx: the host's context.
    :return: a new optimizer, or ``None`` to keep ``optimizer``.
    """


# -------------------------------------------------------------------------------------------------
# State
# -------------------------------------------------------------------------------------------------


@per_plugin_hook()
def batchkit_state_dict() -> dict[str, Any]:
    """Return everything the plugin needs to resume exactly after a restart.

    Called per plugin when a checkpoint is saved; the host stores the result under the plugin's
    instance name. Tensors may be included; return copies, not live buffers. Large artefacts built
    in :func:`batchkit_prepare_data` stay in the artefact cache: keep their key here, not the data.

    :return: a picklable dict.
    """


@per_plugin_hook()
def batchkit_load_state_dict(state: dict[str, Any]) -> None:
    """Restore what :func:`batchkit_state_dict` returned.

    Called per plugin when a checkpoint is loaded, before the train DataLoader is built for the
    resumed run, so sampler-stage plugins see their restored state when their batch sampler is
    created.

    :param state: the dict this plugin returned when the checkpoint was saved.
    """
