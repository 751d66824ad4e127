"""A test kit for batchkit plugins, importable by any plugin package's tests.

* :class:`IndexedDataset` and :class:`TinyModule`: ``(x, y, index)`` samples and a small MLP that
  records which samples every training step trained on and the loss it returned, with the
  per-sample-loss protocol;
* :func:`make_trainer`: a quiet CPU Trainer for tests;
* :class:`FailAtStep`: a plugin that crashes at a given optimizer step, for resume tests;
* :func:`run_two_ranks`: runs a script as a 2-process job (Lightning re-launches it for rank 1) and
  returns what each rank wrote;
* :mod:`batchkit.testing.conformance`: the checks every plugin should pass (state round trip, exact
  mid-epoch resume, the same number of batches on every rank, DDP consistency), as a pytest class to
  subclass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from typing import NoReturn

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from batchkit.hookspecs import hookimpl
from batchkit.plugin import Plugin


class FailAtStep(Plugin):
    """Simulates a crash: raises ``RuntimeError("simulated crash")`` in the batch stage once
    ``ctx.global_step`` reaches ``step``. Put it in a run with a ``ModelCheckpoint`` to test that a
    plugin resumes exactly from the checkpoint written before the crash."""

    name = "fail_at_step"

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def batchkit_transform_batch(self, ctx: Any) -> None:
        if ctx.global_step >= self.step:
            raise RuntimeError("simulated crash")


class IndexedDataset(Dataset):
    """``(x, y, index)`` samples of a fixed random linear-classification problem: the index lets a
    test see which samples each step trained on. ``noise`` > 0 adds label noise, so per-sample
    losses keep differing as training goes on (what loss-based selection needs)."""

    def __init__(self, n: int = 96, dim: int = 8, classes: int = 3, seed: int = 0, noise: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        logits = self.x @ torch.randn(dim, classes, generator=g)
        if noise:
            logits = logits + noise * torch.randn(n, classes, generator=g)
        self.y = logits.argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class TinyModule(pl.LightningModule):
    """A two-layer MLP (optionally with BatchNorm) on :class:`IndexedDataset` batches.

    It records, per training step, the sample indices it trained on (``seen``) and the loss it
    returned (``losses``), and offers the per-sample-loss protocol (``per_sample_loss``).
    """

    def __init__(self, dim: int = 8, classes: int = 3, lr: float = 0.05, batch_norm: bool = False, momentum: float = 0.9) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim, 16)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.ReLU(), nn.Linear(16, classes)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.momentum = momentum
        self.seen: list[list[int]] = []
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y, _ = batch
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self.seen.append([int(i) for i in idx])
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class TinyRouter(nn.Module):
    """A linear gate returning router logits; found by loss-stage MoE plugins through the
    ``batchkit_moe_router = True`` protocol, with its ``top_k``."""

    batchkit_moe_router = True

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(h)


class TinyMoEModule(TinyModule):
    """:class:`TinyModule` with a mixture-of-experts layer after its first Linear: a
    :class:`TinyRouter` sends every sample to ``top_k`` of ``num_experts`` small experts, weighted by
    its renormalised router probabilities. Every built-in plugin can act on it (it has a loss, a
    per-sample loss and routers), which is what the composition tests need.

    For pair-selection plugins it also offers the two-tower protocol of
    ``batchkit_examples.code_pairs.TwoTowerRetrieval``: each sample is the pair (its input, its
    label), embedded as the normalised logits and the one-hot label, with a fixed SigLIP temperature
    and bias."""

    siglip_temperature = 5.0
    siglip_bias = -1.0

    def __init__(self, dim: int = 8, classes: int = 3, lr: float = 0.05, batch_norm: bool = False, momentum: float = 0.9,
                 num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__(dim, classes, lr, batch_norm, momentum)
        self.router = TinyRouter(16, num_experts, top_k)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(num_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.net)
        h = layers[0](x)
        weights, chosen = torch.softmax(self.router(h), -1).topk(self.top_k, -1)
        weights = weights / weights.sum(-1, keepdim=True)
        mixed = torch.zeros_like(h)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                mixed = mixed + torch.where((chosen[:, slot] == e).unsqueeze(-1), weights[:, slot:slot + 1] * expert(h), 0.0)
        h = h + mixed
        for layer in layers[1:]:
            h = layer(h)
        return h

    def pair_embeddings(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b): the normalised logits of the inputs and the one-hot labels, ``[n, classes]`` each."""
        x, y = batch[0], batch[1]
        logits = self(x)
        return F.normalize(logits, dim=-1), F.one_hot(y, logits.shape[-1]).to(logits.dtype)


def make_trainer(root: str | Path | None, callbacks: list, **kwargs: Any) -> Any:
    """A CPU Trainer for tests: one device, no logger, checkpointing, progress bar or summary
    unless asked for; ``kwargs`` override any of these."""
    options: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def run_two_ranks(script: str | Path, out: str | Path, *args: str, timeout: float = 400,
                  extra_env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run ``python script --out OUT *args`` as the rank-0 process of a 2-process job (the script
    builds a ``Trainer(devices=2, ...)``; Lightning starts rank 1 by re-running it) and return what
    each rank wrote to ``OUT/rank<r>.json``. Fails with both ranks' output tails if the job fails."""
    proc = launch(script, out, *args, timeout=timeout, extra_env=extra_env)
    if proc.returncode != 0:
        raise AssertionError(f"2-process job {script} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]


def launch(script: str | Path, out: str | Path, *args: str, timeout: float = 400,
           extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the 2-process job and return the finished process (for tests that expect it to fail)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    Path(out).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *(["-m", str(script)] if not str(script).endswith(".py") else [str(script)])]
    return subprocess.run([*command, "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=out, check=False)


def exit_rank_job() -> NoReturn:
    """End a multi-process job script once it has written its record: destroy the process group
    and leave without the interpreter's and the C++ runtime's exit handlers (``os._exit(0)``).

    At normal exit a rank can abort in C++ static destructors while gloo's threads are still alive
    ("terminate called without an active exception", SIGABRT), after everything the test checks was
    written; fresh-clone CI runs hit it in two different job scripts. Call it as the last line of
    the script's ``__main__`` block, after ``main()`` returned (a job that raised still fails)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_rank_record(out: str | Path, rank: int, record: dict[str, Any]) -> None:
    """What a 2-process job writes for :func:`run_two_ranks` to read."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


__all__ = [
    "FailAtStep", "IndexedDataset", "TinyMoEModule", "TinyModule", "TinyRouter", "exit_rank_job", "launch", "make_trainer",
    "run_two_ranks", "write_rank_record",
]
