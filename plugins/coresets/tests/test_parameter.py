"""The option `param`: exact names, whole-name patterns, the default, and the errors."""

from __future__ import annotations

import pytest
from torch import nn

from batchkit_coresets import linear_weight_names
from batchkit_coresets import resolve_parameter


class Tiny(nn.Module):
    """embedding -> two blocks (attn.v_proj, mlp) -> head, like a small LM's names."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(nn.ModuleDict({"v_proj": nn.Linear(4, 4), "mlp": nn.Linear(4, 4)})
                                    for _ in range(2))
        self.head = nn.Linear(4, 10, bias=False)


def test_exact_name_pattern_and_default() -> None:
    model = Tiny()
    assert resolve_parameter(model, "blocks.1.v_proj.weight") == "blocks.1.v_proj.weight"
    assert resolve_parameter(model, r"blocks\.0\..*v_proj\.weight") == "blocks.0.v_proj.weight"
    assert resolve_parameter(model, r".*\.1\.mlp\.bias") == "blocks.1.mlp.bias"
    # default: the last Linear before the output layer (the last Linear registered)
    assert linear_weight_names(model)[-1] == "head.weight"
    assert resolve_parameter(model) == "blocks.1.mlp.weight"
    assert resolve_parameter(model, None) == "blocks.1.mlp.weight"


def test_default_on_the_example_lm() -> None:
    text_mixture = pytest.importorskip("batchkit_examples.text_mixture")
    model = text_mixture.DenseLanguageModel(dim=8, layers=3, heads=2, hidden=16, seq_len=8)
    assert resolve_parameter(model) == "blocks.2.moe.fc_out.weight"


def test_unknown_name_names_the_option_and_the_fix() -> None:
    with pytest.raises(ValueError) as err:
        resolve_parameter(Tiny(), "blocks.3.attn.v_proj.weight")
    message = str(err.value)
    assert "colm" in message and "`param`" in message and "matches no parameter" in message
    assert "blocks.1.v_proj.weight" in message  # candidates listed


def test_close_name_is_suggested() -> None:
    with pytest.raises(ValueError, match="did you mean blocks.1.v_proj.weight"):
        resolve_parameter(Tiny(), "blocks.1.v_proj.weights")


def test_partial_pattern_explains_fullmatch() -> None:
    with pytest.raises(ValueError, match=r"whole name \(re.fullmatch\).*blocks.0.v_proj.weight"):
        resolve_parameter(Tiny(), r"0\.v_proj")


def test_several_matches_are_listed() -> None:
    with pytest.raises(ValueError) as err:
        resolve_parameter(Tiny(), r"blocks\.\d\.v_proj\.weight")
    message = str(err.value)
    assert "matches 2 parameters" in message
    assert "blocks.0.v_proj.weight" in message and "blocks.1.v_proj.weight" in message
    assert "exactly one" in message


def test_invalid_pattern() -> None:
    with pytest.raises(ValueError, match=r"`param`='blocks\.\(' is neither a parameter name .* nor a valid regular"):
        resolve_parameter(Tiny(), "blocks.(")


def test_default_needs_two_linears() -> None:
    with pytest.raises(ValueError, match=r"`param` is not set .* has 1\. Set `param`"):
        resolve_parameter(nn.Sequential(nn.Embedding(3, 2), nn.Linear(2, 3)))
