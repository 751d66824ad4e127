"""A tiny two-layer MoE used by the moe_lbl tests (single-process and the 2-process job).

Its training loss is ``0 * task loss`` unless ``task_weight`` is set, so in the distributed
equivalence tests the only gradient is the load-balancing loss the plugin adds.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Dataset


class TinyRouter(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


class TinyMoELayer(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = TinyRouter(dim, num_experts, top_k)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), -1)
        weights, chosen = probs.topk(self.top_k, -1)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                sel = chosen[..., slot] == e
                out = out + torch.where(sel.unsqueeze(-1), weights[..., slot : slot + 1] * expert(x), 0.0)
        return x + out


class TinyMoE(pl.LightningModule):
    def __init__(self, dim: int = 6, num_experts: int = 4, top_k: int = 2, layers: int = 2, lr: float = 0.5,
                 task_weight: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TinyMoELayer(dim, num_experts, top_k) for _ in range(layers))
        self.lr, self.task_weight = lr, task_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _idx = batch
        return self.task_weight * self(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TokenDataset(Dataset):
    """``n`` fixed random sequences ``[seq, dim]`` (with their index)."""

    def __init__(self, n: int = 16, seq: int = 5, dim: int = 6, seed: int = 0) -> None:
        self.x = torch.randn(n, seq, dim, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], i


def reference_global_lbl(model: TinyMoE, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The global-batch LBL over all of ``x`` at once, written out independently of the plugin:
    per layer N_E * sum_i f_i P_i with f_i = c_i / (k T), P_i = mean softmax prob; mean over layers."""
    losses = []
    h = x
    for layer in model.layers:
        logits = layer.router(h).reshape(-1, layer.router.gate.out_features)
        p = torch.softmax(logits.float(), -1)
        T, E = p.shape
        chosen = p.topk(top_k, -1).indices
        f = torch.stack([(chosen == i).sum() for i in range(E)]).float() / (top_k * T)
        P = p.mean(0)
        losses.append(E * (f * P).sum())
        h = layer(h)
    return torch.stack(losses).mean()


def reference_accumulated_global_lbl(model: TinyMoE, micro_batches: list[list[torch.Tensor]],
                                     top_k: int) -> torch.Tensor:
    """What one optimizer step with accumulation minimises in global mode, written out independently
    of the plugin. ``micro_batches[k][r]`` is rank r's k-th micro-batch. Micro-step k's ``f`` comes
    from the counts and tokens of micro-steps 1..k over all ranks (Algorithm 1); each rank's ``P``
    is its own; the result is the mean over ranks (the data-parallel gradient mean) and over
    micro-steps (Lightning divides each micro-batch loss by N), so its gradient is the step's."""
    counts: list[torch.Tensor | None] = [None] * len(model.layers)
    tokens = [0] * len(model.layers)
    total = torch.zeros(())
    for ranks_x in micro_batches:
        hs = list(ranks_x)
        per_rank: list[list[torch.Tensor]] = [[] for _ in hs]
        for i, layer in enumerate(model.layers):
            E = layer.router.gate.out_features
            probs = [torch.softmax(layer.router(h).reshape(-1, E).float(), -1) for h in hs]
            c = sum(torch.stack([(p.topk(top_k, -1).indices == e).sum() for e in range(E)]).float() for p in probs)
            counts[i] = c if counts[i] is None else counts[i] + c
            tokens[i] += sum(p.shape[0] for p in probs)
            f = counts[i] / (top_k * tokens[i])
            for r, p in enumerate(probs):
                per_rank[r].append(E * (f * p.mean(0)).sum())
            hs = [layer(h) for h in hs]
        for losses in per_rank:
            total = total + torch.stack(losses).mean()
    return total / (len(micro_batches) * len(micro_batches[0]))
