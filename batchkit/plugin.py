"""The optional base class for plugins.

Any object with :data:`batchkit.hookimpl` methods can be registered; subclassing :class:`Plugin`
adds a name, a declared order, declared conflicts, the declarations the host reads (super-batches,
global batches, several instances) and metric logging through the Trainer's loggers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar


if TYPE_CHECKING:
    from batchkit.host import PluginHost


def kind_of(plugin: object) -> str:
    """The plugin's registered kind: its ``name`` (the entry-point name), else its class name."""
    return getattr(plugin, "name", "") or type(plugin).__name__.lower()


class Plugin:
    """Base class for batchkit plugins.

    Class attributes a plugin sets:

    ``name``
        The name the plugin is registered under: its entry-point name and the ``plugin:`` value in
        YAML. Lower case, no spaces.
    ``order``
        Position in every transform chain within its tryfirst/ordinary/trylast tier: lower runs
        first (wraps first). Ties keep registration order. A YAML entry may override it. It never
        moves the plugin into another tier.
    ``conflicts``
        Names of plugins that must not run together with this one. The host refuses to start
        when both are registered, whichever of the two declares the conflict.
    ``allow_multiple``
        Whether the plugin may be listed more than once (default ``False``: a second entry is refused
        before training, since two instances would act on the same batches, optimizer or state).

    Attributes the host reads, on the class or the instance:

    ``load_factor``
        A batch-stage plugin that selects from a larger batch than it keeps sets this to r > 1: the
        host then loads r times more samples per micro-batch and checks that the plugin returns
        ``ctx.super_batch.keep_size(self)`` samples (see :class:`batchkit.host.SuperBatchPlan`).
    ``global_batches``
        A sampler-stage plugin that builds *global* batches (across ranks) sets this to ``True``:
        the chain then starts from an unsharded base sampler of global batches and the host splits
        every global batch across ranks after the chain.
    ``scales_lr``
        A plugin that calls ``host.set_lr_scale`` sets this to ``True``: the host then applies the
        scale around every optimizer step (through the optimizer's step hooks). Plugins that do
        not declare it cost no step hooks, and their ``set_lr_scale`` calls are refused.
    """

    name: ClassVar[str] = ""
    order: int = 0
    conflicts: ClassVar[tuple[str, ...]] = ()
    allow_multiple: ClassVar[bool] = False
    load_factor: float | None = None
    global_batches: bool = False
    scales_lr: bool = False

    _host: PluginHost | None = None
    _instance_name: str | None = None

    @property
    def host(self) -> PluginHost | None:
        """The host this plugin is registered with, or ``None`` before registration."""
        return self._host

    @property
    def instance_name(self) -> str:
        """The name of this instance in the host (the YAML entry key, or ``name``)."""
        return self._instance_name or kind_of(self)

    def log(self, key: str, value: Any, reduce: str | None = None) -> None:
        """Record a metric; the host writes it to the Trainer's loggers as
        ``batchkit/<instance name>/<key>``, once, at the optimizer step in progress (at the end of
        the current training batch, or of the epoch from an epoch hook). ``value`` may be a tensor:
        it is not copied to the host here. With ``reduce`` (``"mean"``, ``"sum"``, ``"max"``,
        ``"min"``) the value is reduced across ranks first, for figures that describe the global
        batch (log such keys on every rank at the same step); without, rank 0's value is written. A
        figure produced every step should be logged only when ``ctx.logs_this_step``."""
        if self._host is not None:
            self._host.log(f"{self.instance_name}/{key}", value, reduce)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.instance_name!r}, order={self.order})"
