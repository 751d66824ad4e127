"""The ``cabs`` plugin in real (short) training runs on the synthetic two-tower task: every step's
picks are CABS-DM's (or FM's) on the super-batch's concepts with the step's generator, the selection
balances concepts against random batches, it runs before any other batch-stage plugin, concepts come
from the documented field, a callable or a multi-hot tensor, and bad input fails with the fix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from joint_support import REFERENCE
from joint_support import SuperBatchRecorder
from joint_support import fit

from batchkit import ConfigError
from batchkit import PluginError
from batchkit.config import build_plugins
from batchkit.lightning import BatchKitCallback
from batchkit_joint_selection import CABSSelection
from batchkit_joint_selection import JESTSelection
from batchkit_joint_selection import cabs_dm
from batchkit_joint_selection import cabs_fm
from batchkit_joint_selection._common import step_generator
from batchkit_joint_selection.testing import TinyTwoTower


def picked_ids(recorder: SuperBatchRecorder, step: int, local: torch.Tensor) -> list[int]:
    return [recorder.ids[step][i] for i in local.tolist()]


def test_every_step_trains_cabs_dm_picks_of_its_super_batch(tmp_path: Path) -> None:
    recorder = SuperBatchRecorder()
    plugin = CABSSelection(max_freq=3)
    module, trainer = fit(tmp_path, [recorder, plugin], epochs=2)
    assert trainer.global_step == len(recorder.ids) == 24
    greedy = 0
    for step, (concepts, (g_step, micro)) in enumerate(zip(recorder.concepts, recorder.steps)):
        want = cabs_dm(concepts, 8, max_freq=3, generator=step_generator(0, g_step, micro, 0))
        assert module.seen[step] == picked_ids(recorder, step, want.indices), step
        greedy += want.greedy
    assert plugin.greedy == greedy > 0 and plugin.selections == 24
    assert plugin.greedy + plugin.random_fill + plugin.over_cap == 24 * 8


def test_cabs_dm_balances_concepts_against_random_batches(tmp_path: Path) -> None:
    """With a cap of 2 per concept the frequent concept ('common', half the examples) is held to 2
    per batch, where a random batch of 8 has about 4; and a batch covers more distinct concepts."""
    data = [SuperBatchRecorder(), SuperBatchRecorder()]
    cabs, _ = fit(tmp_path / "cabs", [data[0], CABSSelection(max_freq=2)], epochs=2)
    uniform, _ = fit(tmp_path / "uniform", [data[1]], epochs=2)

    def per_batch(module, recorder):
        concepts_of = {i: c for ids, cs in zip(recorder.ids, recorder.concepts) for i, c in zip(ids, cs)}
        common = [sum("common" in concepts_of[i] for i in step) for step in module.seen]
        distinct = [len({c for i in step for c in concepts_of[i]}) for step in module.seen]
        return sum(common) / len(common), sum(distinct) / len(distinct)

    cabs_common, cabs_distinct = per_batch(cabs, data[0])
    uniform_common, uniform_distinct = per_batch(uniform, data[1])
    assert cabs_common <= 2.0 < uniform_common - 1.0
    assert cabs_distinct > uniform_distinct + 1.0


def test_cabs_fm_keeps_the_examples_with_most_concepts(tmp_path: Path) -> None:
    recorder = SuperBatchRecorder()
    module, _ = fit(tmp_path, [recorder, CABSSelection(variant="fm")], epochs=1)
    for step, concepts in enumerate(recorder.concepts):
        assert module.seen[step] == picked_ids(recorder, step, cabs_fm(concepts, 8))
        kept = sorted((len(concepts[recorder.ids[step].index(i)]) for i in module.seen[step]), reverse=True)
        assert kept[-1] >= sorted(map(len, concepts), reverse=True)[7]  # no dropped example has more


def test_cabs_runs_first_so_other_selectors_see_only_what_it_kept(tmp_path: Path) -> None:
    """cabs before jest in the chain, whatever the registration order: the loader loads 25 b,
    cabs keeps 5 b by concepts (no model involved), jest scores only those and keeps b."""
    received: list[int] = []
    jest = JESTSelection(reference=REFERENCE, n_chunks=4)
    original = jest.learnability_scores
    def count(features, scale):
        received.append(features["learner_a"].shape[0])
        return original(features, scale)

    jest.learnability_scores = count  # type: ignore[method-assign]
    recorder = SuperBatchRecorder()
    cabs = CABSSelection()
    module, trainer = fit(tmp_path, [jest, cabs, recorder], epochs=1, n=1000)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, BatchKitCallback)]
    assert callback.host.chain_order("batchkit_transform_batch") == ["super_batch_recorder", "cabs", "jest"]
    assert {len(ids) for ids in recorder.ids} == {200} and set(received) == {40}
    assert {len(s) for s in module.seen} == {8} and trainer.global_step == 5


def test_concepts_from_a_callable_an_import_path_or_a_multi_hot_tensor(tmp_path: Path) -> None:
    recorder = SuperBatchRecorder()
    by_callable = CABSSelection(
        concepts_fn=lambda batch: [[c for c in cs if c != "common"] for cs in batch["concepts"]])
    module, _ = fit(tmp_path / "callable", [recorder, by_callable], epochs=1)
    for step, concepts in enumerate(recorder.concepts):
        stripped = [[c for c in cs if c != "common"] for cs in concepts]
        g_step, micro = recorder.steps[step]
        want = cabs_dm(stripped, 8, generator=step_generator(0, g_step, micro, 0))
        assert module.seen[step] == picked_ids(recorder, step, want.indices)
    plugin = CABSSelection(concepts_fn="batchkit_joint_selection.testing:collate_pairs")  # an import path resolves
    assert callable(plugin.concepts_fn)
    # a [n, C] tensor: nonzero columns are concepts, integer counts repeat them
    hot = torch.tensor([[1, 0, 2], [0, 0, 0], [0, 1, 0]])
    assert CABSSelection().concepts_of({"concepts": hot}, 3) == [[0, 2, 2], [], [1]]
    assert CABSSelection().concepts_of({"concepts": hot.bool()}, 3) == [[0, 2], [], [1]]
    # a [n] tensor: one concept per example (class labels of an (x, y, index) batch: concepts_field "1")
    labels = [torch.zeros(3, 2), torch.tensor([2, 0, 2])]
    assert CABSSelection(concepts_field="1").concepts_of(labels, 3) == [[2], [0], [2]]


def test_a_batch_without_concepts_is_refused_naming_the_option(tmp_path: Path) -> None:
    module = TinyTwoTower()
    with pytest.raises(PluginError, match=r"(?s)cabs: the batch has no field 'tags' \(concepts_field: 'tags'\).*"
                                          r"fields: \['a', 'b', 'concepts', 'index', 'noisy'\].*concepts_fn"):
        fit(tmp_path, [CABSSelection(concepts_field="tags")], module=module, epochs=1)
    assert module.seen == []
    with pytest.raises(PluginError, match="has 3 entries but the super-batch has 40 examples"):
        fit(tmp_path, [CABSSelection(concepts_fn=lambda batch: [["x"]] * 3)], epochs=1)
    with pytest.raises(PluginError, match=r"concept tensor must be \[n = 40\].*or \[n = 40, C\]"):
        fit(tmp_path, [CABSSelection(concepts_fn=lambda batch: torch.ones(40, 2, 2))], epochs=1)


@pytest.mark.parametrize("variant", ["dm", "fm"])
def test_a_first_super_batch_with_no_concept_at_all_is_refused(tmp_path: Path, variant: str) -> None:
    """The field is there but every list is empty (a wrong field or concepts_fn): refused before any
    training step, where it would otherwise silently select at random (DM) or the first b (FM)."""
    module = TinyTwoTower()
    with pytest.raises(PluginError, match=rf"(?s)cabs: no example of the first super-batch has any concept "
                                          rf"\(concepts_fn\(batch\) gave 40 empty lists\).*CABS-{variant.upper()}.*"
                                          r"Point concepts_field at .*concepts_fn"):
        fit(tmp_path, [CABSSelection(variant=variant, concepts_fn=lambda batch: [[]] * 40)], module=module,
            epochs=1)
    assert module.seen == []
    # a later super-batch without concepts is data: DM fills it at random, and the run goes on
    calls = []

    def first_has_concepts(batch: dict) -> list[list[str]]:
        calls.append(1)
        return [["x"] if len(calls) == 1 and i == 0 else [] for i in range(len(batch["index"]))]

    plugin = CABSSelection(variant=variant, concepts_fn=first_has_concepts)
    fit(tmp_path / "later", [plugin], epochs=1)
    assert plugin.selections == len(calls) > 1


@pytest.mark.parametrize("f", [0.0, 1.0, 2.0])
def test_a_filter_ratio_outside_0_1_is_refused(f: float) -> None:
    with pytest.raises(ValueError, match=r"cabs: filter_ratio must be in \(0, 1\)"):
        CABSSelection(filter_ratio=f)
    with pytest.raises(ConfigError, match=r"entry 'c' \(plugin 'cabs'\).*filter_ratio must be in \(0, 1\)"):
        build_plugins({"c": {"plugin": "cabs", "filter_ratio": f}})


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="variant must be 'dm'"):
        CABSSelection(variant="xm")
    with pytest.raises(ValueError, match=r"max_freq \(the per-GPU frequency cap\) must be an integer >= 1"):
        CABSSelection(max_freq=0)
    with pytest.raises(ValueError, match=r"min_per_concept must be an integer in \[1, max_freq = 3\]"):
        CABSSelection(max_freq=3, min_per_concept=4)
    with pytest.raises(ValueError, match="concepts_fn=.*cannot be imported"):
        CABSSelection(concepts_fn="batchkit_joint_selection.testing:nope")
    with pytest.raises(ValueError, match="concepts_fn must be a callable or 'package.module:function'"):
        CABSSelection(concepts_fn="no_colon")
    assert CABSSelection(filter_ratio=0.75).load_factor == pytest.approx(4.0)


def test_the_greedy_share_is_logged(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    fit(tmp_path, [CABSSelection(max_freq=2)], epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=2)
    (metrics,) = list(tmp_path.rglob("metrics.csv"))
    header = metrics.read_text().splitlines()[0].split(",")
    assert "batchkit/cabs/greedy_share" in header and "batchkit/cabs/greedy_share_total" in header
    counts = Counter(line.split(",")[header.index("batchkit/cabs/greedy_share")] != ""
                     for line in metrics.read_text().splitlines()[1:])
    assert counts[True] == 6  # every other of the 12 steps
