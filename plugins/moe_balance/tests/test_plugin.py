"""The moe_lbl plugin: router capture (type, name pattern, protocol), activation checkpointing,
token dropping, top-1/top-k, accumulation, state, errors, and real Lightning runs on the example
MoE language model."""

from __future__ import annotations

import copy
import csv
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from batchkit import BatchKitCallback
from batchkit import PluginHost
from batchkit.config import build_plugins
from batchkit import BatchKitError
from batchkit import PluginError
from batchkit_moe_balance import MoELoadBalancing
from batchkit_moe_balance import load_balancing_loss
from batchkit_moe_balance import routing_statistics
from batchkit_moe_balance import sequence_load_balancing_loss

sys.path.insert(0, str(Path(__file__).parent))
from tiny_moe import TinyMoE  # noqa: E402
from tiny_moe import TokenDataset  # noqa: E402

from batchkit_examples import moe_lm  # noqa: E402


def small_lm(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return moe_lm.MoELanguageModel(**{"dim": 16, "heads": 2, "num_experts": 4, "expert_hidden": 16, "seq_len": 12, **kwargs})


def windows(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 13), generator=torch.Generator().manual_seed(seed))


def step(host: PluginHost, model: nn.Module, batch: torch.Tensor, last: bool = True, task_weight: float = 1.0):
    """One micro-batch through the batch and loss stages, as BatchKitCallback runs them; returns the
    auxiliary term the plugin added (the total loss is kept in ``step.total`` for backward)."""
    host.ctx.is_last_micro_batch = last
    host.notify("batchkit_before_forward", batch=batch, module=model, ctx=host.ctx)
    base = task_weight * model.lm_loss(batch)
    total = host.chain("batchkit_transform_loss", base, outputs=base, batch=batch, module=model, ctx=host.ctx)
    step.total = total
    return total - base


def attached(model: nn.Module, **options) -> tuple[PluginHost, MoELoadBalancing]:
    plugin = MoELoadBalancing(**{"router_type": "Router", "log_every_n_steps": 0, **options})
    host = PluginHost([plugin])
    plugin.attach(model)
    return host, plugin


def router_logits(model: nn.Module, batch: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    handles = [b.moe.router.register_forward_hook(lambda m, a, out: seen.append(out)) for b in model.blocks]
    model(batch[:, :-1])
    for h in handles:
        h.remove()
    return seen


# -- finding routers --------------------------------------------------------------------------------


class ProtocolRouter(nn.Module):
    batchkit_moe_router = True
    num_experts_per_tok = 1

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 3)

    def forward(self, x):
        return self.gate(x), "extra"  # a tuple: logits at index 0


@pytest.mark.parametrize("options", [
    {"router_type": "Router"},
    {"router_type": "batchkit_examples.moe_lm.Router"},
    {"router_pattern": r"blocks\.\d+\.moe\.router"},
])
def test_routers_found_by_type_or_name_pattern(options) -> None:
    model = small_lm(layers=3)
    plugin = MoELoadBalancing(**options)
    plugin.attach(model)
    assert plugin.router_names == ["blocks.0.moe.router", "blocks.1.moe.router", "blocks.2.moe.router"]
    assert plugin._k == 2  # read from Router.top_k


def test_protocol_router_with_tuple_output_and_top1() -> None:
    model = nn.Sequential(ProtocolRouter())
    plugin = MoELoadBalancing(log_every_n_steps=0)
    host = PluginHost([plugin])
    plugin.attach(model)
    assert plugin.router_names == ["0"] and plugin._k == 1
    x = torch.randn(5, 4)
    host.notify("batchkit_before_forward", batch=x, module=model, ctx=host.ctx)
    logits, _ = model(x)
    loss = host.chain("batchkit_transform_loss", torch.zeros(()), outputs=None, batch=x, module=model, ctx=host.ctx)
    c, s, t = routing_statistics(logits, 1)
    assert plugin.last_local_counts[0, :3].sum() == 5  # top-1: one choice per token
    assert torch.allclose(loss, 0.01 * load_balancing_loss(c, t, s, t, 1))


def test_the_loss_is_coefficient_times_the_mean_layer_lbl_with_gradient_to_the_routers() -> None:
    model = small_lm()
    host, plugin = attached(model, coefficient=0.3, mode="micro")
    batch = windows()
    aux = step(host, model, batch, task_weight=0.0)
    per_layer = []
    for z in router_logits(model, batch):
        c, s, t = routing_statistics(z, 2)
        per_layer.append(load_balancing_loss(c, t, s, t, 2))
    expected = torch.stack(per_layer).mean() * 0.3
    assert torch.allclose(aux, expected)
    aux.backward()
    assert model.blocks[0].moe.router.gate.weight.grad.abs().sum() > 0
    # layer_reduction: sum (Megatron's convention) is L times the mean here
    host2, _ = attached(model, coefficient=0.3, mode="micro", layer_reduction="sum")
    plugin.detach()
    assert torch.allclose(step(host2, model, batch), 2 * expected)


def test_only_tokens_of_the_training_step_are_counted() -> None:
    model = small_lm()
    host, plugin = attached(model, mode="micro")
    model(windows(5, seed=3)[:, :-1])  # e.g. validation: outside the window
    host.notify("batchkit_before_forward", batch=windows(), module=model, ctx=host.ctx)
    with torch.no_grad():  # e.g. another plugin's scoring pass inside the window
        model(windows(7, seed=4)[:, :-1])
    loss = model.lm_loss(windows())
    host.chain("batchkit_transform_loss", loss, outputs=loss, batch=None, module=model, ctx=host.ctx)
    assert plugin.last_local_counts[:, -1].tolist() == [36.0, 36.0]  # 3 windows x 12 tokens, per layer


# -- activation checkpointing, token dropping ------------------------------------------------------


def test_non_reentrant_checkpointing_counts_once_and_gives_the_same_loss_and_gradient() -> None:
    batch = windows()
    results = {}
    for mode in (None, "non_reentrant"):
        model = small_lm(activation_checkpointing=mode)
        calls: list[int] = []
        model.blocks[0].moe.router.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        host, plugin = attached(model, mode="global")
        aux = step(host, model, batch, task_weight=0.0)
        step.total.backward()
        results[mode] = (aux.detach(), plugin.last_f_counts.clone(), model.blocks[0].moe.router.gate.weight.grad.clone(), len(calls))
    plain, ckpt = results[None], results["non_reentrant"]
    assert (plain[3], ckpt[3]) == (1, 2)  # the recompute in backward did run the router again
    assert torch.equal(plain[1], ckpt[1])  # ... and was not counted
    assert torch.allclose(plain[0], ckpt[0]) and torch.allclose(plain[2], ckpt[2], atol=1e-7)


def test_reentrant_checkpointing_is_refused_with_the_fix() -> None:
    model = small_lm(activation_checkpointing="reentrant")
    host, _ = attached(model)
    with pytest.raises(PluginError, match="use_reentrant=False"):
        step(host, model, windows())


def test_token_dropping_does_not_change_what_is_counted() -> None:
    model = small_lm(capacity_factor=0.5)
    host, plugin = attached(model, mode="micro")
    step(host, model, windows(4))
    moe = model.blocks[0].moe
    assert moe.last_dropped > 0  # the capacity really dropped tokens
    chosen = torch.bincount(moe.last_choices.reshape(-1), minlength=4).float()
    assert torch.equal(plugin.last_local_counts[0, :4], chosen)  # f counts the router's top-k choices
    assert plugin.last_local_counts[0, :4].sum() == 2 * 48


# -- accumulation and state ------------------------------------------------------------------------


def test_accumulation_buffer_is_cumulative_and_resets_at_step_end() -> None:
    model = small_lm()
    host, plugin = attached(model, mode="global")
    micro_model = copy.deepcopy(model)
    micro_host, _ = attached(micro_model, mode="micro")
    a, b = windows(seed=1), windows(seed=2)
    first = step(host, model, a, last=False)
    assert torch.allclose(first, step(micro_host, micro_model, a))  # micro-step 1: same f
    c1 = plugin.last_local_counts.double()
    second = step(host, model, b, last=True)
    assert torch.equal(plugin.last_f_counts, c1 + plugin.last_local_counts.double())
    assert not torch.allclose(second, step(micro_host, micro_model, b))  # micro-step 2 uses both micro-batches
    host.ctx.global_step = 1
    host.notify("batchkit_step_end", ctx=host.ctx)
    assert plugin.step_counts is None
    step(host, model, b)
    assert torch.equal(plugin.last_f_counts, plugin.last_local_counts.double())


@pytest.mark.parametrize("overlap", [False, True])
def test_state_round_trip_mid_step_resumes_exactly(overlap: bool) -> None:
    # a checkpoint between the two micro-batches of a logged step: the second micro-batch, its gradient
    # and the step's logged figures are the same after a restore (overlap: the path of more than one rank)
    def second_micro_batch(host: PluginHost, plugin: MoELoadBalancing) -> tuple:
        model.zero_grad(set_to_none=True)
        value = step(host, model, windows(seed=2))
        step.total.backward()
        counts = plugin.last_f_counts.clone()
        host.ctx.global_step = 1
        host.notify("batchkit_step_end", ctx=host.ctx)
        return value, counts, model.blocks[0].moe.router.gate.weight.grad.clone(), host.pop_metrics()

    model = small_lm()
    host, plugin = attached(model, mode="global", log_every_n_steps=1)
    plugin._overlap_in_one_process = overlap
    step(host, model, windows(seed=1), last=False)
    state = plugin.batchkit_state_dict()
    expected = second_micro_batch(host, plugin)
    resumed_host, resumed = attached(model, mode="global", log_every_n_steps=1)
    resumed._overlap_in_one_process = overlap
    resumed.batchkit_load_state_dict(state)
    got = second_micro_batch(resumed_host, resumed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    assert got[3] == expected[3] and "moe_lbl/lbl_global_batch" in got[3]
    with pytest.raises(PluginError, match="mode: micro"):
        MoELoadBalancing(mode="micro").batchkit_load_state_dict(state)


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"mode": "globl"}, "mode"),
    ({"coefficient": -1.0}, "coefficient"),
    ({"mode": "micro", "micro_coefficient": 0.001}, "micro_coefficient"),
    ({"router_type": "Router", "router_pattern": "x"}, "router_type or router_pattern"),
    ({"router_pattern": "blocks.(["}, "router_pattern"),
    ({"tokens_per_sequence": 8}, "tokens_per_sequence"),
])
def test_bad_options_name_the_plugin_and_the_option(options, message) -> None:
    with pytest.raises(PluginError, match=message) as info:
        MoELoadBalancing(**options)
    assert str(info.value).startswith("moe_lbl: ")
    # from YAML: the host's own type check (a ConfigError) or ours, both one BatchKitError
    with pytest.raises(BatchKitError, match=message) as info:
        build_plugins({"lb": {"plugin": "moe_lbl", **options}})
    assert "moe_lbl" in str(info.value)


def test_a_model_without_routers_or_top_k_is_refused_at_attach() -> None:
    with pytest.raises(PluginError, match="found no router module.*router_type"):
        MoELoadBalancing(router_type="Gate").attach(small_lm())

    class NoTopK(nn.Module):
        batchkit_moe_router = True

        def forward(self, x):
            return x

    with pytest.raises(PluginError, match="top_k is not set"):
        MoELoadBalancing().attach(nn.Sequential(NoTopK()))


def test_sequence_mode_and_token_mask() -> None:
    model = small_lm()
    host, plugin = attached(model, mode="sequence", token_mask_key="mask")
    tokens = windows(2)
    mask = torch.ones(2, 12)
    mask[1, 6:] = 0
    batch = {"tokens": tokens, "mask": mask}
    host.notify("batchkit_before_forward", batch=batch, module=model, ctx=host.ctx)
    logits = router_logits(model, tokens)  # the training forward (the plugin captures it too)
    base = torch.zeros(())
    aux = host.chain("batchkit_transform_loss", base, outputs=None, batch=batch, module=model, ctx=host.ctx)
    expected = torch.stack([sequence_load_balancing_loss(z.reshape(2, 12, 4), 2, mask) for z in logits]).mean() * 0.01
    assert torch.allclose(aux, expected)
    assert plugin.last_local_counts[0, -1] == 18  # padding left out
    with pytest.raises(PluginError, match="token_mask_key"):
        host.notify("batchkit_before_forward", batch=tokens, module=model, ctx=host.ctx)
        model(tokens[:, :-1])
        host.chain("batchkit_transform_loss", base, outputs=None, batch=tokens, module=model, ctx=host.ctx)


# -- real Lightning runs ----------------------------------------------------------------------------


def fit_lm(tmp_path: Path, coefficient: float, steps: int = 40, **trainer_kwargs) -> pl.Trainer:
    pl.seed_everything(0)
    torch.set_num_threads(1)
    data = moe_lm.TwoDomainTextDataModule(seq_len=32, batch_size=4, max_train_windows=200, max_val_windows=8)
    model = moe_lm.MoELanguageModel(dim=32, heads=2, num_experts=4, expert_hidden=32, seq_len=32, lr=1e-2, warmup_steps=5)
    plugin = MoELoadBalancing(coefficient=coefficient, mode="global", router_type="Router")
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=2, log_every_n_steps=5,
        callbacks=[BatchKitCallback([plugin])], logger=pl.loggers.CSVLogger(tmp_path), limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    trainer.fit(model, data)
    return trainer


def test_lightning_run_balances_the_routers_and_logs_the_figures(tmp_path: Path) -> None:
    without = fit_lm(tmp_path / "off", 0.0)
    balanced = fit_lm(tmp_path / "on", 0.5)
    with open(Path(balanced.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [r for r in rows if r.get("batchkit/moe_lbl/lbl_global_batch")]
    assert [int(r["step"]) for r in logged] == [4, 9, 14, 19, 24, 29, 34, 39]  # every 5 optimizer steps, with Lightning's
    for key in ("lbl", "imbalance", "layer1/imbalance", "layer0/load/expert3"):
        assert logged[-1][f"batchkit/moe_lbl/{key}"]
    loads = [float(logged[-1][f"batchkit/moe_lbl/layer0/load/expert{i}"]) for i in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)

    def last(trainer, key):
        return float(trainer.callback_metrics[f"batchkit/moe_lbl/{key}"])

    # the loss pulls the global load towards uniform: lower LBL and max/mean load than without it
    assert last(balanced, "lbl_global_batch") < last(without, "lbl_global_batch") - 0.02
    assert last(balanced, "imbalance") < last(without, "imbalance")
    assert last(balanced, "lbl_global_batch") < 1.1


def test_lightning_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    def run(steps, ckpt_path=None, save=False):
        pl.seed_everything(0)
        data = moe_lm.TwoDomainTextDataModule(seq_len=16, batch_size=2, max_train_windows=40, max_val_windows=4)
        model = moe_lm.MoELanguageModel(dim=16, heads=2, num_experts=4, expert_hidden=16, seq_len=16, warmup_steps=2)
        callbacks = [BatchKitCallback([MoELoadBalancing(coefficient=0.1, mode="global", router_type="Router")])]
        if save:
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1))
        trainer = pl.Trainer(accelerator="cpu", max_steps=steps, accumulate_grad_batches=2, logger=False,
                             limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=save, callbacks=callbacks)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return model

    straight = run(6, save=True)
    resumed = run(6, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_tiny_moe_module_under_the_callback_single_process() -> None:
    # the module of the 2-process tests, here in one process: the loss is the LBL alone
    pl.seed_everything(0)
    module = TinyMoE()
    plugin = MoELoadBalancing(coefficient=1.0, mode="global", router_type="TinyRouter", log_every_n_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, callbacks=[BatchKitCallback([plugin])], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(TokenDataset(), batch_size=4))
    assert float(trainer.callback_metrics["batchkit/moe_lbl/lbl"]) == pytest.approx(
        float(trainer.callback_metrics["batchkit/moe_lbl/lbl_global_batch"]), rel=1e-6)


# -- global mode overlapped with the forward (what runs with more than one rank), in one process ------


def run_global(overlap: bool, case: str) -> dict:
    """Two micro-batches of one optimizer step in global mode; the LBL alone is trained."""
    model = small_lm(activation_checkpointing="non_reentrant" if case == "checkpointing" else None)
    options = {"coefficient": 0.5}
    if case == "mask_and_micro_term":
        options.update(token_mask_key="mask", micro_coefficient=0.1, layer_reduction="sum")
    if case == "sigmoid":
        options.update(score_function="sigmoid")
    host, plugin = attached(model, mode="global", **options)
    plugin._overlap_in_one_process = overlap
    out: dict = {"values": [], "f_counts": [], "layer_losses": [], "prob_sums": []}
    for i, seed in enumerate((1, 2)):
        window = windows(3, seed=seed)
        mask = (torch.rand(3, 12, generator=torch.Generator().manual_seed(seed)) > 0.25).float()
        batch = {"window": window, "mask": mask}
        host.ctx.is_last_micro_batch = i == 1
        host.notify("batchkit_before_forward", batch=batch, module=model, ctx=host.ctx)
        if case == "two_forwards":  # each router runs twice in the step
            base = 0 * (model.lm_loss(window[:2]) + model.lm_loss(window[2:]))
        else:
            base = 0 * model.lm_loss(window)
        total = host.chain("batchkit_transform_loss", base, outputs=base, batch=batch, module=model, ctx=host.ctx)
        total.backward()
        out["values"].append(total.detach())
        out["f_counts"].append(plugin.last_f_counts.clone())
        out["layer_losses"].append(plugin.last_layer_losses.clone())
        out["prob_sums"].append(plugin.last_prob_sums.clone())
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    out["step_counts"] = plugin.step_counts.clone()
    return out


@pytest.mark.parametrize("case", ["plain", "mask_and_micro_term", "two_forwards", "checkpointing", "sigmoid"])
def test_overlapped_global_mode_equals_the_loss_stage_computation(case: str) -> None:
    at_loss_stage, overlapped = run_global(False, case), run_global(True, case)
    assert overlapped["grads"].keys() == at_loss_stage["grads"].keys()
    assert any("router" in n for n in overlapped["grads"])
    for name, grad in at_loss_stage["grads"].items():
        assert grad.abs().max() > 0 if "router" in name else True
        assert torch.allclose(overlapped["grads"][name], grad, atol=1e-7, rtol=1e-5), name
    for key in ("f_counts", "layer_losses", "prob_sums"):
        for a, b in zip(overlapped[key], at_loss_stage[key]):
            assert torch.allclose(a.double(), b.double(), atol=1e-6), key
    assert torch.equal(overlapped["step_counts"], at_loss_stage["step_counts"])
    # in one process the counts known at the loss stage are the global ones: the value is exact too
    for a, b in zip(overlapped["values"], at_loss_stage["values"]):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(overlapped["f_counts"][1], overlapped["f_counts"][0].double())  # micro-step 2 adds up


class HostReads(TorchFunctionMode):
    """Counts the calls that copy tensor values to the host (a device-to-host copy and a sync on a GPU)."""

    READS = frozenset({"tolist", "item", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overlap", [False, True])
def test_host_copies_happen_only_on_the_steps_the_trainer_logs(overlap: bool) -> None:
    # TinyMoE's forward reads no tensor value on the host, so every read counted is the plugin's
    torch.manual_seed(0)
    model = TinyMoE()
    plugin = MoELoadBalancing(coefficient=1.0, mode="global", router_type="TinyRouter", log_every_n_steps=3)
    plugin._overlap_in_one_process = overlap
    host = PluginHost([plugin])
    plugin.attach(model)
    data = TokenDataset().x
    reads_per_step, logged = [], []
    for step_index in range(6):
        reads = HostReads()
        with reads:
            for micro in range(2):
                x = data[4 * step_index + 2 * micro: 4 * step_index + 2 * micro + 2]
                host.ctx.is_last_micro_batch = micro == 1
                host.notify("batchkit_before_forward", batch=x, module=model, ctx=host.ctx)
                base = 0 * model(x).sum()
                host.chain("batchkit_transform_loss", base, outputs=base, batch=x, module=model, ctx=host.ctx).backward()
            host.ctx.global_step += 1
            host.notify("batchkit_step_end", ctx=host.ctx)
        reads_per_step.append(reads.count)
        logged.append(sorted(host.pop_metrics()))
    assert reads_per_step == [0, 0, 1, 0, 0, 1]  # one copy for all the figures, on steps 3 and 6 only
    assert [bool(m) for m in logged] == [False, False, True, False, False, True]
    assert "moe_lbl/layer1/load/expert3" in logged[2]


def profiled_ops(fn) -> list[str]:
    """Names of the leaf aten operators ``fn`` ran (what launches kernels on a GPU; views excluded)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    no_kernel = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::expand",
                 "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::detach", "aten::alias",
                 "aten::empty", "aten::empty_strided", "aten::t", "aten::transpose", "aten::permute",
                 "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::result_type",
                 "aten::contiguous", "aten::_unsafe_view", "detach"}
    return [e.name for e in events if e.name.startswith("aten::") and id(e) not in parents and e.name not in no_kernel]


@pytest.mark.parametrize("mode", ["micro", "global", "sequence"])
def test_the_loss_stage_runs_the_same_few_operators_whatever_the_number_of_layers(mode: str) -> None:
    counts = {}
    for layers in (2, 6):
        torch.manual_seed(0)
        model = TinyMoE(layers=layers)
        plugin = MoELoadBalancing(coefficient=1.0, mode=mode, router_type="TinyRouter", log_every_n_steps=0)
        host = PluginHost([plugin])
        plugin.attach(model)
        x = TokenDataset().x[:4]
        for _ in range(2):  # the second call runs on the cached row -> layer index
            host.notify("batchkit_before_forward", batch=x, module=model, ctx=host.ctx)
            base = 0 * model(x).sum()
            ops = profiled_ops(lambda h=host, b=base, x=x, m=model: h.chain(
                "batchkit_transform_loss", b, outputs=b, batch=x, module=m, ctx=h.ctx))
        counts[layers] = len(ops)
    assert counts[2] == counts[6], counts
    assert counts[2] <= 40, counts
