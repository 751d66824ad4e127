"""Finding the router modules of an unmodified model and capturing their logits.

A router is any ``nn.Module`` whose forward returns the router logits ``[..., N_E]`` (or a tuple or
list holding them at ``logits_index``, or an object with a ``router_logits`` attribute). Routers are
found by one of:

* ``router_type: auto`` (the default): the routers of the Hugging Face MoE families this plugin
  knows (:data:`HF_ROUTERS`: the ``*TopKRouter`` modules of transformers 5.x, and the ``nn.Linear``
  ``gate`` of the sparse-MoE blocks of transformers 4.x), plus any module with the attribute
  ``batchkit_moe_router = True``;
* ``router_type``: a class name (``"Router"``) or a qualified one (``"my_pkg.moe.Router"``);
* ``router_pattern``: a regular expression that must match the *whole* qualified module name of
  ``named_modules()`` (``re.fullmatch``), as seen from the module the plugin is attached to; under
  Lightning that is the LightningModule, so names carry its attribute prefix
  (``model.model.layers.0.mlp.gate`` for a Hugging Face model kept in ``self.model``).

A forward hook on each router records its logits only while the capture window is open (from the
batch stage to the loss stage of a training step) and only under ``torch.is_grad_enabled()``:

* an activation-checkpointing recompute runs during backward, after the window closed, so its
  router calls are never counted twice;
* scoring passes of other batch-stage plugins run under ``no_grad`` and are not counted.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any
from typing import Callable

import torch
from torch import nn

from batchkit import PluginError

ROUTER_ATTRIBUTE = "batchkit_moe_router"
TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "k")

#: Router classes of the Hugging Face MoE families that ``router_type: auto`` recognises
#: (transformers 5.x), and how each scores the experts. Matched by class name, so nothing here
#: imports transformers. DeepSeek-V3 scores with a sigmoid and routes with a bias and expert groups;
#: its f counts the plain top-k of the scores, like Megatron-Core's aux loss for sigmoid routers.
HF_ROUTERS: dict[str, str] = {
    "MixtralTopKRouter": "softmax",
    "Qwen2MoeTopKRouter": "softmax",
    "Qwen3MoeTopKRouter": "softmax",
    "OlmoeTopKRouter": "softmax",
    "DeepseekV3TopkRouter": "sigmoid",
}
#: Sparse-MoE blocks of transformers 4.x, whose router is a plain ``nn.Linear`` attribute ``gate``
#: (in 5.x the same attribute holds one of :data:`HF_ROUTERS`).
HF_BLOCKS_WITH_LINEAR_GATE = (
    "MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock",
)
#: ``num_experts_per_tok`` in the Hugging Face configs of those families
HF_TOP_K_CONFIG = "num_experts_per_tok"

_LOOKS_LIKE_ROUTER = re.compile(r"router|gate", re.IGNORECASE)


def _class_matches(module: nn.Module, router_type: str) -> bool:
    cls = type(module)
    return router_type in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")


def is_generic_torch_class(router_type: str, model: nn.Module) -> bool:
    """Whether ``router_type`` names a class of ``torch.nn`` itself (``Linear``), which matches
    far more than the routers."""
    return any(_class_matches(m, router_type) and type(m).__module__.startswith("torch.nn") for m in model.modules())


def find_routers(
    model: nn.Module, router_type: str | None = "auto", router_pattern: str | None = None
) -> list[tuple[str, nn.Module]]:
    """The router modules of ``model``, in ``named_modules()`` order, as ``(name, module)``."""
    if router_pattern:
        pattern = re.compile(router_pattern)
        return [(name, m) for name, m in model.named_modules() if pattern.fullmatch(name) is not None]
    if router_type and router_type != "auto":
        return [(name, m) for name, m in model.named_modules() if _class_matches(m, router_type)]
    linear_gates = {
        id(gate) for m in model.modules()
        if type(m).__name__ in HF_BLOCKS_WITH_LINEAR_GATE and isinstance(gate := getattr(m, "gate", None), nn.Linear)
    }
    return [
        (name, m) for name, m in model.named_modules()
        if type(m).__name__ in HF_ROUTERS or id(m) in linear_gates or getattr(m, ROUTER_ATTRIBUTE, False) is True
    ]


def router_score(module: nn.Module) -> str:
    """``softmax`` or ``sigmoid``: how a known router scores experts (``softmax`` for any other)."""
    return HF_ROUTERS.get(type(module).__name__, "softmax")


def router_top_k(module: nn.Module) -> int | None:
    for attribute in TOP_K_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def hf_configs(model: nn.Module) -> list[tuple[str, Any]]:
    """``(module name, config)`` of every Hugging Face model inside ``model`` (modules with a
    ``config`` that has ``num_experts_per_tok``), outermost first, each config once."""
    seen: set[int] = set()
    found = []
    for name, m in model.named_modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, HF_TOP_K_CONFIG) and id(config) not in seen:
            seen.add(id(config))
            found.append((name, config))
    return found


def config_of(model: nn.Module, router_name: str) -> Any | None:
    """The Hugging Face config of the innermost model holding the router ``router_name``."""
    parts = router_name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut])) if cut else model
        config = getattr(owner, "config", None)
        if config is not None and hasattr(config, HF_TOP_K_CONFIG):
            return config
    return None


def name_patterns(names: list[str]) -> list[tuple[str, int]]:
    """Module names folded into the regular expressions that match them (digit runs -> ``\\d+``),
    with how many names each covers, in first-seen order: ``[("model\\.layers\\.\\d+\\.mlp\\.gate", 24)]``."""
    folded = Counter(r"\d+".join(re.escape(part) for part in re.split(r"\d+", name)) for name in names)
    return list(folded.items())


def describe_names(names: list[str]) -> str:
    return ", ".join(f"'{p}'" + (f" ({n} modules)" if n > 1 else "") for p, n in name_patterns(names))


def router_candidates(model: nn.Module) -> dict[str, list[str]]:
    """Modules that look like routers (class or attribute name containing "router" or "gate"),
    as ``{class name: [module names]}``."""
    found: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if _LOOKS_LIKE_ROUTER.search(type(m).__name__) or (name and _LOOKS_LIKE_ROUTER.search(leaf)):
            found.setdefault(type(m).__name__, []).append(name)
    return found


class RouterCapture:
    """Forward hooks on the routers; ``records[layer]`` is the list of logits captured for that layer
    in the current window (more than one entry when a router module is called several times).

    ``on_logits(layer, logits)``, when set, is also called for every captured router call, inside
    the forward (the global mode uses it to start each layer's count all-reduce right away).
    """

    def __init__(self, routers: list[tuple[str, nn.Module]], logits_index: int = 0, owner: str = "moe_lbl") -> None:
        self.names = [name for name, _ in routers]
        self.logits_index = logits_index
        self.owner = owner
        self.window_open = False
        self.records: list[list[torch.Tensor]] = [[] for _ in routers]
        self.calls = 0  # router calls recorded in the current window
        self.ignored_without_grad = 0  # router calls inside the window with autograd off
        self.on_logits: Callable[[int, torch.Tensor], None] | None = None
        self._handles = [module.register_forward_hook(self._hook(layer)) for layer, (_, module) in enumerate(routers)]

    def _hook(self, layer: int) -> Any:
        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if not self.window_open:
                return
            if not torch.is_grad_enabled():
                self.ignored_without_grad += 1
                return
            logits = self.logits_of(output, layer)
            self.records[layer].append(logits)
            self.calls += 1
            if self.on_logits is not None:
                self.on_logits(layer, logits)

        return on_forward

    def logits_of(self, output: Any, layer: int) -> torch.Tensor:
        logits = None
        if isinstance(output, torch.Tensor):
            logits = output
        elif isinstance(output, (tuple, list)) and len(output) > self.logits_index:
            logits = output[self.logits_index] if isinstance(output[self.logits_index], torch.Tensor) else None
        elif isinstance(getattr(output, "router_logits", None), torch.Tensor):
            logits = output.router_logits
        if logits is None or not logits.is_floating_point() or logits.dim() == 0:
            what = type(output).__name__ if logits is None else f"{logits.dtype} tensor of shape {list(logits.shape)}"
            raise PluginError(
                f"{self.owner}: router {self.names[layer]!r} returned a {what}, not router logits. A router must "
                "return the logits tensor [..., num_experts] (floating point), a tuple with the logits at index "
                "`logits_index`, or an object with a `router_logits` attribute; set `logits_index`, or point "
                "`router_type`/`router_pattern` at the module that computes the logits"
            )
        return logits

    def open(self) -> None:
        self.clear()
        self.window_open = True

    def close(self) -> None:
        self.window_open = False

    def clear(self) -> None:
        for record in self.records:
            record.clear()
        self.calls = 0
        self.ignored_without_grad = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
        self.window_open = False
        self.on_logits = None
