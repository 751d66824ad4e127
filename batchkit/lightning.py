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
  private ``trainer.fit_loop._data_source``; there is no public alternative, so that one attribute is
  used and covered by a test.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any
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
from torch.utils.data import DataLoader

from batchkit import deepspeed_compat
from batchkit.config import build_plugins
from batchkit.config import load_config
from batchkit.config import plugin_entries
from batchkit.data import BatchKitDataLoader
from batchkit.data import build_train_loader
from batchkit.errors import PluginError
from batchkit.host import PluginHost


_NO_ATTRIBUTE = object()


class _EpochProgress:
    """Where the training loop is within the epoch; saved with the train DataLoader's state."""

    epoch = 0
    batches_done = 0


class BatchKitCallback(Callback):
    """Runs batchkit plugins inside a Lightning ``Trainer``.

    :param plugins: plugin instances, or a mapping of named YAML-style entries
        (``{"mix": {"plugin": "mixup", "alpha": 0.2}}``).
    :param print_summary: print per-plugin hook overhead at the end of ``fit`` (rank 0).
    """

    def __init__(self, plugins: Sequence[object] | Mapping[str, Any] | None = None, print_summary: bool = False) -> None:
        super().__init__()
        if isinstance(plugins, Mapping):
            plugins = build_plugins(plugins)
        self.host = PluginHost(plugins or ())
        self.print_summary = print_summary
        self._progress = _EpochProgress()
        self._patched: list[tuple[object, str, Any]] = []  # (owner, name, instance attribute it replaced)
        self._loaders: list[BatchKitDataLoader] = []
        self._resumed = False  # state came from a checkpoint; cleared after the first batch
        self._fit_started: float | None = None
        self.fit_seconds: float | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None, **kwargs: Any) -> BatchKitCallback:
        """Build the callback from the ``batchkit.plugins`` section of a YAML file.

        :param overrides: OmegaConf dotlist overrides, e.g. ``["batchkit.plugins.mix.alpha=0.5"]``.
        """
        return cls(plugin_entries(load_config(path, overrides)), **kwargs)

    @property
    def state_key(self) -> str:
        return "BatchKitCallback"

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
        # Plugins check the module first, so a missing protocol fails before anything is patched.
        self.host.notify("batchkit_setup", host=self.host, trainer=trainer, module=pl_module, stage=stage)
        if stage == "fit":
            self._patch_training_step(pl_module)
            self._patch_configure_optimizers(pl_module)
            backward = deepspeed_compat.backward_for(trainer.strategy)  # see batchkit/deepspeed_compat.py
            if backward is not None:
                self._patch(trainer.strategy, "backward", backward)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unpatch()
        if stage == "fit":
            self.host.notify("batchkit_teardown", ctx=self.host.ctx)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning calls teardown after this too; unpatch now so a retry in the same process starts clean.
        self._unpatch()

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

        def wrap(loader: DataLoader) -> DataLoader:
            new = build_train_loader(loader, self.host, progress=self._progress)
            if isinstance(new, BatchKitDataLoader):
                self._loaders.append(new)
            return new

        return apply_to_collection(loaders, DataLoader, wrap)

    def _patch_train_dataloader(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Private: the only place Lightning keeps loaders given to fit(); see the module docstring.
        source = trainer.fit_loop._data_source
        instance = source.instance
        if isinstance(instance, (LightningModule, LightningDataModule)):
            original = instance.train_dataloader

            def train_dataloader() -> Any:
                return self._wrap_loaders(original())

            self._patch(instance, "train_dataloader", train_dataloader)
        elif instance is not None:
            source.instance = self._wrap_loaders(instance)

    # -- stage 3 + 4: batch and loss, around training_step ------------------------------------

    def _patch_training_step(self, pl_module: LightningModule) -> None:
        host = self.host
        if not (host.has_impls("batchkit_transform_batch") or host.has_impls("batchkit_transform_loss")):
            return
        original = pl_module.training_step
        ctx = host.ctx
        # Fixed for the whole fit: plugins are registered before it starts.
        has_batch = host.has_impls("batchkit_transform_batch")
        has_loss = host.has_impls("batchkit_transform_loss")

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            if has_batch:
                batch = host.chain("batchkit_transform_batch", batch, module=pl_module, ctx=ctx)
            outputs = original(batch, *args, **kwargs)
            if not has_loss or outputs is None:
                return outputs
            if isinstance(outputs, torch.Tensor):
                return host.chain("batchkit_transform_loss", outputs, outputs=outputs, batch=batch, module=pl_module, ctx=ctx)
            loss = host.chain("batchkit_transform_loss", outputs["loss"], outputs=outputs, batch=batch, module=pl_module, ctx=ctx)
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

    # -- per epoch and per batch --------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = time.perf_counter()
        # Here, not in setup: plugin state is restored from a checkpoint between the two, and the
        # sampler chain must be built from the restored state.
        self._patch_train_dataloader(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ctx = self.host.ctx
        total = trainer.estimated_stepping_batches
        ctx.total_steps = int(total) if total != float("inf") else None
        if not self._resumed:
            ctx.global_step = trainer.global_step
        # A resume in the middle of an epoch skips on_train_epoch_start: take the epoch from here.
        ctx.epoch = self._progress.epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ctx = self.host.ctx
        ctx.epoch = trainer.current_epoch
        self._progress.epoch = ctx.epoch
        self._progress.batches_done = 0
        self.host.notify("batchkit_epoch_start", epoch=ctx.epoch, ctx=ctx)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        ctx = self.host.ctx
        ctx.batch_idx = batch_idx
        ctx.is_last_micro_batch = _ends_optimizer_step(trainer, batch_idx)
        ctx.micro_step = batch_idx % ctx.accumulate_grad_batches

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Under DeepSpeed Lightning calls this on every micro-batch; pass on only real steps.
        if self.host.ctx.is_last_micro_batch:
            self.host.notify("batchkit_before_optimizer_step", optimizer=optimizer, ctx=self.host.ctx)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        ctx = self.host.ctx
        self._progress.batches_done = batch_idx + 1
        if self._resumed:  # the first batch after a resume: the skip is spent
            for loader in self._loaders:
                loader.resumable.clear_resume()
            self._resumed = False
        if ctx.is_last_micro_batch:
            ctx.global_step += 1
            self.host.notify("batchkit_step_end", ctx=ctx)
        self._flush_metrics(pl_module, per_step=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.host.notify("batchkit_epoch_end", epoch=self.host.ctx.epoch, ctx=self.host.ctx)
        self._flush_metrics(pl_module, per_step=False)

    def _flush_metrics(self, pl_module: LightningModule, per_step: bool) -> None:
        """Hand plugin metrics to the Trainer's loggers (all of them: CSV, wandb, ...)."""
        metrics = self.host.pop_metrics()
        if metrics:
            pl_module.log_dict(
                {f"batchkit/{k}": v for k, v in metrics.items()}, on_step=per_step, on_epoch=not per_step
            )

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
        return {"plugins": self.host.state_dict(), "global_step": self.host.ctx.global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = True
        self.host.load_state_dict(state_dict.get("plugins", {}))
        self.host.ctx.global_step = int(state_dict.get("global_step", 0))


def _ends_optimizer_step(trainer: Trainer, batch_idx: int) -> bool:
    """Whether the optimizer steps after this micro-batch."""
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        # DeepSpeed counts micro-steps over the whole run, not per epoch: ask the engine.
        return bool(strategy.deepspeed_engine.is_gradient_accumulation_boundary())
    accumulate = trainer.accumulate_grad_batches
    return (batch_idx + 1) % accumulate == 0 or batch_idx + 1 == trainer.num_training_batches


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
            raise PluginError(
                f"batchkit: the optimizer chain {host.chain_order('batchkit_wrap_optimizer')} replaced an "
                f"optimizer with {len(old.param_groups)} parameter groups by one with {len(new.param_groups)}, "
                f"but the module's {type(scheduler).__name__} is bound to the old groups. Return the optimizer "
                "alone from configure_optimizers, or keep the group layout."
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
