"""The ``jest`` plugin in real (short) training runs on the synthetic two-tower task: S is built from
the two models' pairwise SigLIP matrices over the super-batch (never per-example losses, never the
learner's matrix as the reference), the draw is the blocked sampler's given the step's generator,
selection keeps clean pairs, the reference embeddings are cached per example, and bad input fails
before training with the option and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from joint_support import REFERENCE
from joint_support import BeforeForward
from joint_support import SuperBatchRecorder
from joint_support import fit
from joint_support import noisy_share

from batchkit import ConfigError
from batchkit import PluginError
from batchkit.config import build_plugins
from batchkit.testing import TinyModule
from batchkit_joint_selection import JESTSelection
from batchkit_joint_selection import conditional_logits
from batchkit_joint_selection import independent_topk
from batchkit_joint_selection import joint_sample
from batchkit_joint_selection import siglip_pair_losses
from batchkit_joint_selection._common import step_generator
from batchkit_joint_selection.testing import TinyTwoTower
from batchkit_joint_selection.testing import reference_model


def jest(**options: object) -> JESTSelection:
    return JESTSelection(**{"reference": REFERENCE, "n_chunks": 4, **options})


def test_S_is_the_pairwise_learnability_of_the_super_batch_not_a_per_example_one(tmp_path: Path) -> None:
    """Through the plugin: the S it samples from equals L_learner - L_reference, recomputed here from
    each model's own embeddings, temperature and bias on the recorded super-batch; it is not the
    port's per-example S[i, j] = l_i - l_j, and its conditional logits carry a signal (the port's
    cancel to zero); the draw is joint_sample's for the step's generator."""
    reference = reference_model()  # what the factory builds, built again independently here
    expected, per_example = [], []

    def score_here(batch, module, ctx):  # the learner as the plugin sees it, before its selection
        with torch.no_grad():
            a, b = module.pair_embeddings(batch)
            ra, rb = reference.pair_embeddings(batch)
            learner = siglip_pair_losses(a, b, module.siglip_temperature, module.siglip_bias)
            ref = siglip_pair_losses(ra, rb, reference.siglip_temperature, reference.siglip_bias)
        expected.append(learner - ref)
        per_example.append(module.per_sample_loss(batch).detach())

    plugin = jest()
    seen_scores, seen_chosen = [], []
    original = plugin.learnability_scores

    def capture(features, scale):
        scores = original(features, scale)
        seen_scores.append(scores)
        return scores

    plugin.learnability_scores = capture  # type: ignore[method-assign]
    recorder = SuperBatchRecorder(score_here)
    probe = BeforeForward(lambda batch, module, ctx: seen_chosen.append(plugin.last_chosen.clone()))
    module, trainer = fit(tmp_path, [recorder, plugin, probe], epochs=1)
    assert len(seen_scores) == len(expected) == trainer.global_step == 12
    for step, (scores, want, losses) in enumerate(zip(seen_scores, expected, per_example)):
        assert scores.shape == (40, 40)
        assert torch.allclose(scores, want, atol=1e-5), step
        port = losses[:, None] - losses[None, :]  # the port's S from per-example losses
        assert not torch.allclose(scores, port, atol=1e-3)
        assert scores.diagonal().abs().min() > 0 and not torch.allclose(scores, -scores.T, atol=1e-3)
        half = torch.zeros(40, dtype=torch.bool)
        half[:20] = True
        assert conditional_logits(scores, half).std() > 0.1
        assert torch.allclose(conditional_logits(port, half), torch.zeros(40), atol=1e-3)
        g_step, micro = recorder.steps[step]
        drawn = joint_sample(scores, 8, n_chunks=4, generator=step_generator(0, g_step, micro))
        assert torch.equal(seen_chosen[step], drawn)
        # one process: the chosen examples are trained in super-batch order
        assert module.seen[step] == [recorder.ids[step][i] for i in sorted(drawn.tolist())]


def test_the_reference_model_is_separate_from_the_learner_and_frozen(tmp_path: Path) -> None:
    plugin = jest()
    module, _ = fit(tmp_path, [plugin], epochs=1)
    assert plugin.reference is not None and plugin.reference is not module
    assert not any(p.requires_grad for p in plugin.reference.parameters())
    assert not plugin.reference.training
    assert all(not any(p is q for q in module.parameters()) for p in plugin.reference.parameters())
    with pytest.raises(PluginError, match="reference is the learner itself"):
        same = TinyTwoTower()
        fit(tmp_path, [JESTSelection(reference=same, n_chunks=4)], module=same, epochs=1)


def test_selection_keeps_the_clean_pairs_the_reference_knows(tmp_path: Path) -> None:
    """30% of the pairs are mismatched. Learnability and easy-reference keep few of them;
    hard-learner (the learner's highest losses) seeks them out; uniform trains 30%."""
    shares = {}
    for name, options in {"learnability": {}, "easy_reference": {"variant": "easy_reference"},
                          "independent_topk": {"selection": "independent_topk"},
                          "hard_learner": {"variant": "hard_learner", "reference": None}}.items():
        module, _ = fit(tmp_path / name, [jest(**options)], epochs=2)
        shares[name] = noisy_share(module)
    uniform, _ = fit(tmp_path / "uniform", [], epochs=2)
    assert 0.25 < noisy_share(uniform) < 0.35
    assert shares["learnability"] < 0.08, shares
    assert shares["easy_reference"] < 0.08, shares
    assert shares["independent_topk"] < 0.08, shares
    assert shares["hard_learner"] > 0.45, shares


def test_a_random_reference_does_not_help(tmp_path: Path) -> None:
    """The signal comes from the reference's training: an untrained reference keeps far more noise."""
    trained, _ = fit(tmp_path / "trained", [jest()], epochs=2)
    untrained, _ = fit(tmp_path / "untrained", [jest(reference_kwargs={"train_steps": 0})], epochs=2)
    assert noisy_share(untrained) > noisy_share(trained) + 0.1


def test_variants_run_only_the_models_they_use(tmp_path: Path) -> None:
    class Counting(TinyTwoTower):
        calls = 0

        def pair_embeddings(self, batch):
            Counting.calls += not torch.is_grad_enabled()  # scoring passes only, not training steps
            return super().pair_embeddings(batch)

    fit(tmp_path / "easy", [jest(variant="easy_reference")], module=Counting(), epochs=1)
    assert Counting.calls == 0  # S = -L_reference: no learner pass at all
    plugin = JESTSelection(variant="hard_learner", n_chunks=4)
    fit(tmp_path / "hard", [plugin], module=Counting(), epochs=1)
    assert Counting.calls == 12 and plugin.reference is None and plugin.reference_rows_computed == 0


def test_independent_topk_keeps_the_best_examples_by_their_own_score(tmp_path: Path) -> None:
    plugin = jest(selection="independent_topk")
    scores = []
    original = plugin.learnability_scores
    plugin.learnability_scores = lambda f, s: scores.append(original(f, s)) or scores[-1]  # type: ignore[method-assign]
    recorder = SuperBatchRecorder()
    module, _ = fit(tmp_path, [recorder, plugin], epochs=1)
    for step, s in enumerate(scores):
        best = independent_topk(s, 8)
        assert sorted(module.seen[step]) == sorted(recorder.ids[step][i] for i in best.tolist())


def test_reference_embeddings_are_computed_once_per_example(tmp_path: Path) -> None:
    plugin = jest()
    recorder = SuperBatchRecorder()
    fit(tmp_path / "cached", [recorder, plugin], epochs=3)
    distinct = {i for ids in recorder.ids for i in ids}
    assert plugin.reference_rows_computed == len(distinct) == 480  # 12 super-batches of 40 per epoch
    uncached = jest(cache_reference=False)
    fit(tmp_path / "uncached", [uncached], epochs=3)
    assert uncached.reference_rows_computed == 3 * 480
    # the cache is what the reference computes, and it is saved in the checkpoint state
    state = plugin.batchkit_state_dict()
    ids, rows = state["reference_cache"]["ids"], state["reference_cache"]["rows"]
    assert sorted(ids.tolist()) == sorted(distinct)
    from batchkit_joint_selection.testing import SyntheticPairs
    from batchkit_joint_selection.testing import collate_pairs

    data = SyntheticPairs(480, 0.3, 0)
    a, b = reference_model().pair_embeddings(collate_pairs([data[i] for i in ids.tolist()]))
    assert torch.allclose(rows[:, 0], a, atol=1e-6) and torch.allclose(rows[:, 1], b, atol=1e-6)


def test_the_draw_is_reproducible_and_follows_the_seed(tmp_path: Path) -> None:
    first, _ = fit(tmp_path / "a", [jest(seed=3)], epochs=1)
    again, _ = fit(tmp_path / "b", [jest(seed=3)], epochs=1)
    other, _ = fit(tmp_path / "c", [jest(seed=4)], epochs=1)
    assert first.seen == again.seen
    assert first.seen != other.seen


def test_scope_rank_in_one_process_is_the_same_selection(tmp_path: Path) -> None:
    global_, _ = fit(tmp_path / "g", [jest(scope="global")], epochs=1)
    rank, _ = fit(tmp_path / "r", [jest(scope="rank")], epochs=1)
    assert [sorted(s) for s in global_.seen] == [sorted(s) for s in rank.seen]


def test_a_checkpoint_path_or_a_whole_saved_model_is_a_reference(tmp_path: Path) -> None:
    trained = reference_model()
    whole = tmp_path / "whole.pt"
    torch.save(trained, whole)
    plugin = jest(reference=str(whole))
    fit(tmp_path / "whole", [plugin], epochs=1)
    assert torch.equal(plugin.reference.tower_a.weight, trained.tower_a.weight)
    # a Lightning checkpoint of the learner's own class
    import lightning.pytorch as pl

    trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(trained)
    ckpt = tmp_path / "reference.ckpt"
    trainer.save_checkpoint(ckpt)
    plugin = jest(reference=str(ckpt))
    fit(tmp_path / "ckpt", [plugin], epochs=1)
    assert torch.equal(plugin.reference.tower_b.weight, trained.tower_b.weight)


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("f", [0.0, 1.0, 1.5, -0.2])
def test_a_filter_ratio_outside_0_1_is_refused(f: float) -> None:
    with pytest.raises(ValueError, match=r"jest: filter_ratio must be in \(0, 1\).*B = b / \(1 - f\)"):
        jest(filter_ratio=f)
    with pytest.raises(ConfigError, match=r"entry 'j' \(plugin 'jest'\).*filter_ratio must be in \(0, 1\)"):
        build_plugins({"j": {"plugin": "jest", "reference": REFERENCE, "filter_ratio": f}})


def test_the_load_factor_is_one_over_one_minus_f(tmp_path: Path) -> None:
    assert jest().load_factor == pytest.approx(5.0)
    assert jest(filter_ratio=0.5).load_factor == pytest.approx(2.0)
    recorder = SuperBatchRecorder()
    module, _ = fit(tmp_path, [recorder, jest(filter_ratio=0.5)], epochs=1)
    assert {len(i) for i in recorder.ids} == {16} and {len(s) for s in module.seen} == {8}


def test_b_not_divisible_by_n_chunks_is_refused_before_any_batch(tmp_path: Path) -> None:
    module = TinyTwoTower()
    with pytest.raises(PluginError, match=r"b = 8 \(the batch size\), is not divisible by n_chunks = 16.*"
                                          r"divisor of 8 \(nearest: 8\)"):
        fit(tmp_path, [JESTSelection(reference=REFERENCE)], module=module, epochs=1)
    assert module.seen == []
    with pytest.raises(PluginError, match=r"n_chunks = 3.*nearest: 2 or 4"):
        fit(tmp_path, [jest(n_chunks=3)], epochs=1)


def test_a_learner_without_the_protocol_is_refused_at_setup(tmp_path: Path) -> None:
    from batchkit.testing.conformance import indexed_loader
    from batchkit.lightning import BatchKitCallback
    from batchkit.testing import make_trainer

    module = TinyModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback([jest()])], max_epochs=1)
    with pytest.raises(PluginError, match=r"(?s)jest.*learner module \(TinyModule\) has no pair_embeddings, "
                                          r"siglip_temperature, siglip_bias.*def pair_embeddings\(self, batch\)"):
        trainer.fit(module, indexed_loader(n=80))
    assert module.seen == []


def test_a_reference_without_the_protocol_or_of_another_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"(?s)reference model \(TinyModule\) has no pair_embeddings.*"
                                          r"Point reference \(now 'batchkit.testing:TinyModule'\)"):
        fit(tmp_path, [jest(reference="batchkit.testing:TinyModule")], epochs=1)
    module = TinyTwoTower()
    with pytest.raises(PluginError, match=r"reference model embeds into 4 dimensions but the learner into 8.*"
                                          r"learner's embedding size"):
        fit(tmp_path, [jest(reference_kwargs={"embed": 4})], module=module, epochs=1)
    assert module.seen == []


@pytest.mark.parametrize(("reference", "message"), [
    ("no/such/file.ckpt", r"neither an existing checkpoint file nor an import path"),
    ("batchkit_joint_selection.testing:nothing_here", r"cannot be imported.*nothing_here"),
    ("batchkit_joint_selection.testing:collate_pairs", r"calling the reference factory.*reference_kwargs"),
])
def test_a_reference_that_cannot_be_loaded_is_a_clear_error(tmp_path: Path, reference: str, message: str) -> None:
    with pytest.raises(PluginError, match=message):
        fit(tmp_path, [jest(reference=reference)], epochs=1)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"variant 'learnability' scores with a reference model; set reference"):
        JESTSelection(n_chunks=4)
    with pytest.raises(ValueError, match="variant must be one of learnability, hard_learner, easy_reference"):
        jest(variant="rho")
    with pytest.raises(ValueError, match="selection must be 'joint' or 'independent_topk'"):
        jest(selection="top")
    with pytest.raises(ValueError, match="scope must be 'global'"):
        jest(scope="node")
    with pytest.raises(ValueError, match="n_chunks must be a positive integer"):
        jest(n_chunks=0)
    with pytest.raises(ConfigError, match="wrong type"):
        build_plugins({"j": {"plugin": "jest", "reference": REFERENCE, "n_chunks": "many"}})


def test_a_batch_without_the_index_field_is_refused_or_scored_without_the_cache(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"no field 'idx' \(index_field: 'idx'\).*cache_reference: false"):
        fit(tmp_path, [jest(index_field="idx")], epochs=1)
    plugin = jest(index_field="idx", cache_reference=False)
    fit(tmp_path, [plugin], epochs=1)
    assert plugin.selections == 12
