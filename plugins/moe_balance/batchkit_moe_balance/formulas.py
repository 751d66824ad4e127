"""The load-balancing loss, written to read like the paper (Qiu et al. 2025, "Demons in the Detail",
arXiv 2501.11873, Eq. 2-6; Switch Transformer, Fedus et al. 2022, Eq. 4-6).

Symbols, per MoE layer:

* ``N_E`` experts, top-``k`` routing, ``T`` tokens;
* ``p(x, i)`` = softmax of the router logits of token ``x`` over all experts;
* ``c_i``  = how many of the ``k * T`` top-k choices picked expert ``i`` (no gradient);
* ``f_i = c_i / (k * T)``: the fraction of choices that went to expert ``i`` (sums to 1);
* ``P_i = (1 / T) * sum_x p(x, i)``: the mean routing probability of expert ``i`` (has the gradient);
* ``LBL = N_E * sum_i f_i * P_i``, which is 1 for a perfectly balanced router.

Only the counts ``c`` and the token count ``T`` of ``f`` change between the scopes: micro-batch (this
rank's tokens), global batch (``c`` and ``T`` summed over the data-parallel ranks and the micro-batches
of the optimizer step so far) and sequence (each sequence on its own). ``P`` is always this rank's own
tokens over this rank's own token count (paper Eq. 6), so data-parallel gradient averaging turns the
per-rank terms into the global-batch loss and nothing is ``1/dp`` too small.

HF transformers' ``load_balancing_loss_func`` counts ``f`` without dividing by ``k`` (its ``f`` sums to
``k``), so its value is ``k`` times ours for one layer; it also pools all layers into one ``f`` and one
``P`` before multiplying, where we compute one loss per layer.

Routers that score experts with a sigmoid (DeepSeek-V3) use the normalised sigmoid
``p(x, i) = s_i / sum_j s_j`` with ``s = sigmoid(logits)`` as ``p`` (DeepSeek-V3, arXiv 2412.19437,
Eq. 17-20; Megatron-Core's ``score_function: sigmoid``); the top-k ranking is the same either way.
"""

from __future__ import annotations

from typing import Literal

import torch

Score = Literal["softmax", "sigmoid"]
SCORES = ("softmax", "sigmoid")


def routing_probabilities(logits: torch.Tensor, score: Score = "softmax") -> torch.Tensor:
    """``p(x, i)`` in float32 along the last dimension: the softmax of the logits, or the normalised
    sigmoid ``s_i / sum_j s_j`` for sigmoid-scored routers."""
    z = logits.float()
    if score == "softmax":
        return torch.softmax(z, dim=-1)
    s = torch.sigmoid(z)
    return s / s.sum(-1, keepdim=True)


def routing_probabilities_backward(
    logits: torch.Tensor, weight_per_expert: torch.Tensor, score: Score = "softmax", probs: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient of ``sum_x sum_i g_i p(x, i)`` with respect to the logits, for a fixed ``g``
    ``[..., N_E]`` (broadcast over the rows): the backward of ``P`` written out, so it can run later
    than the forward (global mode computes ``g = N_E f_i / T`` only once the counts arrived).

    softmax: ``dz_j = p_j (g_j - sum_i g_i p_i)``; normalised sigmoid ``p = s / S``:
    ``dz_j = p_j (1 - s_j) (g_j - sum_i g_i p_i)``. ``probs``: ``p`` if already computed.
    """
    p = routing_probabilities(logits, score) if probs is None else probs
    centred = weight_per_expert - (p * weight_per_expert).sum(-1, keepdim=True)
    if score == "softmax":
        return p * centred
    return p * (1 - torch.sigmoid(logits.float())) * centred


def routing_statistics(
    logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None, score: Score = "softmax"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert selection counts ``c``, probability sums ``sum_x p(x, i)`` and the token count ``T``.

    :param logits: router logits ``[..., N_E]`` (any leading shape; each row is one token).
    :param top_k: experts chosen per token.
    :param token_mask: optional ``[...]`` mask (1 = a real token, 0 = padding), the logits' leading shape.
    :param score: ``softmax`` or ``sigmoid`` (normalised), how the router turns logits into ``p``.
    :return: ``(c [N_E] float, no grad; prob_sum [N_E] float32 with grad; T scalar float)``.
    """
    num_experts = logits.shape[-1]
    rows = logits.reshape(-1, num_experts)
    probs = routing_probabilities(rows, score)  # p(x, i)
    chosen = probs.detach().topk(top_k, dim=-1).indices  # [T, k]: the top-k experts of each token
    if token_mask is None:
        weight = torch.ones(rows.shape[0], device=rows.device, dtype=torch.float32)
    else:
        weight = token_mask.reshape(-1).to(device=rows.device, dtype=torch.float32)
        if weight.numel() != rows.shape[0]:
            raise ValueError(f"token mask has {weight.numel()} entries for {rows.shape[0]} router rows")
    counts = torch.zeros(num_experts, device=rows.device, dtype=torch.float32)
    counts.scatter_add_(0, chosen.reshape(-1), weight.repeat_interleave(top_k))  # c_i
    prob_sum = (probs * weight.unsqueeze(-1)).sum(0)  # sum_x p(x, i)
    return counts, prob_sum, weight.sum()


def grouped_routing_statistics(
    rows: torch.Tensor,
    group: torch.Tensor,
    num_groups: int,
    top_k: int,
    weight: torch.Tensor | None = None,
    score: Score = "softmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`routing_statistics` for many groups of rows at once (layers, router calls, sequences),
    in a fixed handful of operations whatever the number of groups.

    :param rows: router logits ``[N, N_E]``, the rows of every group concatenated.
    :param group: ``[N]`` int64, the group of each row, in ``[0, num_groups)``.
    :param weight: optional ``[N]`` token mask (1 = real token, 0 = padding).
    :return: ``(c [G, N_E] no grad, prob_sum [G, N_E] with grad, T [G])``, float32.
    """
    num_experts = rows.shape[-1]
    probs = routing_probabilities(rows, score)  # p(x, i) [N, N_E]
    chosen = probs.detach().topk(top_k, dim=-1).indices  # [N, k]
    slots = (group.unsqueeze(-1) * num_experts + chosen).reshape(-1)  # (group, expert) of every choice
    if weight is None:
        per_choice = probs.new_ones(()).expand(slots.numel())
        per_row = probs.new_ones(()).expand(rows.shape[0])
        weighted = probs
    else:
        per_row = weight.to(probs.dtype)
        per_choice = per_row.repeat_interleave(top_k)
        weighted = probs * per_row.unsqueeze(-1)
    counts = probs.new_zeros(num_groups * num_experts).index_add_(0, slots, per_choice)
    counts = counts.view(num_groups, num_experts)  # c_i
    prob_sum = probs.new_zeros(num_groups, num_experts).index_add(0, group, weighted)  # sum_x p(x, i)
    tokens = probs.new_zeros(num_groups).index_add_(0, group, per_row)  # T
    return counts, prob_sum, tokens


def load_balancing_loss(
    counts: torch.Tensor,
    counted_tokens: torch.Tensor,
    prob_sum: torch.Tensor,
    local_tokens: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """``LBL = N_E * sum_i f_i * P_i`` along the last dimension (batched over any leading ones).

    :param counts: ``c_i``, at the scope ``f`` is wanted (micro-batch, or summed across ranks and
        micro-batches for the global batch).
    :param counted_tokens: ``T`` of that same scope (``f_i = c_i / (k * T)``).
    :param prob_sum: ``sum_x p(x, i)`` over this rank's tokens (carries the gradient).
    :param local_tokens: this rank's token count (``P_i = prob_sum_i / T_local``).
    :return: the loss per leading index; 0 where a scope has no tokens.
    """
    num_experts = counts.shape[-1]
    f = counts / (top_k * counted_tokens.clamp_min(1)).unsqueeze(-1)  # f_i, sums to 1
    P = prob_sum / local_tokens.clamp_min(1).unsqueeze(-1)  # P_i
    return num_experts * (f * P).sum(-1)


def sequence_load_balancing_loss(
    logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None, score: Score = "softmax"
) -> torch.Tensor:
    """The sequence-level loss (DeepSeek-V2's balance loss): ``LBL`` per sequence, averaged over the
    sequences that have tokens.

    :param logits: ``[B, S, N_E]`` router logits.
    :param token_mask: optional ``[B, S]`` mask.
    """
    if logits.dim() != 3:
        raise ValueError(f"sequence-level LBL needs logits shaped [batch, seq, experts], got {list(logits.shape)}")
    B, S, num_experts = logits.shape
    probs = routing_probabilities(logits, score)  # p(x, i) [B, S, N_E]
    weight = torch.ones(B, S, device=logits.device) if token_mask is None else token_mask.to(logits.device).float().reshape(B, S)
    chosen = probs.detach().topk(top_k, dim=-1).indices  # [B, S, k]
    counts = torch.zeros(B, num_experts, device=logits.device)
    counts.scatter_add_(1, chosen.reshape(B, S * top_k), weight.repeat_interleave(top_k, dim=1))  # c_i per sequence
    prob_sum = (probs * weight.unsqueeze(-1)).sum(1)  # [B, N_E]
    tokens = weight.sum(1)  # [B]
    per_sequence = load_balancing_loss(counts, tokens, prob_sum, tokens, top_k)
    has_tokens = tokens > 0
    return per_sequence[has_tokens].sum() / has_tokens.sum().clamp_min(1)


def load_imbalance(counts: torch.Tensor) -> torch.Tensor:
    """Max-over-mean expert load, ``N_E * max_i f_i``: 1 when balanced, ``N_E / k`` when every token
    picks the same ``k`` experts. Along the last dimension."""
    total = counts.sum(-1, keepdim=True).clamp_min(1e-12)
    return counts.shape[-1] * (counts / total).amax(-1)
