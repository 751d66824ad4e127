"""Lightning integration: :class:`BatchKitCallback` applies all five stages to an unmodified
LightningModule and DataLoader (or DataModule); :class:`CPUDeepSpeedStrategy` runs Lightning's
DeepSpeed strategy on CPU processes (gloo) for tests, CI and laptops.

Where Lightning has no public way to do what a stage needs, this module says so next to the code:

* **batch and loss stages**: a callback receives the batch by reference and cannot replace it, and
  it cannot replace the loss at all. The callback therefore wraps ``training_step`` *on the module
  instance* (not the class) for the duration of ``fit``; Lightning's strategies look the method up
  on the instance, so DDP and DeepSpeed route through the wrapper.
* **optimizer stage**: likewise ``configure_optimizers`` is wrapped on the instance, so a
  replacement optimizer exists before the strategy (and DeepSpeed) takes it.
* **sampler and collator stages**: ``train_dataloader`` is wrapped on the module or DataModule
  instance. Loaders passed straight to ``trainer.fit(train_dataloaders=...)`` live only in the
  private ``trainer.fit_loop._data_source``; there is no public alternative.

Every private or implicit Lightning behaviour batchkit relies on is in :mod:`batchkit._compat`, one
function each, with a contract test.

When the hooks run in a fit: ``batchkit_setup`` (Callback.setup; the model is not on its device
yet), the optimizer chain (when the strategy builds the optimizers), then, once the fit loop asks for
the train loader, ``batchkit_prepare_data`` and the collate and sampler chains, then
``batchkit_fit_start`` (Callback.on_train_start: model on its device, optimizers built, checkpoint
state restored under every strategy), then the epochs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Mapping
from typing import Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch import LightningModule
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from batchkit import _compat
from batchkit import deepspeed_compat
from batchkit import dist
from batchkit.batch import BatchSpec
from batchkit.cache import ArtifactCache
from batchkit.config import batch_spec_entry
from batchkit.config import build_plugins
from batchkit.config import load_config
from batchkit.config import plugin_entries
from batchkit.data import BatchKitDataLoader
from batchkit.data import build_train_loader
from batchkit.errors import BatchKitError
from batchkit.errors import PluginError
from batchkit.host import PluginHost
from batchkit.host import TrainProgress
from batchkit.plugin import kind_of


_NO_ATTRIBUTE = object()


class BatchKitCallback(Callback):
    """Runs batchkit plugins inside a Lightning ``Trainer``.

    :param plugins: plugin instances; or a mapping of named YAML-style entries
        (``{"mix": {"plugin": "mixup", "alpha": 0.2}}``); or a mapping of instance names to plugin
        instances (``{"mix_a": MixupPlugin(...), ...}``), the way to run two instances side by side.
    :param print_summary: print per-plugin hook overhead at the end of ``fit`` (rank 0); turns
        ``time_hooks`` on.
    :param time_hooks: time every plugin's hook calls (``callback.host.timings()``); off by
        default, since the clock readings cost more than a light plugin's calls.
    :param batch_spec: how plugins count and select the samples of a batch
        (:class:`batchkit.batch.BatchSpec`, or its YAML form ``{per_sample: [...], shared: [...]}``);
        needed only for batches whose per-sample fields the default rules cannot tell.
    :param cache_dir: where prepare-data artefacts are kept (default: ``$BATCHKIT_CACHE_DIR`` or
        ``~/.cache/batchkit``).
    """

    def __init__(
        self,
        plugins: Sequence[object] | Mapping[str, Any] | None = None,
        print_summary: bool = False,
        batch_spec: BatchSpec | Mapping[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        time_hooks: bool = False,
    ) -> None:
        super().__init__()
        self.host = PluginHost()
        self.host.time_hooks = time_hooks or print_summary
        if isinstance(plugins, Mapping) and plugins and all(_is_plugin_object(v) for v in plugins.values()):
            for name, plugin in plugins.items():  # {instance name: plugin}
                self.host.register(plugin, name=name)
        else:
            for plugin in build_plugins(plugins) if isinstance(plugins, Mapping) else plugins or ():
                self.host.register(plugin)
        self.host.ctx.batch_spec = BatchSpec.from_config(batch_spec)
        self.cache = ArtifactCache(cache_dir)
        self.print_summary = print_summary
        self._patched: list[tuple[object, str, Any]] = []  # (owner, name, instance attribute it replaced)
        self._loaders: list[BatchKitDataLoader] = []
        self._prepared: set[int] = set()  # datasets whose prepare-data hooks ran in this fit
        self._resumed = False  # state came from a checkpoint; cleared after the first batch
        self._reload_setting: int | None = None  # Trainer setting to put back after a requested rebuild
        self._optimizer_hooks: list[Any] = []
        self._fit_started: float | None = None
        # the per-step notifications, prepared at the start of each fit (see PluginHost.caller)
        self._before_optimizer_step: Callable[..., None] | None = None
        self._step_end: Callable[..., None] | None = None
        self._ends_step: Callable[[int], bool] | None = None
        self._pop_meta: Callable[[], Mapping[str, Any]] | None = None  # the train loader's, when there is one
        self.fit_seconds: float | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None, **kwargs: Any) -> BatchKitCallback:
        """Build the callback from the ``batchkit`` section of a YAML file (``plugins`` and the
        optional ``batch_spec``).

        :param overrides: OmegaConf dotlist overrides, e.g. ``["batchkit.plugins.mix.alpha=0.5"]``.
        """
        cfg = load_config(path, overrides)
        kwargs.setdefault("batch_spec", batch_spec_entry(cfg))
        return cls(plugin_entries(cfg), **kwargs)

    @property
    def state_key(self) -> str:
        return "BatchKitCallback"

    @property
    def progress(self) -> TrainProgress:
        """Where training stands (the host's one record of it)."""
        return self.host.ctx.train_progress

    # -- setup and teardown -------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if sum(isinstance(cb, BatchKitCallback) for cb in trainer.callbacks) > 1:
            raise PluginError(
                "batchkit: the Trainer has more than one BatchKitCallback; put all plugins in one callback"
            )
        self.host.validate()
        ctx = self.host.ctx
        ctx.trainer, ctx.module, ctx.stage = trainer, pl_module, stage
        ctx.rank, ctx.world_size = trainer.global_rank, trainer.world_size
        ctx.accumulate_grad_batches = trainer.accumulate_grad_batches
        ctx.max_steps, ctx.max_epochs = trainer.max_steps, trainer.max_epochs
        ctx.log_every_n_steps = trainer.log_every_n_steps
        if stage == "fit" and not pl_module.automatic_optimization and self.host.has_impls("batchkit_transform_loss"):
            raise PluginError(
                f"batchkit: loss-stage plugins {self.host.chain_order('batchkit_transform_loss')} change the loss that "
                f"Lightning back-propagates, but {type(pl_module).__name__} uses manual optimization "
                "(automatic_optimization = False) and calls backward itself, so they would have no effect. Use "
                "automatic optimization, or remove these plugins."
            )
        # Plugins check the module first, so a missing protocol fails before anything is patched.
        try:
            self.host.notify("batchkit_setup", host=self.host, trainer=trainer, module=pl_module, stage=stage)
        except BatchKitError:
            raise
        except (ValueError, TypeError) as exc:  # a check written with a built-in error: one error type
            raise PluginError(_setup_error_message(self.host, exc)) from exc
        if stage == "fit":
            self._prepared = set()
            self._patch_training_step(pl_module)
            self._patch_configure_optimizers(pl_module)
            backward = deepspeed_compat.backward_for(trainer.strategy)  # see batchkit/deepspeed_compat.py
            if backward is not None:
                self._patch(trainer.strategy, "backward", backward)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unpatch()
        self._remove_optimizer_hooks()
        if self._reload_setting is not None:
            _compat.restore_reload_setting(trainer, self._reload_setting)
            self._reload_setting = None
        if stage == "fit":
            self.host.notify("batchkit_teardown", ctx=self.host.ctx)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls teardown after this too; unpatch now so a retry in the same process starts clean.
        self._unpatch()
        self._remove_optimizer_hooks()

    def _unpatch(self) -> None:
        for owner, name, previous in reversed(self._patched):
            if previous is _NO_ATTRIBUTE:
                vars(owner).pop(name, None)  # the class method shows through again
            else:
                setattr(owner, name, previous)
        self._patched.clear()

    def _patch(self, owner: object, name: str, replacement: Any) -> None:
        replacement.__wrapped__ = getattr(owner, name)
        self._patched.append((owner, name, vars(owner).get(name, _NO_ATTRIBUTE)))
        setattr(owner, name, replacement)

    # -- stage 1 + 2: the train DataLoader ----------------------------------------------------

    def _wrap_loaders(self, loaders: Any) -> Any:
        self._loaders = []  # a reload replaces the previous loaders
        self._pop_meta = None

        def wrap(loader: DataLoader) -> DataLoader:
            new = build_train_loader(loader, self.host, progress=self.progress, prepared=self._prepared, cache=self.cache)
            if isinstance(new, BatchKitDataLoader):
                if self._resumed:
                    new.resumable.resume_at(self.progress.epoch, self.progress.batches_done)
                self._loaders.append(new)
            return new

        wrapped = apply_to_collection(loaders, DataLoader, wrap)
        # batch metadata is tracked for a single train loader (with several, which batch Lightning
        # trains next is its own business)
        meta_loader = self._loaders[0].resumable if len(self._loaders) == 1 else None
        self._pop_meta = meta_loader.pop_meta if meta_loader is not None and meta_loader.track_meta else None
        if self._pop_meta is None:
            self.host.ctx.batch_meta = {}
        return wrapped

    def _patch_train_dataloader(self, trainer: Trainer, pl_module: LightningModule) -> None:
        source = _compat.train_data_source(trainer)
        instance = source.instance
        if isinstance(instance, (LightningModule, LightningDataModule)):
            original = instance.train_dataloader

            def train_dataloader() -> Any:
                return self._wrap_loaders(original())

            self._patch(instance, "train_dataloader", train_dataloader)
        elif instance is not None:
            # Loaders given to fit(): answer the fit loop's every request (a reload included) with a
            # fresh build from the user's loaders, as for a module's train_dataloader().
            def dataloader() -> Any:
                return self._wrap_loaders(instance)

            self._patch(source, "dataloader", dataloader)

    # -- stage 3 + 4: batch and loss, around training_step ------------------------------------

    def _patch_training_step(self, pl_module: LightningModule) -> None:
        host = self.host
        original = pl_module.training_step
        ctx = host.ctx
        progress = ctx.train_progress
        # Fixed for the whole fit: plugins are registered before it starts. Called positionally
        # (checked against the hook declarations here), as keyword matching costs on every step.
        transform_batch = _per_step_caller(host, "batchkit_transform_batch", ("batch", "module", "ctx"))
        before_forward = _per_step_caller(host, "batchkit_before_forward", ("batch", "module", "ctx"))
        transform_loss = _per_step_caller(host, "batchkit_transform_loss", ("loss", "outputs", "batch", "module", "ctx"))

        def check_size(plugin: str, batch: Any) -> None:
            plan = ctx.super_batch
            if plan is None or plugin not in plan.sizes:
                return
            expected, got = plan.keep_size(plugin), ctx.batch_spec.num_samples(batch)
            if got != expected:
                raise PluginError(
                    f"batchkit: plugin {plugin!r} selects from super-batches of {plan.input_size(plugin)} samples and "
                    f"must return {expected} (ctx.super_batch.keep_size), but returned {got} on rank {ctx.rank}"
                )

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            spec = ctx.batch_spec
            loaded = count_samples(batch, spec)
            if transform_batch is not None:
                plan = ctx.super_batch  # the sizes are checked after each plugin that selects
                batch = transform_batch(batch, pl_module, ctx, check_size if plan is not None and plan.sizes else None)
                # counted again: a plugin may cut the (mutable) batch in place and return nothing
                trained = count_samples(batch, spec)
            else:
                trained = loaded
            progress.samples_loaded += loaded
            progress.samples_trained += trained
            progress.batch_size, progress.loaded_batch_size = trained, loaded
            if before_forward is not None:
                before_forward(batch, pl_module, ctx)
            outputs = original(batch, *args, **kwargs)
            if transform_loss is None or outputs is None:
                return outputs
            if isinstance(outputs, torch.Tensor):
                return transform_loss(outputs, outputs, batch, pl_module, ctx)
            loss = transform_loss(outputs["loss"], outputs, batch, pl_module, ctx)
            return {**outputs, "loss": loss}

        self._patch(pl_module, "training_step", training_step)

    # -- stage 5: the optimizer ---------------------------------------------------------------

    def _patch_configure_optimizers(self, pl_module: LightningModule) -> None:
        host = self.host
        if not host.has_impls("batchkit_wrap_optimizer"):
            return
        original = pl_module.configure_optimizers

        def configure_optimizers() -> Any:
            return _replace_optimizers(original(), host, pl_module)

        self._patch(pl_module, "configure_optimizers", configure_optimizers)

    def _install_lr_scale(self, trainer: Trainer) -> None:
        """Scale every group's lr by ``host.lr_scale`` for the duration of each ``step()`` only,
        through the optimizer's public step hooks (they fire under DDP and inside DeepSpeed's ZeRO
        optimizers alike, and LR schedulers, which run after the step, never see the scaled value).
        Installed only when a plugin declares ``scales_lr``: two calls per step nobody needs otherwise."""
        host = self.host
        if not host.scales_lr:
            return
        for optimizer in _compat.torch_optimizers(trainer):
            saved: list[list[Any]] = []

            def scale(opt: torch.optim.Optimizer, args: Any, kwargs: Any, saved: list = saved) -> None:
                factor = host.lr_scale
                if factor != 1.0:
                    saved.append([group["lr"] for group in opt.param_groups])
                    for group in opt.param_groups:
                        group["lr"] = group["lr"] * factor

            def unscale(opt: torch.optim.Optimizer, args: Any, kwargs: Any, saved: list = saved) -> None:
                if saved:
                    for group, lr in zip(opt.param_groups, saved.pop()):
                        group["lr"] = lr

            self._optimizer_hooks += [optimizer.register_step_pre_hook(scale), optimizer.register_step_post_hook(unscale)]

    def _remove_optimizer_hooks(self) -> None:
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []

    # -- per epoch and per batch --------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._before_optimizer_step = _per_step_caller(self.host, "batchkit_before_optimizer_step", ("optimizer", "ctx"))
        self._step_end = _per_step_caller(self.host, "batchkit_step_end", ("ctx",))
        self.host.ctx.device = pl_module.device
        self._remove_optimizer_hooks()
        self._install_lr_scale(trainer)
        # Here, not in setup: plugin state is restored from a checkpoint (under DeepSpeed only after
        # this hook, but still before the loader is built), and the sampler chain must be built
        # from the restored state.
        self._patch_train_dataloader(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ctx = self.host.ctx
        if not self._resumed:
            ctx.global_step = trainer.global_step
        # A resume in the middle of an epoch skips on_train_epoch_start: take the epoch from here.
        ctx.epoch = trainer.current_epoch
        self._plan_total_steps(trainer)
        self._ends_step = _compat.optimizer_step_rule(trainer)
        self.host.notify("batchkit_fit_start", module=pl_module, ctx=ctx)

    def _plan_total_steps(self, trainer: Trainer) -> None:
        total = trainer.estimated_stepping_batches
        estimate = int(total) if total != float("inf") else None
        self.host.ctx.total_steps = self.host.chain("batchkit_plan_total_steps", estimate, ctx=self.host.ctx)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ctx = self.host.ctx
        if self._reload_setting is not None:  # the rebuild a plugin asked for has happened
            _compat.restore_reload_setting(trainer, self._reload_setting)
            self._reload_setting = None
            self._plan_total_steps(trainer)
        ctx.epoch = trainer.current_epoch
        self.progress.batches_done = 0
        self.host.notify("batchkit_epoch_start", epoch=ctx.epoch, ctx=ctx)

    # The three per-batch hooks below run on every step of every fit: they read and write the
    # context's fields directly and call prepared functions (see PluginHost.caller).

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        ctx = self.host.ctx
        ctx.train_progress.batch_idx = batch_idx
        ctx.is_last_micro_batch = self._ends_step(batch_idx)  # type: ignore[misc]
        ctx.micro_step = micro_step = batch_idx % ctx.accumulate_grad_batches
        if micro_step == 0:  # Lightning's rule: it logs the steps whose 1-based count is a multiple of n
            ctx.logs_this_step = (ctx.train_progress.global_step + 1) % max(1, ctx.log_every_n_steps) == 0
        if self._pop_meta is not None:
            ctx.batch_meta = self._pop_meta()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Under DeepSpeed Lightning calls this on every micro-batch; pass on only real steps.
        ctx = self.host.ctx
        if ctx.is_last_micro_batch and self._before_optimizer_step is not None:
            self._before_optimizer_step(optimizer, ctx)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        ctx = self.host.ctx
        progress = ctx.train_progress
        progress.batches_done = batch_idx + 1
        if self._resumed:  # the first batch after a resume: the skip is spent
            for loader in self._loaders:
                loader.resumable.clear_resume()
            self._resumed = False
        if ctx.is_last_micro_batch:
            progress.global_step += 1
            if self._step_end is not None:
                self._step_end(ctx)
        # the step's 0-based index, which Lightning's own metrics of the same step carry
        if self.host.has_metrics:
            self._flush_metrics(trainer, progress.global_step - 1 if ctx.is_last_micro_batch else progress.global_step)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.host.notify("batchkit_epoch_end", epoch=self.host.ctx.epoch, ctx=self.host.ctx)
        self._flush_metrics(trainer, self.host.ctx.global_step - 1)  # Lightning's epoch-end step too
        reasons = self.host.pop_rebuild_request()
        if reasons and self._reload_setting is None:
            self._reload_setting = _compat.reload_train_loader_before_next_epoch(trainer)

    def _flush_metrics(self, trainer: Trainer, step: int) -> None:
        """Write what plugins logged since the last flush to every Trainer logger (CSV, wandb, ...)
        at ``step``, the 0-based index of the optimizer step they belong to (the row where Lightning
        writes the module's own metrics of that step), once: a value logged once appears once. Values logged with
        ``reduce`` are combined across ranks first (one all-reduce per reduction, every rank takes
        part); the others are rank 0's. They also land in ``trainer.callback_metrics``, so a
        ``ModelCheckpoint`` or ``EarlyStopping`` can monitor them. Plugins that produce a value every
        step log it only when ``ctx.logs_this_step``, so the Trainer's ``log_every_n_steps`` applies
        to them too."""
        metrics = self.host.pop_metrics()
        if not metrics:
            return
        values: dict[str, float] = {}
        for op in ("mean", "sum", "max", "min"):
            keys = [k for k, (_, reduce) in metrics.items() if reduce == op]
            if keys:
                packed = torch.tensor([float(metrics[k][0]) for k in keys], dtype=torch.float64)
                values.update(zip(keys, dist.all_reduce(packed, op).tolist()))
        values.update({k: float(v) for k, (v, reduce) in metrics.items() if reduce is None})
        named = {f"batchkit/{k}": v for k, v in values.items()}
        _compat.publish_callback_metrics(trainer, named)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(named, step=max(step, 0))
                logger.save()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit_started is not None:
            self.fit_seconds = time.perf_counter() - self._fit_started
        if self.print_summary and trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            print(self.summary())
            print(f"fit wall time: {self.fit_seconds:.1f} s; " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def summary(self) -> str:
        """Per-plugin hook overhead as a table (rich, if present)."""
        return format_overhead(self.host, self.fit_seconds)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"plugins": self.host.state_dict(), "progress": self.progress.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = True
        self.host.load_state_dict(state_dict.get("plugins", {}))
        self.progress.load_state_dict(state_dict.get("progress", {}))


def _is_plugin_object(value: Any) -> bool:
    return value is not None and not isinstance(value, (Mapping, DictConfig))


def _per_step_caller(host: PluginHost, hook_name: str, positional: tuple[str, ...]) -> Callable[..., Any] | None:
    """The prepared caller of a hook run on every step, taking ``positional`` in that order; None
    where no plugin implements the hook, so the step has nothing to call."""
    return host.caller(hook_name, positional=positional) if host.has_impls(hook_name) else None


def count_samples(batch: Any, spec: BatchSpec) -> int:
    """The batch's number of samples for the progress counters (0 when the batch does not say: only
    plugins that select need an unambiguous count, and they ask the spec themselves)."""
    if not spec.names_fields:
        # the common case, without walking the batch: a tensor, or a container of same-length
        # tensors (run twice a step: each shape is read once, exact types are tested first)
        kind = type(batch)
        if kind is list or kind is tuple or isinstance(batch, (list, tuple)):
            items = batch
        elif isinstance(batch, dict):
            items = batch.values()
        else:
            items = (batch,)
        n = -1
        for item in items:
            if not isinstance(item, torch.Tensor):
                break
            shape = item.shape
            if not shape or (n >= 0 and shape[0] != n):
                break
            n = shape[0]
        else:
            if n >= 0:
                return n
    try:
        return spec.num_samples(batch)
    except PluginError:
        return 0


def _setup_error_message(host: PluginHost, exc: BaseException) -> str:
    """``exc`` (raised by a plugin's ``batchkit_setup``) as a message naming the entry that raised it."""
    entry = getattr(exc, "batchkit_plugin", None)
    if entry is None:
        return f"batchkit: a plugin's setup check failed: {type(exc).__name__}: {exc}"
    kind = kind_of(host.plugins.get(entry))
    plugin = f"entry {entry!r}" + (f" (plugin {kind!r})" if kind != entry else "")
    return f"batchkit: {plugin} refused the setup: {exc}"


def _replace_optimizers(config: Any, host: PluginHost, module: LightningModule) -> Any:
    """Run the optimizer chain on every optimizer in a ``configure_optimizers`` result, and point
    the result's LR schedulers at the replacements."""
    replaced: dict[int, tuple[torch.optim.Optimizer, torch.optim.Optimizer]] = {}  # id(old) -> (old, new)

    def swap(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        new = host.chain("batchkit_wrap_optimizer", opt, module=module, ctx=host.ctx)
        if new is not opt:
            replaced[id(opt)] = (opt, new)
        return new

    config = apply_to_collection(config, torch.optim.Optimizer, swap)

    def repoint(scheduler: Any) -> Any:
        pair = replaced.get(id(getattr(scheduler, "optimizer", None)))
        if pair is None:
            return scheduler
        old, new = pair
        if len(old.param_groups) != len(new.param_groups):
            chain = host.chain_order("batchkit_wrap_optimizer")
            plugins = host.plugins
            # A plugin that may change the group layout says how to keep it (lamb/lars: exclude: false).
            fixes = [hint for name in chain if (hint := getattr(plugins[name], "keep_param_groups_hint", None))]
            fixes.append("return the optimizer without an LR scheduler from configure_optimizers")
            entries = ", ".join(f"{name!r}" for name in chain)
            raise PluginError(
                f"batchkit: the optimizer chain (entries {entries}) replaced {type(old).__name__}'s "
                f"{len(old.param_groups)} parameter groups by {len(new.param_groups)} groups of {type(new).__name__}, "
                f"but the module's {type(scheduler).__name__} is bound to the old groups (one learning rate per "
                f"group), so it cannot drive the replacement. Fix: {'; or '.join(fixes)}."
            )
        for old_group, new_group in zip(old.param_groups, new.param_groups):
            if "initial_lr" in old_group:
                new_group.setdefault("initial_lr", old_group["initial_lr"])
        scheduler.optimizer = new
        return scheduler

    return apply_to_collection(config, torch.optim.lr_scheduler.LRScheduler, repoint)


def format_overhead(host: PluginHost, fit_seconds: float | None = None) -> str:
    """A table of time spent in each plugin's hooks."""
    timings = host.timings()
    rows = []
    for plugin, hooks in timings.items():
        for hook, t in hooks.items():
            share = f"{100 * t['total_s'] / fit_seconds:.2f}%" if fit_seconds else "-"
            rows.append((plugin, hook.removeprefix("batchkit_"), str(int(t["calls"])), f"{t['mean_us']:.1f}", f"{t['total_s']:.3f}", share))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional for the summary only
        header = "plugin  hook  calls  mean_us  total_s  share_of_fit"
        return "\n".join([header] + ["  ".join(r) for r in rows])
    table = Table(title="batchkit: time in plugin hooks")
    for col in ("plugin", "hook", "calls", "mean µs", "total s", "of fit time"):
        table.add_column(col, justify="left" if col in ("plugin", "hook") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(record=True, width=100)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy on CPU processes, with gloo.

    Lightning refuses DeepSpeed without CUDA; DeepSpeed itself runs on CPU when
    ``DS_ACCELERATOR=cpu`` is set (set it before ``deepspeed`` is first imported). This subclass
    lifts the three CUDA-only checks and nothing else, so ZeRO 1/2 run for real::

        Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=2))
    """

    strategy_name = "deepspeed_cpu"
    #: divides the loss by accumulate_grad_batches once, not twice (batchkit/deepspeed_compat.py)
    batchkit_corrects_gas_scaling = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # DeepSpeed picks its accelerator once, on first import; make that choice CPU if it has not
        # been made yet, and refuse clearly if it was made otherwise.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "deepspeed" in sys.modules:
            from deepspeed.accelerator import get_accelerator

            if get_accelerator().device_name() != "cpu":
                raise PluginError(
                    "batchkit: CPUDeepSpeedStrategy needs DeepSpeed's CPU accelerator, but deepspeed was "
                    f"imported with {get_accelerator().device_name()!r}; set DS_ACCELERATOR=cpu before "
                    "anything imports deepspeed"
                )
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA accelerator check; DDPStrategy sets up the process group.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # Skip the CUDA device-index validation; the rest is what DeepSpeedStrategy does.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return deepspeed_compat.corrected_backward(self, super().backward, closure_loss, optimizer, *args, **kwargs)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}


__all__ = ["BatchKitCallback", "CPUDeepSpeedStrategy"]
