"""Greedy facility location on the L1 similarity (the coreset of one source).

For the n examples of one source with (normalised, sparsified) gradients u_1 .. u_n::

    D_ij = ||u_i − u_j||_1                 (torch.cdist, p=1)
    S_ij = max(D) − D_ij                   (>= 0; S_ii = max(D) is the largest)
    F(A) = Σ_i max_{j ∈ A} S_ij,  F(∅) = 0

F is monotone submodular: a set A whose members are close to every example covers the source's
gradients well, and a weighted A matches their sum (CoLM trains it unweighted, as the reference's
default does). The greedy algorithm adds, k times, the j with the largest marginal gain::

    gain(j | A) = F(A ∪ {j}) − F(A) = Σ_i max(S_ij − c_i, 0),   c_i = max_{j ∈ A} S_ij  (0 for A = ∅)

and reaches F(A_greedy) >= (1 − 1/e) · max_{|A| = k} F(A) (Nemhauser, Wolsey, Fisher 1978). All
gains are computed at once as one [n, n] reduction per pick (n is a source's share of a large
batch, tens to hundreds), which is what the reference's lazy greedy (submodlib) computes, without
its priority queue.
"""

from __future__ import annotations

import torch


def l1_similarity(u: torch.Tensor) -> torch.Tensor:
    """S = max(D) − D with D = cdist(u, u, p=1): ``[n, n]`` for ``u`` ``[n, d]``."""
    if u.dim() != 2:
        raise ValueError(f"colm: facility location needs [n, d] representations, got shape {tuple(u.shape)}")
    distances = torch.cdist(u.float(), u.float(), p=1)  # D
    return distances.max() - distances                   # S


def facility_location_value(similarity: torch.Tensor, chosen: torch.Tensor | list[int]) -> torch.Tensor:
    """F(A) = Σ_i max_{j ∈ A} S_ij (0 for the empty set)."""
    chosen = torch.as_tensor(chosen, dtype=torch.long, device=similarity.device)
    if chosen.numel() == 0:
        return similarity.new_zeros(())
    return similarity[:, chosen].max(dim=1).values.sum()


def greedy_facility_location(similarity: torch.Tensor, budget: int) -> torch.Tensor:
    """The greedy maximiser of F with |A| = ``budget``: indices in the order they were picked.

    Ties go to the lowest index. Once every gain is zero (A already covers every example as well as
    any j could) the remaining picks are the lowest unpicked indices, so the result always has
    ``budget`` distinct entries.
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n):
        raise ValueError(f"colm: the similarity must be square, got shape {tuple(similarity.shape)}")
    if not 0 <= budget <= n:
        raise ValueError(f"colm: facility location budget {budget} is outside [0, {n}]")
    coverage = similarity.new_zeros(n)                                    # c_i = max_{j∈A} S_ij
    picked = torch.zeros(n, dtype=torch.bool, device=similarity.device)
    order = []
    for _ in range(budget):
        gains = (similarity - coverage[:, None]).clamp_min(0).sum(dim=0)  # gain(j | A) for every j
        gains = gains.masked_fill(picked, float("-inf"))
        j = int(torch.argmax(gains))                                      # first maximum: lowest index
        order.append(j)
        picked[j] = True
        coverage = torch.maximum(coverage, similarity[:, j])
    return torch.tensor(order, dtype=torch.long, device=similarity.device)
