"""The core batch module: counting samples without guessing, selection, splitting and joining in every
container a DataLoader produces, the per-sample-loss protocol and the scoring pass."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from batchkit import PluginError
from batchkit.batch import BatchSpec
from batchkit.batch import check_per_sample_losses
from batchkit.batch import per_sample_losses
from batchkit.batch import resolve_loss_method
from batchkit.batch import scoring_pass

SPEC = BatchSpec()


def test_the_number_of_samples_is_the_length_all_tensor_fields_share() -> None:
    assert SPEC.num_samples(torch.zeros(5, 3)) == 5
    assert SPEC.num_samples([torch.zeros(5, 3), torch.zeros(5)]) == 5
    assert SPEC.num_samples({"meta": {"ids": torch.arange(4)}, "x": torch.zeros(4, 2)}) == 4
    assert SPEC.num_samples((["a", "b"], torch.zeros(2, 1))) == 2
    assert SPEC.num_samples({"x": torch.zeros(3, 2), "scale": torch.tensor(2.0)}) == 3  # 0-d: never a sample field
    with pytest.raises(PluginError, match="found no per-sample tensor"):
        SPEC.num_samples({"x": torch.tensor(1.0)})


def test_tensors_of_different_lengths_are_refused_not_guessed() -> None:
    # the old helper took the first tensor's length (10 here) and silently mis-sliced
    with pytest.raises(PluginError, match=r"different lengths \{'0': 10, '1': 4\}.*shared: \[\.\.\.\]"):
        SPEC.num_samples([torch.zeros(10), torch.zeros(4, 3)])
    assert BatchSpec(shared=["0"]).num_samples([torch.zeros(10), torch.zeros(4, 3)]) == 4
    assert BatchSpec(per_sample=["1"]).num_samples([torch.zeros(10), torch.zeros(4, 3)]) == 4
    assert BatchSpec(size_field="0").num_samples([torch.zeros(10), torch.zeros(4, 3)]) == 10


def test_select_keeps_container_types_and_slices_per_sample_lists_of_lists() -> None:
    index = torch.tensor([3, 1])
    x = torch.arange(12).reshape(4, 3)
    Pair = namedtuple("Pair", "x names")
    batch = {
        "x": x,
        "pair": Pair(x[:, 0], ("a", "b", "c", "d")),
        "concepts": [["re"], ["os", "sys"], [], ["json"]],  # a per-sample list of lists (CABS concepts)
        "scale": torch.tensor(2.0),
        "w": torch.ones(3),
        "source": "stdlib",
    }
    with pytest.raises(PluginError, match="different lengths .*'w': 3.*shared"):
        SPEC.select(batch, index)  # w has 3 entries: per-sample or not? The rules do not guess.
    out = BatchSpec(shared=["w"]).select(batch, index)
    assert out["x"].tolist() == [[9, 10, 11], [3, 4, 5]]  # in the index's order
    assert isinstance(out["pair"], Pair) and out["pair"].x.tolist() == [9, 3] and out["pair"].names == ("d", "b")
    assert out["concepts"] == [["json"], ["os", "sys"]]
    assert out["scale"].item() == 2.0 and out["w"].shape == (3,) and out["source"] == "stdlib"  # not per sample
    assert SPEC.select([x, [10, 11, 12, 13]], index)[1] == [13, 11]
    assert SPEC.select(x, index).tolist() == [[9, 10, 11], [3, 4, 5]]


def test_a_field_with_n_entries_that_is_not_per_sample_is_declared_shared() -> None:
    batch = {"x": torch.arange(3), "class_weights": torch.tensor([1.0, 2.0, 3.0])}  # 3 samples, 3 classes
    assert SPEC.select(batch, torch.tensor([0]))["class_weights"].shape == (1,)  # the rules cannot know
    spec = BatchSpec(shared=["class_weights"])
    out = spec.select(batch, torch.tensor([0]))
    assert out["class_weights"].tolist() == [1.0, 2.0, 3.0] and out["x"].tolist() == [0]
    assert spec.per_sample_paths(batch) == ["x"]


def test_nested_fields_are_named_by_paths() -> None:
    batch = [{"ids": torch.zeros(4, 7), "mask": torch.ones(4, 7)}, torch.arange(4)]
    assert SPEC.per_sample_paths(batch) == ["0.ids", "0.mask", "1"]
    # a list of tensors is a container of fields, unless declared a per-sample field
    ragged = {"tokens": [torch.zeros(2), torch.zeros(5), torch.zeros(3)], "y": torch.arange(3)}
    with pytest.raises(PluginError, match="different lengths"):
        SPEC.num_samples(ragged)
    spec = BatchSpec(per_sample=["tokens", "y"])
    out = spec.select(ragged, torch.tensor([1, 2]))
    assert [t.shape[0] for t in out["tokens"]] == [5, 3] and out["y"].tolist() == [1, 2]


def test_declared_fields_are_checked() -> None:
    with pytest.raises(PluginError, match="declares per_sample have different lengths"):
        BatchSpec(per_sample=["x", "w"]).select({"x": torch.zeros(4), "w": torch.zeros(3)}, [0])
    with pytest.raises(PluginError, match="declares 'w' per-sample, but it has shape \\(3,\\) and the batch has 4"):
        BatchSpec(per_sample=["w"], size_field="x").select({"x": torch.zeros(4), "w": torch.zeros(3)}, [0])
    with pytest.raises(PluginError, match="both per_sample and shared"):
        BatchSpec(per_sample=["x"], shared=["x"])
    with pytest.raises(PluginError, match="size_field is 'n'.*no such field"):
        BatchSpec(size_field="n").num_samples({"x": torch.zeros(2)})
    with pytest.raises(PluginError, match="unknown keys \\['shard'\\]"):
        BatchSpec.from_config({"shard": ["x"]})
    assert BatchSpec.from_config({"shared": ["w"]}).shared == {"w"}


def test_split_and_concat_are_inverse() -> None:
    batch = {"x": torch.arange(10).reshape(5, 2), "names": list("abcde"), "k": torch.tensor(7)}
    parts = SPEC.split(batch, 2)
    assert [SPEC.num_samples(p) for p in parts] == [3, 2]
    assert parts[1]["names"] == ["d", "e"] and parts[1]["k"].item() == 7
    joined = SPEC.concat(parts)
    assert torch.equal(joined["x"], batch["x"]) and joined["names"] == batch["names"]
    assert [SPEC.num_samples(p) for p in SPEC.split(batch, [1, 4])] == [1, 4]
    with pytest.raises(PluginError, match="add up to 4, not the batch's 5"):
        SPEC.split(batch, [1, 3])


def test_select_refuses_bad_indices() -> None:
    with pytest.raises(PluginError, match="out of range for a batch of 2"):
        SPEC.select(torch.zeros(2), [2])
    with pytest.raises(PluginError, match="1-d index"):
        SPEC.select(torch.zeros(2), [[0]])


def test_loss_method_lookup_and_output_check() -> None:
    class Module:
        def scores(self, batch):
            return batch

    assert resolve_loss_method("p", Module(), "scores")(3) == 3
    with pytest.raises(PluginError, match="option loss_method='nope'"):
        resolve_loss_method("p", Module(), "nope")
    with pytest.raises(PluginError, match="p: the module Module has no per_sample_loss"):
        resolve_loss_method("p", Module())
    with pytest.raises(PluginError, match="returned list, not a tensor"):
        check_per_sample_losses("p", "scores", [1.0], 1)
    with pytest.raises(PluginError, match=r"shape \(2, 3\), but the batch has 2 samples"):
        check_per_sample_losses("p", "scores", torch.zeros(2, 3), 2)
    losses = per_sample_losses("p", lambda b: b[0].sum(1).requires_grad_(), [torch.ones(3, 2)], SPEC)
    assert losses.tolist() == [2.0, 2.0, 2.0] and not losses.requires_grad


class Scorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.bn(self.lin(x))).sum(1)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_scoring_pass_leaves_the_model_and_random_stream_as_it_found_them(mode: str) -> None:
    torch.manual_seed(0)
    model = Scorer().train()
    model.lin.eval()  # a submodule with its own flag
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.lin.weight.grad = torch.full_like(model.lin.weight, 3.0)
    torch.manual_seed(5)
    reference_draw = torch.rand(4)
    torch.manual_seed(5)
    with scoring_pass(model, mode, restore=[model.lin.weight]):
        assert not torch.is_grad_enabled()
        assert model.bn.training is (mode == "train")
        model(torch.randn(8, 3))
        model.lin.weight.add_(1.0)  # a zeroth-order perturbation, say
    assert torch.equal(torch.rand(4), reference_draw)  # the scoring forward's draws were given back
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm statistics and the perturbed weight restored
    assert model.training and model.bn.training and not model.lin.training
    assert torch.equal(model.lin.weight.grad, torch.full_like(model.lin.weight, 3.0))


def test_scoring_pass_with_grad_keeps_parameter_grads() -> None:
    model = nn.Linear(2, 1)
    with scoring_pass(model, grad=True):
        assert torch.is_grad_enabled()
        model(torch.ones(1, 2)).sum().backward()
        assert model.weight.grad is not None
    assert model.weight.grad is None


def test_the_progress_count_agrees_with_the_spec_on_every_batch_shape() -> None:
    from batchkit.lightning import count_samples

    Pair = namedtuple("Pair", "x y")
    x, y = torch.zeros(6, 3), torch.arange(6)
    batches = [
        x, [x, y], (x, y), Pair(x, y), {"x": x, "y": y},
        [x, torch.zeros(4)],  # lengths differ
        [x, torch.tensor(1.0)],  # a 0-dim field
        [x, ["a"] * 6],  # a per-sample list
        {"x": x, "meta": {"w": torch.ones(2)}},  # nested
        [torch.tensor(2.0)], [], "text",
    ]
    spec = BatchSpec()
    for batch in batches:
        try:
            expected = spec.num_samples(batch)
        except PluginError:
            expected = 0
        assert count_samples(batch, spec) == expected, batch
    assert count_samples([x, y], spec) == 6
    # a spec that names fields is always asked
    named = BatchSpec(size_field="1")
    assert named.names_fields and not spec.names_fields
    assert count_samples([x, torch.zeros(4)], named) == 4
