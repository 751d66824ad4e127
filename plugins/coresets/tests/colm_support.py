"""Test support shared by the colm tests and their 2-process job: a CoLM that records every
selection, and a replay of the selections from the records alone."""

from __future__ import annotations

import copy
from typing import Any

import torch

from batchkit_coresets import AdamNormalizer
from batchkit_coresets import CoLM
from batchkit_coresets import RandomDirection
from batchkit_coresets import select_coreset


class RecordingCoLM(CoLM):
    """CoLM that records, per step, this rank's large batch (dataset indices, source ids, estimates),
    the global choice and what the rank trains."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def select(self, batch: Any, features: dict[str, torch.Tensor], z: Any, keep: int, spec: Any) -> Any:
        result = super().select(batch, features, z, keep, spec)
        self.records.append({
            "super_ids": batch["index"].tolist() if "index" in batch else None,
            "sources": features["source"].tolist(),
            "features": (features["c"] if "c" in features else features["g"]).tolist(),
            "chosen": result.chosen.tolist(),
            "assigned": result.assigned.tolist(),
            "trained_ids": result.batch["index"].tolist() if "index" in batch else None,
        })
        return result


def replay_global(ranks: list[list[dict[str, Any]]], keep: int, shape: tuple[int, ...] | None, *, seed: int = 0,
                  small_sources: tuple[int, ...] = (), dims: int | None = None) -> tuple[list[list[int]], AdamNormalizer]:
    """The global choice of every step recomputed from the ranks' records: gather (concatenate in
    rank order), rebuild g = c z with the same direction stream (``shape``: θ's; None for exact
    estimates), select_coreset over world * keep with one normaliser. Returns the choices and the
    normaliser."""
    directions, normalizer = RandomDirection(seed), AdamNormalizer()
    choices = []
    for step in range(len(ranks[0])):
        features = torch.cat([torch.tensor(r[step]["features"], dtype=torch.float32) for r in ranks])
        sources = torch.cat([torch.tensor(r[step]["sources"]) for r in ranks])
        if shape is not None:
            features = features[:, None] * directions.draw(shape).reshape(1, -1)
        choices.append(select_coreset(features, sources, len(ranks) * keep, small_sources=small_sources,
                                      normalizer=normalizer, dims=dims).tolist())
    return choices, normalizer


def replay_per_rank(ranks: list[list[dict[str, Any]]], keep: int, shape: tuple[int, ...], *, seed: int = 0,
                    small_sources: tuple[int, ...] = (), dims: int | None = None) -> tuple[list[list[list[int]]], AdamNormalizer]:
    """``scope="rank"``: each rank selects ``keep`` of its own large batch from the shared moments;
    afterwards the moments are the mean of the ranks' updated moments."""
    directions, shared = RandomDirection(seed), AdamNormalizer()
    choices = []
    for step in range(len(ranks[0])):
        z = directions.draw(shape).reshape(1, -1)
        updated, picks = [], []
        for r in ranks:
            local = copy.deepcopy(shared)
            g = torch.tensor(r[step]["features"], dtype=torch.float32)[:, None] * z
            picks.append(select_coreset(g, torch.tensor(r[step]["sources"]), keep, small_sources=small_sources,
                                        normalizer=local, dims=dims).tolist())
            if local.t != shared.t:
                updated.append(local)
        if updated:
            shared.m_prev = sum(u.m_prev for u in updated) / len(updated)
            shared.v_prev = sum(u.v_prev for u in updated) / len(updated)
            shared.t += 1
        choices.append(picks)
    return choices, shared
