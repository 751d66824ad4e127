"""A tiny contrastive task for b3's tests, the conformance suite and the 2-process jobs.

Everything is named by import path so a re-launched rank can build it:

* :class:`TopicPairs`: N (query, target) text pairs about a few topics, as dict samples
  ``{"index", "query", "target"}`` with hashed bag-of-words feature vectors; the texts are in
  ``dataset.texts`` (queries) and ``dataset.target_texts``;
* :func:`hashed_bag_teacher`: a cheap deterministic teacher (texts -> hashed bag-of-words), counting
  the texts it embedded in this process (``TEACHER_CALLS``), so tests can see whether the artefact
  was built or loaded;
* :class:`TinyPairModule`: two linear towers trained with a SigLIP loss over the batch and, when
  the batch carries them, the b3 hard negatives (``hard_negative_target``); it records the indices
  of every step (``seen``) and whether hard negatives reached the loss;
* :func:`pair_loader`: the train DataLoader.
"""

from __future__ import annotations

import zlib
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

#: texts embedded by :func:`hashed_bag_teacher` in this process
TEACHER_CALLS = [0]

_TOPICS = [
    "parse read file path line encoding text",
    "socket connect host port send receive timeout",
    "thread lock wait queue worker signal event",
    "date time zone format month year calendar",
    "list sort key order reverse compare item",
    "number float integer round divide decimal sign",
]
_COMMON = "return the a value given object new current default".split()


def _bag(text: str, dim: int) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    for word in text.split():
        v[zlib.crc32(word.encode()) % dim] += 1.0
    return v


def hashed_bag_teacher(texts: list[str]) -> np.ndarray:
    """A cheap teacher: each text's words hashed into 64 buckets (counts)."""
    TEACHER_CALLS[0] += len(texts)
    return np.stack([_bag(t, 64) for t in texts])


hashed_bag_teacher.name = "hashed-bag-64"  # type: ignore[attr-defined]  # the identity in the cache key


class TopicPairs(Dataset):
    """``n`` (query, target) pairs: each query mixes words of one topic with common words, and its
    target is another draw from the same topic plus a few words of the query (so pairs match)."""

    def __init__(self, n: int = 96, dim: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        topics = [t.split() for t in _TOPICS]
        self.texts, self.target_texts = [], []
        for i in range(n):
            words = topics[i % len(topics)]
            query = list(rng.choice(words, 4)) + list(rng.choice(_COMMON, 2)) + [f"w{i}"]
            target = list(rng.choice(words, 3)) + query[:2] + [f"w{i}"]
            self.texts.append(" ".join(query))
            self.target_texts.append(" ".join(target))
        self.query = torch.from_numpy(np.stack([_bag(t, dim) for t in self.texts]))
        self.target = torch.from_numpy(np.stack([_bag(t, dim) for t in self.target_texts]))

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "query": self.query[i], "target": self.target[i]}


def pair_loader(n: int = 96, batch_size: int = 8, shuffle: bool = True, **kwargs: Any) -> DataLoader:
    """The train loader of :class:`TopicPairs` (default collate: a dict of tensors)."""
    return DataLoader(TopicPairs(n), batch_size=batch_size, shuffle=shuffle, **kwargs)


class TinyPairModule(pl.LightningModule):
    """Two linear towers, SigLIP loss ``(1/n) sum_ij -log sigmoid(z_ij (t <a_i, b_j> + c))`` over
    the batch plus, per query, ``-log sigmoid(-(t <a_i, h> + c))`` for every hard negative h of the
    batch (``hard_negative_target``), except the query's own example."""

    def __init__(self, dim: int = 16, width: int = 8, lr: float = 0.1, n: int = 96, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.query_tower = torch.nn.Linear(dim, width)
        self.target_tower = torch.nn.Linear(dim, width)
        self.seen: list[list[int]] = []
        self.hard_negative_steps = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        a = F.normalize(self.query_tower(batch["query"]), dim=-1)
        b = F.normalize(self.target_tower(batch["target"]), dim=-1)
        logits = 5.0 * a @ b.T - 2.0
        z = 2 * torch.eye(len(a)) - 1
        loss = -F.logsigmoid(z * logits).sum() / len(a)
        if "hard_negative_target" in batch:
            n, k = batch["hard_negatives"].shape
            h = F.normalize(self.target_tower(batch["hard_negative_target"].reshape(n * k, -1)), dim=-1)
            terms = -F.logsigmoid(-(5.0 * a @ h.T - 2.0))
            own = batch["index"].unsqueeze(1) == batch["hard_negatives"].reshape(1, n * k)
            loss = loss + terms.masked_fill(own, 0.0).sum() / n
            self.hard_negative_steps += 1
        return loss

    def train_dataloader(self) -> DataLoader:  # for `batchkit prepare` / `batchkit fit` configs
        return pair_loader(self.hparams.n, self.hparams.batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
