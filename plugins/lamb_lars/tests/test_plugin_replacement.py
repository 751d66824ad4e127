"""The lamb/lars plugins replacing a module's own optimizer in real Lightning runs: an LR scheduler
bound to the module's groups (the error names `exclude: false`; with it the schedule drives the
replacement), the module's per-group settings carried over (no-decay groups, Adam's betas, SGD's
momentum), one warning listing what is replaced, and a checkpoint of the other optimizer refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from batchkit import PluginError
from batchkit.lightning import BatchKitCallback
from batchkit_lamb_lars import Lamb, Lars
from batchkit_lamb_lars.plugin import LambPlugin, LarsPlugin


class Classifier(pl.LightningModule):
    """``optimizer="adamw"``: AdamW with a decay group (weights) and a no-decay group (biases, the
    norm and the embedding, as the example MoE LM has it), betas (0.9, 0.95), and a LambdaLR bound
    to the groups; ``"sgd"``: SGD alone."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        self.kind = optimizer
        self.embed = torch.nn.Embedding(1, 4)  # a learned input offset: a 2-d tensor the module does not decay
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))

    def no_decay(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.dim() < 2 or n.startswith("embed")]

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x + self.embed.weight[0]), y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8)

    def configure_optimizers(self):
        if self.kind == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.8)
        rest = self.no_decay()
        decay = [p for p in self.parameters() if all(p is not q for q in rest)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                lr=0.01, betas=(0.9, 0.95))
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(entries: dict, module: Classifier, root: Path, steps: int = 3, ckpt_path: Path | None = None,
        callbacks: tuple = ()) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, enable_checkpointing=bool(callbacks),
                         callbacks=[BatchKitCallback(entries), *callbacks])
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def test_an_lr_scheduler_on_the_module_groups_gets_the_documented_fix(tmp_path: Path) -> None:
    with pytest.raises(PluginError) as info:
        fit({"opt": {"plugin": "lamb", "weight_decay": 0.01}}, Classifier(), tmp_path)
    message = str(info.value)
    assert "replaced AdamW's 2 parameter groups by 3 groups of Lamb" in message
    assert "LambdaLR is bound to the old groups" in message
    assert "Fix: set exclude: false on entry 'opt' (batchkit.plugins.opt.exclude=false)" in message


def test_with_exclude_false_the_module_settings_carry_over_and_the_schedule_drives_lamb(tmp_path: Path) -> None:
    module = Classifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit({"opt": {"plugin": "lamb", "exclude": False, "weight_decay": 0.01}}, module, tmp_path)
    (opt,) = trainer.optimizers
    assert isinstance(opt, Lamb)
    decay, rest = opt.param_groups
    # the entry's weight decay replaces the module's on the group it decays, never on its no-decay group
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.01, 0.0)
    assert {id(p) for p in rest["params"]} == {id(p) for p in module.no_decay()}
    # Adam's betas mean the same in LAMB: the module's (0.9, 0.95), not LAMB's default (0.9, 0.999)
    assert decay["betas"] == rest["betas"] == (0.9, 0.95)
    # the module's LambdaLR drives the replacement: lr = 0.01 / (step + 1) after 3 steps
    assert decay["lr"] == rest["lr"] == pytest.approx(0.01 / 4)
    reports = [str(w.message) for w in caught if "replaces the module's AdamW by Lamb" in str(w.message)]
    assert len(reports) == 1
    assert "Settings replaced: weight_decay 0.1 -> 0.01; eps 1e-08 -> 1e-06." in reports[0]


def test_the_report_is_given_once_per_plugin() -> None:
    plugin = LambPlugin(exclude=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            module = Classifier()
            plugin.batchkit_wrap_optimizer(module.configure_optimizers()["optimizer"], module)
    assert sum("Settings replaced: eps 1e-08 -> 1e-06" in str(w.message) for w in caught) == 1


def test_lars_carries_sgd_momentum_dampening_and_nesterov_per_group() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    sgd = torch.optim.SGD([{"params": net[0].parameters(), "momentum": 0.8, "nesterov": True},
                           {"params": net[1].parameters(), "momentum": 0.5, "dampening": 0.1}], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = LarsPlugin(exclude=False).batchkit_wrap_optimizer(sgd, net)
    assert isinstance(new, Lars)
    assert [(g["momentum"], g["dampening"], g["nesterov"]) for g in new.param_groups] == [(0.8, 0.0, True), (0.5, 0.1, False)]
    # an entry's own value wins
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = LarsPlugin(exclude=False, momentum=0.9, nesterov=False).batchkit_wrap_optimizer(sgd, net)
    assert [g["momentum"] for g in new.param_groups] == [0.9, 0.9] and not any(g["nesterov"] for g in new.param_groups)


def test_an_entry_weight_decay_applies_to_every_group_when_the_module_decays_none() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    adam = torch.optim.Adam([{"params": net[0].parameters()}, {"params": net[1].parameters()}], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = LambPlugin(exclude=False, weight_decay=0.02).batchkit_wrap_optimizer(adam, net)
    assert [g["weight_decay"] for g in new.param_groups] == [0.02, 0.02]
    assert [g["betas"] for g in new.param_groups] == [(0.9, 0.999)] * 2


@pytest.mark.parametrize(
    ("saved", "resumed", "message"),
    [
        ("lamb", "lars", "lars (entry 'opt'): the checkpoint's optimizer state was written by LAMB or Adam, not LARS: "
                         "its parameter groups have no 'momentum', 'trust_coeff'"),
        ("lars", "lamb", "lamb (entry 'opt'): the checkpoint's optimizer state was written by LARS or SGD, not LAMB: "
                         "its parameter groups have no 'betas', 'weight_decay_mode'"),
    ],
)
def test_resuming_with_the_other_optimizer_is_refused_with_the_fix(tmp_path: Path, saved: str, resumed: str, message: str) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit({"opt": {"plugin": saved}}, Classifier("sgd"), tmp_path, steps=2, callbacks=(checkpoint,))
    path = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(PluginError) as info:
        fit({"opt": {"plugin": resumed}}, Classifier("sgd"), tmp_path, steps=4, ckpt_path=path)
    assert str(info.value).startswith(message)
    assert "Resume with the plugin list the checkpoint was saved with" in str(info.value)
    # the same optimizer resumes as before
    trainer = fit({"opt": {"plugin": saved}}, Classifier("sgd"), tmp_path, steps=4, ckpt_path=path)
    assert trainer.global_step == 4
