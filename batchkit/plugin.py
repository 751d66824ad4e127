"""The optional base class for plugins.

Any object with :data:`batchkit.hookimpl` methods can be registered; subclassing :class:`Plugin`
adds a name, a declared order, declared conflicts and metric logging through the Trainer's loggers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import ClassVar


if TYPE_CHECKING:
    from batchkit.host import PluginHost


class Plugin:
    """Base class for batchkit plugins.

    Class attributes a plugin sets:

    ``name``
        The name the plugin is registered under: its entry-point name and the ``plugin:`` value in
        YAML. Lower case, no spaces.
    ``order``
        Position in every transform chain within its tryfirst/ordinary/trylast tier: lower runs
        first (wraps first). Ties keep registration order. A YAML entry may override it.
    ``conflicts``
        Names of plugins that must not run together with this one. The host refuses to start
        when both are registered, whichever of the two declares the conflict.
    """

    name: ClassVar[str] = ""
    order: int = 0
    conflicts: ClassVar[tuple[str, ...]] = ()

    _host: PluginHost | None = None
    _instance_name: str | None = None

    @property
    def host(self) -> PluginHost | None:
        """The host this plugin is registered with, or ``None`` before registration."""
        return self._host

    @property
    def instance_name(self) -> str:
        """The name of this instance in the host (the YAML entry key, or ``name``)."""
        return self._instance_name or self.name or type(self).__name__.lower()

    def log(self, key: str, value: float) -> None:
        """Record a scalar metric; the host sends it to the Trainer's loggers as
        ``batchkit/<instance name>/<key>`` at the end of the current training batch."""
        if self._host is not None:
            self._host.log(f"{self.instance_name}/{key}", value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.instance_name!r}, order={self.order})"
