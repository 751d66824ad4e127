"""JEST: the pairwise sigmoid losses, the learnability variants, the conditional logits on a
hand-made 4x4 S, the blocked sampler (distinct indices, exactly b, the softmax it draws from, the
effect of the conditional terms, reproducibility and resume), and the third-party port's bugs
(a per-example S; the learner's losses used as the reference) shown to be impossible."""

from __future__ import annotations

import math

import pytest
import torch

import batchkit_joint_selection.jest as jest
from batchkit_joint_selection import conditional_logits
from batchkit_joint_selection import gumbel_topk
from batchkit_joint_selection import independent_scores
from batchkit_joint_selection import independent_topk
from batchkit_joint_selection import joint_sample
from batchkit_joint_selection import learnability_matrix
from batchkit_joint_selection import siglip_pair_losses


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_score(scores: torch.Tensor, members: list[int]) -> float:
    """s(A) = sum_{i, j in A} S[i, j]."""
    idx = torch.tensor(members, dtype=torch.long)
    return float(scores[idx][:, idx].sum())


# -- pairwise losses and S ----------------------------------------------------------------------


def test_siglip_pair_losses_on_hand_computed_cases() -> None:
    eye = torch.eye(2)
    # logits = 2 <a_i, b_j> - 1 = [[1, -1], [-1, 1]]; z * logits = 1 everywhere -> log(1 + e^-1)
    assert torch.allclose(siglip_pair_losses(eye, eye, 2.0, -1.0), torch.full((2, 2), math.log1p(math.exp(-1))))
    # swapped texts: logits = [[-1, 1], [1, -1]]; z * logits = -1 everywhere -> log(1 + e)
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert torch.allclose(siglip_pair_losses(eye, swapped, 2.0, -1.0), torch.full((2, 2), math.log1p(math.e)))
    # one entry by hand: a_0 . b_1 = 0.5 * 0.2 + 0.1 * 0.3 = 0.13; logit = 10 * 0.13 - 10 = -8.7; z = -1
    a = torch.tensor([[0.5, 0.1], [0.3, 0.9]])
    b = torch.tensor([[0.7, 0.4], [0.2, 0.3]])
    losses = siglip_pair_losses(a, b, torch.tensor(10.0), torch.tensor(-10.0))
    assert losses[0, 1].item() == pytest.approx(-math.log(1 / (1 + math.exp(-8.7))))
    # a positive: a_1 . b_1 = 0.06 + 0.27 = 0.33; logit = -6.7; z = +1
    assert losses[1, 1].item() == pytest.approx(-math.log(1 / (1 + math.exp(6.7))))
    assert losses.dtype == torch.float32
    assert siglip_pair_losses(a.bfloat16(), b.bfloat16(), 10.0, -10.0).dtype == torch.float32


def test_siglip_pair_losses_refuses_mismatched_towers() -> None:
    with pytest.raises(ValueError, match=r"same shape \[B, D\].*pair_embeddings"):
        siglip_pair_losses(torch.zeros(4, 8), torch.zeros(4, 6), 10.0, -10.0)
    with pytest.raises(ValueError, match=r"\[B, D\] matrices"):
        siglip_pair_losses(torch.zeros(4), torch.zeros(4), 10.0, -10.0)


def two_models(seed: int = 0, size: int = 12, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise loss matrices of a 'learner' and a 'reference' model on the same B examples."""
    g = gen(seed)
    a_learn, b_learn = torch.randn(size, dim, generator=g), torch.randn(size, dim, generator=g)
    a_ref, b_ref = torch.randn(size, dim, generator=g), torch.randn(size, dim, generator=g)
    norm = torch.nn.functional.normalize
    learner = siglip_pair_losses(norm(a_learn, dim=1), norm(b_learn, dim=1), 10.0, -10.0)
    reference = siglip_pair_losses(norm(a_ref, dim=1), norm(b_ref, dim=1), 5.0, -3.0)
    return learner, reference


def test_variants() -> None:
    learner, reference = two_models()
    assert torch.equal(learnability_matrix(learner, reference), learner - reference)
    assert torch.equal(learnability_matrix(learner, None, "hard_learner"), learner)
    assert torch.equal(learnability_matrix(None, reference, "easy_reference"), -reference)
    with pytest.raises(ValueError, match="unknown variant 'rho'.*learnability, hard_learner, easy_reference"):
        learnability_matrix(learner, reference, "rho")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'learnability' needs reference_losses"):
        learnability_matrix(learner, None)
    with pytest.raises(ValueError, match="'easy_reference' needs reference_losses"):
        learnability_matrix(learner, None, "easy_reference")
    with pytest.raises(ValueError, match="differ in shape"):
        learnability_matrix(learner, reference[:6, :6])
    with pytest.raises(ValueError, match=r"square \[B, B\]"):
        learnability_matrix(learner[:, :5], reference[:, :5])


# -- the port's bugs ----------------------------------------------------------------------------


def test_a_per_example_S_is_not_what_is_built_and_would_make_selection_uniform() -> None:
    learner, reference = two_models(seed=3)
    built = learnability_matrix(learner, reference)
    # The port: per-example losses (here each model's mean loss of example i), with the reference
    # set to the learner's, S[i, j] = l_i - l_j: zero diagonal, antisymmetric.
    per_example = learner.mean(dim=1)
    buggy = per_example[:, None] - per_example[None, :]
    assert not torch.allclose(built, buggy)
    assert built.diagonal().abs().min() > 0 and not torch.allclose(built, -built.T)
    selected = torch.zeros(12, dtype=torch.bool)
    selected[[1, 4, 7]] = True
    # the buggy S cancels: every conditional logit is 0, so softmax is uniform at every chunk ...
    assert torch.allclose(conditional_logits(buggy, selected), torch.zeros(12), atol=1e-5)
    assert torch.allclose(conditional_logits(buggy, torch.zeros(12, dtype=torch.bool)), torch.zeros(12))
    # ... while the pairwise S gives a real signal among the unselected examples
    signal = conditional_logits(built, selected)[~selected]
    assert signal.max() - signal.min() > 1.0
    # and per-example vectors are refused outright, naming the fix
    with pytest.raises(ValueError, match="per-example losses.*pairwise.*siglip_pair_losses.*uniform"):
        learnability_matrix(per_example, reference.mean(dim=1))
    with pytest.raises(ValueError, match="reference_losses is a vector of per-example losses"):
        learnability_matrix(learner, reference.mean(dim=1))


def test_the_reference_is_kept_apart_from_the_learner() -> None:
    learner, reference = two_models(seed=4)
    s = learnability_matrix(learner, reference)
    assert not torch.equal(reference, learner)
    assert torch.allclose(s + reference, learner, atol=1e-5) and s.abs().sum() > 0
    assert not torch.allclose(s, learner) and not torch.allclose(s, -reference)
    # the port's `ref_loss = learner_loss`: the same tensor, or a copy with equal values, is refused
    with pytest.raises(ValueError, match="reference losses equal the learner's.*frozen reference model"):
        learnability_matrix(learner, learner)
    with pytest.raises(ValueError, match="reference losses equal the learner's"):
        learnability_matrix(learner, learner.clone())


# -- conditional logits -------------------------------------------------------------------------

HAND_S = torch.tensor([
    [1.0, 2.0, 0.0, -1.0],
    [0.0, 3.0, 1.0, 2.0],
    [4.0, -2.0, 0.0, 1.0],
    [1.0, 0.0, 2.0, -3.0],
])


def mask(*members: int) -> torch.Tensor:
    m = torch.zeros(4, dtype=torch.bool)
    m[list(members)] = True
    return m


def test_conditional_logits_on_a_hand_made_4x4() -> None:
    # A empty: S[k, k]
    assert conditional_logits(HAND_S, mask()).tolist() == [1.0, 3.0, 0.0, -3.0]
    # A = {1}: k=0: 1 + S[0,1] + S[1,0] = 1 + 2 + 0 = 3; k=2: 0 + (-2) + 1 = -1; k=3: -3 + 0 + 2 = -1
    logits = conditional_logits(HAND_S, mask(1))
    assert [logits[k].item() for k in (0, 2, 3)] == [3.0, -1.0, -1.0]
    # A = {0, 2}: k=1: 3 + (S[1,0] + S[1,2]) + (S[0,1] + S[2,1]) = 3 + 1 + 0 = 4
    #             k=3: -3 + (S[3,0] + S[3,2]) + (S[0,3] + S[2,3]) = -3 + 3 + 0 = 0
    logits = conditional_logits(HAND_S, mask(0, 2))
    assert [logits[k].item() for k in (1, 3)] == [4.0, 0.0]
    # A = {0, 1, 2}: k=3: -3 + (1 + 0 + 2) + (-1 + 2 + 1) = 2
    assert conditional_logits(HAND_S, mask(0, 1, 2))[3].item() == 2.0


def test_conditional_logit_is_the_change_in_batch_score() -> None:
    g = gen(7)
    scores = torch.randn(9, 9, generator=g, dtype=torch.float64)
    for members in ([], [3], [0, 5], [1, 2, 8, 6]):
        selected = torch.zeros(9, dtype=torch.bool)
        selected[members] = True
        logits = conditional_logits(scores, selected)
        for k in range(9):
            if k not in members:
                gain = batch_score(scores, members + [k]) - batch_score(scores, members)
                assert logits[k].item() == pytest.approx(gain)


def test_the_sampler_draws_each_chunk_from_the_conditional_logits() -> None:
    # The paper's rule written out: chunk c is the top n_draws of conditional_logits(S, A) + Gumbel
    # noise over the unselected examples, A = all earlier chunks. Given the same noise (row c of one
    # [n_chunks, B] draw), joint_sample's running sums must pick exactly the same chunks.
    scores = torch.randn(40, 40, generator=gen(1))
    picks = joint_sample(scores, 12, n_chunks=4, generator=gen(2))
    noise = jest.gumbel_noise((4, 40), gen(2))
    selected = torch.zeros(40, dtype=torch.bool)
    expected = []
    for c in range(4):
        logits = conditional_logits(scores, selected).masked_fill(selected, float("-inf"))
        chunk = torch.topk(logits + noise[c], 3).indices
        selected[chunk] = True
        expected.append(chunk)
    assert torch.equal(torch.cat(expected), picks)


# -- the blocked sampler ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "batch", "n_chunks"), [(40, 8, 4), (320, 64, 16), (50, 50, 5), (10, 1, 1), (33, 16, 16)]
)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e6])
def test_the_sampler_draws_exactly_b_distinct_indices(size: int, batch: int, n_chunks: int, scale: float) -> None:
    for seed in range(3):
        scores = scale * torch.randn(size, size, generator=gen(seed))
        picks = joint_sample(scores, batch, n_chunks=n_chunks, generator=gen(100 + seed))
        assert picks.dtype == torch.long and picks.shape == (batch,)
        assert len(set(picks.tolist())) == batch and 0 <= picks.min() and picks.max() < size
    # constant S (every logit ties) and a huge positive block: still b distinct
    for scores in (torch.ones(20, 20), torch.full((20, 20), 1e30)):
        picks = joint_sample(scores, 20, n_chunks=4, generator=gen(0))
        assert sorted(picks.tolist()) == list(range(20))


def test_b_not_divisible_by_n_chunks_is_a_clear_error() -> None:
    message = r"b = 60 is not divisible by n_chunks = 16.*divisor of 60 \(nearest: 15 or 20\).*multiple of 16"
    with pytest.raises(ValueError, match=message):
        joint_sample(torch.zeros(300, 300), 60, n_chunks=16, generator=gen(0))
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, B = 8\]"):
        joint_sample(torch.zeros(8, 8), 16, n_chunks=16, generator=gen(0))
    with pytest.raises(ValueError, match="NaN or inf"):
        joint_sample(torch.full((8, 8), float("nan")), 4, n_chunks=2, generator=gen(0))
    with pytest.raises(ValueError, match="square"):
        joint_sample(torch.zeros(8, 4), 4, n_chunks=2, generator=gen(0))


def test_gumbel_topk_draws_from_the_softmax_without_replacement() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0])
    p = torch.softmax(logits, 0)
    first = gumbel_topk(logits.expand(40000, 3), 1, gen(0))[:, 0]
    freq = torch.bincount(first, minlength=3) / 40000
    assert torch.allclose(freq, p, atol=0.01)
    # two draws without replacement: P(0 then 1) = p0 p1 / (1 - p0) (sequential draws)
    pairs = gumbel_topk(logits.expand(40000, 3), 2, gen(1))
    assert (pairs[:, 0] != pairs[:, 1]).all()
    share = ((pairs[:, 0] == 0) & (pairs[:, 1] == 1)).double().mean().item()
    assert share == pytest.approx((p[0] * p[1] / (1 - p[0])).item(), abs=0.01)
    # -inf logits are never drawn while finite ones remain
    masked = torch.tensor([0.0, float("-inf"), 5.0, float("-inf")])
    assert set(gumbel_topk(masked.expand(1000, 4), 2, gen(2)).flatten().tolist()) == {0, 2}


def test_the_first_chunk_follows_softmax_of_the_diagonal() -> None:
    # diag S = (3, 0, 0, 0): P(first = 0) = e^3 / (e^3 + 3) = 0.870 (uniform would give 0.25)
    scores = torch.diag(torch.tensor([3.0, 0.0, 0.0, 0.0]))
    firsts = [int(joint_sample(scores, 1, n_chunks=1, generator=gen(s))[0]) for s in range(1500)]
    assert firsts.count(0) / 1500 == pytest.approx(math.exp(3) / (math.exp(3) + 3), abs=0.03)


def test_later_chunks_follow_the_pairs_already_selected() -> None:
    # zero diagonal (the first chunk is uniform); 0 and 1 form a strongly learnable pair, so once
    # one of them is drawn the other follows: logit 2 * 10 = 20 against 0 for the others
    scores = torch.zeros(10, 10)
    scores[0, 1] = scores[1, 0] = 10.0
    firsts = {}
    for seed in range(400):
        first, second = joint_sample(scores, 2, n_chunks=2, generator=gen(seed)).tolist()
        firsts[first] = firsts.get(first, 0) + 1
        if first in (0, 1):
            assert second == 1 - first
    assert len(firsts) == 10  # the first draw is spread over all ten
    # a pair never drawn together with the other chunking: one chunk of 2 ignores the pair term
    together = sum(set(joint_sample(scores, 2, n_chunks=1, generator=gen(s)).tolist()) == {0, 1} for s in range(400))
    assert together < 40  # uniform pairs: 1 / 45 of draws


def test_joint_selection_raises_the_batch_score_over_uniform() -> None:
    learner, reference = two_models(seed=11, size=80, dim=4)
    scores = learnability_matrix(learner, reference)
    joint = [batch_score(scores, joint_sample(scores, 16, n_chunks=8, generator=gen(s)).tolist()) for s in range(30)]
    uniform = [batch_score(scores, torch.randperm(80, generator=gen(s))[:16].tolist()) for s in range(30)]
    assert sum(joint) / 30 > sum(uniform) / 30 + 1.0


def test_the_draw_is_reproducible_and_resumes_from_the_generator_state() -> None:
    scores = torch.randn(64, 64, generator=gen(5))
    first = joint_sample(scores, 16, n_chunks=4, generator=gen(9))
    assert torch.equal(first, joint_sample(scores, 16, n_chunks=4, generator=gen(9)))
    assert not torch.equal(first, joint_sample(scores, 16, n_chunks=4, generator=gen(10)))
    g = gen(3)
    joint_sample(scores, 16, n_chunks=4, generator=g)            # step 1
    state = g.get_state()                                       # checkpoint
    step2 = joint_sample(scores, 16, n_chunks=4, generator=g)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(joint_sample(scores, 16, n_chunks=4, generator=resumed), step2)


# -- independent top-k --------------------------------------------------------------------------


def test_independent_top_k_on_a_hand_made_case() -> None:
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    # s_0 = row 1 + column 6 - 1 = 6; s_1 = 2 + 2 - 2 = 2; s_2 = 5 + 0 - 0 = 5
    assert independent_scores(scores).tolist() == [6.0, 2.0, 5.0]
    assert independent_topk(scores, 2).tolist() == [0, 2]
    assert independent_topk(torch.zeros(5, 5), 3).tolist() == [0, 1, 2]  # ties to the lower index
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, B = 3\]"):
        independent_topk(scores, 4)
