"""The on-disk artefact cache for offline data preparation (mining, teacher embeddings, indexes).

A plugin builds an artefact once in :func:`batchkit.hookspecs.batchkit_prepare_data` and keeps only
its key in its state, so checkpoints stay small and a second run (or a resumed one) loads the
artefact instead of rebuilding it::

    key = cache.key("b3-clusters", dataset_texts, teacher_name, {"p": 30, "m": 100, "K": 32})
    clusters = cache.get_or_create(key, lambda: mine(...))   # rank 0 builds, every rank loads

The key is a fingerprint of everything the artefact depends on: change the data, the teacher or an
option and the key changes, so a stale artefact is never used. The cache lives in
``$BATCHKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/batchkit``, else ``~/.cache/batchkit``, unless the
callback is given a ``cache_dir``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from typing import Callable

import torch

from batchkit import dist
from batchkit.errors import PluginError


def default_cache_dir() -> Path:
    explicit = os.environ.get("BATCHKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchkit"


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of ``parts``: numbers, strings, bytes, None, lists/tuples, dicts (key
    order ignored), dataclasses, tensors and numpy arrays (dtype, shape and contents). Anything else
    is refused rather than hashed by its ``repr`` (which may hold a memory address)."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if value is None or isinstance(value, (bool, int, float, str)):
        digest.update(b"J" + json.dumps(value).encode())
    elif isinstance(value, bytes):
        digest.update(b"B%d:" % len(value) + value)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif type(value).__module__ == "numpy" and hasattr(value, "tobytes"):
        digest.update(f"N{value.dtype}{value.shape}".encode() + value.tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"D%d" % len(value))
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(b"L%d" % len(value))
        for item in value:
            _feed(digest, item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(digest, type(value).__qualname__)
        _feed(digest, dataclasses.asdict(value))
    else:
        raise PluginError(
            f"batchkit: cannot fingerprint a {type(value).__name__}; pass what the artefact depends on as numbers, "
            "strings, bytes, tensors, arrays, lists or dicts (e.g. a dataset's texts or a model's name and version)"
        )


class ArtifactCache:
    """Artefacts on disk, one file per key, written atomically (a crash never leaves half a file)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def key(self, name: str, *parts: Any) -> str:
        """``name-<fingerprint of parts>``: the key of an artefact called ``name`` built from ``parts``."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise PluginError(f"batchkit: artefact name {name!r} must be letters, digits, '_', '.' or '-'")
        return f"{name}-{fingerprint(*parts)[:24]}"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, artefact: Any) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(artefact, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, key: str) -> Any:
        path = self.path(key)
        if not path.is_file():
            raise PluginError(
                f"batchkit: artefact {key!r} is not in the cache {self.root}; it is rebuilt by the plugin's "
                "prepare-data step (run the job again, or `batchkit prepare --config ...`), or point "
                "BATCHKIT_CACHE_DIR at the cache the run used"
            )
        return torch.load(path, map_location="cpu", weights_only=False)

    def get_or_create(self, key: str, build: Callable[[], Any]) -> Any:
        """The artefact ``key``: loaded if cached, else built by rank 0 and saved while the other
        ranks wait, then loaded on every rank. Call it on every rank (it holds a barrier)."""
        failure: str | None = None
        if dist.get_rank() == 0 and not self.exists(key):
            try:
                self.save(key, build())
            except Exception as exc:
                if not dist.is_distributed():
                    raise
                failure = f"{type(exc).__name__}: {exc}"
                error = exc
        # Tell every rank how it went, so a failed build ends all ranks with its error, none left waiting.
        failure = dist.broadcast_object(failure)
        if failure is not None:
            if dist.get_rank() == 0:
                raise error
            raise PluginError(f"batchkit: rank 0 failed to build artefact {key!r}: {failure}")
        return self.load(key)
