"""The selection: proportional budget, small sources, top-k dimensions, greedy facility location
against brute force, and select_coreset composing them."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from batchkit_coresets import AdamNormalizer
from batchkit_coresets import facility_location_value
from batchkit_coresets import greedy_facility_location
from batchkit_coresets import l1_similarity
from batchkit_coresets import proportional_budget
from batchkit_coresets import select_coreset
from batchkit_coresets import small_source_mask
from batchkit_coresets import top_dims

# --------------------------------------------------------------------------------------------------
# proportional budget
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("counts", "k", "expected"), [
    # floors [5, 2, 1, 1] = 9; +1 to the smallest k_s first (ties in source order): source 2
    ([10, 5, 3, 2], 10, [5, 2, 2, 1]),
    # floors [3, 2, 1] (3.5, 2.1, 1.4) = 6; +1 to source 2
    ([50, 30, 20], 7, [3, 2, 2]),
    # floors [0, 24, 24] = 48; +1 to source 0 (k_s = 0), then source 1 (tie with 2, earlier)
    ([1, 50, 50], 50, [1, 25, 24]),
    # exact split: nothing to add
    ([4, 4, 8], 8, [2, 2, 4]),
    # one source takes everything; k = |R| takes every example
    ([7], 3, [3]),
    ([3, 2], 5, [3, 2]),
    ([3, 2], 0, [0, 0]),
])
def test_proportional_budget_vectors(counts: list[int], k: int, expected: list[int]) -> None:
    assert proportional_budget(counts, k) == expected


def test_proportional_budget_properties() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        counts = torch.randint(1, 40, (int(torch.randint(1, 8, (1,), generator=gen)),), generator=gen).tolist()
        total = sum(counts)
        k = int(torch.randint(0, total + 1, (1,), generator=gen))
        budget = proportional_budget(counts, k)
        assert sum(budget) == k
        for n, k_s in zip(counts, budget):
            assert 0 <= k_s <= n
            assert math.floor(n * k / total) <= k_s <= math.floor(n * k / total) + 1


def test_proportional_budget_errors() -> None:
    with pytest.raises(ValueError, match="cannot select 6 examples from 5"):
        proportional_budget([3, 2], 6)


def test_small_source_mask() -> None:
    sources = torch.tensor([0, 1, 2, 0, 2, 3, 0, 1])
    assert small_source_mask(sources, small_sources=[3, 1]).tolist() == [0, 1, 0, 0, 0, 1, 0, 1]
    # at most 2 examples in this batch: sources 1 (2), 2 (2), 3 (1)
    assert small_source_mask(sources, small_threshold=2).tolist() == [0, 1, 1, 0, 1, 1, 0, 1]
    assert small_source_mask(sources, small_sources=[0], small_threshold=1).tolist() == [1, 0, 0, 1, 0, 1, 1, 0]
    assert not small_source_mask(sources).any()


def test_top_dims() -> None:
    u = torch.tensor([[1.0, -3.0, 2.0, 0.0], [1.0, -1.0, -2.0, 0.0]])  # |mean| = [1, 2, 0, 0]
    assert top_dims(u, 1).tolist() == [1]
    assert top_dims(u, 2).tolist() == [0, 1]
    assert top_dims(u, 3).tolist() == [0, 1, 2]  # tie at 0: the lower coordinate
    v = torch.tensor([[0.0, 5.0, 1.0, 5.0, 1.0, 1.0, 0.0]])
    assert top_dims(v, 4).tolist() == [1, 2, 3, 4]  # ties at the cut (1.0): coordinates 2 and 4 of 2, 4, 5
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 300, generator=gen)
    expected = torch.sort(w.mean(0).abs(), descending=True, stable=True).indices[:40].sort().values
    assert torch.equal(top_dims(w, 40), expected)
    assert top_dims(u, None).tolist() == [0, 1, 2, 3]
    assert top_dims(u, 10).tolist() == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# facility location
# --------------------------------------------------------------------------------------------------


def brute_force_value(similarity: list[list[float]], chosen: tuple[int, ...]) -> float:
    """F(A) = Σ_i max_{j ∈ A} S_ij, in plain Python."""
    return sum(max(row[j] for j in chosen) for row in similarity) if chosen else 0.0


def brute_force_greedy(similarity: list[list[float]], budget: int) -> list[int]:
    """The greedy algorithm by evaluating F(A ∪ {j}) for every j (ties: lowest j)."""
    chosen: list[int] = []
    for _ in range(budget):
        best, best_value = None, -math.inf
        for j in range(len(similarity)):
            if j in chosen:
                continue
            value = brute_force_value(similarity, tuple(chosen + [j]))
            if value > best_value + 1e-9:
                best, best_value = j, value
        chosen.append(best)
    return chosen


def test_hand_made_similarity() -> None:
    S = torch.tensor([[4.0, 3.0, 0.0, 0.0],
                      [3.0, 4.0, 1.0, 0.0],
                      [0.0, 1.0, 4.0, 2.0],
                      [0.0, 0.0, 2.0, 4.0]])
    # pick 1: column sums 7, 8, 7, 6 -> 1; coverage [3, 4, 1, 0]
    # pick 2: gains 1, -, 5, 5 -> 2 (tie, lower index); coverage [3, 4, 4, 2]
    # pick 3: gains 1, -, -, 2 -> 3
    assert greedy_facility_location(S, 3).tolist() == [1, 2, 3]
    assert facility_location_value(S, [1, 2]).item() == 13.0
    assert facility_location_value(S, []).item() == 0.0
    assert greedy_facility_location(S, 3).tolist() == brute_force_greedy(S.tolist(), 3)


def test_greedy_against_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    bound = 1 - 1 / math.e
    worst_ratio = 1.0
    for case in range(60):
        n = int(torch.randint(2, 9, (1,), generator=gen))
        if case % 2:
            S = l1_similarity(torch.randn(n, 3, generator=gen))            # the similarity CoLM uses
        else:
            S = torch.rand(n, n, generator=gen) * 10                        # any non-negative S
        for budget in range(1, min(n, 4) + 1):
            greedy = greedy_facility_location(S, budget).tolist()
            assert greedy == brute_force_greedy(S.tolist(), budget)
            optimum = max(brute_force_value(S.tolist(), A) for A in itertools.combinations(range(n), budget))
            value = facility_location_value(S, greedy).item()
            assert value >= bound * optimum - 1e-4
            worst_ratio = min(worst_ratio, value / optimum)
    assert worst_ratio < 1.0  # greedy is not always optimal on these cases: the brute force is not trivial


def test_greedy_fills_after_zero_gain() -> None:
    S = torch.ones(4, 4)  # after one pick every gain is 0: the rest go to the lowest unpicked indices
    assert greedy_facility_location(S, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="budget 5 is outside"):
        greedy_facility_location(S, 5)


def test_l1_similarity() -> None:
    u = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.0]])
    # D = [[0, 3, 1], [3, 0, 4], [1, 4, 0]], max 4
    assert l1_similarity(u).tolist() == [[4.0, 1.0, 3.0], [1.0, 4.0, 0.0], [3.0, 0.0, 4.0]]


# --------------------------------------------------------------------------------------------------
# select_coreset
# --------------------------------------------------------------------------------------------------


def mixture(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sources = torch.tensor([0] * 10 + [1] * 6 + [2] * 2 + [3] * 2)
    sources = sources[torch.randperm(20, generator=gen)]
    grads = torch.randn(20, 12, generator=gen) + sources[:, None].float()
    return grads, sources


def test_small_sources_whole_and_proportional_rest() -> None:
    grads, sources = mixture()
    chosen = select_coreset(grads, sources, 10, small_sources=[2], small_threshold=2, normalizer=AdamNormalizer(),
                            dims=4)
    assert len(chosen) == 10 and chosen.unique().numel() == 10 and torch.equal(chosen, chosen.sort().values)
    picked = sources[chosen]
    # kept whole: source 2 (listed) and 3 (2 examples <= threshold); rest k_R = 6 over [10, 6]:
    # floors [3, 2], +1 to source 1
    assert [(picked == s).sum().item() for s in range(4)] == [3, 3, 2, 2]


def test_deterministic_and_moments_from_the_selected_large_examples() -> None:
    grads, sources = mixture()
    first, second = AdamNormalizer(), AdamNormalizer()
    chosen = select_coreset(grads, sources, 10, small_sources=[2, 3], normalizer=first, dims=4)
    assert torch.equal(chosen, select_coreset(grads, sources, 10, small_sources=[2, 3], normalizer=second, dims=4))
    # the moments moved to the mean of m_i, v_i over the selected large-source examples only
    rest = ((sources != 2) & (sources != 3)).nonzero().flatten()
    _, m, v = AdamNormalizer().normalize(grads[rest])
    selected_rest = torch.isin(rest, chosen)
    torch.testing.assert_close(first.m_prev, m[selected_rest].mean(0))
    torch.testing.assert_close(first.v_prev, v[selected_rest].mean(0))
    assert first.t == 1
    # the next step uses those moments: a different normalisation, same inputs
    assert not torch.equal(AdamNormalizer().normalize(grads)[0], first.normalize(grads)[0])


def test_facility_location_covers_every_cluster() -> None:
    """One source, three well separated clusters of 6, 3 and 3 examples, k = 3: facility location
    takes one from each (a random 3 of 12 does so with probability 54/220)."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 20.0, 0.0]])
    cluster = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    order = torch.randperm(12, generator=gen)
    grads = (centres[cluster] + 0.1 * torch.randn(12, 3, generator=gen))[order]
    chosen = select_coreset(grads, torch.zeros(12, dtype=torch.long), 3, dims=None)
    assert sorted(cluster[order][chosen].tolist()) == [0, 1, 2]


def test_small_sources_over_budget_keep_the_first_k() -> None:
    grads, sources = mixture()
    normalizer = AdamNormalizer()
    chosen = select_coreset(grads, sources, 3, small_sources=[2, 3], normalizer=normalizer)
    small = ((sources == 2) | (sources == 3)).nonzero().flatten()
    assert chosen.tolist() == small[:3].tolist()
    assert normalizer.t == 0  # nothing selected from the large sources: moments unchanged


def test_all_dims_and_no_normalizer() -> None:
    grads, sources = mixture()
    chosen = select_coreset(grads, sources, 20)
    assert chosen.tolist() == list(range(20))


def test_errors() -> None:
    grads, sources = mixture()
    with pytest.raises(ValueError, match=r"k=21 must lie in \[1, n=20\]"):
        select_coreset(grads, sources, 21)
    with pytest.raises(ValueError, match=r"k=0"):
        select_coreset(grads, sources, 0)
    with pytest.raises(ValueError, match=r"source ids \[n\], got shapes \(20, 12\) and \(19,\)"):
        select_coreset(grads, sources[:19], 5)
    bad = grads.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"examples \[4\] are not finite"):
        select_coreset(bad, sources, 5)
