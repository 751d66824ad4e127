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
"""

from __future__ import annotations

import torch


def routing_statistics(
    logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert selection counts ``c``, probability sums ``sum_x p(x, i)`` and the token count ``T``.

    :param logits: router logits ``[..., N_E]`` (any leading shape; each row is one token).
    :param top_k: experts chosen per token.
    :param token_mask: optional ``[...]`` mask (1 = a real token, 0 = padding), the logits' leading shape.
    :return: ``(c [N_E] float, no grad; prob_sum [N_E] float32 with grad; T scalar float)``.
    """
    num_experts = logits.shape[-1]
    rows = logits.reshape(-1, num_experts)
    probs = torch.softmax(rows.float(), dim=-1)  # p(x, i)
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
    logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The sequence-level loss (DeepSeek-V2's balance loss): ``LBL`` per sequence, averaged over the
    sequences that have tokens.

    :param logits: ``[B, S, N_E]`` router logits.
    :param token_mask: optional ``[B, S]`` mask.
    """
    if logits.dim() != 3:
        raise ValueError(f"sequence-level LBL needs logits shaped [batch, seq, experts], got {list(logits.shape)}")
    B, S, num_experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # p(x, i) [B, S, N_E]
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
