"""The ``jest`` plugin: JEST joint example selection (Evans et al. 2024) on the host's super-batches.

Each micro-batch is loaded as a super-batch of B = b / (1 - f) examples (``load_factor``; the host
loads it and checks that b come back). Then, for every super-batch:

1. the learner's pair embeddings ``module.pair_embeddings(batch) -> (a, b)`` in the host's
   :func:`~batchkit.batch.scoring_pass` (eval mode, no grad, random streams restored), and the
   frozen reference model's, cached per example by the batch's ``index_field``;
2. the embeddings are the features of :func:`batchkit.selection.select_across_ranks`: with
   ``scope="global"`` (default) they are gathered from every rank, rank 0 builds the pairwise SigLIP
   loss matrices of both models over the global super-batch, ``L[i, j] = -log sigmoid(z_ij (t <a_i,
   b_j> + bias))`` with each model's own t and bias, S from the variant, and draws
   ``world_size * b`` examples with the blocked sampler (:func:`~batchkit_joint_selection.jest.joint_sample`,
   ``n_chunks`` chunks, Gumbel-top-k); the host broadcasts the choice and every rank trains b of
   them (its own first). ``scope="rank"``: the same on each rank's own super-batch, no collective;
3. the variants: ``learnability`` (S = L_learner - L_reference, default), ``hard_learner``
   (S = L_learner, no reference), ``easy_reference`` (S = -L_reference, no learner pass);
   ``selection="independent_topk"`` keeps the b examples of highest per-example learnability
   instead of sampling jointly (the paper's comparison).

The random draw of each selection comes from a generator seeded with (seed, optimizer step,
micro-batch) (and the rank for ``scope="rank"``): nothing to checkpoint for it. The reference
embeddings cache is shared by the ranks (each rank's new rows are gathered every step, so every
rank holds the same cache: Lightning saves callback state from rank 0 only) and saved in
checkpoints, so a resumed run scores with the very numbers the uninterrupted one had.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from typing import Literal
from typing import Optional
from typing import Union

import torch
from torch import nn

from batchkit import Plugin
from batchkit import PluginError
from batchkit import dist
from batchkit import hookimpl
from batchkit.batch import scoring_pass
from batchkit.selection import select_across_ranks
from batchkit_joint_selection._common import load_factor_of
from batchkit_joint_selection._common import required_field
from batchkit_joint_selection._common import step_generator
from batchkit_joint_selection.jest import VARIANTS
from batchkit_joint_selection.jest import independent_topk
from batchkit_joint_selection.jest import joint_sample
from batchkit_joint_selection.jest import learnability_matrix
from batchkit_joint_selection.jest import siglip_pair_losses


__all__ = ["JESTSelection", "check_pair_protocol", "load_reference"]

PROTOCOL = ("pair_embeddings", "siglip_temperature", "siglip_bias")


def check_pair_protocol(plugin: str, model: Any, role: str, fix: str) -> None:
    """Refuse a model without ``pair_embeddings(batch)``, ``siglip_temperature`` and ``siglip_bias``."""
    missing = []
    for attribute in PROTOCOL:
        try:
            value = getattr(model, attribute)
        except AttributeError:
            missing.append(attribute)
            continue
        if attribute == "pair_embeddings" and not callable(value):
            missing.append(attribute)
    if missing:
        raise PluginError(
            f"{plugin}: the {role} ({type(model).__name__}) has no {', '.join(missing)}, which JEST needs to build "
            f"the pairwise SigLIP loss matrix of a super-batch. {fix} The protocol, as in "
            "batchkit_examples.code_pairs.TwoTowerRetrieval:\n"
            "    def pair_embeddings(self, batch):  # -> (a [n, D], b [n, D]): the two towers' embeddings of the n\n"
            "        ...                            #    pairs, normalised as the SigLIP loss sees them\n"
            "    siglip_temperature                 # t, the multiplicative temperature (exp of the learnt log t)\n"
            "    siglip_bias                        # the bias b: logit_ij = t <a_i, b_j> + b"
        )


def load_reference(plugin: str, reference: Any, kwargs: Mapping[str, Any], learner: Any) -> nn.Module:
    """The reference model named by the ``reference`` option (see :class:`JESTSelection`)."""
    if isinstance(reference, nn.Module):
        return reference
    if not isinstance(reference, str) or not reference:
        raise PluginError(
            f"{plugin}: reference must be a model, 'package.module:factory' or a checkpoint path, got {reference!r}"
        )
    path = Path(reference).expanduser()
    if path.is_file():
        return _reference_from_checkpoint(plugin, path, kwargs, learner)
    if ":" not in reference:
        raise PluginError(
            f"{plugin}: reference={reference!r} is neither an existing checkpoint file nor an import path "
            "'package.module:factory'; give the path of the reference model's checkpoint, or a factory that "
            "returns it (a class, a function, or e.g. 'package.module:Model.load_from_checkpoint' with "
            "reference_kwargs: {checkpoint_path: ...})"
        )
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise PluginError(
            f"{plugin}: reference={reference!r} cannot be imported ({type(exc).__name__}: {exc}); give "
            "'package.module:factory' of an installed package, or a checkpoint path"
        ) from None
    if isinstance(target, nn.Module):
        model = target
    elif callable(target):
        try:
            model = target(**dict(kwargs))
        except TypeError as exc:
            raise PluginError(
                f"{plugin}: calling the reference factory {reference!r} with reference_kwargs={dict(kwargs)} failed: "
                f"{exc}; set reference_kwargs to the factory's arguments"
            ) from None
    else:
        raise PluginError(f"{plugin}: reference={reference!r} is a {type(target).__name__}, not a model or a factory")
    if not isinstance(model, nn.Module):
        raise PluginError(
            f"{plugin}: the reference factory {reference!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _reference_from_checkpoint(plugin: str, path: Path, kwargs: Mapping[str, Any], learner: Any) -> nn.Module:
    """A whole pickled model, or a Lightning checkpoint of the learner's own class (the usual JEST
    setting: the reference is the learner's architecture trained on curated data)."""
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(loaded, nn.Module):
        return loaded
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        cls = type(learner)
        loader = getattr(cls, "load_from_checkpoint", None)
        if loader is None:
            raise PluginError(
                f"{plugin}: {path} is a checkpoint (a state dict), and the learner's class {cls.__name__} has no "
                "load_from_checkpoint to rebuild the reference from it; give reference: "
                "'package.module:Class.load_from_checkpoint' with reference_kwargs: {checkpoint_path: ...}"
            )
        try:
            return loader(str(path), map_location="cpu", **dict(kwargs))
        except Exception as exc:  # noqa: BLE001 - whatever the class's loader raises
            raise PluginError(
                f"{plugin}: could not load the reference checkpoint {path} as {cls.__name__} (the learner's class): "
                f"{type(exc).__name__}: {exc}. If the reference is another architecture, give reference: "
                "'package.module:Class.load_from_checkpoint' and reference_kwargs: {checkpoint_path: ...}"
            ) from None
    raise PluginError(
        f"{plugin}: {path} holds a {type(loaded).__name__}, neither a model (torch.save(model)) nor a Lightning "
        "checkpoint; give a checkpoint of the reference model or a factory 'package.module:factory'"
    )


class JESTSelection(Plugin):
    """Keep b of every super-batch of B = b / (1 - f) by JEST's joint selection (module docstring).

    :param reference: the frozen reference model (unused by ``variant="hard_learner"``): a path to a
        checkpoint (a Lightning checkpoint of the learner's own class, or a whole ``torch.save``'d
        model), an import path ``"package.module:factory"`` called with ``reference_kwargs`` (a
        class, a function, or ``"package.module:Model.load_from_checkpoint"``), or, from Python, a
        model. It must offer the same protocol as the learner and embed into as many dimensions.
    :param reference_kwargs: keyword arguments of the factory (or of ``load_from_checkpoint``).
    :param filter_ratio: f, the fraction of each super-batch filtered out, in (0, 1).
    :param n_chunks: chunks of the blocked sampler; the batch drawn (``world_size * b`` with
        ``scope="global"``, b with ``"rank"``) must be a multiple of it.
    :param variant: ``"learnability"``, ``"hard_learner"`` or ``"easy_reference"``.
    :param selection: ``"joint"`` (blocked sampling) or ``"independent_topk"``.
    :param scope: ``"global"`` (over every rank's super-batch) or ``"rank"``.
    :param index_field: the batch field holding each example's dataset index, the key of the
        reference-embedding cache.
    :param cache_reference: cache the reference embeddings per example: N x 2 x D floats for the N
        examples seen, on every rank (ranks share the rows they compute, one ``all_gather_object``
        per step) and in checkpoints; ``False`` runs the reference on every super-batch.
    :param seed: seed of the selection draws.
    """

    name = "jest"
    #: hard_batches trains fixed whole mini-batches ranked by their last loss; a super-batch
    #: selector changes what each of them holds, so its loss table would rank batches never trained.
    conflicts = ("hard_batches",)

    def __init__(
        self,
        reference: Union[str, nn.Module, None] = None,
        reference_kwargs: Optional[dict[str, Any]] = None,
        filter_ratio: float = 0.8,
        n_chunks: int = 16,
        variant: Literal["learnability", "hard_learner", "easy_reference"] = "learnability",
        selection: Literal["joint", "independent_topk"] = "joint",
        scope: Literal["global", "rank"] = "global",
        index_field: str = "index",
        cache_reference: bool = True,
        seed: int = 0,
    ) -> None:
        self.load_factor = load_factor_of(self.name, filter_ratio)
        self.filter_ratio = float(filter_ratio)
        if variant not in VARIANTS:
            raise ValueError(f"jest: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if selection not in ("joint", "independent_topk"):
            raise ValueError(f"jest: selection must be 'joint' or 'independent_topk', got {selection!r}")
        if scope not in ("global", "rank"):
            raise ValueError(
                f"jest: scope must be 'global' (select over every rank's super-batch) or 'rank', got {scope!r}")
        if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f"jest: n_chunks must be a positive integer, got {n_chunks!r}; the paper uses 16")
        if variant != "hard_learner" and reference is None:
            raise ValueError(
                f"jest: variant {variant!r} scores with a reference model; set reference to its checkpoint path or "
                "to 'package.module:factory' (e.g. reference: runs/code_pairs_reference/reference.ckpt), or use "
                "variant: hard_learner, which needs none"
            )
        if reference_kwargs is not None and not isinstance(reference_kwargs, Mapping):
            raise ValueError(f"jest: reference_kwargs must be a mapping of keyword arguments, got {reference_kwargs!r}")
        self.reference_spec = reference
        self.reference_kwargs = dict(reference_kwargs or {})
        self.n_chunks = n_chunks
        self.variant = variant
        self.selection = selection
        self.scope = scope
        self.index_field = index_field
        self.cache_reference = bool(cache_reference)
        self.seed = int(seed)
        self.reference: Optional[nn.Module] = None
        self._reference_scale: tuple[float, float] = (0.0, 0.0)  # (t, bias) of the frozen reference
        # the reference-embedding cache: rows [capacity, 2, D] by dataset index, and which are known
        self._cache_rows: Optional[torch.Tensor] = None
        self._cache_known: Optional[torch.Tensor] = None
        self._dims_checked = False
        #: selections made and samples scored (per rank, the same on every rank), reference rows
        #: computed (by all ranks together); the same on every rank, as the checkpoint needs
        self.selections = 0
        self.scored_samples = 0
        self.reference_rows_computed = 0
        #: S of the last selection made on this rank (rank 0 with scope "global"), for inspection
        self.last_scores: Optional[torch.Tensor] = None
        #: the last selection's chosen indices into the gathered super-batch (rank r's example i is
        #: r * n + i), in draw order; with scope "global" the same on every rank
        self.last_chosen: Optional[torch.Tensor] = None

    @property
    def uses_learner(self) -> bool:
        return self.variant != "easy_reference"

    @property
    def uses_reference(self) -> bool:
        return self.variant != "hard_learner"

    # -- setup ----------------------------------------------------------------------------------

    @hookimpl
    def batchkit_setup(self, module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.uses_learner:
            check_pair_protocol(self.name, module, "learner module", "Add them to the LightningModule.")
        if self.uses_reference and self.reference is None:
            reference = load_reference(self.name, self.reference_spec, self.reference_kwargs, module)
            if reference is module:
                raise PluginError(
                    "jest: the reference is the learner itself, so S = L_learner - L_reference would be zero and the "
                    "selection uniform; give a separately trained, frozen reference model"
                )
            check_pair_protocol(self.name, reference, "reference model",
                                f"Point reference (now {self.reference_spec!r}) at a model that has them.")
            self.reference = reference.eval().requires_grad_(False)
        if self.reference is not None:
            with torch.no_grad():
                self._reference_scale = (float(self.reference.siglip_temperature), float(self.reference.siglip_bias))

    @hookimpl
    def batchkit_fit_start(self, ctx: Any) -> None:
        if self.reference is not None:
            self.reference = self.reference.to(ctx.device).eval().requires_grad_(False)
        if self._cache_rows is not None:
            self._cache_rows = self._cache_rows.to(ctx.device)
            self._cache_known = self._cache_known.to(ctx.device)
        plan = ctx.super_batch
        if plan is None or self.instance_name not in plan.sizes:
            return  # checked again at the first batch, with the error
        keep = plan.keep_size(self)
        drawn = keep * (ctx.world_size if self.scope == "global" else 1)
        if self.selection == "joint" and drawn % self.n_chunks:
            divisors = [d for d in range(1, drawn + 1) if drawn % d == 0]
            near = sorted({max(d for d in divisors if d <= self.n_chunks),
                           min((d for d in divisors if d >= self.n_chunks), default=drawn)})
            where = f"{keep} per rank x {ctx.world_size} ranks with scope 'global'" if self.scope == "global" \
                and ctx.world_size > 1 else "the batch size"
            raise PluginError(
                f"jest: the batch JEST draws, b = {drawn} ({where}), is not divisible by n_chunks = {self.n_chunks}; "
                f"each chunk draws b / n_chunks examples. Set n_chunks to a divisor of {drawn} (nearest: "
                f"{' or '.join(map(str, near))}) or make the batch size a multiple of {self.n_chunks}"
            )

    # -- state ----------------------------------------------------------------------------------

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        cache = None
        if self._cache_known is not None:
            ids = self._cache_known.nonzero().flatten()
            cache = {"ids": ids.cpu(), "rows": self._cache_rows[ids].cpu()}
        return {"selections": self.selections, "scored_samples": self.scored_samples,
                "reference_rows_computed": self.reference_rows_computed, "reference_cache": cache}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        self.selections = int(state["selections"])
        self.scored_samples = int(state["scored_samples"])
        self.reference_rows_computed = int(state["reference_rows_computed"])
        cache = state.get("reference_cache")
        self._cache_rows = self._cache_known = None
        if cache is not None and len(cache["ids"]):
            ids, rows = cache["ids"].long(), cache["rows"].float()
            self._grow(int(ids.max()) + 1, rows.shape[-1], rows.device)
            self._cache_rows[ids] = rows
            self._cache_known[ids] = True

    # -- scoring --------------------------------------------------------------------------------

    def learnability_scores(self, features: Mapping[str, torch.Tensor],
                            learner_scale: tuple[float, float]) -> torch.Tensor:
        """S over the (gathered) super-batch, from the two models' pairwise SigLIP loss matrices."""
        learner = reference = None
        if self.uses_learner:
            learner = siglip_pair_losses(features["learner_a"], features["learner_b"], *learner_scale)
        if self.uses_reference:
            reference = siglip_pair_losses(features["reference_a"], features["reference_b"], *self._reference_scale)
        return learnability_matrix(learner, reference, self.variant)

    def _embeddings(self, model: Any, batch: Any, n: int, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.pair_embeddings(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise PluginError(
                f"jest: the {role}'s pair_embeddings(batch) must return a pair of tensors (a, b), got "
                f"{type(out).__name__}"
            )
        a, b = out
        if a.dim() != 2 or a.shape != b.shape or a.shape[0] != n:
            raise PluginError(
                f"jest: the {role}'s pair_embeddings(batch) returned shapes {tuple(a.shape)} and {tuple(b.shape)} "
                f"for a batch of {n} examples; return two [{n}, D] tensors, one row per example"
            )
        return a.detach().float(), b.detach().float()

    def _grow(self, capacity: int, dim: int, device: Any) -> None:
        if self._cache_rows is not None and self._cache_rows.shape[0] >= capacity:
            return
        size = max(capacity, 2 * (self._cache_rows.shape[0] if self._cache_rows is not None else 0), 64)
        rows = torch.zeros(size, 2, dim, device=device)
        known = torch.zeros(size, dtype=torch.bool, device=device)
        if self._cache_rows is not None:
            old = self._cache_rows.shape[0]
            rows[:old] = self._cache_rows.to(device)
            known[:old] = self._cache_known.to(device)
        self._cache_rows, self._cache_known = rows, known

    def _reference_embeddings(self, batch: Any, spec: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.reference is not None
        if not self.cache_reference:
            with torch.no_grad():
                self.reference_rows_computed += n * dist.get_world_size()  # every rank runs it on its n
                return self._embeddings(self.reference, batch, n, "reference model")
        ids = required_field(
            self.name, batch, self.index_field, "index_field",
            "each example's dataset index (the reference cache's key)",
            "Set index_field to the field that holds it, or cache_reference: false to run the reference on every "
            "super-batch.")
        ids = torch.as_tensor(ids).long().flatten()
        if ids.shape[0] != n or (n and int(ids.min()) < 0):
            raise PluginError(
                f"jest: index_field {self.index_field!r} must hold one non-negative dataset index per example "
                f"({n}), got shape {tuple(ids.shape)}; point index_field at the right field or set "
                "cache_reference: false"
            )
        device = ids.device
        if self._cache_known is not None:
            self._cache_known = self._cache_known.to(device)
            self._cache_rows = self._cache_rows.to(device)
        known = torch.zeros(n, dtype=torch.bool, device=device)
        if self._cache_known is not None:
            inside = ids < self._cache_known.shape[0]
            known[inside] = self._cache_known[ids[inside]]
        missing = (~known).nonzero().flatten()
        new_ids, new_rows = ids[missing], None
        if missing.numel():
            part = batch if missing.numel() == n else spec.select(batch, missing)
            with torch.no_grad():
                a, b = self._embeddings(self.reference, part, missing.numel(), "reference model")
            new_rows = torch.stack([a, b], dim=1)
        if dist.is_distributed():
            # Every rank keeps every rank's rows, so the cache (and the state rank 0 saves in the
            # checkpoint) is the same on all ranks and a resumed rank scores with the same numbers.
            parts = dist.all_gather_object((new_ids.cpu(), None if new_rows is None else new_rows.cpu()))
            parts = [(i, r) for i, r in parts if r is not None]
        else:
            parts = [(new_ids, new_rows)] if new_rows is not None else []
        for part_ids, part_rows in parts:
            part_ids = part_ids.to(device)
            self._grow(int(part_ids.max()) + 1, part_rows.shape[-1], device)
            self._cache_rows[part_ids] = part_rows.to(device)
            self._cache_known[part_ids] = True
            self.reference_rows_computed += part_ids.numel()
        rows = self._cache_rows[ids]
        return rows[:, 0], rows[:, 1]

    # -- selection ------------------------------------------------------------------------------

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, module: Any, ctx: Any) -> Any:
        plan = ctx.super_batch
        if plan is None or self.instance_name not in plan.sizes:
            raise PluginError(
                "jest: the host did not plan a super-batch for this plugin (ctx.super_batch); jest runs inside "
                "BatchKitCallback on a map-style train DataLoader, which the host rebuilds to load B = b / (1 - f)"
            )
        if self.uses_reference and self.reference is None:  # used outside BatchKitCallback's setup
            self.batchkit_setup(module, "fit")
        spec = ctx.batch_spec
        keep = plan.keep_size(self)
        n = spec.num_samples(batch)
        features: dict[str, torch.Tensor] = {}
        learner_scale = (0.0, 0.0)
        if self.uses_learner:
            with scoring_pass(module):
                features["learner_a"], features["learner_b"] = self._embeddings(module, batch, n, "learner")
                learner_scale = (float(module.siglip_temperature), float(module.siglip_bias))
        if self.uses_reference:
            features["reference_a"], features["reference_b"] = self._reference_embeddings(batch, spec, n)
        if not self._dims_checked and self.uses_learner and self.uses_reference:
            learner_dim, reference_dim = features["learner_a"].shape[1], features["reference_a"].shape[1]
            if learner_dim != reference_dim:
                raise PluginError(
                    f"jest: the reference model embeds into {reference_dim} dimensions but the learner into "
                    f"{learner_dim}; JEST's reference is the learner's architecture trained on curated data. Point "
                    f"reference (now {self.reference_spec!r}) at a model with the learner's embedding size"
                )
        self._dims_checked = True
        local = self.scope == "rank" and ctx.world_size > 1
        draw = (self.seed, ctx.global_step, ctx.micro_step) + ((ctx.rank,) if local else ())

        def choose(gathered: dict[str, torch.Tensor], k: int) -> torch.Tensor:
            scores = self.learnability_scores(gathered, learner_scale)
            if self.selection == "joint":
                chosen = joint_sample(scores, k, n_chunks=self.n_chunks, generator=step_generator(*draw))
            else:
                chosen = independent_topk(scores, k)
            self.last_scores = scores
            if ctx.logs_this_step:
                block = scores[chosen][:, chosen]
                self.log("learnability_selected", float(block.mean()))
                self.log("learnability_super_batch", float(scores.mean()))
            return chosen

        result = select_across_ranks(batch, features, choose, keep, scope=self.scope, spec=spec)
        self.last_chosen = result.chosen
        self.selections += 1
        self.scored_samples += n
        return result.batch

    @hookimpl
    def batchkit_epoch_end(self) -> None:
        if self.selections:
            self.log("reference_rows_computed", self.reference_rows_computed)
