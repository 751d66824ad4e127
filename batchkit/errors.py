"""The errors batchkit raises for bad plugins and bad configuration.

Each message names the plugin (or YAML entry), the option, and the fix.
"""

from __future__ import annotations


class BatchKitError(Exception):
    """Base class of all batchkit errors."""


class PluginError(BatchKitError):
    """A plugin object is malformed: bad hook implementation, duplicate name, failed import."""


class PluginConflictError(BatchKitError):
    """Two registered plugins declare that they cannot run together."""


class ConfigError(BatchKitError):
    """A YAML plugin entry is wrong: unknown plugin, unknown or missing option, wrong type."""
