"""Hugging Face MoE models out of the box: ``router_type: auto`` on tiny random models of every family
it knows, against HF's own ``load_balancing_loss_func`` and the model's ``aux_loss``; and the errors a
new user meets (no router found, a generic class, a pattern that does not match the whole name, HF's
own aux loss switched on).

transformers is a test dependency that ``make test`` installs: a missing install fails, never skips.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchkit import PluginError
from batchkit import PluginHost
from batchkit_moe_balance import MoELoadBalancing
from batchkit_moe_balance import load_balancing_loss
from batchkit_moe_balance import routing_statistics
from batchkit_moe_balance.formulas import routing_probabilities

COMMON = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
          "num_experts_per_tok": 2, "max_position_embeddings": 32}
FAMILIES = {
    # family: (config class, model class, router class, family-specific config)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "MixtralTopKRouter",
                {"intermediate_size": 16, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2MoeTopKRouter",
                  {"intermediate_size": 16, "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8,
                   "num_experts": 4}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeTopKRouter",
                  {"intermediate_size": 16, "moe_intermediate_size": 8, "num_experts": 4, "head_dim": 8}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "OlmoeTopKRouter",
              {"intermediate_size": 16, "num_experts": 4, "eos_token_id": None}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3TopkRouter",
                    {"intermediate_size": 16, "moe_intermediate_size": 8, "n_routed_experts": 4, "n_group": 2,
                     "topk_group": 1, "first_k_dense_replace": 0, "num_key_value_heads": 2, "kv_lora_rank": 8,
                     "q_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4,
                     "n_shared_experts": 1}),
}


@pytest.fixture(scope="module")
def transformers():
    import transformers

    return transformers


@pytest.fixture(scope="module")
def hf_lbl():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func


def tiny(transformers, family: str, **overrides):
    config_class, model_class, _, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    return getattr(transformers, model_class)(config)


class Wrapper(nn.Module):
    """What a LightningModule holding the HF model as ``self.model`` looks like to the plugin."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def run_micro_batch(plugin: MoELoadBalancing, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None):
    """One training micro-batch through the batch and loss stages; returns (HF outputs, the term added)."""
    host = PluginHost([plugin])
    batch = {"input_ids": ids, "attention_mask": mask}
    host.notify("batchkit_before_forward", batch=batch, module=model, ctx=host.ctx)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
    zero = torch.zeros(())
    return out, host.chain("batchkit_transform_loss", zero, outputs=out, batch=batch, module=model, ctx=host.ctx)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_finds_the_routers_and_top_k_of_every_family(transformers, family: str) -> None:
    model = Wrapper(tiny(transformers, family, num_experts_per_tok=3))
    plugin = MoELoadBalancing(mode="micro")  # router_type: auto is the default
    plugin.attach(model)
    router_class = FAMILIES[family][2]
    # exactly the MoE gates: not Qwen2-MoE's shared_expert_gate, nor DeepSeek-V3's shared experts' gate_proj
    assert plugin.router_names == ["model.model.layers.0.mlp.gate", "model.model.layers.1.mlp.gate"]
    assert {type(model.get_submodule(n)).__name__ for n in plugin.router_names} == {router_class}
    assert plugin._k == 3  # num_experts_per_tok of the config
    assert plugin._score == ("sigmoid" if family == "deepseek_v3" else "softmax")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deepseek_v3"])
def test_micro_mode_matches_hf_load_balancing_loss_and_the_models_aux_loss(transformers, hf_lbl, family: str) -> None:
    model = tiny(transformers, family)
    k, E = 2, 4
    plugin = MoELoadBalancing(coefficient=1.0, mode="micro")
    plugin.attach(model)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    out, added = run_micro_batch(plugin, model, ids)
    per_layer = plugin.last_layer_losses
    for layer, logits in enumerate(out.router_logits):
        # HF's f sums to k: its value is k times ours, per layer
        assert k * per_layer[layer].item() == pytest.approx(hf_lbl((logits,), E, k).item(), rel=1e-5)
    assert added.item() == pytest.approx(per_layer.mean().item(), rel=1e-6)
    # the model's aux_loss pools both layers into one f and one P: our formula on the pooled statistics
    counts, prob_sum = plugin.last_local_counts, plugin.last_prob_sums
    pooled = load_balancing_loss(counts[:, :E].sum(0), counts[:, E].sum(), prob_sum.sum(0), counts[:, E].sum(), k)
    assert out.aux_loss.item() == pytest.approx(k * pooled.item(), rel=1e-5)


def test_padding_mask_matches_hf_and_coefficient_k_times_router_aux_loss_coef_is_the_same_strength(transformers, hf_lbl) -> None:
    # one MoE layer: pooling over layers makes no difference, so HF's loss and ours are the same term
    model = tiny(transformers, "mixtral", num_hidden_layers=1, router_aux_loss_coef=0.02)
    coef, k = 0.02, 2
    plugin = MoELoadBalancing(coefficient=k * coef, mode="micro", token_mask_key="attention_mask")
    plugin.attach(model)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    out, added = run_micro_batch(plugin, model, ids, mask)
    assert plugin.last_local_counts[0, -1] == mask.sum()  # padding left out
    assert out.aux_loss.item() == pytest.approx(hf_lbl(out.router_logits, 4, k, mask).item(), rel=1e-6)
    assert added.item() == pytest.approx(coef * out.aux_loss.item(), rel=1e-5)
    router = model.model.layers[0].mlp.gate.weight
    ours = torch.autograd.grad(added, router, retain_graph=True)[0]
    theirs = torch.autograd.grad(coef * out.aux_loss, router)[0]
    assert ours.abs().max() > 0 and torch.allclose(ours, theirs, atol=1e-8, rtol=1e-4)


def test_deepseek_v3_uses_normalised_sigmoid_scores(transformers) -> None:
    # DeepSeek-V3's balance loss (arXiv 2412.19437, Eq. 17-20), written out: f from the top-k of the
    # scores, P the mean of s_i / sum_j s_j
    model = tiny(transformers, "deepseek_v3")
    plugin = MoELoadBalancing(coefficient=1.0, mode="micro")
    plugin.attach(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    out, _ = run_micro_batch(plugin, model, ids)
    for layer, z in enumerate(out.router_logits):
        s = torch.sigmoid(z.float())
        chosen = s.topk(2, dim=-1).indices
        f = torch.stack([(chosen == i).sum() for i in range(4)]).float() / (2 * z.shape[0])
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        assert plugin.last_layer_losses[layer].item() == pytest.approx(4 * (f * P).sum().item(), rel=1e-5)
        assert torch.allclose(routing_probabilities(z, "sigmoid").mean(0), P)


def test_a_config_that_adds_hfs_own_aux_loss_is_refused(transformers) -> None:
    model = Wrapper(tiny(transformers, "mixtral", output_router_logits=True, router_aux_loss_coef=0.02))
    with pytest.raises(PluginError, match=r"output_router_logits=True.*counted twice.*output_router_logits=False.*0\.04"):
        MoELoadBalancing().attach(model)
    MoELoadBalancing().attach(Wrapper(tiny(transformers, "mixtral", output_router_logits=True, router_aux_loss_coef=0.0)))


def test_no_router_found_lists_every_candidate_and_the_names_to_match(transformers) -> None:
    model = Wrapper(tiny(transformers, "qwen2_moe"))
    with pytest.raises(PluginError) as info:
        MoELoadBalancing(router_type="Router").attach(model)
    message = str(info.value)
    assert message.startswith("moe_lbl: found no router module")
    assert r"Qwen2MoeTopKRouter: 'model\.model\.layers\.\d+\.mlp\.gate' (2 modules)" in message
    assert r"'model\.model\.layers\.\d+\.mlp\.shared_expert_gate' (2 modules)" in message
    # a pattern without the LightningModule's attribute prefix matches only part of the names
    with pytest.raises(PluginError, match=r"matches only part of 'model\\\.model\\\.layers\\\.\\d\+\\\.mlp\\\.gate'.*fullmatch"):
        MoELoadBalancing(router_pattern=r"layers\.\d+\.mlp\.gate").attach(model)
    plugin = MoELoadBalancing(router_pattern=r"model\.model\.layers\.\d+\.mlp\.gate")
    plugin.attach(model)
    assert len(plugin.router_names) == 2


def test_router_type_linear_is_refused_as_matching_non_routers(transformers) -> None:
    with pytest.raises(PluginError, match=r"'Linear' is a generic torch\.nn class.*not routers.*router_type: auto"):
        MoELoadBalancing(router_type="Linear").attach(Wrapper(tiny(transformers, "mixtral")))


# -- transformers 4.x: the router is an nn.Linear `gate` of the sparse-MoE block ------------------------


class MixtralSparseMoeBlock(nn.Module):
    """The shape of transformers 4.x's block: ``gate`` is a Linear, forward returns (hidden, router_logits)."""

    def __init__(self, dim: int = 8, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)
        weights, chosen = torch.softmax(logits, -1).topk(self.top_k, -1)
        out = sum(torch.where((chosen[..., s] == e).unsqueeze(-1), weights[..., s:s + 1] * expert(x), 0.0)
                  for s in range(self.top_k) for e, expert in enumerate(self.experts))
        return x + out, logits


class Layer4x(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Linear(8, 8)
        self.block_sparse_moe = MixtralSparseMoeBlock()


def test_transformers_4x_linear_gates_are_found_by_auto_and_linear_is_refused_with_a_pattern() -> None:
    model = nn.ModuleDict({"layers": nn.ModuleList(Layer4x() for _ in range(2))})
    plugin = MoELoadBalancing(mode="micro", log_every_n_steps=0)
    plugin.attach(model)
    assert plugin.router_names == ["layers.0.block_sparse_moe.gate", "layers.1.block_sparse_moe.gate"]
    assert plugin._k == 2  # from the block
    host = PluginHost([plugin])
    x = torch.randn(5, 8)
    host.notify("batchkit_before_forward", batch=x, module=model, ctx=host.ctx)
    logits = []
    for layer in model["layers"]:
        x, z = layer.block_sparse_moe(layer.self_attn(x))
        logits.append(z)
    added = host.chain("batchkit_transform_loss", torch.zeros(()), outputs=None, batch=x, module=model, ctx=host.ctx)
    expected = []
    for z in logits:
        c, s, t = routing_statistics(z, 2)
        expected.append(load_balancing_loss(c, t, s, t, 2))
    assert torch.allclose(added, 0.01 * torch.stack(expected).mean())
    with pytest.raises(PluginError, match=r"matched 12 modules.*router_pattern: 'layers\\\.\\d\+\\\.block_sparse_moe\\\.gate'"):
        MoELoadBalancing(router_type="Linear").attach(model)
