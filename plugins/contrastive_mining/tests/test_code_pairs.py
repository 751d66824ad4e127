"""b3 on the real task, with the real teacher: the packaged MiniLM embeds 512 docstrings of
batchkit_examples.code_pairs (the only test module of the plugin that loads it), B3 batches hold
harder negatives than random batches, and the two-tower model trains on B3 batches with their hard
negatives' code."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from batchkit.cache import ArtifactCache
from batchkit.host import BatchKitContext
from batchkit.lightning import BatchKitCallback
from batchkit.testing import make_trainer
from batchkit_contrastive_mining import DEFAULT_TEACHER
from batchkit_contrastive_mining import top_neighbours
from batchkit_contrastive_mining.plugin import B3Plugin
from batchkit_contrastive_mining.plugin import ClusterBatchSampler

code_pairs = pytest.importorskip("batchkit_examples.code_pairs")

OPTIONS = dict(queries="doc_texts", K=32, p=10, m=40, hard_negatives=5, hard_negative_fields=["code_ids"],
               max_seq_length=64, progress=False)


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory):
    train, _ = code_pair_datasets()
    cache_dir = tmp_path_factory.mktemp("cache")
    plugin = B3Plugin(**OPTIONS)
    plugin.batchkit_prepare_data(train, ArtifactCache(cache_dir), BatchKitContext())
    return train, cache_dir, plugin


def code_pair_datasets():
    return code_pairs.code_pair_datasets(train_subset_size=512)


def test_the_real_teacher_makes_batches_of_similar_docstrings(mined) -> None:
    train, cache_dir, plugin = mined
    assert plugin.report["built"] == {"embeddings": True, "clusters": True}
    embeddings = ArtifactCache(cache_dir).load(plugin.embeddings_key)
    assert embeddings["teacher"].startswith(f"{DEFAULT_TEACHER}==") and embeddings["queries"].shape == (512, 384)
    emb = torch.from_numpy(embeddings["queries"])

    def mean_in_batch_similarity(batches: list[list[int]]) -> float:
        sims = [(emb[b] @ emb[b].T).sum().sub(len(b)).div(len(b) * (len(b) - 1)).item() for b in batches]
        return float(np.mean(sims))

    ranks = top_neighbours(embeddings["queries"], k=50, knn="exact")

    def hard_pairs(batches: list[list[int]]) -> int:
        """(i, j) in one batch with j among i's teacher ranks [p, p + m)."""
        return sum(len(set(ranks[i, 10:50].tolist()) & set(b)) for b in batches for i in b)

    sampler = ClusterBatchSampler(None, plugin.clusters, clusters_per_batch=2, seed=0, shuffle=True)
    b3_batches = [list(b) for b in sampler]
    order = torch.randperm(512, generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = [order[i:i + 64] for i in range(0, 512, 64)]
    # A random batch of 64 of 512 holds 40 * 63 / 511 = 4.9 of a sample's 40 hard negatives; a B3
    # batch, built from the mutual ones, about twice as many (10.4 measured).
    random_count = hard_pairs(random_batches) / 512
    assert abs(random_count - 40 * 63 / 511) < 0.5
    assert hard_pairs(b3_batches) / 512 > 1.6 * random_count
    assert mean_in_batch_similarity(b3_batches) > mean_in_batch_similarity(random_batches) + 0.02


def test_the_two_tower_model_trains_on_b3_batches_with_hard_negatives(mined, tmp_path: Path) -> None:
    train, cache_dir, _ = mined
    seen: list[dict] = []

    class Recording(code_pairs.TwoTowerRetrieval):
        def training_step(self, batch, batch_idx):
            with torch.no_grad():
                plain = {k: v for k, v in batch.items() if not k.startswith("hard_negative")}
                seen.append({"batch": batch, "loss": self.per_sample_loss(batch).mean().item(),
                             "loss_without_negatives": self.per_sample_loss(plain).mean().item()})
            return super().training_step(batch, batch_idx)

    pl.seed_everything(0, verbose=False)
    plugin = B3Plugin(**OPTIONS)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True,
                                         collate_fn=code_pairs.CodePairCollate())
    make_trainer(tmp_path, [BatchKitCallback([plugin], cache_dir=cache_dir)], max_steps=4).fit(Recording(), loader)
    assert plugin.report["built"] == {"embeddings": False, "clusters": False}  # the fixture's artefacts
    clusters = {frozenset(c) for c in plugin.clusters.tolist()}
    assert len(seen) == 4
    for step in seen:
        batch = step["batch"]
        index = batch["index"].tolist()
        assert {frozenset(index[:32]), frozenset(index[32:])} <= clusters
        assert batch["hard_negatives"].shape == (64, 5) and batch["hard_negative_code_ids"].shape[:2] == (64, 5)
        expected = [train.code_tokens[j] for j in batch["hard_negatives"].reshape(-1).tolist()]
        got = batch["hard_negative_code_ids"].reshape(320, -1)
        assert all(got[r, :len(t)].tolist() == t and not got[r, len(t):].any() for r, t in enumerate(expected))
        # the model's loss scores every query against the batch's 320 hard-negative codes too
        assert step["loss"] > step["loss_without_negatives"]
