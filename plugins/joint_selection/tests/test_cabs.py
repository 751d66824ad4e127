"""CABS: FM's ordering, DM's concept table, targets, rank shares and gains on hand-computed toy
tables, the greedy's picks (by hand, and against an independent lazy-heap greedy on random
tables), the per-GPU frequency cap, the random fill, multiset semantics and determinism."""

from __future__ import annotations

import random

import pytest
import torch
from cabs_lazy_heap import lazy_heap_dm

from batchkit_joint_selection import cabs_dm
from batchkit_joint_selection import cabs_dm_rank
from batchkit_joint_selection import cabs_fm
from batchkit_joint_selection import concept_entries
from batchkit_joint_selection import concept_table
from batchkit_joint_selection import concept_targets
from batchkit_joint_selection import dm_gains
from batchkit_joint_selection import rank_shares


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# The toy table of the hand computations below (single rank).
TOY = [
    ["cat", "dog"],          # 0
    ["dog"],                 # 1
    ["cat", "bird", "cat"],  # 2: cat twice (two boxes)
    [],                      # 3: no concepts
    ["fish"],                # 4
]


# -- CABS-FM ------------------------------------------------------------------------------------


def test_fm_keeps_the_examples_with_most_concepts_ties_by_index() -> None:
    concepts = [["a", "b"], [], ["a", "b", "c"], ["c", "d"], ["a"]]  # |C_i| = 2, 0, 3, 2, 1
    assert cabs_fm(concepts, 3).tolist() == [2, 0, 3]  # 0 and 3 tie at 2: index order
    assert cabs_fm(concepts, 5).tolist() == [2, 0, 3, 4, 1]
    assert cabs_fm(TOY, 2).tolist() == [2, 0]  # repeats count: example 2 has 3 entries
    with pytest.raises(ValueError, match=r"target must be in \[1, 5\]"):
        cabs_fm(concepts, 6)
    with pytest.raises(ValueError, match="example 1 must be a list.*got str 'dog'.*\\['dog'\\]"):
        cabs_fm([["a"], "dog"], 1)


# -- CABS-DM: table, targets, shares, gains -----------------------------------------------------


def test_concept_table_sorts_names_and_counts_examples_across_ranks() -> None:
    table = concept_table([TOY, [["dog", "eel"], ["cat"]]])
    assert table.names == ["bird", "cat", "dog", "eel", "fish"]
    # F: bird 1; cat: 0, 2 (once, though twice in it), rank 1's example 1 -> 3; dog 0, 1, rank 1's 0 -> 3
    assert table.freq.tolist() == [1.0, 3.0, 3.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="mutually comparable"):
        concept_table([[["a", 1]]])


def test_targets_on_hand_computed_cases() -> None:
    # C = 3, T = 7: base = 2, the first 7 % 3 = 1 concept gets 3
    assert concept_targets(3, 7, max_freq=10).tolist() == [3, 2, 2]
    # C = 4, T = 10: base 2, first two +1
    assert concept_targets(4, 10, max_freq=10).tolist() == [3, 3, 2, 2]
    # base capped at max_freq: no +1 (C = 3, T = 40, cap 10 -> base min(13, 10) = 10)
    assert concept_targets(3, 40, max_freq=10).tolist() == [10, 10, 10]
    assert concept_targets(4, 10, max_freq=2).tolist() == [2, 2, 2, 2]
    # C > T: base 0, first T get 1, the rest clamp up to 1; sum 5 > 3 -> floor(1 * 3 / 5) = 0 -> kept at 1
    assert concept_targets(5, 3, max_freq=10).tolist() == [1, 1, 1, 1, 1]
    # min_per_concept = 2, C = 2, T = 3: [2, 1] -> clamp [2, 2], sum 4 > 3 -> floor(2 * 3 / 4) = 1 each
    assert concept_targets(2, 3, max_freq=10, min_per_concept=2).tolist() == [1, 1]
    # min_per_concept = 3, C = 4, T = 14: base 3, +1 for two -> [4, 4, 3, 3] (sum 14, no scaling)
    assert concept_targets(4, 14, max_freq=10, min_per_concept=3).tolist() == [4, 4, 3, 3]
    assert concept_targets(0, 5).tolist() == []
    with pytest.raises(ValueError, match="max_freq .* must be >= 1"):
        concept_targets(3, 7, max_freq=0)
    with pytest.raises(ValueError, match=r"min_per_concept must be in \[1, max_freq = 2\]"):
        concept_targets(3, 7, max_freq=2, min_per_concept=3)


def test_rank_shares_give_the_remainder_to_low_ranks() -> None:
    assert rank_shares(10, 3) == [4, 3, 3]
    assert rank_shares(2, 4) == [1, 1, 0, 0]
    assert rank_shares(8, 2) == [4, 4]


def test_gains_on_the_toy_table() -> None:
    table = concept_table([TOY])               # bird, cat, dog, fish; F = 1, 2, 2, 1
    assert table.freq.tolist() == [1.0, 2.0, 2.0, 1.0]
    entries = concept_entries(TOY, table.names)
    assert entries.tolist() == [[1, 2, -1], [2, -1, -1], [0, 1, 1], [-1, -1, -1], [3, -1, -1]]
    targets = torch.tensor([1, 2, 1, 1])
    # n = 0: g = (tgt - 0) / tgt + 1 / F: bird 1 + 1 = 2, cat 1 + 1/2 = 1.5, dog 1.5, fish 2
    gains, over = dm_gains(entries, torch.zeros(4, dtype=torch.long), targets, table.freq, max_freq=3)
    assert gains.tolist()[:3] == pytest.approx([1.5, 1.5, (2 + 1.5 + 1.5) / 3])
    assert gains[3] == float("-inf") and gains[4] == 2.0 and not over.any()
    # n = (bird 1, cat 1, dog 0, fish 0): bird at target -> -0.5; cat (2 - 1) / 2 + 1/2 = 1
    counts = torch.tensor([1, 1, 0, 0])
    gains, over = dm_gains(entries, counts, targets, table.freq, max_freq=3)
    assert gains.tolist()[:3] == pytest.approx([(1 + 1.5) / 2, 1.5, (-0.5 + 1 + 1) / 3])
    # the cap: cat reaches max_freq = 1 -> examples 0 and 2 are over it (gain -inf), 1 and 4 are not
    gains, over = dm_gains(entries, counts, targets, table.freq, max_freq=1)
    assert over.tolist() == [True, False, True, False, False]
    assert gains[0] == gains[2] == float("-inf") and gains[1] == 1.5


# -- CABS-DM: the greedy ------------------------------------------------------------------------


def test_greedy_picks_on_the_toy_table() -> None:
    # T = 3, C = 4, cap 2: targets [1, 1, 1, 1] (C > T). Gains 1.5, 1.5, 5/3, -inf, 2 -> pick 4 (fish).
    # Fish at target (g = -0.5) touches nobody else -> pick 2 (5/3): cat n = 2 reaches the cap, so 0 is
    # dropped; then 1 (dog, 1.5).
    picked = cabs_dm(TOY, 3, max_freq=2, generator=gen())
    assert picked.indices.tolist() == [4, 2, 1]
    assert (picked.greedy, picked.random_fill, picked.over_cap) == (3, 0, 0)
    # T = 4: nothing finite is left after [4, 2, 1] (0 is dropped, 3 has no concepts) -> 3 by random fill
    picked = cabs_dm(TOY, 4, max_freq=2, generator=gen())
    assert picked.indices.tolist() == [4, 2, 1, 3]
    assert (picked.greedy, picked.random_fill, picked.over_cap) == (3, 1, 0)
    # T = 5: the pool is empty after that; the last comes from the dropped example 0
    picked = cabs_dm(TOY, 5, max_freq=2, generator=gen())
    assert picked.indices.tolist() == [4, 2, 1, 3, 0]
    assert (picked.greedy, picked.random_fill, picked.over_cap) == (3, 1, 1)


def test_the_frequency_cap_drops_every_holder() -> None:
    # eight examples share "x" (with one private concept each), two have none; cap 3, T = 6.
    concepts = [["x", f"y{i}"] for i in range(8)] + [[], []]
    picked = cabs_dm(concepts, 6, max_freq=3, generator=gen(1))
    # all tie at first (pick 0); then x is over target and the rest tie again: 1, 2 -> x reaches 3
    assert picked.indices[:3].tolist() == [0, 1, 2]
    assert (picked.greedy, picked.random_fill, picked.over_cap) == (3, 2, 1)
    assert set(picked.indices[3:5].tolist()) == {8, 9}       # the pool: not picked, not dropped
    assert picked.indices[5].item() in range(3, 8)            # one dropped example fills the share
    assert len(set(picked.indices.tolist())) == 6
    # without the fill's shortage, the greedy part never holds x more than max_freq times
    for cap in (1, 2, 4):
        picked = cabs_dm(concepts * 3, 12, max_freq=cap, generator=gen(2))
        holders = sum("x" in (concepts * 3)[i] for i in picked.indices[: picked.greedy].tolist())
        assert holders == cap


def test_the_cap_is_per_rank() -> None:
    # two ranks whose examples all hold "x": each rank may take up to max_freq of them
    ranks = [[["x", f"a{i}"] for i in range(6)], [["x", f"b{i}"] for i in range(6)]]
    picks = [cabs_dm_rank(ranks, r, 8, max_freq=2, generator=gen(r)) for r in range(2)]
    assert [p.greedy for p in picks] == [2, 2]  # 4 holders of x in the global batch, 2 per rank
    assert [len(p.indices) for p in picks] == [4, 4]


def test_ranks_share_one_table_and_split_the_target() -> None:
    rank0 = [["a"], ["b", "c"], ["a", "c"], ["d"], []]
    rank1 = [["c"], ["e"], ["a", "e"], ["b"]]
    ranks = [rank0, rank1]
    picks = [cabs_dm_rank(ranks, r, 5, max_freq=10, generator=gen(r)) for r in range(2)]
    assert [len(p.indices) for p in picks] == [3, 2]  # 5 = 3 + 2, the remainder to rank 0
    # rank 1's picks use the global table: F = a 3, b 2, c 3, d 1, e 2; targets [1, 1, 1, 1, 1] (T = 5, C = 5)
    table = concept_table(ranks)
    assert table.freq.tolist() == [3.0, 2.0, 3.0, 1.0, 2.0]
    expected, *_ = lazy_heap_dm(rank1, table.names, table.freq.tolist(), [1] * 5, 2, 10, gen(1))
    assert picks[1].indices.tolist() == expected
    # by hand: rank 1 gains: c 1 + 1/3, e 1 + 1/2, (a, e) = (4/3 + 3/2) / 2, b 1.5 -> 1 (e, ties 3 by index)
    # then e is at target: (a, e) -> (4/3 - 0.5) / 2; b keeps 1.5 -> 3
    assert picks[1].indices.tolist() == [1, 3]
    with pytest.raises(ValueError, match="rank 2 is outside the 2 ranks"):
        cabs_dm_rank(ranks, 2, 5, generator=gen())
    with pytest.raises(ValueError, match="rank 1 must keep 5 of 4 examples"):
        cabs_dm_rank(ranks, 1, 10, generator=gen())


def test_multiset_semantics_count_every_entry() -> None:
    # F: a 2, c 1; T = 3, C = 2: targets [2, 1]. Gains: g[a] = 2/2 + 1/2 = 1.5 for examples 0 and 1,
    # g[c] = 2 -> pick 2, then 0 (tie with 1, lower index). "a" twice in example 0: one pick adds 2 to
    # n[a], reaching the cap of 2, so example 1 is dropped and fills the share from over the cap.
    concepts = [["a", "a"], ["a"], ["c"]]
    picked = cabs_dm(concepts, 3, max_freq=2, generator=gen())
    assert picked.indices.tolist() == [2, 0, 1]
    assert (picked.greedy, picked.random_fill, picked.over_cap) == (2, 0, 1)
    # de-duplicated (set semantics) n[a] = 1 after example 0, so example 1 is still picked by gain
    picked = cabs_dm([sorted(set(c)) for c in concepts], 3, max_freq=2, generator=gen())
    assert picked.indices.tolist() == [2, 0, 1] and picked.greedy == 3


def test_the_greedy_matches_a_lazy_heap_greedy_on_random_tables() -> None:
    rng = random.Random(0)
    fills = 0
    for case in range(150):
        vocab = [f"c{v:02d}" for v in range(rng.randint(1, 15))]
        sizes = [rng.choice([0, 1, 1, 2, 3, 4, 6]) for _ in range(rng.randint(1, 60))]
        concepts = [[rng.choice(vocab) for _ in range(size)] for size in sizes]
        target = rng.randint(1, len(concepts))
        max_freq = rng.randint(1, 6)
        picked = cabs_dm(concepts, target, max_freq=max_freq, generator=gen(case))
        table = concept_table([concepts])
        targets = concept_targets(len(table.names), target, max_freq).tolist()
        expected = lazy_heap_dm(concepts, table.names, table.freq.tolist(), targets, target, max_freq, gen(case))
        assert (picked.indices.tolist(), picked.greedy, picked.random_fill, picked.over_cap) == expected, case
        assert len(set(picked.indices.tolist())) == target
        fills += picked.random_fill + picked.over_cap
    assert fills > 0  # the cases exercised the fill too


def test_deterministic_and_independent_of_entry_order() -> None:
    rng = random.Random(1)
    concepts = [[rng.choice("abcdefg") for _ in range(rng.randint(0, 4))] for _ in range(200)]
    first = cabs_dm(concepts, 64, max_freq=3, generator=gen(5))
    again = cabs_dm(concepts, 64, max_freq=3, generator=gen(5))
    shuffled = cabs_dm([tuple(reversed(c)) for c in concepts], 64, max_freq=3, generator=gen(5))
    assert torch.equal(first.indices, again.indices) and torch.equal(first.indices, shuffled.indices)
    assert first.random_fill > 0  # so the generator matters ...
    other = cabs_dm(concepts, 64, max_freq=3, generator=gen(6))
    assert torch.equal(other.indices[: other.greedy], first.indices[: first.greedy])  # ... only for the fill
    assert not torch.equal(other.indices, first.indices)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="example 0 must be a list"):
        cabs_dm(["cat"], 1, generator=gen())
    with pytest.raises(ValueError, match=r"target must be in \[1, 5\]"):
        cabs_dm(TOY, 0, generator=gen())
    with pytest.raises(ValueError, match="max_freq .* >= 1"):
        cabs_dm(TOY, 2, max_freq=0, generator=gen())


def test_without_any_concepts_the_share_is_a_seeded_random_draw() -> None:
    picked = cabs_dm([[] for _ in range(10)], 4, generator=gen(3))
    assert (picked.greedy, picked.random_fill, picked.over_cap) == (0, 4, 0)
    assert len(set(picked.indices.tolist())) == 4
    assert torch.equal(picked.indices, cabs_dm([[] for _ in range(10)], 4, generator=gen(3)).indices)
    assert cabs_fm([[] for _ in range(10)], 3).tolist() == [0, 1, 2]
