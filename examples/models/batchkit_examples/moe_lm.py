"""A small byte-level mixture-of-experts language model and a two-domain text mixture that ships
with Python itself.

* **code**: the standard library's own ``.py`` sources (tests and site-packages left out);
* **prose**: the English help topics of ``pydoc_data.topics`` (the text of ``help("if")`` etc.).

Both are read as UTF-8 bytes (vocabulary 256) and cut into fixed windows. Validation windows come
from held-out *documents* (files, topics), chosen by a hash of their name, so no validation text is
seen in training. The train mixture has as many code windows as prose windows.

The model: pre-norm transformer blocks (causal attention + a mixture-of-experts feed-forward). Each
MoE layer has a :class:`Router` (a linear gate giving the router logits) and ``num_experts`` two-layer
experts; every token goes to its ``top_k`` experts, weighted by its renormalised router
probabilities (Mixtral-style). ``capacity_factor`` turns on token dropping (each expert takes at
most ``capacity_factor * k * tokens / num_experts`` tokens per forward, the rest pass through the
residual). The model has no load-balancing loss of its own: the ``moe_lbl`` plugin adds one, finding
the routers by their class name ``Router``.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from pathlib import Path
from typing import Any
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import ConcatDataset
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

DOMAINS = ("code", "prose")


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------


def _held_out(name: str, val_percent: int) -> bool:
    return zlib.crc32(name.encode()) % 100 < val_percent


def domain_documents(domain: str) -> list[tuple[str, bytes]]:
    """``(name, utf-8 bytes)`` of every document of a domain, in a fixed order."""
    if domain == "prose":
        from pydoc_data.topics import topics

        return [(key, topics[key].encode()) for key in sorted(topics)]
    if domain == "code":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
        files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
        return [(str(p.relative_to(root)), p.read_bytes()) for p in files]
    raise ValueError(f"unknown domain {domain!r}: use one of {DOMAINS}")


def domain_windows(domain: str, seq_len: int, split: str, val_percent: int = 10) -> torch.Tensor:
    """Non-overlapping ``seq_len + 1`` byte windows ``[n, seq_len + 1]`` (int64) of one domain's
    train or validation documents, each document cut on its own."""
    rows = []
    for name, data in domain_documents(domain):
        if _held_out(name, val_percent) != (split == "val"):
            continue
        n = len(data) // (seq_len + 1)
        if n:
            rows.append(torch.frombuffer(bytearray(data[: n * (seq_len + 1)]), dtype=torch.uint8).view(n, seq_len + 1))
    return torch.cat(rows).long()


class WindowDataset(Dataset):
    """``(window [seq_len + 1], domain index)`` pairs."""

    def __init__(self, windows: torch.Tensor, domain: int) -> None:
        self.windows = windows
        self.domain = domain

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.windows[i], self.domain


def two_domain_datasets(seq_len: int = 128, max_train_windows: Optional[int] = None, max_val_windows: int = 256,
                        seed: int = 0) -> tuple[Dataset, dict[str, Dataset]]:
    """(train mixture, {domain: validation set}). The train mixture takes the same number of
    windows from each domain: all prose windows (or ``max_train_windows``), and as many code windows
    drawn at random (fixed ``seed``) from the much larger standard library."""
    gen = torch.Generator().manual_seed(seed)
    train = {d: domain_windows(d, seq_len, "train") for d in DOMAINS}
    per_domain = min(len(w) for w in train.values())
    if max_train_windows:
        per_domain = min(per_domain, max_train_windows)
    parts, val = [], {}
    for index, domain in enumerate(DOMAINS):
        windows = train[domain]
        pick = torch.randperm(len(windows), generator=gen)[:per_domain].sort().values
        parts.append(WindowDataset(windows[pick], index))
        held = domain_windows(domain, seq_len, "val")
        pick = torch.randperm(len(held), generator=gen)[:max_val_windows].sort().values
        val[domain] = WindowDataset(held[pick], index)
    return ConcatDataset(parts), val


class TwoDomainTextDataModule(pl.LightningDataModule):
    """Python source and English prose, byte level, mixed 1:1 for training; one validation loader per
    domain (``val_loss/code``, ``val_loss/prose``)."""

    def __init__(self, seq_len: int = 128, batch_size: int = 16, max_train_windows: Optional[int] = None,
                 max_val_windows: int = 256, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.max_train_windows = max_train_windows
        self.max_val_windows = max_val_windows
        self.num_workers = num_workers
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_sets = two_domain_datasets(self.seq_len, self.max_train_windows, self.max_val_windows, self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.val_sets[d], batch_size=64, num_workers=self.num_workers) for d in DOMAINS]


# -------------------------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------------------------


class Router(nn.Module):
    """The gate of one MoE layer: token features ``[..., dim]`` -> router logits ``[..., num_experts]``."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


class MoEFeedForward(nn.Module):
    """``num_experts`` GELU MLPs; each token is sent to its top-k experts."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, capacity_factor: Optional[float] = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.router = Router(dim, num_experts, top_k)
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.w_in = nn.Parameter(torch.randn(num_experts, dim, hidden) / math.sqrt(dim))
        self.w_out = nn.Parameter(torch.randn(num_experts, hidden, dim) / math.sqrt(hidden))
        #: top-k expert choices of the last forward ``[tokens, k]`` and how many were dropped
        self.last_choices: torch.Tensor | None = None
        self.last_dropped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        self.last_choices = experts.detach()
        out = torch.zeros_like(tokens)
        capacity = None
        if self.capacity_factor is not None:
            capacity = max(1, int(self.capacity_factor * self.top_k * len(tokens) / self.num_experts))
        dropped = 0
        for e in range(self.num_experts):
            token_idx, slot = (experts == e).nonzero(as_tuple=True)
            if capacity is not None and len(token_idx) > capacity:  # token dropping, first come first served
                dropped += len(token_idx) - capacity
                token_idx, slot = token_idx[:capacity], slot[:capacity]
            if len(token_idx) == 0:
                continue
            h = F.gelu(tokens[token_idx] @ self.w_in[e]) @ self.w_out[e]
            out.index_add_(0, token_idx, h * weights[token_idx, slot].unsqueeze(-1))
        self.last_dropped = dropped
        return out.reshape(shape)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, expert_hidden: int, num_experts: int, top_k: int,
                 capacity_factor: Optional[float]) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.moe = MoEFeedForward(dim, expert_hidden, num_experts, top_k, capacity_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, S, D))
        return x + self.moe(self.norm2(x))


class ByteLanguageModel(pl.LightningModule):
    """Training and validation on the two-domain byte windows, for any ``lm_loss(window)`` (nats per
    byte); AdamW with warm-up and cosine decay from the hyper-parameters ``lr``, ``weight_decay`` and
    ``warmup_steps``."""

    def lm_loss(self, window: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        window, _domain = batch
        loss = self.lm_loss(window)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        window, _domain = batch
        self.log(f"val_loss/{DOMAINS[dataloader_idx]}", self.lm_loss(window), add_dataloader_idx=False, batch_size=len(window))

    def configure_optimizers(self) -> Any:
        return warmup_cosine_adamw(self, self.hparams.lr, self.hparams.weight_decay, self.hparams.warmup_steps)


class MoELanguageModel(ByteLanguageModel):
    """Byte-level MoE transformer LM.

    :param activation_checkpointing: ``None``, ``"non_reentrant"`` or ``"reentrant"``: recompute each
        block in backward (``torch.utils.checkpoint``).
    """

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, num_experts: int = 8, top_k: int = 2,
                 expert_hidden: int = 128, seq_len: int = 128, lr: float = 3e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 50, capacity_factor: Optional[float] = None,
                 activation_checkpointing: Optional[str] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if activation_checkpointing not in (None, "non_reentrant", "reentrant"):
            raise ValueError(f"activation_checkpointing must be None, 'non_reentrant' or 'reentrant', got {activation_checkpointing!r}")
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, expert_hidden, num_experts, top_k, capacity_factor) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mode = self.hparams.activation_checkpointing
        for block in self.blocks:
            if mode is not None and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=(mode == "reentrant"))
            else:
                x = block(x)
        return self.head(self.norm(x))

    def lm_loss(self, window: torch.Tensor) -> torch.Tensor:
        logits = self(window[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))



def warmup_cosine_adamw(module: pl.LightningModule, lr: float, weight_decay: float, warmup: int) -> dict[str, Any]:
    """AdamW (weight decay on matrices but embeddings), linear warm-up then cosine decay to 10%."""
    named = list(module.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    total = max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer is not None else 1000

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule), "interval": "step"}}


# -------------------------------------------------------------------------------------------------
# Analysis
# -------------------------------------------------------------------------------------------------


@torch.no_grad()
def expert_load_by_domain(model: MoELanguageModel, val_sets: dict[str, Dataset], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per domain, the fraction of top-k choices that went to each expert: ``[layers, experts]``, rows sum to 1."""
    was_training = model.training
    model.eval()
    loads = {}
    for domain, dataset in val_sets.items():
        counts = torch.zeros(len(model.blocks), model.hparams.num_experts)
        for window, _ in DataLoader(dataset, batch_size=batch_size):
            model(window[:, :-1].to(model.device))
            for layer, block in enumerate(model.blocks):
                counts[layer] += torch.bincount(block.moe.last_choices.reshape(-1).cpu(), minlength=counts.shape[1]).float()
        loads[domain] = counts / counts.sum(-1, keepdim=True)
    model.train(was_training)
    return loads


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits along the last dimension: 0 for identical distributions,
    1 for disjoint ones."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a / b.clamp_min(1e-12)).clamp_min(1e-12).log2(), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)
