"""The composition matrix: every pair of built-in plugins (and the mixup example) either runs
together with both plugins acting, or is refused before training by a declared conflict; and every
plugin listed twice is refused unless it allows it.

Each plugin has a *profile*: the YAML options for a short run on :class:`batchkit.testing.TinyMoEModule`
(which every plugin can act on: a loss, a per-sample loss, routers) and a check that it acted. A new
plugin joins by adding its profile. A plugin that acts on images (multigrid changes their size)
says so in its profile: its pairs then run on the same problem laid out as 2 x 4 images (upsampled
to 8 x 16), which :class:`ImageMoEModule` pools adaptively back to the 8 features. ``python tests/test_composition.py`` rewrites the verdict table
in docs/config.md; a test keeps the two in sync.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

from batchkit import PluginConflictError
from batchkit.config import available_plugins
from batchkit.config import build_plugins
from batchkit.lightning import BatchKitCallback
from batchkit.plugin import kind_of
from batchkit.testing import IndexedDataset
from batchkit.testing import TinyMoEModule
from batchkit.testing import make_trainer


@dataclass
class Profile:
    """How to run one plugin briefly, and how to tell it acted (``acted`` returns what it saw)."""

    options: dict[str, Any]
    acted: Callable[[Any, Any], bool]
    what: str
    trainer: dict[str, Any] = field(default_factory=dict)
    #: whether the plugin needs image inputs (its pairs then run on :class:`ImageMoEModule`)
    images: bool = False


class IndexedImages(Dataset):
    """IndexedDataset's samples with the 8 features as a 2 x 4 image, upsampled 4x: ``(1, 8, 16)``."""

    def __init__(self, n: int, noise: float) -> None:
        self.base = IndexedDataset(n=n, noise=noise)
        self.x = self.base.x.reshape(n, 1, 2, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.base.y[i], i


class ImageMoEModule(TinyMoEModule):
    """TinyMoEModule on images of any size: adaptive average pooling to 2 x 4, then the 8 features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.adaptive_avg_pool2d(x, (2, 4)).flatten(1))


def _optimizer_is(name: str) -> Callable[[Any, Any], bool]:
    return lambda plugin, trainer: type(trainer.optimizers[0]).__name__ == name


PROFILES: dict[str, Profile] = {
    # the inputs stand in for the teacher's embeddings: clusters of 8 mutually-near samples, one per batch
    "b3": Profile({"queries": "x", "K": 8, "p": 2, "m": 10, "progress": False},
                  lambda p, t: p.batches_planned > 0 and all(
                      sorted(b) in [sorted(c) for c in p.clusters.tolist()] for b in t.lightning_module.seen),
                  "every batch trained was one whole mined cluster"),
    # the labels stand in for one concept per example; batches of 8 are chosen from super-batches of 16
    "cabs": Profile({"filter_ratio": 0.5, "concepts_field": "1"}, lambda p, t: p.selections > 0,
                    "batches were chosen from super-batches by concept"),
    "hard_batches": Profile({"delta": 0.5}, lambda p, t: p.applied_upto > 0, "rounds were chosen from the loss table"),
    "selective_backprop": Profile({"keep": 0.5, "start": 0.0, "end": 1.0, "interrupt": 0},
                                  lambda p, t: p.selected_batches > 0, "batches were pruned"),
    # the labels stand in for source ids (3 sources); batches of 8 are chosen from large batches of 16
    "colm": Profile({"source_field": "1"}, lambda p, t: p.normalizer.t > 0, "coresets were chosen from large batches"),
    "moe_lbl": Profile({"coefficient": 0.01}, lambda p, t: p.last_layer_losses is not None, "the LBL term was added"),
    # pairs of (input, label) embedded by TinyMoEModule's two-tower protocol, a fresh one as reference
    "jest": Profile({"filter_ratio": 0.5, "n_chunks": 4, "reference": "batchkit.testing:TinyMoEModule", "index_field": "2"},
                    lambda p, t: p.selections > 0, "batches were sampled jointly from super-batches"),
    "lamb": Profile({}, _optimizer_is("Lamb"), "the optimizer is Lamb"),
    "lars": Profile({}, _optimizer_is("Lars"), "the optimizer is Lars"),
    "mixup": Profile({"num_classes": 3}, lambda p, t: p.last_lambda is not None, "batches were mixed"),
    # 48 images of 8 x 16 in batches of 8: every epoch trains a batch of 32 at 4 x 8 and one of 16 at 6 x 11
    "multigrid": Profile({"baseline_epochs": 2, "baseline_lr_milestones": [1]},
                         lambda p, t: p.batches_by_size == {(4, 8): 3, (6, 11): 3},
                         "batches of 32 at 4 x 8 and of 16 at 6 x 11 were trained", images=True),
}


def _conflict(a: str, b: str) -> bool:
    classes = {name: available_plugins()[name].load() for name in (a, b)}
    return b in getattr(classes[a], "conflicts", ()) or a in getattr(classes[b], "conflicts", ())


def _fit(tmp_path: Path, names: list[str]) -> tuple[dict[str, Any], Any, TinyMoEModule]:
    entries = {name: {"plugin": name, **PROFILES[name].options} for name in names}
    plugins = build_plugins(entries)
    images = any(PROFILES[n].images for n in names)
    module = ImageMoEModule() if images else TinyMoEModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback(plugins, cache_dir=tmp_path / "cache")], max_epochs=3,
                           **{k: v for n in names for k, v in PROFILES[n].trainer.items()})
    data = IndexedImages(n=48, noise=0.8) if images else IndexedDataset(n=48, noise=0.8)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True))
    return {kind_of(p): p for p in plugins}, trainer, module


def verdict(a: str, b: str) -> str:
    return "refused: declared conflict" if _conflict(a, b) else "runs, both act"


@pytest.mark.parametrize(("a", "b"), list(itertools.combinations(sorted(PROFILES), 2)))
def test_every_pair_runs_with_both_acting_or_is_refused_before_training(tmp_path: Path, a: str, b: str) -> None:
    if _conflict(a, b):
        with pytest.raises(PluginConflictError, match=rf"declares a conflict with '({a}|{b})'"):
            _fit(tmp_path, [a, b])
        return
    plugins, trainer, module = _fit(tmp_path, [a, b])
    assert trainer.global_step > 0
    for name in (a, b):
        assert PROFILES[name].acted(plugins[name], trainer), f"{name} did not act next to {a if name == b else b}: expected {PROFILES[name].what}"


def test_a_refused_pair_stops_before_any_batch(tmp_path: Path) -> None:
    module = TinyMoEModule()
    plugins = build_plugins({"hard": {"plugin": "hard_batches"}, "sb": {"plugin": "selective_backprop"}})
    trainer = make_trainer(tmp_path, [BatchKitCallback(plugins)], max_epochs=1)
    with pytest.raises(PluginConflictError, match="'hard' \\(hard_batches\\) declares a conflict with 'sb'"):
        trainer.fit(module, DataLoader(IndexedDataset(n=16), batch_size=8))
    assert module.seen == []


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_plugin_listed_twice_is_refused_before_training(tmp_path: Path, name: str) -> None:
    entries = {f"{name}_{i}": {"plugin": name, **PROFILES[name].options} for i in (1, 2)}
    module = TinyMoEModule()
    trainer = make_trainer(tmp_path, [BatchKitCallback(entries)], max_epochs=1)
    with pytest.raises(PluginConflictError, match=rf"plugin '{name}' is listed 2 times \(entries \['{name}_1', '{name}_2'\]\)"):
        trainer.fit(module, DataLoader(IndexedDataset(n=16), batch_size=8))
    assert module.seen == []


def test_every_installed_plugin_has_a_profile() -> None:
    assert set(PROFILES) == set(available_plugins()), "a plugin joins the composition matrix with a profile here"


# -- the table in docs/config.md ---------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"
BEGIN, END = "<!-- composition matrix: begin -->", "<!-- composition matrix: end -->"


def matrix_markdown() -> str:
    names = sorted(PROFILES)
    rows = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append("twice: refused")
            else:
                cells.append("conflict" if _conflict(a, b) else "✓")
        rows.append(f"| `{a}` | " + " | ".join(cells) + " |")
    legend = ("✓: the two run together and both act (" + "; ".join(f"`{n}`: {PROFILES[n].what}" for n in names)
              + "). conflict: refused before training, naming both entries. Pairs with "
              + ", ".join(f"`{n}`" for n in names if PROFILES[n].images)
              + " run on images (the same problem laid out as 2 x 4 images, upsampled to 8 x 16, and the MLP behind an "
              "adaptive pooling).")
    return "\n".join([BEGIN, *rows, "", legend, END])


def test_the_matrix_in_the_docs_is_current() -> None:
    text = DOCS.read_text()
    found = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text, re.S)
    assert found and found.group(0) == matrix_markdown(), "run: python tests/test_composition.py"


if __name__ == "__main__":
    text = DOCS.read_text()
    block = matrix_markdown()
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        sys.exit(f"add the markers {BEGIN} / {END} to {DOCS} first")
    DOCS.write_text(text)
