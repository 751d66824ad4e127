"""Fused LAMB / LARS kernels for batchkit: CUDA multi-tensor kernels and their CPU twin.

Both are built on first use (``torch.utils.cpp_extension``) and cached. Use
:func:`is_available` to ask whether a device has a fused library; the optimizers in
``batchkit_lamb_lars`` fall back to their foreach path (with one warning) when it does not.
"""

from ._loader import FusedUnavailableWarning, failure_reason
from .ops import (BOTH, PASS1, PASS2, SUPPORTED_DTYPES, WD_MODES, LambHyper, LarsHyper, is_available, lamb, lars,
                  set_cuda_launch_limits)

__all__ = [
    "BOTH",
    "PASS1",
    "PASS2",
    "SUPPORTED_DTYPES",
    "WD_MODES",
    "FusedUnavailableWarning",
    "LambHyper",
    "LarsHyper",
    "failure_reason",
    "is_available",
    "lamb",
    "lars",
    "set_cuda_launch_limits",
]
__version__ = "0.1.0"
