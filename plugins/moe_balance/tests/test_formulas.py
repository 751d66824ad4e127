"""The defining formulas on small cases worked out by hand, and parity with HF transformers."""

from __future__ import annotations

import math

import pytest
import torch

from batchkit_moe_balance import load_balancing_loss
from batchkit_moe_balance import load_imbalance
from batchkit_moe_balance import routing_statistics
from batchkit_moe_balance import sequence_load_balancing_loss
from batchkit_moe_balance.formulas import grouped_routing_statistics
from batchkit_moe_balance.formulas import routing_probabilities
from batchkit_moe_balance.formulas import routing_probabilities_backward

LN3 = math.log(3.0)


def lbl(logits, k, mask=None):
    c, s, t = routing_statistics(logits, k, mask)
    return load_balancing_loss(c, t, s, t, k)


def test_top1_two_experts_by_hand() -> None:
    # p = [.75, .25], [.75, .25], [.25, .75] -> choices 0, 0, 1
    logits = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, LN3]])
    c, s, t = routing_statistics(logits, top_k=1)
    assert c.tolist() == [2.0, 1.0] and t.item() == 3
    assert torch.allclose(s, torch.tensor([1.75, 1.25]))
    # f = [2/3, 1/3], P = [1.75/3, 1.25/3]; LBL = 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5/9
    assert lbl(logits, 1).item() == pytest.approx(9.5 / 9, rel=1e-6)


def test_top2_balanced_router_gives_one_and_collapsed_gives_experts_over_k() -> None:
    # p = [.4, .4, .2] and its rotations: each expert chosen twice out of 6 choices, P uniform
    a, b = math.log(0.4), math.log(0.2)
    balanced = torch.tensor([[a, a, b], [b, a, a], [a, b, a]])
    c, _, _ = routing_statistics(balanced, top_k=2)
    assert c.tolist() == [2.0, 2.0, 2.0]
    assert lbl(balanced, 2).item() == pytest.approx(1.0, rel=1e-6)
    # every token sends its 2 choices to experts 0 and 1 with all the probability: LBL -> N_E / k = 2
    collapsed = torch.tensor([[20.0, 20.0, -20.0, -20.0]] * 5)
    assert lbl(collapsed, 2).item() == pytest.approx(2.0, rel=1e-6)
    assert load_imbalance(routing_statistics(collapsed, 2)[0]).item() == pytest.approx(2.0)  # 4 * max f = 4 * 0.5
    assert load_imbalance(torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(1.0)


def test_gradient_is_experts_times_f_over_local_tokens() -> None:
    # dLBL / d sum_x p(x, i) = N_E * f_i / T_local
    counts = torch.tensor([[3.0, 1.0, 0.0, 4.0]])  # k = 2, T_counted = 4
    prob_sum = torch.tensor([[1.0, 0.5, 0.25, 0.25]], requires_grad=True)
    loss = load_balancing_loss(counts, torch.tensor([4.0]), prob_sum, torch.tensor([2.0]), top_k=2)
    loss.sum().backward()
    f = counts / (2 * 4)
    assert torch.allclose(prob_sum.grad, 4 * f / 2.0)
    assert loss.item() == pytest.approx(4 * (f * prob_sum.detach() / 2.0).sum().item())


def test_global_batch_is_the_mean_of_the_rank_terms_with_shared_f() -> None:
    # Eq. 6: N_E sum_i fbar_i Pbar_i = mean_j N_E sum_i fbar_i P_i^j (equal tokens per rank), P keeping its gradient
    gen = torch.Generator().manual_seed(0)
    ranks = [(torch.randn(6, 5, generator=gen) * 2).requires_grad_() for _ in range(2)]
    stats = [routing_statistics(z, 2) for z in ranks]
    c_bar = stats[0][0] + stats[1][0]
    t_bar = stats[0][2] + stats[1][2]
    per_rank = [load_balancing_loss(c_bar, t_bar, s, t, 2) for c, s, t in stats]
    together = lbl(torch.cat(ranks), 2)
    assert torch.allclose((per_rank[0] + per_rank[1]) / 2, together)
    g_ranks = torch.autograd.grad((per_rank[0] + per_rank[1]) / 2, ranks)
    g_together = torch.autograd.grad(lbl(torch.cat(ranks), 2), ranks)
    for a, b in zip(g_ranks, g_together):
        assert torch.allclose(a, b, atol=1e-7)
    micro = (lbl(ranks[0], 2) + lbl(ranks[1], 2)) / 2
    assert not torch.allclose(micro, together)


def test_padding_tokens_are_left_out() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = logits[mask.bool()]
    assert torch.allclose(lbl(logits, 2, mask), lbl(kept, 2))
    c, _, t = routing_statistics(logits, 2, mask)
    assert t.item() == 5 and c.sum().item() == 10


def test_sequence_level_by_hand() -> None:
    # sequence 1: every token p = [.9, .1] -> expert 0; sequence 2: p = [.1, .9] -> expert 1
    z = math.log(9.0)
    logits = torch.tensor([[[z, 0.0]] * 3, [[0.0, z]] * 3])
    # each sequence: f = [1, 0], P = [.9, .1] -> 2 * .9 = 1.8; over the micro-batch f = P = [.5, .5] -> 1
    assert sequence_load_balancing_loss(logits, 1).item() == pytest.approx(1.8, rel=1e-6)
    assert lbl(logits, 1).item() == pytest.approx(1.0, rel=1e-6)
    # a fully padded sequence does not count
    padded = torch.cat([logits, torch.zeros(1, 3, 2)])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    assert sequence_load_balancing_loss(padded, 1, mask).item() == pytest.approx(1.8, rel=1e-6)


def test_normalised_sigmoid_scores_by_hand() -> None:
    # DeepSeek-V3 style: s = sigmoid(z), p = s / sum s. z = [0, ln 3, -ln 3] -> s = [1/2, 3/4, 1/4], S = 3/2
    z = torch.tensor([[0.0, math.log(3.0), -math.log(3.0)]])
    p = routing_probabilities(z, "sigmoid")
    assert torch.allclose(p, torch.tensor([[1 / 3, 1 / 2, 1 / 6]]))
    c, s, t = routing_statistics(z, 1, score="sigmoid")
    assert c.tolist() == [0.0, 1.0, 0.0]  # top-1 of the scores
    # LBL = 3 * (f = [0, 1, 0]) . (P = [1/3, 1/2, 1/6]) = 1.5
    assert load_balancing_loss(c, t, s, t, 1).item() == pytest.approx(1.5)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_written_out_backward_of_p_equals_autograd(score: str) -> None:
    # d/dz sum_x sum_i g_i p(x, i): what global mode computes in backward once f is known
    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(7, 5, generator=gen) * 2).requires_grad_()
    g = torch.rand(5, generator=gen)
    (routing_probabilities(z, score) * g).sum().backward()
    assert torch.allclose(routing_probabilities_backward(z.detach(), g, score), z.grad, atol=1e-6)


def test_grouped_statistics_equal_one_group_at_a_time() -> None:
    gen = torch.Generator().manual_seed(3)
    sizes = [6, 4, 6, 5]  # e.g. layer 0, layer 1, layer 0 again (a second call), layer 2
    layer = [0, 1, 0, 2]
    parts = [torch.randn(n, 8, generator=gen) for n in sizes]
    masks = [(torch.rand(n, generator=gen) > 0.3).float() for n in sizes]
    group = torch.repeat_interleave(torch.tensor(layer), torch.tensor(sizes))
    rows = torch.cat(parts).requires_grad_()
    for score in ("softmax", "sigmoid"):
        c, s, t = grouped_routing_statistics(rows, group, 3, 2, torch.cat(masks), score)
        for g in range(3):
            alone = [routing_statistics(p, 2, m, score) for p, m, lay in zip(parts, masks, layer) if lay == g]
            assert torch.equal(c[g], sum(a[0] for a in alone))
            assert torch.allclose(s[g], sum(a[1] for a in alone)) and t[g] == sum(a[2] for a in alone)
    s.sum().backward()  # the probability sums keep their gradient
    assert rows.grad is not None and rows.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def hf_lbl():
    # A test-only parity baseline that `make test` installs: a missing install fails, never skips.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_micro_batch_matches_hf_transformers_up_to_its_k_normalisation(hf_lbl, top_k: int) -> None:
    gen = torch.Generator().manual_seed(top_k)
    layers = [torch.randn(24, 8, generator=gen) * 1.5 for _ in range(3)]
    for logits in layers:
        # HF's f sums to k (one-hot over the k choices, averaged over tokens); ours sums to 1.
        assert hf_lbl((logits,), 8, top_k).item() == pytest.approx(top_k * lbl(logits, top_k).item(), rel=1e-5)
    # HF pools the layers into one f and one P; that is our formula on the pooled statistics.
    stats = [routing_statistics(z, top_k) for z in layers]
    c, s, t = (sum(x[i] for x in stats) for i in range(3))
    pooled = load_balancing_loss(c, t, s, t, top_k)
    assert hf_lbl(tuple(layers), 8, top_k).item() == pytest.approx(top_k * pooled.item(), rel=1e-5)
    # with a padding mask
    mask = (torch.rand(4, 6, generator=gen) > 0.3).long()
    assert hf_lbl((layers[0],), 8, top_k, mask).item() == pytest.approx(top_k * lbl(layers[0], top_k, mask).item(), rel=1e-5)
