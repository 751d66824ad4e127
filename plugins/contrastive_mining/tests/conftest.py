from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def artefact_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty artefact cache (2-process jobs inherit it through the environment)."""
    cache = tmp_path / "batchkit-cache"
    monkeypatch.setenv("BATCHKIT_CACHE_DIR", str(cache))
    return cache
