"""mixup as a batchkit plugin: the worked example of a third-party plugin package.

mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) trains on convex
combinations of pairs of samples and of their labels::

    lambda ~ Beta(alpha, alpha)
    x' = lambda * x + (1 - lambda) * x[perm]
    y' = lambda * onehot(y) + (1 - lambda) * onehot(y[perm])

It runs in the batch stage on ``(inputs, labels, ...)`` batches with integer class labels (further
fields, such as sample ids, pass through unchanged) and turns the labels into class probabilities, which ``torch.nn.functional.cross_entropy`` accepts as targets,
so the user's ``training_step`` needs no change. Its random stream is part of its checkpointed
state, so a resumed run mixes exactly as the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl


__all__ = ["MixupPlugin"]


class MixupPlugin(Plugin):
    """Mix each training batch with a shuffled copy of itself.

    :param alpha: the Beta distribution's parameter; larger mixes more. Must be > 0.
    :param num_classes: number of classes, for the one-hot labels.
    :param seed: seed of the plugin's own random stream (the same on every rank is fine: each
        rank mixes its own shard).
    """

    name = "mixup"

    def __init__(self, alpha: float = 0.2, num_classes: int = 10, seed: int = 0) -> None:
        if alpha <= 0:
            raise ValueError(f"mixup: alpha must be > 0, got {alpha}; use e.g. alpha: 0.2")
        if num_classes < 2:
            raise ValueError(f"mixup: num_classes must be >= 2, got {num_classes}")
        self.alpha = alpha
        self.num_classes = num_classes
        self.rng = np.random.default_rng(seed)
        self.last_lambda: float | None = None

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, ctx: Any) -> Any:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise PluginError(
                f"mixup (entry {self.instance_name!r}): expects (inputs, labels, ...) batches, got "
                f"{type(batch).__name__}; put mixup only on classification data loaders"
            )
        x, y, *rest = batch  # further fields (sample ids, say) pass through: they describe the first of each pair
        if x.dtype in (torch.int16, torch.int32, torch.int64):
            # A mix of two token ids is no token id: the embedding would fail far from here. (uint8
            # images pass: a model that scales them itself takes the mixed values as they are.)
            raise PluginError(
                f"mixup (entry {self.instance_name!r}): the inputs are a {x.dtype} tensor of shape "
                f"{tuple(x.shape)} (token ids or class indices?), and mixing them gives fractional values "
                "the model cannot take (an embedding needs whole ids). mixup mixes continuous inputs such as "
                "images or features: remove the mixup entry for this model (or mix embeddings inside the "
                "model instead)."
            )
        if y.dtype.is_floating_point:
            raise PluginError(
                f"mixup (entry {self.instance_name!r}): the labels are already probabilities, not class ids; "
                "mixup needs integer class labels (is another plugin mixing the labels before it?)"
            )
        # Our own random stream (not the global one) so it is reproducible and checkpointed.
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = torch.from_numpy(self.rng.permutation(x.shape[0])).to(x.device)
        onehot = torch.nn.functional.one_hot(y, self.num_classes).to(x.dtype)
        self.last_lambda = lam
        if ctx is None or ctx.logs_this_step:  # a figure per step: only on the steps the Trainer logs
            self.log("lambda", lam)
        return [lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm], *rest]

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

