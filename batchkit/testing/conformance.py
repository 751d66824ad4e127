"""The conformance suite: checks every batchkit plugin should pass, whatever it does.

Subclass :class:`PluginConformance` in a plugin package's tests and name the plugin the way users
do, by its YAML entries (so the entry point is exercised too)::

    from batchkit.testing.conformance import PluginConformance

    class TestMyPluginConformance(PluginConformance):
        entries = {"mine": {"plugin": "my_plugin", "strength": 0.5}}

pytest then runs, on a small real training job (:class:`~batchkit.testing.TinyModule` on
:class:`~batchkit.testing.IndexedDataset` unless the subclass names another module and loader):

* ``test_state_round_trip``: the state the plugins save is picklable, and loading it into fresh
  instances and saving again gives the same state;
* ``test_exact_mid_epoch_resume``: a run killed mid-epoch and resumed from its last checkpoint
  trains the same samples in the same order and ends with bit-identical weights and plugin state as
  the uninterrupted run;
* ``test_ddp_ranks_agree`` (2 processes, DDP on gloo): every rank runs the same number of batches
  per epoch and of optimizer steps, ranks train disjoint samples at every step, and the replicas end
  identical.

The module and loader are given as import paths (``"package.module:attribute"``) so the 2-process
job can build them too; ``module_kwargs`` and ``loader_kwargs`` are passed to them. The loader
factory is called as ``factory(**loader_kwargs)`` and returns a DataLoader. ``index_field`` is the
path (see :mod:`batchkit.batch`) of the batch field holding each sample's dataset index.
"""

from __future__ import annotations

import importlib
import io
from pathlib import Path
from typing import Any
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from batchkit.batch import BatchSpec
from batchkit.config import build_plugins
from batchkit.hookspecs import hookimpl
from batchkit.host import PluginHost
from batchkit.plugin import Plugin
from batchkit.testing import FailAtStep
from batchkit.testing import IndexedDataset
from batchkit.testing import make_trainer
from batchkit.testing import run_two_ranks


def load_object(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def indexed_loader(n: int = 96, batch_size: int = 8, noise: float = 0.8, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    """The suite's default loader: :class:`IndexedDataset` with label noise, so losses keep differing."""
    return DataLoader(IndexedDataset(n=n, noise=noise), batch_size=batch_size, shuffle=shuffle, **kwargs)


class SampleRecorder(Plugin):
    """Records, for every micro-batch training_step receives, the dataset indices it holds."""

    name = "conformance_recorder"

    def __init__(self, index_field: str) -> None:
        self.index_field = index_field
        self.seen: list[list[int]] = []
        self.steps: list[tuple[int, int, int]] = []

    @hookimpl
    def batchkit_before_forward(self, batch: Any, ctx: Any) -> None:
        leaves = dict(BatchSpec()._leaves(batch))
        if self.index_field not in leaves:
            raise AssertionError(
                f"conformance: the batch has no field {self.index_field!r} (fields: {sorted(leaves)}); set index_field "
                "to the path of the field that holds each sample's dataset index"
            )
        self.seen.append([int(i) for i in torch.as_tensor(leaves[self.index_field]).tolist()])
        self.steps.append((ctx.epoch, ctx.batch_idx, ctx.global_step))


def first_difference(a: Any, b: Any, path: str = "state") -> str | None:
    """Where two plugin states first differ (``None`` if they are equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{path}[{k!r}]"))), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{i}]"))), None)
    return None if states_equal(a, b) else f"{path}: {a!r} != {b!r}"


def states_equal(a: Any, b: Any) -> bool:
    """Deep equality of plugin states (tensors compared exactly, including NaN positions)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(torch.nan_to_num(a.cpu(), nan=0.123), torch.nan_to_num(b.cpu(), nan=0.123))
                and torch.equal(a.isnan() if a.is_floating_point() else a, b.isnan() if b.is_floating_point() else b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


class PluginConformance:
    """Base class of a plugin's conformance tests (see the module docstring)."""

    #: the plugins under test, as YAML entries
    entries: ClassVar[dict[str, Any]] = {}
    module_factory: ClassVar[str] = "batchkit.testing:TinyModule"
    module_kwargs: ClassVar[dict[str, Any]] = {"batch_norm": True}
    loader_factory: ClassVar[str] = "batchkit.testing.conformance:indexed_loader"
    loader_kwargs: ClassVar[dict[str, Any]] = {}
    index_field: ClassVar[str] = "2"
    max_epochs: ClassVar[int] = 3
    #: checkpoint after this many optimizer steps, crash at the next one (mid-epoch by default:
    #: 96 samples in batches of 8 give 12 steps per epoch)
    resume_step: ClassVar[int] = 17
    trainer_kwargs: ClassVar[dict[str, Any]] = {}
    #: whether the plugins' own checkpoint state is expected (False: the plugins are stateless)
    stateful: ClassVar[bool] = True

    # -- building a run -----------------------------------------------------------------------

    def make_plugins(self) -> list[object]:
        return build_plugins(self.entries)

    def _fit(self, root: Path, extra: list[object] = (), callbacks: list = (), ckpt_path: str | None = None,
             **trainer_kwargs: Any) -> tuple[Any, Any, SampleRecorder, Any]:
        from batchkit.lightning import BatchKitCallback

        pl.seed_everything(0, workers=True)
        recorder = SampleRecorder(self.index_field)
        callback = BatchKitCallback([*self.make_plugins(), recorder, *extra])
        module = load_object(self.module_factory)(**self.module_kwargs)
        loader = load_object(self.loader_factory)(**self.loader_kwargs)
        options = {"max_epochs": self.max_epochs, **self.trainer_kwargs, **trainer_kwargs}
        trainer = make_trainer(root, [callback, *callbacks], **options)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module, trainer, recorder, callback

    # -- the checks ---------------------------------------------------------------------------

    def test_state_round_trip(self, tmp_path: Path) -> None:
        _, _, _, callback = self._fit(tmp_path, max_epochs=1)
        state = {k: v for k, v in callback.host.state_dict().items() if k != SampleRecorder.name}
        if self.stateful:
            assert state, f"no plugin in {list(self.entries)} saved any state; set stateful = False if that is intended"
        buffer = io.BytesIO()
        torch.save(state, buffer)  # what Lightning does with it
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        fresh = PluginHost(self.make_plugins())
        fresh.load_state_dict(loaded)
        difference = first_difference(fresh.state_dict(), state)
        assert difference is None, f"loading the saved state and saving again changed it: {difference}"

    def test_exact_mid_epoch_resume(self, tmp_path: Path) -> None:
        full_module, full_trainer, full, full_cb = self._fit(tmp_path / "full")
        total = full_trainer.global_step
        assert total > self.resume_step + 1, f"the run has only {total} steps; lower resume_step"
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=self.resume_step, save_top_k=-1)
        with pytest.raises(RuntimeError, match="simulated crash"):
            self._fit(tmp_path / "part", [FailAtStep(self.resume_step + 1)], [ckpt], enable_checkpointing=True)
        (saved,) = [p for p in (tmp_path / "ckpt").glob("*.ckpt") if f"step={self.resume_step}." in p.name]
        assert torch.load(saved, weights_only=False)["state_dict"]  # the crash did not lose the checkpoint
        resumed_module, resumed_trainer, resumed, resumed_cb = self._fit(tmp_path / "resumed", ckpt_path=str(saved))
        done = len(full.seen) - len(resumed.seen)
        assert resumed.seen == full.seen[done:], "the resumed run did not train the same samples in the same order"
        assert resumed.steps == full.steps[done:], "the resumed run's (epoch, batch, step) context differs"
        assert resumed_trainer.global_step == total
        for (name, a), (_, b) in zip(full_module.state_dict().items(), resumed_module.state_dict().items()):
            assert torch.equal(a, b), f"weights differ after the resume: {name}"
        state = lambda cb: {k: v for k, v in cb.host.state_dict().items() if k != SampleRecorder.name}  # noqa: E731
        difference = first_difference(state(resumed_cb), state(full_cb))
        assert difference is None, f"the plugins' state differs after the resume: {difference}"

    @pytest.mark.multiprocess
    def test_ddp_ranks_agree(self, tmp_path: Path) -> None:
        import json

        spec = {
            "entries": self.entries, "module_factory": self.module_factory, "module_kwargs": self.module_kwargs,
            "loader_factory": self.loader_factory, "loader_kwargs": self.loader_kwargs,
            "index_field": self.index_field, "max_epochs": min(self.max_epochs, 2), "trainer_kwargs": self.trainer_kwargs,
        }
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        a, b = run_two_ranks("batchkit.testing.conformance_job", tmp_path, "--spec", str(tmp_path / "spec.json"))
        assert a["batches_per_epoch"] == b["batches_per_epoch"], "ranks ran different numbers of batches per epoch"
        assert a["global_step"] == b["global_step"] > 0
        assert len(a["seen"]) == len(b["seen"])
        for step, (x, y) in enumerate(zip(a["seen"], b["seen"])):
            assert not set(x) & set(y), f"ranks trained the same samples at micro-batch {step}: {sorted(set(x) & set(y))}"
        assert a["params"] == b["params"], "the DDP replicas ended with different weights"
