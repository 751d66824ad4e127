"""A tiny synthetic two-tower task with everything ``jest`` and ``cabs`` need, for tests (the
conformance suite's 2-process job imports it by path) and for trying the plugins out.

**Data** (:class:`SyntheticPairs`): example i has a latent z_i ~ N(0, I_8); its two views are
``a_i = z_i W_a + 0.3 e`` and ``b_i = z_i W_b + 0.3 e'`` (16-d; W_a, W_b fixed by ``data_seed``). A
fixed ``noise`` fraction of the examples get the b-view of another example of that set (a cyclic
derangement, as in the code-pairs example). Concepts are read off the b-view's latent:
``z<j>`` for every latent coordinate above 0.8, and ``common`` for half of the examples (a frequent
concept, to exercise CABS's cap). Items are dicts: ``index``, ``a``, ``b``, ``noisy``, ``concepts``.

**Model** (:class:`TinyTwoTower`): one linear map per tower to 8 dimensions, L2-normalised, trained
with the SigLIP loss (t = exp(t'), init 10; bias init -10); it offers ``pair_embeddings``,
``siglip_temperature``, ``siglip_bias`` and ``per_sample_loss``, and records the dataset indices
and noisy flags of every batch it trains on.

**Reference** (:func:`reference_model`): the same model trained (plain Adam, full batch) on clean
pairs drawn afresh from the same views, so its pair losses flag the corrupted pairs.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset


__all__ = ["SyntheticPairs", "TinyTwoTower", "collate_pairs", "pair_loader", "reference_model"]

LATENT, VIEW, EMBED = 8, 16, 8


def _views(data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + data_seed)
    return torch.randn(LATENT, VIEW, generator=g), torch.randn(LATENT, VIEW, generator=g)


class SyntheticPairs(Dataset):
    """Paired views of shared latents, ``noise`` of them mismatched (module docstring)."""

    def __init__(self, n: int = 480, noise: float = 0.3, seed: int = 0, data_seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        w_a, w_b = _views(data_seed)
        z = torch.randn(n, LATENT, generator=g)
        self.a = z @ w_a + 0.3 * torch.randn(n, VIEW, generator=g)
        b = z @ w_b + 0.3 * torch.randn(n, VIEW, generator=g)
        common = torch.rand(n, generator=g) < 0.5
        source = torch.arange(n)
        corrupted = torch.randperm(n, generator=g)[: int(round(noise * n))]
        if len(corrupted) >= 2:
            source[corrupted] = corrupted.roll(-1)
        self.b = b[source]
        self.noisy = source != torch.arange(n)
        self.concepts = [[f"z{j}" for j in range(LATENT) if z[s, j] > 0.8] + (["common"] if common[s] else [])
                         for s in source.tolist()]

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "a": self.a[i], "b": self.b[i], "noisy": bool(self.noisy[i]), "concepts": self.concepts[i]}


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "a": torch.stack([it["a"] for it in items]), "b": torch.stack([it["b"] for it in items]),
            "noisy": torch.tensor([it["noisy"] for it in items], dtype=torch.bool),
            "concepts": [list(it["concepts"]) for it in items]}


def pair_loader(n: int = 480, batch_size: int = 8, noise: float = 0.3, seed: int = 0, shuffle: bool = True,
                **kwargs: Any) -> DataLoader:
    """A DataLoader over :class:`SyntheticPairs` (the conformance suite's ``loader_factory``)."""
    return DataLoader(SyntheticPairs(n, noise, seed), batch_size=batch_size, shuffle=shuffle, collate_fn=collate_pairs,
                      **kwargs)


class TinyTwoTower(pl.LightningModule):
    """Two linear towers and the SigLIP loss (module docstring)."""

    def __init__(self, lr: float = 0.05, seed: int | None = None, embed: int = EMBED) -> None:
        super().__init__()
        with torch.random.fork_rng(enabled=seed is not None):  # a seeded init leaves the global stream alone
            if seed is not None:
                torch.manual_seed(seed)
            self.tower_a = nn.Linear(VIEW, embed)
            self.tower_b = nn.Linear(VIEW, embed)
        # shape [1], not 0-d: DeepSpeed 0.19 cannot broadcast 0-d parameters (it views them as bytes)
        self.log_temperature = nn.Parameter(torch.tensor([10.0]).log())
        self.bias = nn.Parameter(torch.tensor([-10.0]))
        self.lr = lr
        self.seen: list[list[int]] = []
        self.noisy_seen: list[list[bool]] = []

    @property
    def siglip_temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def siglip_bias(self) -> torch.Tensor:
        return self.bias

    def pair_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.tower_a(batch["a"]), dim=-1), F.normalize(self.tower_b(batch["b"]), dim=-1)

    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        a, b = self.pair_embeddings(batch)
        logits = self.siglip_temperature * a @ b.T + self.siglip_bias
        z = 2 * torch.eye(len(a), device=a.device) - 1
        pairwise = -F.logsigmoid(z * logits)
        return 0.5 * (pairwise.sum(0) + pairwise.sum(1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        self.noisy_seen.append(batch["noisy"].tolist())
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def reference_model(seed: int = 1, train_steps: int = 200, n: int = 512, data_seed: int = 0,
                    embed: int = EMBED) -> TinyTwoTower:
    """JEST's reference for :class:`SyntheticPairs`: :class:`TinyTwoTower` trained on ``n`` clean
    pairs of fresh latents (``train_steps`` full-batch Adam steps; 0 leaves it at its random
    initialisation), returned frozen in eval mode. Deterministic given its arguments."""
    model = TinyTwoTower(seed=seed, embed=embed)
    data = SyntheticPairs(n, noise=0.0, seed=10_000 + seed, data_seed=data_seed)
    batch = collate_pairs([data[i] for i in range(n)])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(train_steps):
        optimizer.zero_grad()
        model.per_sample_loss(batch).mean().backward()
        optimizer.step()
    return model.eval().requires_grad_(False)
