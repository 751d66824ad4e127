"""A naturally skewed text mixture that ships with Python, and a small dense byte-level LM on it.

**Sources.** Each source is one package of the standard library's own source code (``asyncio``,
``email``, ``json``, ...) or the English help topics of ``pydoc_data.topics`` (``prose``), read as
UTF-8 bytes (vocabulary 256) and cut into fixed ``seq_len + 1`` windows, each document on its own.
The default mixture has a few large sources and several small ones, as they come (the sizes depend
on the installed Python; on CPython 3.11 the largest has about 50x the windows of the smallest).
Documents are read with :func:`batchkit_examples.moe_lm.domain_documents`, the code of the MoE
example; nothing of it is copied here.

**Validation.** Per source, the windows (in document order) are grouped into blocks of
``val_block`` consecutive windows and every ``val_every``-th block is held out: every source,
however few files it has, gets a validation set spread over its text, and no validation byte is in
a training window. (The MoE example holds out whole documents; several small sources here have only
2-7 files, so that would leave them with no validation text or none for training.)

**Batches** are dicts: ``tokens`` ``[B, seq_len + 1]`` int64 and ``source`` ``[B]`` int64, the index
of the window's source in ``sources`` (:data:`SOURCE_KEY`; what CoLM's plugin reads).

**Model.** :class:`DenseLanguageModel` is the MoE example's transformer (its pre-norm ``Block``:
causal attention, then the feed-forward; its forward pass, and AdamW with warm-up and cosine decay)
with a dense GELU feed-forward in place of the mixture of experts. It provides ``per_sample_loss(batch)`` and
logs the validation loss per source (``val_loss/<source>``), their mean over sources
(``val_loss/mean``) and the worst source (``val_loss/worst``).
"""

from __future__ import annotations

from typing import Any
from typing import Optional
from typing import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset
from torch.utils.data import DataLoader
from torch.utils.data import Dataset
from torchmetrics import MeanMetric

from batchkit_examples import moe_lm

#: the batch key holding each example's source index
SOURCE_KEY = "source"
#: the batch key holding the byte windows ``[B, seq_len + 1]``
TOKENS_KEY = "tokens"
#: the pseudo-package name of the pydoc help topics
PROSE = "prose"

#: large sources first, then the small ones (``SMALL_SOURCES``)
DEFAULT_SOURCES = ("asyncio", PROSE, "email", "http", "logging", "json", "wsgiref", "zoneinfo", "dbm", "sqlite3")
#: the five smallest of ``DEFAULT_SOURCES`` (each under 4% of the training windows)
SMALL_SOURCES = ("json", "wsgiref", "zoneinfo", "dbm", "sqlite3")


def source_documents(sources: Sequence[str]) -> dict[str, list[tuple[str, bytes]]]:
    """Per source, ``(name, utf-8 bytes)`` of each of its documents in a fixed order: the ``.py``
    files of the standard-library package of that name, or the pydoc topics for ``"prose"``."""
    code = moe_lm.domain_documents("code") if any(source != PROSE for source in sources) else []
    documents = {}
    for source in sources:
        if source == PROSE:
            documents[source] = moe_lm.domain_documents("prose")
            continue
        documents[source] = [(name, data) for name, data in code if name.split("/")[0] == source]
        if not documents[source]:
            raise ValueError(f"unknown source {source!r}: use {PROSE!r} or the name of a package of the standard "
                             f"library that has .py files (e.g. 'json', 'email')")
    return documents


def document_windows(data: bytes, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``seq_len + 1`` byte windows of one document, ``[n, seq_len + 1]`` uint8
    (the tail shorter than a window is dropped)."""
    n = len(data) // (seq_len + 1)
    if n == 0:
        return torch.empty(0, seq_len + 1, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[: n * (seq_len + 1)]), dtype=torch.uint8).view(n, seq_len + 1)


def split_windows(source: str, documents: list[tuple[str, bytes]], seq_len: int, val_block: int = 4,
                  val_every: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) windows of one source's documents, uint8 ``[n, seq_len + 1]`` each: block
    j of ``val_block`` consecutive windows is held out when ``j % val_every == val_every - 1``."""
    windows = torch.cat([document_windows(data, seq_len) for _, data in documents])
    block = torch.arange(len(windows)) // val_block
    held_out = block % val_every == val_every - 1
    if held_out.all() or not held_out.any():
        raise ValueError(f"source {source!r} has {len(windows)} windows of {seq_len + 1} bytes, too few to split "
                         f"into train and validation blocks of {val_block}: use a shorter seq_len or drop it")
    return windows[~held_out], windows[held_out]


class SourceWindows(Dataset):
    """The windows of one source as ``{"tokens": [seq_len + 1] int64, "source": int}`` examples."""

    def __init__(self, windows: torch.Tensor, source: int) -> None:
        self.windows = windows
        self.source = source

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {TOKENS_KEY: self.windows[i].long(), SOURCE_KEY: self.source}


def mixture_datasets(sources: Sequence[str] = DEFAULT_SOURCES, seq_len: int = 128, max_val_windows: int = 128,
                     val_block: int = 4, val_every: int = 5, seed: int = 0) -> tuple[Dataset, dict[str, Dataset]]:
    """(train mixture, {source: validation set}). The train mixture holds every train window of every
    source (its natural proportions); each validation set at most ``max_val_windows`` windows drawn
    at random (fixed ``seed``) from the source's held-out blocks."""
    if len(set(sources)) != len(sources):
        raise ValueError(f"sources must be distinct, got {list(sources)}")
    gen = torch.Generator().manual_seed(seed)
    train, val = [], {}
    documents = source_documents(sources)
    for index, source in enumerate(sources):
        train_windows, val_windows = split_windows(source, documents[source], seq_len, val_block, val_every)
        train.append(SourceWindows(train_windows, index))
        pick = torch.randperm(len(val_windows), generator=gen)[:max_val_windows].sort().values
        val[source] = SourceWindows(val_windows[pick], index)
    return ConcatDataset(train), val


def source_counts(dataset: ConcatDataset) -> list[int]:
    """Training windows per source, in source order, of a mixture made by :func:`mixture_datasets`."""
    return [len(part) for part in dataset.datasets]


class TextMixtureDataModule(pl.LightningDataModule):
    """The skewed source mixture for training (shuffled, its natural proportions) and one validation
    loader over every source's validation set (the model splits the losses by ``source``)."""

    def __init__(self, sources: Sequence[str] = DEFAULT_SOURCES, seq_len: int = 128, batch_size: int = 32,
                 val_batch_size: int = 64, max_val_windows: int = 128, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.sources = tuple(sources)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.max_val_windows = max_val_windows
        self.num_workers = num_workers
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_sets = mixture_datasets(self.sources, self.seq_len, self.max_val_windows,
                                                         seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers,
                          drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ConcatDataset(list(self.val_sets.values())), batch_size=self.val_batch_size,
                          num_workers=self.num_workers)


class FeedForward(nn.Module):
    """A dense two-layer GELU MLP ``dim -> hidden -> dim``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class DenseBlock(moe_lm.Block):
    """The MoE example's pre-norm block with a dense :class:`FeedForward`. The feed-forward keeps the
    attribute name ``moe`` because ``moe_lm.Block.forward`` calls it by that name, so parameter
    names read ``blocks.<i>.moe.fc_out.weight``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__(dim, heads, hidden, num_experts=1, top_k=1, capacity_factor=None)
        self.moe = FeedForward(dim, hidden)


class DenseLanguageModel(moe_lm.MoELanguageModel):
    """Byte-level dense transformer LM on dict batches (``tokens``, ``source``).

    Forward, loss, AdamW with linear warm-up and cosine decay are the MoE example's; only the
    feed-forward is dense. ``sources`` names the source indices for the logged validation losses.
    """

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, hidden: int = 256, seq_len: int = 128,
                 lr: float = 3e-3, weight_decay: float = 0.1, warmup_steps: int = 20,
                 activation_checkpointing: Optional[str] = None, sources: Sequence[str] = DEFAULT_SOURCES) -> None:
        # LightningModule.__init__, skipping MoELanguageModel's, whose hyper-parameters (experts, top-k)
        # would be recorded too
        super(moe_lm.MoELanguageModel, self).__init__()
        self.save_hyperparameters()
        if activation_checkpointing not in (None, "non_reentrant", "reentrant"):
            raise ValueError(f"activation_checkpointing must be None, 'non_reentrant' or 'reentrant', got "
                             f"{activation_checkpointing!r}")
        # the layers MoELanguageModel.forward runs: embedding + positions, blocks, final norm, head
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.blocks = nn.ModuleList(DenseBlock(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)
        self.sources = tuple(sources)
        self.val_loss = nn.ModuleList(MeanMetric() for _ in self.sources)

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Next-byte cross-entropy of each window, averaged over its positions: ``[B]``."""
        tokens = batch[TOKENS_KEY]
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(dim=1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch[TOKENS_KEY]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses = self.per_sample_loss(batch)
        source = batch[SOURCE_KEY]
        for index in source.unique().tolist():
            self.val_loss[index].update(losses[source == index])

    def on_validation_epoch_end(self) -> None:
        per_source = torch.stack([metric.compute() for metric in self.val_loss])
        for name, value in zip(self.sources, per_source):
            self.log(f"val_loss/{name}", value)
        self.log("val_loss/mean", per_source.mean(), prog_bar=True)
        self.log("val_loss/worst", per_source.max())
        for metric in self.val_loss:
            metric.reset()
