"""LAMB and LARS for batchkit: plain ``torch.optim.Optimizer`` classes plus optimizer-stage plugins.

    from batchkit_lamb_lars import Lamb, Lars, layerwise_param_groups
    opt = Lamb(layerwise_param_groups(model, weight_decay=0.01), lr=2e-3)

The plugins (``lamb`` and ``lars`` in the ``batchkit.plugins`` entry-point group) live in
:mod:`batchkit_lamb_lars.plugin` and need the batchkit host; the optimizers do not.
"""

from .groups import is_excluded, layerwise_param_groups
from .lamb import Lamb
from .lars import Lars

__all__ = ["Lamb", "Lars", "is_excluded", "layerwise_param_groups"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("LambPlugin", "LarsPlugin"):
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(name)
