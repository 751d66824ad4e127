"""The ``cabs`` plugin: CABS concept-aware batch sampling (Ghosh et al. 2026) on the host's super-batches.

Each micro-batch is loaded as a super-batch of B = b / (1 - f) examples (``load_factor``), and b of
them are kept by their concept labels alone, on the CPU, with no model involved:

* ``variant="dm"`` (diversity maximisation, default): with ``scope="global"`` the concept lists of
  every rank's super-batch are gathered (``batchkit.dist.all_gather_object``), every rank builds the
  same concept table and targets for the global batch of ``world_size * b``, and each rank keeps b
  of its own examples by the greedy of :func:`~batchkit_joint_selection.cabs.cabs_dm_rank` (the
  paper's gain, this rank's counts, the per-GPU cap ``max_freq``, a seeded random fill when no
  finite gain is left). ``scope="rank"``: table and targets from this rank's super-batch only.
* ``variant="fm"`` (frequency maximisation): each rank keeps its b examples with the most concept
  entries (per GPU, as in the released code).

The plugin runs first in the batch chain (``order = -100``), so other batch-stage plugins (a
scoring pass, another selector) only ever see the b examples it kept. The random fill of each
selection comes from a generator seeded with (seed, optimizer step, micro-batch, rank): nothing to
checkpoint for it; the counters behind the metrics are checkpointed.

Concepts come from the batch: the field ``concepts_field`` (default ``"concepts"``: one list of
concept names per example, the key of the code-pairs example), or ``concepts_fn(batch)`` returning
one list per example (a callable from Python, or ``"package.module:function"`` in YAML). A ``[n, C]``
tensor is read as multi-hot (integer counts repeat a concept), a ``[n]`` tensor as one concept id per
example (class labels, say).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any
from typing import Callable
from typing import Literal
from typing import Union

import torch

from batchkit import Plugin
from batchkit import PluginError
from batchkit import dist
from batchkit import hookimpl
from batchkit_joint_selection._common import load_factor_of
from batchkit_joint_selection._common import required_field
from batchkit_joint_selection._common import step_generator
from batchkit_joint_selection.cabs import cabs_dm_rank
from batchkit_joint_selection.cabs import cabs_fm


__all__ = ["CABSSelection", "concept_lists"]

ConceptsFn = Callable[[Any], Sequence[Sequence[Any]]]


def concept_lists(plugin: str, value: Any, n: int, source: str) -> list[list[Any]]:
    """One list of concepts per example from a batch field or a ``concepts_fn`` result."""
    if isinstance(value, torch.Tensor):
        if value.dim() not in (1, 2) or value.shape[0] != n:
            raise PluginError(
                f"{plugin}: {source} is a tensor of shape {tuple(value.shape)}; a concept tensor must be [n = {n}] "
                f"(one concept id per example, e.g. class labels) or [n = {n}, C] multi-hot (or counts)"
            )
        rows = value.detach().cpu()
        if rows.dim() == 1:
            return [[v] for v in rows.tolist()]
        if rows.dtype == torch.bool or rows.is_floating_point():
            return [r.nonzero().flatten().tolist() for r in rows]
        return [torch.repeat_interleave(torch.arange(rows.shape[1]), r.clamp(min=0)).tolist() for r in rows]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise PluginError(
            f"{plugin}: {source} must hold one list of concept names per example, got {type(value).__name__}"
        )
    if len(value) != n:
        raise PluginError(
            f"{plugin}: {source} has {len(value)} entries but the super-batch has {n} examples; give one list of "
            "concepts per example"
        )
    return [list(c) if not isinstance(c, (str, bytes)) else c for c in value]  # a bare string is refused below


def _import_function(plugin: str, path: str) -> ConceptsFn:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{plugin}: concepts_fn must be a callable or 'package.module:function', got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{plugin}: concepts_fn={path!r} cannot be imported ({type(exc).__name__}: {exc})") from None
    if not callable(target):
        raise ValueError(f"{plugin}: concepts_fn={path!r} is a {type(target).__name__}, not a function")
    return target


class CABSSelection(Plugin):
    """Keep b of every super-batch of B = b / (1 - f) by CABS-DM or CABS-FM (module docstring).

    :param variant: ``"dm"`` (diversity maximisation) or ``"fm"`` (most concepts).
    :param filter_ratio: f, the fraction of each super-batch filtered out, in (0, 1).
    :param max_freq: CABS-DM's per-GPU frequency cap (the paper's 10).
    :param min_per_concept: CABS-DM's least target per concept.
    :param concepts_field: the batch field with one list of concepts per example.
    :param concepts_fn: instead of the field, a callable ``batch -> list of concept lists`` (or its
        import path ``"package.module:function"``).
    :param scope: CABS-DM's concept table and targets over every rank's super-batch (``"global"``,
        the paper's) or this rank's only (``"rank"``, no collective). CABS-FM is always per rank.
    :param seed: seed of CABS-DM's random fill.
    """

    name = "cabs"
    #: first in the batch chain: selection on labels before any per-example model work
    order = -100
    #: hard_batches trains fixed whole mini-batches ranked by their last loss; a super-batch
    #: selector changes what each of them holds, so its loss table would rank batches never trained.
    conflicts = ("hard_batches",)

    def __init__(
        self,
        variant: Literal["dm", "fm"] = "dm",
        filter_ratio: float = 0.8,
        max_freq: int = 10,
        min_per_concept: int = 1,
        concepts_field: str = "concepts",
        concepts_fn: Union[str, ConceptsFn, None] = None,
        scope: Literal["global", "rank"] = "global",
        seed: int = 0,
    ) -> None:
        self.load_factor = load_factor_of(self.name, filter_ratio)
        self.filter_ratio = float(filter_ratio)
        if variant not in ("dm", "fm"):
            raise ValueError(
                f"cabs: variant must be 'dm' (diversity maximisation) or 'fm' (most concepts), got {variant!r}")
        if scope not in ("global", "rank"):
            raise ValueError(f"cabs: scope must be 'global' or 'rank', got {scope!r}")
        if isinstance(max_freq, bool) or not isinstance(max_freq, int) or max_freq < 1:
            raise ValueError(
                f"cabs: max_freq (the per-GPU frequency cap) must be an integer >= 1, got {max_freq!r}; "
                "the paper uses 10")
        if isinstance(min_per_concept, bool) or not isinstance(min_per_concept, int) \
                or not 1 <= min_per_concept <= max_freq:
            raise ValueError(
                f"cabs: min_per_concept must be an integer in [1, max_freq = {max_freq}], got {min_per_concept!r}")
        self.variant = variant
        self.max_freq = max_freq
        self.min_per_concept = min_per_concept
        self.concepts_field = concepts_field
        self.concepts_fn: ConceptsFn | None = _import_function(self.name, concepts_fn) if isinstance(concepts_fn, str) \
            else concepts_fn
        if self.concepts_fn is not None and not callable(self.concepts_fn):
            raise ValueError(f"cabs: concepts_fn must be a callable or 'package.module:function', got {concepts_fn!r}")
        self.scope = scope
        self.seed = int(seed)
        #: picks made by the greedy, by the random fill, from over-cap examples; selections made (this rank)
        self.greedy = 0
        self.random_fill = 0
        self.over_cap = 0
        self.selections = 0

    # -- state: the draws need none (seeded per selection), the counters behind the metrics do ----

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, int]:
        return {"greedy": self.greedy, "random_fill": self.random_fill, "over_cap": self.over_cap,
                "selections": self.selections}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, int]) -> None:
        self.greedy = int(state["greedy"])
        self.random_fill = int(state["random_fill"])
        self.over_cap = int(state["over_cap"])
        self.selections = int(state["selections"])

    # -- selection ------------------------------------------------------------------------------

    def concepts_of(self, batch: Any, n: int) -> list[list[Any]]:
        """The super-batch's concepts, one list per example."""
        if self.concepts_fn is not None:
            return concept_lists(self.name, self.concepts_fn(batch), n, "concepts_fn(batch)")
        value = required_field(
            self.name, batch, self.concepts_field, "concepts_field", "each example's list of concepts",
            "Put one list of concept names per example in the batch under that key (the code-pairs example's "
            "collate does, as 'concepts'), point concepts_field at the field that has them, or give concepts_fn "
            "(a callable batch -> list of concept lists; in YAML 'package.module:function').")
        return concept_lists(self.name, value, n, f"the field {self.concepts_field!r}")

    def _check_some_concepts(self, per_rank: list[list[list[Any]]]) -> None:
        """At the run's first selection, refuse a super-batch in which no example has a concept: the
        field or ``concepts_fn`` is almost surely the wrong one, and selection would silently be
        random (DM's fill) or the first b (FM). Later such super-batches are data: DM fills them at
        random, which ``greedy_share`` shows."""
        if self.selections or any(c for rank in per_rank for c in rank):
            return
        source = "concepts_fn(batch)" if self.concepts_fn is not None else f"the field {self.concepts_field!r}"
        raise PluginError(
            f"cabs: no example of the first super-batch has any concept ({source} gave "
            f"{sum(map(len, per_rank))} empty lists), so CABS-{self.variant.upper()} would select without "
            "concepts. Point concepts_field at the field that holds each example's concept names, or make "
            "concepts_fn return them"
        )

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, ctx: Any) -> Any:
        plan = ctx.super_batch
        if plan is None or self.instance_name not in plan.sizes:
            raise PluginError(
                "cabs: the host did not plan a super-batch for this plugin (ctx.super_batch); cabs runs inside "
                "BatchKitCallback on a map-style train DataLoader, which the host rebuilds to load B = b / (1 - f)"
            )
        spec = ctx.batch_spec
        keep = plan.keep_size(self)
        n = spec.num_samples(batch)
        concepts = self.concepts_of(batch, n)
        if self.variant == "fm":
            self._check_some_concepts([concepts])
            chosen = cabs_fm(concepts, keep)
            self.greedy += keep
        else:
            if self.scope == "global" and dist.is_distributed():
                per_rank, rank = dist.all_gather_object(concepts), dist.get_rank()
            else:
                per_rank, rank = [concepts], 0
            self._check_some_concepts(per_rank)  # on what every rank gathered: all ranks raise together
            picked = cabs_dm_rank(per_rank, rank, keep * len(per_rank), max_freq=self.max_freq,
                                  min_per_concept=self.min_per_concept,
                                  generator=step_generator(self.seed, ctx.global_step, ctx.micro_step, ctx.rank))
            chosen = picked.indices
            self.greedy += picked.greedy
            self.random_fill += picked.random_fill
            self.over_cap += picked.over_cap
        self.selections += 1
        if ctx.logs_this_step and self.variant == "dm":
            self.log("greedy_share", self.greedy / max(1, self.greedy + self.random_fill + self.over_cap))
        return spec.select(batch, chosen)

    @hookimpl
    def batchkit_epoch_end(self) -> None:
        picks = self.greedy + self.random_fill + self.over_cap
        if picks:
            self.log("greedy_share_total", self.greedy / picks, reduce="mean")
