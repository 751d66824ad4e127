"""Unit tests of the plugin host: registration checks, chain order, conflicts, timing, state."""

from __future__ import annotations

from typing import Any

import pytest

from batchkit import Plugin
from batchkit import PluginConflictError
from batchkit import PluginError
from batchkit import PluginHost
from batchkit import hookimpl


class Append(Plugin):
    """Appends its tag to the batch (a list) in the batch stage."""

    name = "append"

    def __init__(self, tag: str, order: int = 0) -> None:
        self.tag = tag
        self.order = order

    @hookimpl
    def batchkit_transform_batch(self, batch: list) -> list:
        return batch + [self.tag]


class First(Append):
    name = "first"

    @hookimpl(tryfirst=True)
    def batchkit_transform_batch(self, batch: list) -> list:
        return batch + [self.tag]


class Last(Append):
    name = "last"

    @hookimpl(trylast=True)
    def batchkit_transform_batch(self, batch: list) -> list:
        return batch + [self.tag]


class KeepsBatch(Plugin):
    name = "keeps"

    @hookimpl
    def batchkit_transform_batch(self, batch: Any) -> None:
        return None


def test_chain_feeds_each_plugin_the_previous_result_and_none_keeps_the_value() -> None:
    host = PluginHost()
    host.register(Append("a"), name="a")
    host.register(KeepsBatch())
    host.register(Append("b"), name="b")
    assert host.chain("batchkit_transform_batch", [], module=None, ctx=host.ctx) == ["a", "b"]


def test_chain_order_is_tier_then_declared_order_then_registration() -> None:
    host = PluginHost()
    host.register(Last("z-last"), name="z-last")
    host.register(Append("late", order=5), name="late")
    host.register(Append("early", order=-5), name="early")
    host.register(Append("tie1"), name="tie1")
    host.register(Append("tie2"), name="tie2")
    host.register(First("first"), name="first")
    expected = ["first", "early", "tie1", "tie2", "late", "z-last"]
    assert host.chain_order("batchkit_transform_batch") == expected
    assert host.chain("batchkit_transform_batch", [], module=None, ctx=host.ctx) == expected
    assert host.describe() == {"batchkit_transform_batch": expected}


def test_registering_changes_the_chain_after_first_use() -> None:
    host = PluginHost([Append("a")])
    assert host.chain("batchkit_transform_batch", [], module=None, ctx=host.ctx) == ["a"]
    host.register(First("f"))
    assert host.chain("batchkit_transform_batch", [], module=None, ctx=host.ctx) == ["f", "a"]
    host.unregister("first")
    assert host.chain_order("batchkit_transform_batch") == ["append"]


def test_misspelt_hook_is_rejected_with_the_list_of_hooks() -> None:
    class Typo(Plugin):
        name = "typo"

        @hookimpl
        def batchkit_tranform_batch(self, batch: Any) -> Any:
            return batch

    with pytest.raises(PluginError, match=r"'typo'.*batchkit_tranform_batch.*batchkit_transform_batch"):
        PluginHost([Typo()])


def test_argument_the_hook_does_not_offer_is_rejected() -> None:
    class BadArg(Plugin):
        name = "badarg"

        @hookimpl
        def batchkit_transform_batch(self, batch: Any, labels: Any) -> Any:
            return batch

    with pytest.raises(PluginError, match=r"'badarg'.*labels"):
        PluginHost([BadArg()])


def test_undecorated_hook_method_is_rejected() -> None:
    class Forgot(Plugin):
        name = "forgot"

        def batchkit_transform_batch(self, batch: Any) -> Any:
            return batch

    with pytest.raises(PluginError, match=r"without @batchkit.hookimpl"):
        PluginHost([Forgot()])


def test_class_instead_of_instance_and_duplicate_names_are_rejected() -> None:
    with pytest.raises(PluginError, match=r"not an instance"):
        PluginHost([Append])
    host = PluginHost([Append("a")])
    with pytest.raises(PluginError, match=r"already registered"):
        host.register(Append("b"))


def test_wrapper_on_a_chain_hook_is_rejected() -> None:
    class Wrapper(Plugin):
        name = "wrapper"

        @hookimpl(wrapper=True)
        def batchkit_transform_batch(self, batch: Any) -> Any:
            return (yield)

    with pytest.raises(PluginError, match=r"pluggy wrapper"):
        PluginHost([Wrapper()])


def test_declared_conflicts_fail_at_validate_whichever_side_declares() -> None:
    class A(Plugin):
        name = "a"
        conflicts = ("b",)

    class B(Plugin):
        name = "b"

    PluginHost([A()]).validate()  # alone it is fine
    with pytest.raises(PluginConflictError, match=r"'a'.*conflict.*'b'"):
        PluginHost([B(), A()]).validate()


def test_hook_calls_are_timed_per_plugin_when_asked() -> None:
    host = PluginHost([Append("a"), KeepsBatch()])
    host.chain("batchkit_transform_batch", [], module=None, ctx=host.ctx)
    assert host.timings() == {}  # off by default
    host.time_hooks = True  # rebuilds the prepared callers
    for _ in range(5):
        host.chain("batchkit_transform_batch", [], module=None, ctx=host.ctx)
    timings = host.timings()
    assert timings["append"]["batchkit_transform_batch"]["calls"] == 5
    assert timings["keeps"]["batchkit_transform_batch"]["calls"] == 5
    assert timings["append"]["batchkit_transform_batch"]["total_s"] > 0
    host.reset_timings()
    assert host.timings() == {}


def test_a_prepared_caller_runs_the_chain_like_chain_and_calls_after_per_plugin() -> None:
    host = PluginHost()
    host.register(Append("a"), name="a")
    host.register(KeepsBatch())
    host.register(Append("b"), name="b")
    seen: list[tuple[str, list]] = []
    transform = host.caller("batchkit_transform_batch")
    out = transform(batch=[], module=None, ctx=host.ctx, after=lambda name, value: seen.append((name, list(value))))
    assert out == ["a", "b"]
    assert seen == [("a", ["a"]), ("keeps", ["a"]), ("b", ["a", "b"])]
    assert host.caller("batchkit_transform_batch") is transform  # prepared once
    host.register(Append("c"), name="c")  # a new plugin: prepared again
    assert host.caller("batchkit_transform_batch")(batch=[], module=None, ctx=host.ctx) == ["a", "b", "c"]
    # a hook nobody implements returns the value unchanged / does nothing
    assert host.caller("batchkit_plan_total_steps")(total_steps=7, ctx=host.ctx) == 7
    assert host.caller("batchkit_step_end")(ctx=host.ctx) is None
    with pytest.raises(PluginError, match="per plugin"):
        host.caller("batchkit_state_dict")


def test_a_caller_fetched_for_positional_calls_checks_the_argument_order() -> None:
    host = PluginHost()
    host.register(Append("a"), name="a")
    transform = host.caller("batchkit_transform_batch", positional=("batch", "module", "ctx"))
    seen: list[str] = []
    assert transform([], None, host.ctx, lambda name, value: seen.append(name)) == ["a"]
    assert seen == ["a"]
    with pytest.raises(TypeError, match=r"takes \(batch, module, ctx\), not \(module, batch, ctx\)"):
        host.caller("batchkit_transform_batch", positional=("module", "batch", "ctx"))
    with pytest.raises(TypeError, match="optimizer, ctx"):
        host.caller("batchkit_before_optimizer_step", positional=("ctx",))


def test_a_chain_called_without_one_of_the_hooks_arguments_fails_naming_it() -> None:
    host = PluginHost([Append("a")])
    with pytest.raises(TypeError, match="module"):
        host.chain("batchkit_transform_batch", [], ctx=host.ctx)


def test_a_traceback_through_a_prepared_caller_shows_the_line_that_called_the_plugin() -> None:
    import traceback

    class Boom(Plugin):
        name = "boom"

        @hookimpl
        def batchkit_transform_batch(self, batch: list) -> list:
            raise ValueError("bad batch")

    host = PluginHost([Append("a"), Boom()])
    host.time_hooks = True
    with pytest.raises(ValueError) as info:
        host.chain("batchkit_transform_batch", [], module=None, ctx=host.ctx)
    text = "".join(traceback.format_exception(info.value))
    assert "result = f1(batch)" in text
    assert "plugin 'boom' in batchkit_transform_batch" in text
    assert info.value.batchkit_plugin == "boom"
    # the plugin that ran before the failure is counted, the one that raised is not
    timings = host.timings()
    assert set(timings) == {"append"}
    assert timings["append"]["batchkit_transform_batch"]["calls"] == 1


def test_an_exception_names_the_plugin_and_hook() -> None:
    class Boom(Plugin):
        name = "boom"

        @hookimpl
        def batchkit_epoch_start(self, epoch: int) -> None:
            raise ValueError("bad epoch")

    host = PluginHost([Boom()])
    with pytest.raises(ValueError, match="bad epoch") as info:
        host.notify("batchkit_epoch_start", epoch=0, ctx=host.ctx)
    assert "plugin 'boom' in batchkit_epoch_start" in "".join(info.value.__notes__)


class Counter(Plugin):
    name = "counter"

    def __init__(self) -> None:
        self.n = 0

    @hookimpl
    def batchkit_step_end(self) -> None:
        self.n += 1

    @hookimpl
    def batchkit_state_dict(self) -> dict:
        return {"n": self.n}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_state_round_trips_per_instance_name_and_mismatch_is_an_error() -> None:
    host = PluginHost()
    host.register(Counter(), name="c1")
    host.register(Counter(), name="c2")
    for _ in range(3):
        host.notify("batchkit_step_end", ctx=host.ctx)
    host.plugins["c2"].n = 7
    state = host.state_dict()
    assert state == {"c1": {"n": 3}, "c2": {"n": 7}}
    fresh = PluginHost()
    fresh.register(Counter(), name="c1")
    fresh.register(Counter(), name="c2")
    fresh.load_state_dict(state)
    assert (fresh.plugins["c1"].n, fresh.plugins["c2"].n) == (3, 7)
    with pytest.raises(PluginError, match=r"not registered: \['c2'\]"):
        PluginHost([Counter()]).load_state_dict({"counter": {"n": 1}, "c2": {"n": 1}})


def test_plugin_metrics_are_buffered_under_the_instance_name() -> None:
    host = PluginHost()
    p = host.register(Append("a"), name="aug")
    p.log("ratio", 0.5)
    assert host.pop_metrics() == {"aug/ratio": (0.5, None)}
    assert host.pop_metrics() == {}


def test_dist_helpers_are_noops_in_one_process() -> None:
    import torch

    from batchkit import dist

    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce(t, "mean") is t and t.tolist() == [1.0, 2.0]
    assert dist.all_gather(t).shape == (1, 2)
    assert dist.all_gather_object(3) == [3]
    assert (dist.get_rank(), dist.get_world_size(), dist.is_distributed()) == (0, 1, False)
    with pytest.raises(ValueError, match="op='avg'"):
        dist.all_reduce(t, "avg")  # type: ignore[arg-type]


def test_hook_reference_is_generated_from_the_hookspecs() -> None:
    import importlib.util
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    spec = importlib.util.spec_from_file_location("make_hooks_md", docs / "make_hooks_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (docs / "hooks.md").read_text() == module.render(), "run: python docs/make_hooks_md.py"
    from batchkit import hookspecs
    from batchkit.host import HOOKS

    # every hook is declared with its kind and stage, in a section of the reference
    assert set(HOOKS) == {n for n in dir(hookspecs) if n.startswith("batchkit_")}
    assert {h.stage for h in HOOKS.values()} == {stage for _, stage in module.SECTIONS}


def test_hook_kinds_come_from_the_declarations() -> None:
    from batchkit.host import CHAIN_HOOKS
    from batchkit.host import HOOKS

    assert CHAIN_HOOKS["batchkit_transform_batch"] == "batch"
    assert CHAIN_HOOKS["batchkit_plan_total_steps"] == "total_steps"
    assert HOOKS["batchkit_before_forward"].kind == "notification" and HOOKS["batchkit_before_forward"].stage == "batch"
    assert HOOKS["batchkit_state_dict"].kind == "per_plugin"


@pytest.mark.parametrize("option", [{"wrapper": True}, {"hookwrapper": True}])
def test_wrappers_on_notification_hooks_are_rejected(option: dict) -> None:
    # pluggy would accept them, and the host would never run them: refuse at registration
    class Wrapper(Plugin):
        name = "wrapper"

        @hookimpl(**option)
        def batchkit_step_end(self, ctx: Any) -> Any:
            yield

    with pytest.raises(PluginError, match=r"declares batchkit_step_end as a pluggy wrapper.*never runs wrappers"):
        PluginHost([Wrapper()])


def test_a_plugin_listed_twice_is_refused_unless_it_allows_it() -> None:
    host = PluginHost()
    host.register(Append("a"), name="one")
    host.register(Append("b"), name="two")
    with pytest.raises(PluginConflictError, match=r"plugin 'append' is listed 2 times \(entries \['one', 'two'\]\)"):
        host.validate()

    class Many(Append):
        name = "many"
        allow_multiple = True

    host = PluginHost()
    host.register(Many("a"), name="one")
    host.register(Many("b"), name="two")
    host.validate()


def test_chain_tiers_show_why_order_does_not_cross_tiers() -> None:
    host = PluginHost()
    host.register(Append("late", order=-100), name="late")
    host.register(First("first", order=50), name="first")
    assert host.chain_tiers("batchkit_transform_batch") == [("first", "tryfirst", 50), ("late", "ordinary", -100)]
