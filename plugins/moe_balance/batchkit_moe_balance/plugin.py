"""``moe_lbl``: the MoE load-balancing loss as a loss-stage plugin, at micro-batch, global-batch or
sequence scope. See the package README for the options and docs/methods/moe_balance.md for the
measurements.

Two ways the loss is computed, same gradient:

* **at the loss stage, all layers at once** (micro and sequence mode, and global mode in one
  process): the captured logits of every router call go through one softmax, one top-k and three
  ``index_add`` (:func:`grouped_routing_statistics`), whatever the number of layers;
* **overlapped** (global mode with more than one data-parallel rank): the router hooks record the
  logits; the last router's hook counts every layer's top-k choices at once and starts one
  asynchronous all-reduce of the counts; the gradient, the only thing that needs the global counts,
  is computed in backward by :class:`_DeferredLBLGradient`, which waits for the all-reduce there.
  Its autograd node is created right after the last router ran, so the engine reaches it once the
  backward has come down to that router: by then the other ranks have long finished their forward,
  and the wait costs nothing in the usual case.
"""

from __future__ import annotations

import re
from typing import Any
from typing import Literal
from typing import Optional

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.autograd.function import once_differentiable

from batchkit import Plugin
from batchkit import PluginError
from batchkit import dist
from batchkit import hookimpl
from batchkit_moe_balance.capture import HF_ROUTERS
from batchkit_moe_balance.capture import HF_TOP_K_CONFIG
from batchkit_moe_balance.capture import ROUTER_ATTRIBUTE
from batchkit_moe_balance.capture import RouterCapture
from batchkit_moe_balance.capture import config_of
from batchkit_moe_balance.capture import describe_names
from batchkit_moe_balance.capture import find_routers
from batchkit_moe_balance.capture import hf_configs
from batchkit_moe_balance.capture import is_generic_torch_class
from batchkit_moe_balance.capture import name_patterns
from batchkit_moe_balance.capture import router_candidates
from batchkit_moe_balance.capture import router_score
from batchkit_moe_balance.capture import router_top_k
from batchkit_moe_balance.formulas import SCORES
from batchkit_moe_balance.formulas import grouped_routing_statistics
from batchkit_moe_balance.formulas import load_balancing_loss
from batchkit_moe_balance.formulas import load_imbalance
from batchkit_moe_balance.formulas import routing_probabilities
from batchkit_moe_balance.formulas import routing_probabilities_backward

Mode = Literal["micro", "global", "sequence"]
MODES = ("micro", "global", "sequence")


class MoELoadBalancing(Plugin):
    """Adds ``coefficient * LBL`` to the training loss.

    :param coefficient: weight of the loss (per layer with ``layer_reduction: sum``). Coming from a
        Hugging Face model's own aux loss: ``coefficient = top_k * router_aux_loss_coef`` gives the
        same strength in ``micro`` mode (HF's f sums to k, ours to 1).
    :param mode: ``micro`` (f from this rank's micro-batch, today's common practice), ``global``
        (f from the counts of every data-parallel rank and every micro-batch of the optimizer step so
        far: the paper's Algorithm 1), or ``sequence`` (f and P per sequence).
    :param top_k: experts per token; default: ``num_experts_per_tok`` of the Hugging Face config
        holding the router, else the router module's ``top_k`` (or ``num_experts_per_tok``, ``k``).
    :param router_type: ``auto`` (default: the routers of the Hugging Face MoE families in
        :data:`HF_ROUTERS`, and modules with ``batchkit_moe_router = True``), or the class name (or
        ``module.Class``) of the router modules.
    :param router_pattern: regular expression that must match the whole qualified name of each
        router module (``re.fullmatch`` over ``named_modules()`` of the LightningModule, so names
        start with its attribute, e.g. ``model\\.model\\.layers\\.\\d+\\.mlp\\.gate``).
    :param score_function: ``softmax`` or ``sigmoid`` (normalised): how ``p`` is computed from the
        logits; default: ``sigmoid`` for DeepSeek-V3 routers, ``softmax`` otherwise.
    :param logits_index: where the logits are when a router returns a tuple.
    :param layer_reduction: ``mean`` (the loss is 1 when balanced, whatever the depth) or ``sum``
        over MoE layers (Megatron-Core's convention: the coefficient applies per layer).
    :param token_mask_key: key of a ``[batch, seq]`` padding mask (1 = real token) in a dict batch;
        padding tokens are left out of f and P.
    :param tokens_per_sequence: for ``mode: sequence`` when routers return flat ``[tokens, experts]``
        logits and there is no token mask to take the sequence shape from.
    :param micro_coefficient: with ``mode: global``, also add this weight times the micro-batch LBL
        (the paper's 1%-weight micro term that keeps each device's experts busy under expert
        parallelism).
    :param log_every_n_steps: log the figures every this many optimizer steps (one small all-reduce
        and one device-to-host copy each time, none on other steps); default the Trainer's
        ``log_every_n_steps``; 0 turns logging off.
    :param log_expert_load: also log the global load of every expert of every layer.
    """

    name = "moe_lbl"

    #: run the overlapped global-mode path even in one process (tests compare it with the other path)
    _overlap_in_one_process = False

    def __init__(
        self,
        coefficient: float = 0.01,
        mode: Mode = "global",
        top_k: Optional[int] = None,
        router_type: Optional[str] = "auto",
        router_pattern: Optional[str] = None,
        score_function: Optional[Literal["softmax", "sigmoid"]] = None,
        logits_index: int = 0,
        layer_reduction: Literal["mean", "sum"] = "mean",
        token_mask_key: Optional[str] = None,
        tokens_per_sequence: Optional[int] = None,
        micro_coefficient: float = 0.0,
        log_every_n_steps: Optional[int] = None,
        log_expert_load: bool = True,
    ) -> None:
        who = "moe_lbl"
        if mode not in MODES:
            raise PluginError(f"{who}: mode must be one of {list(MODES)}, got {mode!r}; use e.g. mode: global")
        if not coefficient >= 0:
            raise PluginError(f"{who}: coefficient must be >= 0, got {coefficient}; the usual range is 1e-3 to 1e-2")
        if not micro_coefficient >= 0:
            raise PluginError(
                f"{who}: micro_coefficient must be >= 0, got {micro_coefficient}; use e.g. 0.01 * coefficient"
            )
        if micro_coefficient and mode != "global":
            raise PluginError(
                f"{who}: micro_coefficient adds a micro-batch term next to the global-batch loss and needs "
                f"mode: global (got mode: {mode}); remove micro_coefficient or set mode: global"
            )
        if top_k is not None and top_k < 1:
            raise PluginError(f"{who}: top_k must be >= 1, got {top_k}; leave it unset to read it from the model")
        if router_type == "auto":
            router_type = None
        if router_type and router_pattern:
            raise PluginError(
                f"{who}: give router_type or router_pattern, not both (got {router_type!r} and {router_pattern!r}); "
                "remove one of them"
            )
        if router_pattern:
            try:
                re.compile(router_pattern)
            except re.error as exc:
                raise PluginError(f"{who}: router_pattern {router_pattern!r} is not a regular expression ({exc}); "
                                  r"use e.g. 'blocks\.\d+\.moe\.router'") from None
        if score_function is not None and score_function not in SCORES:
            raise PluginError(f"{who}: score_function must be one of {list(SCORES)}, got {score_function!r}; "
                              "leave it unset to take it from the router")
        if layer_reduction not in ("mean", "sum"):
            raise PluginError(f"{who}: layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}")
        if tokens_per_sequence is not None and (mode != "sequence" or tokens_per_sequence < 1):
            raise PluginError(f"{who}: tokens_per_sequence must be >= 1 and is used only with mode: sequence "
                              f"(got {tokens_per_sequence} with mode: {mode}); remove it or set mode: sequence")
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise PluginError(f"{who}: log_every_n_steps must be >= 0 (0 = no logging), got {log_every_n_steps}")
        self.coefficient = float(coefficient)
        self.mode = mode
        self.top_k = top_k
        self.router_type = router_type
        self.router_pattern = router_pattern
        self.score_function = score_function
        self.logits_index = logits_index
        self.layer_reduction = layer_reduction
        self.token_mask_key = token_mask_key
        self.tokens_per_sequence = tokens_per_sequence
        self.micro_coefficient = float(micro_coefficient)
        self.log_every_n_steps = log_every_n_steps
        self.log_expert_load = log_expert_load

        self.capture: RouterCapture | None = None
        self.router_names: list[str] = []
        self._checkpoint_router_names: list[str] = []
        self._k: int = 0
        self._score: str = "softmax"
        self.num_experts: int | None = None
        self._every = 1  # log every this many optimizer steps (0: never)
        self._groups: dict[Any, torch.Tensor] = {}  # row -> group index tensors, by call layout
        # -- the current micro-batch
        self._mask_rows: torch.Tensor | None = None  # token mask [tokens] of this micro-batch
        self._mask: torch.Tensor | None = None
        self._pending: _MicroBatchCounts | None = None  # overlapped global mode: this micro-batch's all-reduces
        # -- the current optimizer step
        self._step_buffer: torch.Tensor | None = None  # Algorithm 1's buffer [L, N_E + 1] (c and T), float64
        self._step_pending: _MicroBatchCounts | None = None  # its newest part, still in flight (overlapped mode)
        self._logging_step = False  # whether the figures of this step are logged (then records are kept)
        self._records: list[tuple[torch.Tensor, torch.Tensor, Any]] = []  # (local c|T, sum p, layer terms)
        self._restored_stats: torch.Tensor | None = None  # [L, 2 N_E + 2] from a checkpoint taken mid-step
        self._restored_micro_steps = 0
        self._last: _LastMicroBatch | None = None

    # -- attaching to the model -------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Find the routers of ``model`` and hook them (the Lightning path does this at setup)."""
        self.detach()
        who = self.instance_name
        if self.router_type and is_generic_torch_class(self.router_type, model):
            raise PluginError(self._generic_class_message(model))
        routers = find_routers(model, self.router_type, self.router_pattern)
        if not routers:
            raise PluginError(self._no_router_message(model))
        self._refuse_hf_aux_loss(model)
        ks: dict[str, int | None] = {}
        for name, module in routers:
            k = self.top_k
            if k is None and (config := config_of(model, name)) is not None:
                k = getattr(config, HF_TOP_K_CONFIG)
            if k is None:
                k = router_top_k(module)
            if k is None and "." in name:  # transformers 4.x: a Linear gate, top_k on its MoE block
                k = router_top_k(model.get_submodule(name.rsplit(".", 1)[0]))
            ks[name] = k
        if any(k is None for k in ks.values()):
            missing = [n for n, k in ks.items() if k is None]
            raise PluginError(
                f"{who}: top_k is not set and routers {missing} have no top_k attribute (nor a Hugging Face config "
                f"with {HF_TOP_K_CONFIG}); set top_k to the number of experts each token is sent to"
            )
        if len(set(ks.values())) > 1:
            raise PluginError(
                f"{who}: routers use different top_k {ks}; one plugin instance handles one top_k: "
                "use two entries with router_pattern selecting each group"
            )
        scores = {name: self.score_function or router_score(module) for name, module in routers}
        if len(set(scores.values())) > 1:
            raise PluginError(
                f"{who}: the routers score experts differently ({scores}); use two entries with router_pattern "
                "selecting each group, or set score_function"
            )
        self._k = next(iter(ks.values()))
        self._score = next(iter(scores.values()))
        self.router_names = [name for name, _ in routers]
        self.num_experts = None
        self._groups.clear()
        self.capture = RouterCapture(routers, self.logits_index, owner=who)

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    @property
    def num_layers(self) -> int:
        return len(self.router_names)

    def _auto_hint(self, model: nn.Module) -> str:
        """What ``router_type: auto`` would find in ``model``, as a hint for the error messages."""
        found = find_routers(model, None, None)
        if not found:
            return ""
        classes = sorted({type(m).__name__ for _, m in found})
        return (f"router_type: auto (the default) finds {len(found)} routers in this model ({', '.join(classes)}: "
                f"{describe_names([n for n, _ in found])}). ")

    def _generic_class_message(self, model: nn.Module) -> str:
        matched = find_routers(model, self.router_type, None)
        names = [name for name, _ in matched]
        gates = [n for n, m in matched if n.rsplit(".", 1)[-1].lower() in ("gate", "router", "gating")
                 and getattr(m, "out_features", 2) > 1]
        suggestion = "|".join(p for p, _ in name_patterns(gates)) if gates else "<the full names of the router modules>"
        return (
            f"{self.instance_name}: router_type: {self.router_type!r} is a generic torch.nn class, and it matched "
            f"{len(names)} modules ({describe_names(names)}), most of which are not routers (attention projections, "
            "experts, the output head): their outputs are not router logits. " + self._auto_hint(model)
            + "Name the routers instead: router_type: auto (it knows the MoE routers of Hugging Face transformers, "
            f"including the nn.Linear `gate` of 4.x sparse-MoE blocks), or router_pattern: '{suggestion}' (it must "
            "match the whole module name)"
        )

    def _no_router_message(self, model: nn.Module) -> str:
        if self.router_type:
            how = f"router_type: {self.router_type!r}"
        elif self.router_pattern:
            how = f"router_pattern: {self.router_pattern!r}"
        else:
            how = (f"router_type: auto, which knows {', '.join(HF_ROUTERS)}, the nn.Linear `gate` of transformers 4.x "
                   f"sparse-MoE blocks, and modules with `{ROUTER_ATTRIBUTE} = True`")
        parts = [f"{self.instance_name}: found no router module in {type(model).__name__} ({how})."]
        if self.router_type or self.router_pattern:
            parts.append(self._auto_hint(model).strip())
        candidates = router_candidates(model)
        if candidates:
            listing = "; ".join(f"{cls}: {describe_names(names)}" for cls, names in candidates.items())
            parts.append(f"Modules that look like routers (class: names as router_pattern expressions): {listing}.")
        else:
            classes = sorted({type(m).__name__ for m in model.modules()})
            parts.append(f"No module class or name contains 'router' or 'gate'; the classes in the model: {classes}.")
        if self.router_pattern:
            partial = [n for n, _ in model.named_modules() if n and re.search(self.router_pattern, n)]
            if partial:
                parts.append(f"router_pattern matches only part of {describe_names(partial)}: it must match the whole "
                             "name (re.fullmatch), prefix included.")
        parts.append(
            "Set router_type to the routers' class name, or router_pattern to a regex matching their whole names as "
            "named_modules() gives them from the module the plugin is attached to (under Lightning the "
            "LightningModule, so names start with its attribute, e.g. 'model.'), or mark the routers with "
            f"`{ROUTER_ATTRIBUTE} = True`"
        )
        return " ".join(parts)

    def _refuse_hf_aux_loss(self, model: nn.Module) -> None:
        for owner, config in hf_configs(model):
            coef = getattr(config, "router_aux_loss_coef", 0.0) or 0.0
            if getattr(config, "output_router_logits", False) and float(coef) != 0.0:
                k = getattr(config, HF_TOP_K_CONFIG)
                raise PluginError(
                    f"{self.instance_name}: the Hugging Face model at {owner or type(model).__name__!r} has "
                    f"config.output_router_logits=True and config.router_aux_loss_coef={coef}, so it adds its own "
                    "load-balancing loss to its loss and the LBL would be counted twice. Set "
                    "config.output_router_logits=False (the plugin reads the routers itself; coefficient = "
                    f"top_k x router_aux_loss_coef = {k * float(coef):g} gives the same strength in mode: micro), or "
                    "remove the moe_lbl entry to keep the model's own loss"
                )

    # -- hooks --------------------------------------------------------------------------------------

    @hookimpl
    def batchkit_setup(self, trainer: Any, module: Any, stage: str) -> None:
        if stage == "fit":
            self.attach(module)
            every = self.log_every_n_steps
            if every is None:
                every = int(getattr(trainer, "log_every_n_steps", 1)) if trainer is not None else 1
            self._every = every

    @hookimpl
    def batchkit_teardown(self) -> None:
        self._finish_step()
        self.detach()

    @hookimpl
    def batchkit_before_forward(self, batch: Any, ctx: Any) -> None:
        # Open the capture window once the batch stage is done (other plugins' scoring forwards
        # are not training tokens) on the batch training_step receives; the loss stage closes it.
        capture = self.capture
        if capture is None:
            raise PluginError(f"{self.instance_name}: no model attached; call attach(model) before training")
        if self.log_every_n_steps is not None:
            self._every = self.log_every_n_steps
        # this step's figures are logged at its end: keep what they need only then
        self._logging_step = bool(self._every) and (ctx.global_step + 1) % self._every == 0
        self._mask = self._token_mask(batch)
        self._mask_rows = None
        if self._pending is not None:  # the previous micro-batch never reached the loss stage
            self._pending.wait_all()
            self._pending = None
        if self.mode == "global" and (dist.is_distributed() or self._overlap_in_one_process):
            self._pending = _MicroBatchCounts(self, self._step_counts_so_far())
            capture.on_logits = self._on_router_call
        else:
            capture.on_logits = None
        capture.open()

    @hookimpl
    def batchkit_transform_loss(self, loss: torch.Tensor) -> torch.Tensor:
        capture = self.capture
        if capture is None:
            raise PluginError(f"{self.instance_name}: no model attached; call attach(model) before training")
        capture.close()
        try:
            aux = self._overlapped_loss() if self._pending is not None else self._auxiliary_loss()
            return loss + aux.to(loss.dtype)
        finally:
            capture.clear()
            self._pending = None

    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None:
        every = self._every
        if every and ctx.global_step % every == 0 and (self._records or self._restored_stats is not None):
            self._log_step()
        self._finish_step()

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        copy = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {
            "mode": self.mode,
            # the routers the counts' rows belong to (the checkpoint's, until a model is attached)
            "router_names": list(self.router_names or self._checkpoint_router_names),
            "step_counts": copy(self._step_counts_so_far()),
            "step_stats": copy(self._step_stats()),
            "micro_steps": self._micro_steps(),
        }

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise PluginError(
                f"{self.instance_name}: the checkpoint was saved with mode: {state.get('mode')} but this run uses "
                f"mode: {self.mode}; resume with the same mode"
            )
        saved = list(state.get("router_names") or [])
        if self.router_names and saved and saved != list(self.router_names):
            raise PluginError(
                f"{self.instance_name}: the checkpoint's counts belong to the routers {saved}, but this run found "
                f"{list(self.router_names)}; resume with the same model and router_type / router_pattern"
            )
        self._checkpoint_router_names = saved
        self._finish_step()
        self._step_buffer = state.get("step_counts")
        self._restored_stats = state.get("step_stats")
        self._restored_micro_steps = int(state.get("micro_steps", 0)) if self._restored_stats is not None else 0

    # -- what the last micro-batch computed (for tests and inspection) ------------------------------

    @property
    def step_counts(self) -> torch.Tensor | None:
        """Algorithm 1's buffer: all-reduced ``c`` and ``T`` ``[L, N_E + 1]`` of the step so far."""
        return self._step_counts_so_far()

    @property
    def last_local_counts(self) -> torch.Tensor | None:
        """This rank's own counts ``c`` (and ``T`` in the last column) of the last micro-batch."""
        return None if self._last is None else self._last.local.float()

    @property
    def last_f_counts(self) -> torch.Tensor | None:
        """The counts ``c`` (and ``T``) that ``f`` was computed from at the last micro-batch (in
        overlapped global mode this waits for that micro-batch's all-reduces)."""
        return None if self._last is None else self._last.f_counts()

    @property
    def last_prob_sums(self) -> torch.Tensor | None:
        """This rank's ``sum_x p(x, i)`` ``[L, N_E]`` of the last micro-batch (detached)."""
        return None if self._last is None else self._last.prob_sums

    @property
    def last_layer_losses(self) -> torch.Tensor | None:
        """The per-layer LBL term trained at the last micro-batch (detached)."""
        return None if self._last is None else self._last.layer_losses()

    # -- the loss -----------------------------------------------------------------------------------

    def _token_mask(self, batch: Any) -> torch.Tensor | None:
        key = self.token_mask_key
        if key is None:
            return None
        if isinstance(batch, dict) and key in batch:
            return batch[key]
        raise PluginError(
            f"{self.instance_name}: token_mask_key is {key!r} but the batch is a {type(batch).__name__}"
            + (f" with keys {list(batch)}" if isinstance(batch, dict) else "")
            + "; set token_mask_key to the batch key of the [batch, seq] padding mask, or remove it"
        )

    def _row_weight(self, layer: int, rows: int, device: torch.device) -> torch.Tensor | None:
        """The token mask as one weight per router row, or ``None`` without a mask."""
        if self._mask is None:
            return None
        if self._mask_rows is None:
            self._mask_rows = self._mask.reshape(-1).to(device=device, dtype=torch.float32)
        if self._mask_rows.numel() != rows:
            raise PluginError(
                f"{self.instance_name}: the token mask {self.token_mask_key!r} has {self._mask_rows.numel()} entries "
                f"but router {self.router_names[layer]!r} routed {rows} tokens; the mask must cover exactly the tokens the "
                "routers see (or remove token_mask_key)"
            )
        return self._mask_rows

    def _check_experts(self, layer: int, num_experts: int) -> None:
        if self.num_experts is None:
            self.num_experts = num_experts
        if num_experts != self.num_experts:
            raise PluginError(
                f"{self.instance_name}: router {self.router_names[layer]!r} returned {num_experts} logits per token "
                f"where another returned {self.num_experts}: the matched modules are not all routers, or they "
                "have different expert counts. Point router_type/router_pattern at the routers only (one plugin "
                "entry per expert count)"
            )
        if self._k > num_experts:
            raise PluginError(f"{self.instance_name}: top_k={self._k} is more than the {num_experts} experts of the "
                              "routers; set top_k")

    def _layer_logits(self) -> list[list[torch.Tensor]]:
        capture = self.capture
        assert capture is not None
        if not capture.calls:
            if capture.ignored_without_grad:
                raise PluginError(
                    f"{self.instance_name}: the routers ran {capture.ignored_without_grad} times in this training step, "
                    "all with autograd off, so the load-balancing loss would have no gradient. This happens with "
                    "reentrant activation checkpointing (torch.utils.checkpoint(..., use_reentrant=True)) around the "
                    "routers: use use_reentrant=False, or keep the routers outside the checkpointed function"
                )
            raise PluginError(
                f"{self.instance_name}: none of the routers {self.router_names} ran in this training step; check "
                "router_type/router_pattern, or that training_step calls the model"
            )
        return capture.records

    def _reduce(self, layer_values: torch.Tensor) -> torch.Tensor:
        return layer_values.mean(-1) if self.layer_reduction == "mean" else layer_values.sum(-1)

    def _group_index(self, key: Any, device: torch.device, build: Any) -> Any:
        """Row -> group indices for one layout of router calls (``build(device)``), built once per
        layout (a few layouts kept: with dynamic padding every sequence length is a new one)."""
        group = self._groups.get((key, device))
        if group is None:
            if len(self._groups) >= 8:
                self._groups.pop(next(iter(self._groups)))
            group = self._groups[(key, device)] = build(device)
        return group

    def _auxiliary_loss(self) -> torch.Tensor:
        """All layers at once, at the loss stage (micro, sequence, and global mode in one process)."""
        records = self._layer_logits()
        k, L = self._k, self.num_layers
        calls = [(layer, logits) for layer, per_layer in enumerate(records) for logits in per_layer]
        E = calls[0][1].shape[-1]
        for layer, logits in calls:
            self._check_experts(layer, logits.shape[-1])
        device = calls[0][1].device
        rows = [logits.reshape(-1, E) for _, logits in calls]
        sizes = tuple((layer, r.shape[0]) for (layer, _), r in zip(calls, rows))
        weight = None
        if self._mask is not None:
            weight = self._row_weight(calls[0][0], rows[0].shape[0], device)
            for layer, r in zip((c[0] for c in calls[1:]), rows[1:]):
                self._row_weight(layer, r.shape[0], device)
            weight = weight.repeat(len(rows)) if len(rows) > 1 else weight
        flat = torch.cat(rows) if len(rows) > 1 else rows[0]

        if self.mode == "sequence":
            return self._sequence_loss(calls, flat, weight, sizes, device)

        group = self._group_index(sizes, device, lambda device: torch.repeat_interleave(
            torch.tensor([layer for layer, _ in sizes]), torch.tensor([n for _, n in sizes])).to(device))
        counts, prob_sum, tokens = grouped_routing_statistics(flat, group, L, k, weight, self._score)  # [L, E] each
        local = torch.cat([counts, tokens[:, None]], 1)  # this rank's c | T
        micro = None
        if self.mode == "micro" or self.micro_coefficient:
            micro = load_balancing_loss(counts, tokens, prob_sum, tokens, k)  # [L]
        if self.mode == "micro":
            layer_losses, f_counts = micro, local
        else:  # global, one process: Algorithm 1's buffer needs no communication
            buffer = self._step_buffer
            if buffer is not None and buffer.shape != local.shape:
                raise PluginError(self._buffer_shape_message(buffer, local))
            packet = local.double()
            buffer = packet if buffer is None else buffer.to(device) + packet  # c and T of micro-steps 1..k
            self._step_buffer = f_counts = buffer
            step = buffer.float()
            layer_losses = load_balancing_loss(step[:, :E], step[:, E], prob_sum, tokens, k)
        aux = self.coefficient * self._reduce(layer_losses)
        if self.micro_coefficient:
            aux = aux + self.micro_coefficient * self._reduce(micro)
        layer_losses = layer_losses.detach()
        self._last = _LastMicroBatch(local, prob_sum.detach(), lambda: f_counts, lambda: layer_losses)
        if self._logging_step:
            self._records.append((local, prob_sum.detach(), layer_losses))
        return aux

    def _sequence_loss(self, calls: list, flat: torch.Tensor, weight: torch.Tensor | None, sizes: tuple,
                       device: torch.device) -> torch.Tensor:
        """Sequence mode: one group per (router call, sequence); each layer's loss is the mean over
        its sequences that have tokens."""
        k, L = self._k, self.num_layers
        lengths = tuple(self._sequence_length(logits, layer) for layer, logits in calls)
        for (layer, rows), length in zip(sizes, lengths):
            if rows % length:
                raise PluginError(
                    f"{self.instance_name}: mode: sequence: router {self.router_names[layer]!r} routed {rows} tokens, "
                    f"not a whole number of sequences of {length}; set tokens_per_sequence (or token_mask_key) to "
                    "the sequence length the routers see"
                )

        def build(device: torch.device) -> torch.Tensor:
            seqs = [n // s for (_, n), s in zip(sizes, lengths)]
            rows_per_group = torch.tensor(lengths).repeat_interleave(torch.tensor(seqs))
            row_group = torch.repeat_interleave(torch.arange(sum(seqs)), rows_per_group)
            group_layer = torch.repeat_interleave(torch.tensor([layer for layer, _ in sizes]), torch.tensor(seqs))
            return torch.cat([row_group, group_layer]).to(device)

        both = self._group_index((sizes, lengths), device, build)
        row_group, group_layer = both[: flat.shape[0]], both[flat.shape[0]:]
        G = group_layer.shape[0]
        counts, prob_sum, tokens = grouped_routing_statistics(flat, row_group, G, k, weight, self._score)
        per_sequence = load_balancing_loss(counts, tokens, prob_sum, tokens, k)  # [G]
        has_tokens = (tokens > 0).float()
        zeros = per_sequence.new_zeros(L)
        sequences = zeros.index_add(0, group_layer, has_tokens).clamp_min(1)
        layer_losses = zeros.index_add(0, group_layer, per_sequence * has_tokens) / sequences
        layer_counts = torch.cat([counts, tokens[:, None]], 1)
        local = layer_counts.new_zeros(L, layer_counts.shape[1]).index_add_(0, group_layer, layer_counts)
        aux = self.coefficient * self._reduce(layer_losses)
        layer_losses = layer_losses.detach()
        layer_prob_sum = prob_sum.detach().new_zeros(L, prob_sum.shape[1]).index_add_(0, group_layer, prob_sum.detach())
        self._last = _LastMicroBatch(local, layer_prob_sum, lambda: local, lambda: layer_losses)
        if self._logging_step:
            self._records.append((local, layer_prob_sum, layer_losses))
        return aux

    def _sequence_length(self, logits: torch.Tensor, layer: int) -> int:
        if logits.dim() == 3:
            return logits.shape[1]
        if self._mask is not None and self._mask.dim() == 2:
            return self._mask.shape[1]
        if self.tokens_per_sequence:
            return self.tokens_per_sequence
        raise PluginError(
            f"{self.instance_name}: mode: sequence needs the sequence of every token, but router "
            f"{self.router_names[layer]!r} returned logits shaped {list(logits.shape)}; return [batch, seq, experts] "
            "logits, or set tokens_per_sequence (or token_mask_key with a [batch, seq] mask)"
        )

    def _buffer_shape_message(self, buffer: torch.Tensor, packet: torch.Tensor) -> str:
        return (f"{self.instance_name}: the count buffer has shape {list(buffer.shape)} (restored from a checkpoint?) "
                f"but this model gives {list(packet.shape)} (layers, experts + 1); resume with the same model")

    # -- global mode, overlapped ----------------------------------------------------------------------

    def _on_router_call(self, layer: int, logits: torch.Tensor) -> None:
        """In the forward, right after a router ran. After the last router: every layer's counts, their
        all-reduce started, and the autograd node that will wait for it in backward."""
        pending = self._pending
        assert pending is not None
        self._check_experts(layer, logits.shape[-1])
        pending.add(_RouterCall(layer, logits))
        if layer == self.num_layers - 1:  # the last router: all layers' counts go now, in one all-reduce
            pending.send()

    def _overlapped_loss(self) -> torch.Tensor:
        """The loss stage in overlapped global mode: the gradient is already wired (one zero-valued term
        per router call, see :class:`_DeferredLBLGradient`); the value added is the LBL with the counts
        known now, without waiting: all ranks' counts of the earlier micro-batches of the step and this
        rank's own counts of this one (in one process that is the exact value)."""
        self._layer_logits()
        pending = self._pending
        assert pending is not None
        pending.send()  # counts of router calls after the last router's (none in a plain forward)
        k, E = self._k, self.num_experts
        local = pending.local_counts()  # [L, E + 1] float64
        prob_sum = pending.prob_sums()  # [L, E], no gradient (that is the deferred nodes' job)
        tokens = local[:, E]
        known = local if pending.base is None else pending.base.to(local.device) + local
        value = self.coefficient * self._reduce(load_balancing_loss(known[:, :E], known[:, E], prob_sum, tokens, k))
        if self.micro_coefficient:
            micro = load_balancing_loss(local[:, :E], tokens, prob_sum, tokens, k)
            value = value + self.micro_coefficient * self._reduce(micro)
        graph = torch.stack(pending.terms).sum() if len(pending.terms) > 1 else pending.terms[0]
        pending.terms = []  # their autograd nodes refer to `pending`: no reference cycle keeping the logits alive
        self._step_pending = pending
        self._last = _LastMicroBatch(local, prob_sum, pending.global_counts, pending.layer_losses)
        if self._logging_step:
            self._records.append((local, prob_sum, pending))
        return graph + value.float()

    def _step_counts_so_far(self) -> torch.Tensor | None:
        if self._step_pending is not None:  # fold the newest micro-batch in (waits only if still in flight)
            self._step_buffer = self._step_pending.global_counts()
            self._step_pending.release_rows()
            self._step_pending = None
        return self._step_buffer

    def _finish_step(self) -> None:
        """Algorithm 1: the buffer starts empty at every optimizer step. Collectives still in flight are
        waited for (normally they completed during backward)."""
        for pending in (self._pending, self._step_pending):
            if pending is not None:
                pending.wait_all()
                pending.release_rows()  # the logits of the step's last micro-batch, no longer needed
        self._pending = self._step_pending = None
        self._step_buffer = None
        self._records = []
        self._restored_stats = None
        self._restored_micro_steps = 0

    # -- logging ------------------------------------------------------------------------------------

    def _micro_steps(self) -> int:
        return len(self._records) + self._restored_micro_steps

    def _step_stats(self) -> torch.Tensor | None:
        """This rank's ``[L, 2 N_E + 2]`` sums over the step's micro-batches: c, sum p, T, trained LBL."""
        if not self._records:
            return self._restored_stats
        local = torch.stack([r[0] for r in self._records]).double()  # [K, L, E + 1]
        prob_sum = torch.stack([r[1] for r in self._records]).double()  # [K, L, E]
        terms = torch.stack([r[2].layer_losses() if isinstance(r[2], _MicroBatchCounts) else r[2]
                             for r in self._records]).double()
        E = prob_sum.shape[-1]
        stats = torch.cat([local[..., :E], prob_sum, local[..., E:], terms[..., None]], -1).sum(0)
        if self._restored_stats is not None:
            stats = stats + self._restored_stats.to(stats.device)
        return stats

    def _log_step(self) -> None:
        """Global figures of the optimizer step just taken: one all-reduce of [L, 2 N_E + 2] and one
        device-to-host copy, on logging steps only."""
        stats = self._step_stats().clone()
        dist.all_reduce(stats, "sum")
        E = (stats.shape[1] - 2) // 2
        counts, prob_sum, tokens, loss_sum = stats[:, :E], stats[:, E:2 * E], stats[:, 2 * E], stats[:, 2 * E + 1]
        k, L = self._k, stats.shape[0]
        global_lbl = load_balancing_loss(counts, tokens, prob_sum, tokens, k)  # over the whole global batch
        imbalance = load_imbalance(counts)
        training_term = loss_sum / (dist.get_world_size() * max(self._micro_steps(), 1))
        load = counts / (k * tokens.clamp_min(1))[:, None]  # global f_i per layer
        parts = [training_term.mean()[None], global_lbl.mean()[None], imbalance.mean()[None], global_lbl, imbalance]
        if self.log_expert_load:
            parts.append(load.reshape(-1))
        figures = torch.cat(parts).tolist()  # the one device-to-host copy
        self.log("lbl", figures[0])
        self.log("lbl_global_batch", figures[1])
        self.log("imbalance", figures[2])
        for layer in range(L):
            self.log(f"layer{layer}/lbl_global_batch", figures[3 + layer])
            self.log(f"layer{layer}/imbalance", figures[3 + L + layer])
            if self.log_expert_load:
                for expert in range(E):
                    self.log(f"layer{layer}/load/expert{expert}", figures[3 + 2 * L + layer * E + expert])


class _LastMicroBatch:
    """What the last micro-batch computed; the global figures on demand (they may be in flight)."""

    def __init__(self, local: torch.Tensor, prob_sums: torch.Tensor, f_counts: Any, layer_losses: Any) -> None:
        self.local = local
        self.prob_sums = prob_sums
        self.f_counts = f_counts
        self.layer_losses = layer_losses


class _RouterCall:
    """One router call of a micro-batch: its logits, and where its rows sit in the chunk of calls
    whose counts went out in the same all-reduce."""

    __slots__ = ("layer", "logits", "chunk", "start", "end")

    def __init__(self, layer: int, logits: torch.Tensor) -> None:
        self.layer, self.logits = layer, logits
        self.chunk, self.start, self.end = -1, 0, 0


class _Chunk:
    """Router calls whose counts share one all-reduce: their rows concatenated, each row's layer."""

    __slots__ = ("rows", "probs", "group", "weight", "local", "packet", "handle")

    def __init__(self, rows: torch.Tensor, probs: torch.Tensor, group: torch.Tensor, weight: torch.Tensor | None,
                 local: torch.Tensor, packet: torch.Tensor, handle: Any) -> None:
        self.rows, self.probs, self.group, self.weight = rows, probs, group, weight
        self.local, self.packet, self.handle = local, packet, handle


class _MicroBatchCounts:
    """One micro-batch in overlapped global mode: its router calls, their counts and the all-reduce.

    The router hooks only record (:meth:`add`) until the last router has run; then the counts of every
    layer are computed at once and one ``[L, N_E + 1]`` all-reduce starts, asynchronously
    (:meth:`send`). The backward needs the last layer's counts first, so a collective per layer would
    start no wait earlier and cost the collective's fixed latency once per layer. Router calls after
    the last router's (a router run twice) go in a second all-reduce, at the loss stage at the latest.
    The first deferred node reached in backward waits, then computes the gradient of every call's
    logits at once (:meth:`row_gradients`). ``base`` is Algorithm 1's buffer before this micro-batch
    (all ranks' counts of the step's earlier micro-batches).
    """

    def __init__(self, plugin: MoELoadBalancing, base: torch.Tensor | None) -> None:
        L = plugin.num_layers
        self.plugin = plugin
        self.base = base
        self.num_layers, self.top_k, self.score = L, plugin._k, plugin._score
        scale = 1.0 / L if plugin.layer_reduction == "mean" else 1.0
        self.coefficient = plugin.coefficient * scale  # per layer
        self.micro_coefficient = plugin.micro_coefficient * scale
        self.terms: list[torch.Tensor] = []
        self.chunks: list[_Chunk] = []
        self._unsent: list[_RouterCall] = []
        self._local: torch.Tensor | None = None
        self._prob_sums: torch.Tensor | None = None
        self._global: torch.Tensor | None = None
        self._gradient: torch.Tensor | None = None
        self._row_gradients: dict[int, torch.Tensor] = {}

    def add(self, call: _RouterCall) -> None:
        self._unsent.append(call)

    def send(self) -> None:
        """Count the top-k choices and tokens of every router call not sent yet, all layers in a few
        operations, start their all-reduce (no communication in one process), and create the autograd
        node that computes their gradient (:class:`_DeferredLBLGradient`): created now, right after the
        last router, the engine reaches it once the backward has come down to that router."""
        calls, self._unsent = self._unsent, []
        if not calls:
            return
        plugin, L, k = self.plugin, self.num_layers, self.top_k
        E = calls[0].logits.shape[-1]
        parts = [call.logits.detach().reshape(-1, E) for call in calls]
        layout = tuple((call.layer, part.shape[0]) for call, part in zip(calls, parts))
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]

        def build(device: torch.device) -> tuple[torch.Tensor, ...]:
            group = torch.repeat_interleave(torch.tensor([layer for layer, _ in layout]), torch.tensor([n for _, n in layout]))
            tokens = torch.zeros(L, E + 1, dtype=torch.float64)  # T per layer, without a mask
            tokens[:, E].index_add_(0, group, torch.ones(len(group), dtype=torch.float64))
            # each row's layer; where its counts start in the flat [L * (E + 1)] packet; where its T goes
            return tuple(t.to(device) for t in (group, (group * (E + 1)).unsqueeze(-1), group * (E + 1) + E, tokens.view(-1)))

        group, slot_start, token_slot, tokens = plugin._group_index(("counts", layout, E), rows.device, build)
        weight = None
        if plugin._mask is not None:
            weight = plugin._row_weight(calls[0].layer, parts[0].shape[0], rows.device)
            for call, part in zip(calls[1:], parts[1:]):
                plugin._row_weight(call.layer, part.shape[0], rows.device)
            weight = weight.repeat(len(parts)) if len(parts) > 1 else weight
        with torch.no_grad():
            probs = routing_probabilities(rows, self.score)  # p(x, i)
            chosen = probs.topk(k, dim=-1).indices
            slots = (slot_start + chosen).reshape(-1)  # (layer, expert) of every top-k choice
            if weight is None:
                local = tokens.clone().index_add_(0, slots, tokens.new_ones(()).expand(slots.numel()))  # T, then c
            else:
                weight64 = weight.double()
                local = torch.zeros_like(tokens).index_add_(0, slots, weight64.repeat_interleave(k))
                local.index_add_(0, token_slot, weight64)
            local = local.view(L, E + 1)  # this rank's c | T
            packet, handle = local, None
            if dist.is_distributed():
                packet = local.clone()
                handle = torch_dist.all_reduce(packet, op=torch_dist.ReduceOp.SUM, async_op=True)
        offset = 0
        for call, part in zip(calls, parts):
            call.chunk, call.start, call.end = len(self.chunks), offset, offset + part.shape[0]
            offset += part.shape[0]
        self.chunks.append(_Chunk(rows, probs, group, weight, local, packet, handle))
        self._local = self._prob_sums = self._global = self._gradient = None
        self.terms.append(_DeferredLBLGradient.apply(self, calls, *(call.logits for call in calls)))

    def wait_all(self) -> None:
        self.send()
        for chunk in self.chunks:
            if chunk.handle is not None:
                chunk.handle.wait()
                chunk.handle = None

    def local_counts(self) -> torch.Tensor:
        """This rank's ``[L, N_E + 1]`` c | T (float64)."""
        if self._local is None:
            self._local = self.chunks[0].local if len(self.chunks) == 1 else torch.stack([c.local for c in self.chunks]).sum(0)
        return self._local

    def prob_sums(self) -> torch.Tensor:
        """This rank's ``[L, N_E]`` sum_x p(x, i), no gradient: every call's rows at once."""
        if self._prob_sums is None:
            total = None
            with torch.no_grad():
                for chunk in self.chunks:
                    probs = chunk.probs if chunk.weight is None else chunk.probs * chunk.weight.unsqueeze(-1)
                    part = probs.new_zeros(self.num_layers, probs.shape[1]).index_add_(0, chunk.group, probs)
                    total = part if total is None else total + part
            self._prob_sums = total
        return self._prob_sums

    def global_counts(self) -> torch.Tensor:
        """Algorithm 1's buffer after this micro-batch, ``[L, N_E + 1]`` float64 (waits for the all-reduce)."""
        if self._global is None:
            self.wait_all()
            counts = self.chunks[0].packet if len(self.chunks) == 1 else torch.stack([c.packet for c in self.chunks]).sum(0)
            self._global = counts if self.base is None else self.base.to(counts.device) + counts
        return self._global

    def gradient_weights(self) -> torch.Tensor:
        """``dLoss / d sum_x p(x, i)`` per layer, ``[L, N_E]``: coefficient * N_E * f_i / T_local, with f
        from the global counts (plus the micro term's, with f from this rank's counts)."""
        if self._gradient is None:
            counts, local = self.global_counts(), self.local_counts()
            E = counts.shape[1] - 1
            local_tokens = local[:, E:].clamp_min(1)
            # coefficient * N_E * f_i / T_local, f_i = c_i / (k T): c_i * (coefficient N_E / k) / (T T_local)
            g = counts[:, :E] * (self.coefficient * E / self.top_k) / (counts[:, E:].clamp_min(1) * local_tokens)
            if self.micro_coefficient:
                g = g + local[:, :E] * (self.micro_coefficient * E / self.top_k) / local_tokens.square()
            self._gradient = g.float()
        return self._gradient

    def row_gradients(self, chunk_index: int) -> torch.Tensor:
        """The gradient of the loss with respect to every row of one chunk's logits, ``[rows, N_E]``
        (the first call needs the global counts: this is where backward waits for the all-reduce)."""
        d = self._row_gradients.get(chunk_index)
        if d is None:
            chunk = self.chunks[chunk_index]
            d = routing_probabilities_backward(chunk.rows, self.gradient_weights()[chunk.group], self.score, chunk.probs)
            if chunk.weight is not None:
                d = d * chunk.weight.unsqueeze(-1)
            self._row_gradients[chunk_index] = d
        return d

    def release_rows(self) -> None:
        """Drop the logits and per-row gradients once backward is over (the counts stay)."""
        if self.chunks and self.chunks[0].probs is not None:
            self.prob_sums()
        for chunk in self.chunks:
            chunk.rows = chunk.probs = chunk.group = chunk.weight = None
        self._row_gradients.clear()

    def layer_losses(self) -> torch.Tensor:
        """The exact per-layer term trained (the value of what the gradient is of), ``[L]``."""
        counts, local = self.global_counts(), self.local_counts()
        E = counts.shape[1] - 1
        lbl = load_balancing_loss(counts[:, :E], counts[:, E], self.prob_sums().double(), local[:, E], self.top_k)
        return lbl.float()


class _DeferredLBLGradient(torch.autograd.Function):
    """Zero in the forward; in backward, the gradient of the global-batch LBL with respect to the
    logits of a chunk of router calls, once their counts have arrived (the wait is here).

    The logits are kept through the calls, not ``save_for_backward``: inside a non-reentrantly
    checkpointed region, saved tensors would be recomputed in backward, where the capture window is
    closed and this function is not called again.
    """

    @staticmethod
    def forward(ctx: Any, pending: _MicroBatchCounts, calls: list[_RouterCall], *logits: torch.Tensor) -> torch.Tensor:
        ctx.pending, ctx.calls = pending, calls
        return logits[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        calls = ctx.calls
        d_rows = ctx.pending.row_gradients(calls[0].chunk) * grad  # waits for the all-reduce
        ctx.pending = ctx.calls = None  # released now rather than with the graph
        grads = tuple(d_rows[c.start:c.end].reshape(c.logits.shape).to(c.logits.dtype) for c in calls)
        return (None, None, *grads)
