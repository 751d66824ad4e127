"""Test support shared by the hard-samples tests and their 2-process job, on the host's test kit."""

from __future__ import annotations

from functools import partial
from typing import Any

from batchkit import testing

#: label noise for the tests' datasets, so mini-batch losses keep differing as training goes on
LABEL_NOISE = 0.8

class RecordingNet(testing.TinyModule):
    """The kit's TinyModule with BatchNorm on by default: records the sample indices and loss of
    every step, and offers the per-sample-loss protocol."""

    def __init__(self, batch_norm: bool = True, **kwargs: Any) -> None:
        super().__init__(batch_norm=batch_norm, **kwargs)


#: The kit's quiet CPU Trainer, for three epochs unless told otherwise.
make_trainer = partial(testing.make_trainer, max_epochs=3)


def batch_ids(seen: list[list[int]], partition: list[list[int]]) -> list[int]:
    """The mini-batch id of every trained batch, from the indices it held."""
    by_first = {tuple(b): j for j, b in enumerate(partition)}
    return [by_first[tuple(s)] for s in seen]


