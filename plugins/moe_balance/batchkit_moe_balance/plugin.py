"""``moe_lbl``: the MoE load-balancing loss as a loss-stage plugin, at micro-batch, global-batch or
sequence scope. See the package README for the options and docs/methods/moe_balance.md for the
measurements."""

from __future__ import annotations

import re
from typing import Any
from typing import Literal
from typing import Optional

import torch
from torch import nn

from batchkit import Plugin
from batchkit import dist
from batchkit import hookimpl
from batchkit_moe_balance.capture import ROUTER_ATTRIBUTE
from batchkit_moe_balance.capture import RouterCapture
from batchkit_moe_balance.capture import find_routers
from batchkit_moe_balance.capture import router_top_k
from batchkit_moe_balance.formulas import load_balancing_loss
from batchkit_moe_balance.formulas import load_imbalance
from batchkit_moe_balance.formulas import routing_statistics
from batchkit_moe_balance.formulas import sequence_load_balancing_loss

Mode = Literal["micro", "global", "sequence"]
MODES = ("micro", "global", "sequence")


class MoELoadBalancing(Plugin):
    """Adds ``coefficient * LBL`` to the training loss.

    :param coefficient: weight of the loss (per layer with ``layer_reduction: sum``).
    :param mode: ``micro`` (f from this rank's micro-batch, today's common practice), ``global``
        (f from the counts of every data-parallel rank and every micro-batch of the optimizer step so
        far: the paper's Algorithm 1), or ``sequence`` (f and P per sequence).
    :param top_k: experts per token; default: the router module's ``top_k`` (or
        ``num_experts_per_tok``, ``k``) attribute.
    :param router_type: class name (or ``module.Class``) of the router modules.
    :param router_pattern: regular expression for the qualified names of the router modules.
        Without either, modules with ``batchkit_moe_router = True`` are the routers.
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
        each time); default the Trainer's ``log_every_n_steps``; 0 turns logging off.
    :param log_expert_load: also log the global load of every expert of every layer.
    """

    name = "moe_lbl"

    def __init__(
        self,
        coefficient: float = 0.01,
        mode: Mode = "global",
        top_k: Optional[int] = None,
        router_type: Optional[str] = None,
        router_pattern: Optional[str] = None,
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
            raise ValueError(f"{who}: mode must be one of {list(MODES)}, got {mode!r}; use e.g. mode: global")
        if not coefficient >= 0:
            raise ValueError(f"{who}: coefficient must be >= 0, got {coefficient}; the usual range is 1e-3 to 1e-2")
        if not micro_coefficient >= 0:
            raise ValueError(f"{who}: micro_coefficient must be >= 0, got {micro_coefficient}; use e.g. 0.01 * coefficient")
        if micro_coefficient and mode != "global":
            raise ValueError(
                f"{who}: micro_coefficient adds a micro-batch term next to the global-batch loss and needs "
                f"mode: global (got mode: {mode}); remove micro_coefficient or set mode: global"
            )
        if top_k is not None and top_k < 1:
            raise ValueError(f"{who}: top_k must be >= 1, got {top_k}; leave it unset to read the router's top_k")
        if router_type and router_pattern:
            raise ValueError(f"{who}: give router_type or router_pattern, not both (got {router_type!r} and {router_pattern!r})")
        if router_pattern:
            try:
                re.compile(router_pattern)
            except re.error as exc:
                raise ValueError(f"{who}: router_pattern {router_pattern!r} is not a regular expression ({exc}); "
                                 r"use e.g. 'blocks\.\d+\.moe\.router'") from None
        if layer_reduction not in ("mean", "sum"):
            raise ValueError(f"{who}: layer_reduction must be 'mean' or 'sum', got {layer_reduction!r}")
        if tokens_per_sequence is not None and (mode != "sequence" or tokens_per_sequence < 1):
            raise ValueError(f"{who}: tokens_per_sequence must be >= 1 and is used only with mode: sequence "
                             f"(got {tokens_per_sequence} with mode: {mode})")
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise ValueError(f"{who}: log_every_n_steps must be >= 0 (0 = no logging), got {log_every_n_steps}")
        self.coefficient = float(coefficient)
        self.mode = mode
        self.top_k = top_k
        self.router_type = router_type
        self.router_pattern = router_pattern
        self.logits_index = logits_index
        self.layer_reduction = layer_reduction
        self.token_mask_key = token_mask_key
        self.tokens_per_sequence = tokens_per_sequence
        self.micro_coefficient = float(micro_coefficient)
        self.log_every_n_steps = log_every_n_steps
        self.log_expert_load = log_expert_load

        self.capture: RouterCapture | None = None
        self.router_names: list[str] = []
        self._k: int = 0
        self.num_experts: int | None = None
        # Algorithm 1's buffer: [L, N_E + 1] = all-reduced counts c and tokens T of the step so far.
        self.step_counts: torch.Tensor | None = None
        # This rank's detached statistics of the current optimizer step, for logging.
        self._step_stats: torch.Tensor | None = None  # [L, 2 N_E + 2]: c, sum p, T, sum of LBL terms
        self._micro_steps = 0
        #: the counts ``c`` (and ``T`` in the last column) that ``f`` was computed from at the last micro-batch
        self.last_f_counts: torch.Tensor | None = None
        #: this rank's own counts ``c`` (and ``T``) of the last micro-batch
        self.last_local_counts: torch.Tensor | None = None
        #: the per-layer LBL of the last micro-batch (detached)
        self.last_layer_losses: torch.Tensor | None = None

    # -- attaching to the model -------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Find the routers of ``model`` and hook them (the Lightning path does this at setup)."""
        self.detach()
        routers = find_routers(model, self.router_type, self.router_pattern)
        if not routers:
            how = (f"router_type: {self.router_type!r}" if self.router_type else
                   f"router_pattern: {self.router_pattern!r}" if self.router_pattern else
                   f"no router_type/router_pattern, and no module has `{ROUTER_ATTRIBUTE} = True`")
            kinds = sorted({type(m).__name__ for m in model.modules()})[:12]
            raise ValueError(
                f"{self.instance_name}: found no router module in {type(model).__name__} ({how}). Set "
                f"router_type to the router's class name (classes in the model: {kinds}), or router_pattern "
                f"to a regex over names from model.named_modules(), or mark routers with `{ROUTER_ATTRIBUTE} = True`"
            )
        ks = {name: (self.top_k or router_top_k(module)) for name, module in routers}
        if any(k is None for k in ks.values()):
            missing = [n for n, k in ks.items() if k is None]
            raise ValueError(
                f"{self.instance_name}: top_k is not set and routers {missing} have no top_k attribute; "
                "set top_k to the number of experts each token is sent to"
            )
        if len(set(ks.values())) > 1:
            raise ValueError(
                f"{self.instance_name}: routers use different top_k {ks}; one plugin instance handles one top_k: "
                "use two entries with router_pattern selecting each group"
            )
        self._k = next(iter(ks.values()))
        self.router_names = [name for name, _ in routers]
        self.capture = RouterCapture(routers, self.logits_index, owner=self.instance_name)

    def detach(self) -> None:
        if self.capture is not None:
            self.capture.remove()
            self.capture = None

    @property
    def num_layers(self) -> int:
        return len(self.router_names)

    # -- hooks --------------------------------------------------------------------------------------

    @hookimpl
    def batchkit_setup(self, module: Any, stage: str) -> None:
        if stage == "fit":
            self.attach(module)

    @hookimpl
    def batchkit_teardown(self) -> None:
        self.detach()

    @hookimpl(trylast=True)
    def batchkit_transform_batch(self) -> None:
        # Open the capture window after every other batch-stage plugin (their scoring forwards
        # are not training tokens); the loss stage closes it.
        if self.capture is None:
            raise RuntimeError(f"{self.instance_name}: no model attached; call attach(model) before training")
        self.capture.open()

    @hookimpl
    def batchkit_transform_loss(self, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        capture = self.capture
        if capture is None:
            raise RuntimeError(f"{self.instance_name}: no model attached; call attach(model) before training")
        capture.close()
        try:
            return loss + self._auxiliary_loss(batch).to(loss.dtype)
        finally:
            capture.clear()

    @hookimpl
    def batchkit_step_end(self, ctx: Any) -> None:
        every = self.log_every_n_steps
        if every is None:
            trainer = getattr(ctx, "trainer", None)
            every = int(getattr(trainer, "log_every_n_steps", 1)) if trainer is not None else 1
        if every and self._step_stats is not None and ctx.global_step % every == 0:
            self._log_step()
        self.step_counts = None  # Algorithm 1: the buffer starts empty at every optimizer step
        self._step_stats = None
        self._micro_steps = 0

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        copy = lambda t: None if t is None else t.detach().cpu().clone()  # noqa: E731
        return {
            "mode": self.mode,
            "router_names": list(self.router_names),
            "step_counts": copy(self.step_counts),
            "step_stats": copy(self._step_stats),
            "micro_steps": self._micro_steps,
        }

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"{self.instance_name}: the checkpoint was saved with mode: {state.get('mode')} but this run uses "
                f"mode: {self.mode}; resume with the same mode"
            )
        self.step_counts = state.get("step_counts")
        self._step_stats = state.get("step_stats")
        self._micro_steps = int(state.get("micro_steps", 0))

    # -- the loss -----------------------------------------------------------------------------------

    def _token_mask(self, batch: Any) -> torch.Tensor | None:
        key = self.token_mask_key
        if key is None:
            return None
        if isinstance(batch, dict) and key in batch:
            return batch[key]
        raise KeyError(
            f"{self.instance_name}: token_mask_key is {key!r} but the batch is a {type(batch).__name__}"
            + (f" with keys {list(batch)}" if isinstance(batch, dict) else "")
            + "; set token_mask_key to the batch key of the [batch, seq] padding mask, or remove it"
        )

    def _layer_logits(self) -> list[list[torch.Tensor]]:
        capture = self.capture
        assert capture is not None
        records = capture.records
        if not any(records):
            if capture.ignored_without_grad:
                raise RuntimeError(
                    f"{self.instance_name}: the routers ran {capture.ignored_without_grad} times in this training step, "
                    "all with autograd off, so the load-balancing loss would have no gradient. This happens with "
                    "reentrant activation checkpointing (torch.utils.checkpoint(..., use_reentrant=True)) around the "
                    "routers: use use_reentrant=False, or keep the routers outside the checkpointed function"
                )
            raise RuntimeError(
                f"{self.instance_name}: none of the routers {self.router_names} ran in this training step; check "
                "router_type/router_pattern, or that training_step calls the model"
            )
        return records

    def _auxiliary_loss(self, batch: Any) -> torch.Tensor:
        records = self._layer_logits()
        mask = self._token_mask(batch)
        k = self._k
        reference = next(t for layer in records for t in layer)
        E = reference.shape[-1]
        if self.num_experts is None:
            self.num_experts = E
        device = reference.device
        counts = torch.zeros(self.num_layers, E, device=device)
        prob_sums: list[torch.Tensor] = []
        tokens = torch.zeros(self.num_layers, device=device)
        for layer, calls in enumerate(records):
            prob_sum = torch.zeros(E, device=device)
            for logits in calls:
                if logits.shape[-1] != E:
                    raise ValueError(
                        f"{self.instance_name}: router {self.router_names[layer]!r} has {logits.shape[-1]} experts and "
                        f"{self.router_names[0]!r} has {E}; one plugin instance handles one expert count: use two "
                        "entries with router_pattern selecting each group"
                    )
                if k > E:
                    raise ValueError(f"{self.instance_name}: top_k={k} is more than the {E} experts of the routers")
                layer_mask = mask
                if mask is not None and mask.numel() != logits.numel() // E:
                    raise ValueError(
                        f"{self.instance_name}: the token mask {self.token_mask_key!r} has {mask.numel()} entries but "
                        f"router {self.router_names[layer]!r} routed {logits.numel() // E} tokens; the mask must "
                        "cover exactly the tokens the routers see"
                    )
                c, s, t = routing_statistics(logits, k, layer_mask)
                counts[layer] += c
                prob_sum = prob_sum + s
                tokens[layer] += t
            prob_sums.append(prob_sum)
        prob_sum = torch.stack(prob_sums)  # [L, N_E], with grad

        micro = load_balancing_loss(counts, tokens, prob_sum, tokens, k)  # [L]
        self.last_local_counts = torch.cat([counts, tokens[:, None]], 1)
        if self.mode == "micro":
            layer_losses = micro
            self.last_f_counts = self.last_local_counts
        elif self.mode == "global":
            # The one collective: c and T of every layer, summed over the data-parallel ranks.
            packet = torch.cat([counts, tokens[:, None]], 1).double()
            dist.all_reduce(packet, "sum")
            if self.step_counts is None:
                self.step_counts = torch.zeros_like(packet)
            elif self.step_counts.shape != packet.shape:
                raise ValueError(
                    f"{self.instance_name}: the count buffer has shape {list(self.step_counts.shape)} (restored from a "
                    f"checkpoint?) but this model gives {list(packet.shape)} (layers, experts + 1)"
                )
            self.step_counts = self.step_counts.to(packet.device) + packet  # c and T of micro-steps 1..k
            self.last_f_counts = self.step_counts.clone()
            step = self.step_counts.to(prob_sum.dtype)
            layer_losses = load_balancing_loss(step[:, :E], step[:, E], prob_sum, tokens, k)
        else:
            self.last_f_counts = self.last_local_counts
            layer_losses = torch.stack([
                torch.stack([sequence_load_balancing_loss(self._as_sequences(t, mask, layer), k, self._sequence_mask(t, mask))
                             for t in calls]).mean() if calls else prob_sum.new_zeros(())
                for layer, calls in enumerate(records)
            ])
        self.last_layer_losses = layer_losses.detach()

        reduce = torch.mean if self.layer_reduction == "mean" else torch.sum
        aux = self.coefficient * reduce(layer_losses)
        if self.micro_coefficient:
            aux = aux + self.micro_coefficient * reduce(micro)

        stats = torch.cat([counts, prob_sum.detach(), tokens[:, None], layer_losses.detach()[:, None]], 1).double()
        self._step_stats = stats if self._step_stats is None else self._step_stats.to(stats.device) + stats
        self._micro_steps += 1
        return aux

    def _as_sequences(self, logits: torch.Tensor, mask: torch.Tensor | None, layer: int) -> torch.Tensor:
        if logits.dim() == 3:
            return logits
        E = logits.shape[-1]
        if mask is not None and mask.dim() == 2:
            return logits.reshape(*mask.shape, E)
        if self.tokens_per_sequence:
            return logits.reshape(-1, self.tokens_per_sequence, E)
        raise ValueError(
            f"{self.instance_name}: mode: sequence needs the sequence of every token, but router "
            f"{self.router_names[layer]!r} returned logits shaped {list(logits.shape)}; return [batch, seq, experts] "
            "logits, or set tokens_per_sequence (or token_mask_key with a [batch, seq] mask)"
        )

    @staticmethod
    def _sequence_mask(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        return None if mask is None else mask.reshape(-1)

    # -- logging ------------------------------------------------------------------------------------

    def _log_step(self) -> None:
        """Global figures of the optimizer step just taken (one all-reduce of [L, 2 N_E + 2])."""
        stats = self._step_stats.clone()
        dist.all_reduce(stats, "sum")
        E = (stats.shape[1] - 2) // 2
        counts, prob_sum, tokens, loss_sum = stats[:, :E], stats[:, E:2 * E], stats[:, 2 * E], stats[:, 2 * E + 1]
        k = self._k
        global_lbl = load_balancing_loss(counts, tokens, prob_sum, tokens, k)  # over the whole global batch
        imbalance = load_imbalance(counts)
        training_term = loss_sum / (dist.get_world_size() * max(self._micro_steps, 1))
        load = counts / (k * tokens.clamp_min(1))[:, None]  # global f_i per layer
        # one device-to-host copy for every figure (not one sync per logged number)
        means = torch.stack([training_term.mean(), global_lbl.mean(), imbalance.mean()]).tolist()
        global_lbl, imbalance, load = global_lbl.tolist(), imbalance.tolist(), load.tolist()
        self.log("lbl", means[0])
        self.log("lbl_global_batch", means[1])
        self.log("imbalance", means[2])
        for layer in range(self.num_layers):
            self.log(f"layer{layer}/lbl_global_batch", global_lbl[layer])
            self.log(f"layer{layer}/imbalance", imbalance[layer])
            if self.log_expert_load:
                for expert in range(E):
                    self.log(f"layer{layer}/load/expert{expert}", load[layer][expert])
