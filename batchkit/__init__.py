"""batchkit: composable batching transforms for PyTorch Lightning, as pluggy plugins.

Users meet it three ways: :class:`BatchKitCallback` on a Trainer, a YAML plugin list
(:meth:`BatchKitCallback.from_yaml`, ``batchkit fit --config``), and third-party plugin packages
registered in the ``batchkit.plugins`` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from batchkit.errors import BatchKitError
from batchkit.errors import ConfigError
from batchkit.errors import PluginConflictError
from batchkit.errors import PluginError
from batchkit.hookspecs import hookimpl
from batchkit.hookspecs import hookspec
from batchkit.host import BatchKitContext
from batchkit.host import PluginHost
from batchkit.plugin import Plugin


if TYPE_CHECKING:
    from batchkit.lightning import BatchKitCallback
    from batchkit.lightning import CPUDeepSpeedStrategy

__version__ = "0.1.0"

__all__ = [
    "BatchKitCallback",
    "BatchKitContext",
    "BatchKitError",
    "CPUDeepSpeedStrategy",
    "ConfigError",
    "Plugin",
    "PluginConflictError",
    "PluginError",
    "PluginHost",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str) -> Any:
    # Lightning is imported only when its integration is used, so plugins importing
    # `batchkit.hookimpl` stay cheap to import.
    if name in ("BatchKitCallback", "CPUDeepSpeedStrategy"):
        from batchkit import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module 'batchkit' has no attribute {name!r}")
