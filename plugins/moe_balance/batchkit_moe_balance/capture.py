"""Finding the router modules of an unmodified model and capturing their logits.

A router is any ``nn.Module`` whose forward returns the router logits ``[..., N_E]`` (or a tuple or
list holding them at ``logits_index``, or an object with a ``router_logits`` attribute). Routers are
found by one of:

* ``router_type``: a class name (``"Router"``) or a qualified one (``"my_pkg.moe.Router"``);
* ``router_pattern``: a regular expression matched against the qualified module names of
  ``named_modules()`` (``r"blocks\\.\\d+\\.moe\\.gate"``);
* the protocol: a module with the attribute ``batchkit_moe_router = True``.

A forward hook on each router records its logits only while the capture window is open (from the
batch stage to the loss stage of a training step) and only under ``torch.is_grad_enabled()``:

* an activation-checkpointing recompute runs during backward, after the window closed, so its
  router calls are never counted twice;
* scoring passes of other batch-stage plugins run under ``no_grad`` and are not counted.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

ROUTER_ATTRIBUTE = "batchkit_moe_router"
TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "k")


def find_routers(model: nn.Module, router_type: str | None, router_pattern: str | None) -> list[tuple[str, nn.Module]]:
    """The router modules of ``model``, in ``named_modules()`` order, as ``(name, module)``."""
    pattern = re.compile(router_pattern) if router_pattern else None
    found = []
    for name, module in model.named_modules():
        if router_type is not None:
            cls = type(module)
            match = router_type in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")
        elif pattern is not None:
            match = pattern.fullmatch(name) is not None
        else:
            match = getattr(module, ROUTER_ATTRIBUTE, False) is True
        if match:
            found.append((name, module))
    return found


def router_top_k(module: nn.Module) -> int | None:
    for attribute in TOP_K_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class RouterCapture:
    """Forward hooks on the routers; ``records[layer]`` is the list of logits captured for that layer
    in the current window (more than one entry when a router module is called several times)."""

    def __init__(self, routers: list[tuple[str, nn.Module]], logits_index: int = 0, owner: str = "moe_lbl") -> None:
        self.names = [name for name, _ in routers]
        self.logits_index = logits_index
        self.owner = owner
        self.window_open = False
        self.records: list[list[torch.Tensor]] = [[] for _ in routers]
        self.ignored_without_grad = 0  # router calls inside the window with autograd off
        self._handles = [module.register_forward_hook(self._hook(layer)) for layer, (_, module) in enumerate(routers)]

    def _hook(self, layer: int) -> Any:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if not self.window_open:
                return
            if not torch.is_grad_enabled():
                self.ignored_without_grad += 1
                return
            self.records[layer].append(self.logits_of(output, layer))

        return on_forward

    def logits_of(self, output: Any, layer: int) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, (tuple, list)) and len(output) > self.logits_index and isinstance(output[self.logits_index], torch.Tensor):
            return output[self.logits_index]
        logits = getattr(output, "router_logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        raise TypeError(
            f"{self.owner}: router {self.names[layer]!r} returned a {type(output).__name__}, not router logits. "
            "A router must return the logits tensor [..., num_experts], a tuple with the logits at index "
            "`logits_index`, or an object with a `router_logits` attribute; set `logits_index` or point "
            "`router_type`/`router_pattern` at the module that computes the logits"
        )

    def open(self) -> None:
        self.clear()
        self.window_open = True

    def close(self) -> None:
        self.window_open = False

    def clear(self) -> None:
        for record in self.records:
            record.clear()
        self.ignored_without_grad = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
        self.window_open = False
