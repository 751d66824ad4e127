"""What the ``jest`` and ``cabs`` plugins share: the filter ratio, per-step random streams, and
reading one field of a batch by its path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from batchkit import PluginError


def load_factor_of(plugin: str, filter_ratio: float) -> float:
    """B / b = 1 / (1 - f) for a filter ratio f in (0, 1); a clear error otherwise."""
    if isinstance(filter_ratio, bool) or not isinstance(filter_ratio, (int, float)) or not 0.0 < filter_ratio < 1.0:
        raise ValueError(
            f"{plugin}: filter_ratio must be in (0, 1) (the fraction f of each super-batch that is filtered out; "
            f"the plugin loads B = b / (1 - f) examples and keeps b), got {filter_ratio!r}; e.g. filter_ratio: 0.8 "
            "loads 5 b"
        )
    return 1.0 / (1.0 - float(filter_ratio))


def step_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), so nearby steps get unrelated streams. The
    plugins seed a fresh generator per selection from (seed, step, micro-batch[, rank]): nothing
    to checkpoint, and a resumed run draws what the uninterrupted one drew."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def step_generator(*values: int) -> torch.Generator:
    """A CPU generator seeded with :func:`step_seed` of ``values``."""
    return torch.Generator().manual_seed(step_seed(*values))


_MISSING = object()


def batch_field(batch: Any, path: str) -> Any:
    """The field of ``batch`` at ``path`` (dict keys and sequence positions joined by dots, as in
    :mod:`batchkit.batch`), or a sentinel :data:`_MISSING` when there is none."""
    value = batch
    for part in path.split(".") if path else ():
        if isinstance(value, Mapping):
            if part in value:
                value = value[part]
                continue
            return _MISSING
        if isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
            continue
        return _MISSING
    return value


def required_field(plugin: str, batch: Any, path: str, option: str, what: str, fix: str) -> Any:
    """:func:`batch_field`, or a :class:`PluginError` naming the option and the fix."""
    value = batch_field(batch, path)
    if value is _MISSING:
        if isinstance(batch, Mapping):
            fields: Any = sorted(map(str, batch))
        elif isinstance(batch, (list, tuple)):
            fields = [str(i) for i in range(len(batch))]  # positions are the paths of a sequence batch
        else:
            fields = f"none (a {type(batch).__name__})"
        raise PluginError(
            f"{plugin}: the batch has no field {path!r} ({option}: {path!r}), which holds {what}; the batch's "
            f"fields: {fields}. {fix}"
        )
    return value
