"""The ``colm`` plugin: CoLM mini-batch coresets (Nguyen et al., ICLR 2025) on the host's super-batches.

Each micro-batch the DataLoader loads a large batch of B = ``large_batch_factor`` × b samples (the
host's super-batch: ``load_factor``), and the plugin hands ``training_step`` the b of them whose
gradient best matches the large batch's, with every example of the small sources kept::

    θ      = option `param` (default: the last nn.Linear before the output)          setup
    s_i    = the source id of example i (option `source_field`)                       first step on
    g_i    = zeroth_order: z ~ N(0, I) (same z on every rank), c_i = (L_i(θ+εz) − L_i(θ−εz)) / 2ε, g_i = c_i z
             exact:        ∇_θ L_i (torch.func)
    gather (c_i or g_i, s_i) of every rank's large batch          select_across_ranks (scope "global")
    chosen = select_coreset(g, s, world · b)  on rank 0, broadcast   Adam moments, budget, facility location
    every rank trains b of the chosen samples (its own first)
    the Adam moments are made equal on every rank                  one all-reduce of 2|θ| + 1 numbers

With ``scope="rank"`` each rank selects b of its own B samples (no gather, no broadcast); the
moments are still averaged over the ranks, so every rank holds the same state.

With a shared z the features gathered per example are two numbers (c_i and s_i): rank 0 rebuilds
g_i = c_i z itself, so the global selection costs no more communication than a loss gather.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from typing import Callable
from typing import Literal
from typing import Optional
from typing import Sequence
from typing import Union

import torch

from batchkit import Plugin
from batchkit import PluginError
from batchkit import dist
from batchkit import hookimpl
from batchkit.batch import DEFAULT_LOSS_METHOD
from batchkit.batch import check_per_sample_losses
from batchkit.batch import resolve_loss_method
from batchkit.selection import Selection
from batchkit.selection import select_across_ranks

from .adam import AdamNormalizer
from .coreset import DEFAULT_DIMS
from .coreset import select_coreset
from .gradients import DEFAULT_EPS
from .gradients import RandomDirection
from .gradients import directional_derivatives
from .gradients import exact
from .parameter import resolve_parameter

__all__ = ["CoLM", "read_field"]

#: the default batch field holding each example's source id (the text-mixture example's key)
DEFAULT_SOURCE_FIELD = "source"


def read_field(batch: Any, path: str) -> Any:
    """The field of ``batch`` at ``path``: dict keys and sequence positions joined by dots
    (``"source"``, ``"meta.source"``, ``"3"``), the paths of :mod:`batchkit.batch`.

    :raises KeyError: naming the first part of the path that is not there.
    """
    value = batch
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(part)
    return value


def _fields_of(batch: Any, prefix: str = "") -> list[str]:
    """Top two levels of field paths, for error messages."""
    if isinstance(batch, Mapping):
        items = [(str(k), v) for k, v in batch.items()]
    elif isinstance(batch, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(batch)]
    else:
        return [prefix] if prefix else []
    paths = []
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else key
        nested = isinstance(value, Mapping) or (isinstance(value, (list, tuple)) and value and
                                                 isinstance(value[0], (torch.Tensor, Mapping)))
        paths.extend(_fields_of(value, path) if nested and not prefix else [path])
    return paths


class CoLM(Plugin):
    """CoLM: train on a coreset of b examples chosen from a large batch of B = ``large_batch_factor`` × b.

    :param large_batch_factor: B / b, the large batch as a multiple of the batch size b the loader
        was given (the reference: 2). Must be > 1; the host then loads B samples per micro-batch.
    :param estimator: ``"zeroth_order"`` (the paper: two no-grad forwards along a random direction)
        or ``"exact"`` (per-example gradients with torch.func; memory ~ B × |θ| and the per-example
        activations).
    :param param: the parameter whose gradients represent the examples: its name, or a regular
        expression matching exactly one name; default the last ``nn.Linear`` before the output.
    :param eps: ε of the central difference (zeroth order).
    :param redraw: draw a new direction z every step (default) or keep the first (the reference code).
    :param seed: seed of the direction stream (the same on every rank).
    :param dims: coordinates kept per source (top-k of |mean of the normalised estimates|); None: all.
    :param small_sources: source ids kept whole (the reference's ``keep_sources``).
    :param small_threshold: also keep whole every source with at most this many examples in the
        large batch (the global one, or this rank's with ``scope="rank"``).
    :param source_field: where each example's source id is: a field path of the batch (dict keys
        and positions joined by dots, as in :mod:`batchkit.batch`), or, from Python, a callable
        ``batch -> [n]`` integer ids.
    :param scope: ``"global"`` (select over every rank's large batch; default) or ``"rank"``
        (each rank selects from its own).
    :param normalize: Adam-normalise the estimates with tracked moments (the paper); False selects
        on the raw estimates.
    :param adam_betas: (β1, β2) of the Adam normalisation (the reference takes the optimizer's).
    :param adam_eps: ε of the Adam normalisation.
    :param loss_method: the module's per-sample loss method (the per-sample-loss protocol).
    :param chunk_size: examples vectorised at once by ``exact`` (None: all).
    """

    name = "colm"

    def __init__(
        self,
        large_batch_factor: float = 2.0,
        estimator: Literal["zeroth_order", "exact"] = "zeroth_order",
        param: Optional[str] = None,
        eps: float = DEFAULT_EPS,
        redraw: bool = True,
        seed: int = 0,
        dims: Optional[int] = DEFAULT_DIMS,
        small_sources: Sequence[int] = (),
        small_threshold: Optional[int] = None,
        source_field: Union[str, Callable[[Any], Any]] = DEFAULT_SOURCE_FIELD,
        scope: Literal["global", "rank"] = "global",
        normalize: bool = True,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        loss_method: str = DEFAULT_LOSS_METHOD,
        chunk_size: Optional[int] = None,
    ) -> None:
        if not (isinstance(large_batch_factor, (int, float)) and math.isfinite(large_batch_factor)):
            raise ValueError(f"colm: large_batch_factor must be a number > 1 (B / b), got {large_batch_factor!r}")
        if large_batch_factor < 1:
            raise ValueError(f"colm: large_batch_factor={large_batch_factor} makes the large batch B smaller than the "
                             f"batch b it selects from (B < b). Set large_batch_factor: 2 (the paper: B = 2b) or more")
        if large_batch_factor == 1:
            raise ValueError("colm: large_batch_factor=1 makes B = b, so there is nothing to select; set "
                             "large_batch_factor: 2 (the paper) or more, or remove the colm plugin")
        if estimator not in ("zeroth_order", "exact"):
            raise ValueError(f"colm: estimator must be 'zeroth_order' or 'exact', got {estimator!r}")
        if not eps > 0:
            raise ValueError(f"colm: eps must be > 0, got {eps}; the paper uses eps: 0.001")
        if dims is not None and dims < 1:
            raise ValueError(f"colm: dims must be a positive number of coordinates or null (all), got {dims}")
        if small_threshold is not None and small_threshold < 0:
            raise ValueError(f"colm: small_threshold must be >= 0 or null, got {small_threshold}")
        if scope not in ("global", "rank"):
            raise ValueError(f"colm: scope must be 'global' or 'rank', got {scope!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"colm: chunk_size must be >= 1 or null, got {chunk_size}")
        if not (isinstance(source_field, str) and source_field) and not callable(source_field):
            raise ValueError(f"colm: source_field must be a field path of the batch (e.g. 'source') or a callable "
                             f"batch -> source ids, got {source_field!r}")
        self.load_factor = float(large_batch_factor)
        self.estimator = estimator
        self.param = param
        self.eps = float(eps)
        self.dims = dims
        self.small_sources = tuple(int(s) for s in small_sources)
        self.small_threshold = small_threshold
        self.source_field = source_field
        self.scope = scope
        self.loss_method = loss_method
        self.chunk_size = chunk_size
        beta1, beta2 = adam_betas
        try:
            self.normalizer = AdamNormalizer(beta1, beta2, adam_eps) if normalize else None
        except ValueError as err:
            raise ValueError(f"{err}; set adam_betas: [0.9, 0.999] and adam_eps: 1.0e-8 (Adam's defaults)") from None
        self.directions = RandomDirection(seed, redraw)
        self._loss: Callable[[Any], torch.Tensor] | None = None
        self._param_name: str | None = None

    # -- setup: the module offers what CoLM needs ---------------------------------------------

    @hookimpl
    def batchkit_setup(self, module: Any, stage: str) -> None:
        if stage == "fit":
            self._resolve(module)

    def _resolve(self, module: Any) -> None:
        self._loss = resolve_loss_method(self.name, module, self.loss_method)
        try:
            self._param_name = resolve_parameter(module, self.param)
        except ValueError as err:
            raise PluginError(str(err)) from None

    def _theta(self, module: Any) -> torch.Tensor:
        try:
            theta = module.get_parameter(self._param_name)
        except AttributeError:
            raise PluginError(f"colm: option `param` resolved to {self._param_name!r} at setup, but the module "
                              f"{type(module).__name__} no longer has that parameter; set `param` to one of its "
                              f"parameter names") from None
        if theta.numel() == 0 or hasattr(theta, "ds_id"):
            raise PluginError(f"colm: the parameter {self._param_name!r} (option `param`) is partitioned across ranks "
                              f"(DeepSpeed ZeRO stage 3), so no rank can perturb or differentiate it alone. Use "
                              f"ZeRO stage 1 or 2, or DDP")
        return theta

    # -- the batch stage -------------------------------------------------------------------------

    @hookimpl
    def batchkit_transform_batch(self, batch: Any, module: Any, ctx: Any) -> Any:
        if self._loss is None:  # used outside BatchKitCallback's setup
            self._resolve(module)
        spec = ctx.batch_spec
        keep = self._keep_size(ctx)
        n = spec.num_samples(batch)
        sources = self.source_ids(batch, n)
        theta = self._theta(module)
        z = None
        if self.estimator == "zeroth_order":
            z = self.directions.draw(theta.shape)             # one draw per step, the same on every rank
            c = directional_derivatives(self._loss_of(n), module, batch, self._param_name, z, self.eps)
            features = {"c": c, "source": sources.to(c.device)}
        else:                                                 # vmap calls the loss on one example at a time
            g = exact(self._loss_of(1), module, batch, self._param_name, self.chunk_size)
            features = {"g": g, "source": sources.to(g.device)}
        t_before = self.normalizer.t if self.normalizer is not None else 0
        result = self.select(batch, features, z, keep, spec)
        self._synchronise_moments(t_before, theta.numel(), theta.device)
        return result.batch

    def _keep_size(self, ctx: Any) -> int:
        """b, from the host's super-batch plan; a clear error where the host did not build the loader."""
        plan = ctx.super_batch
        if plan is None or self.instance_name not in plan.sizes:
            # Lightning builds the train loader early, before BatchKitCallback wraps it, when
            # configure_optimizers reads trainer.estimated_stepping_batches and max_epochs is set.
            raise PluginError(
                "colm: this batch was not loaded as a large batch (the host's super-batch plan is missing), so there "
                "is nothing to select from. The train DataLoader was built before batchkit could wrap it: Lightning "
                "does that when configure_optimizers reads trainer.estimated_stepping_batches while max_epochs is "
                "set. Train with Trainer(max_epochs=-1, max_steps=N) (then estimated_stepping_batches is max_steps), "
                "or compute the schedule's length without estimated_stepping_batches")
        return plan.keep_size(self)

    def _loss_of(self, n: int) -> Callable[[Any, Any], torch.Tensor]:
        """``(module, batch) -> L_i`` through the module's per-sample loss, its shape checked against
        ``n`` examples (the dtype is kept: the central difference needs every digit)."""
        return lambda module, batch: check_per_sample_losses(self.name, self.loss_method, self._loss(batch), n)

    def source_ids(self, batch: Any, n: int) -> torch.Tensor:
        """s_i of the ``n`` examples: ``[n]`` int64, or a PluginError naming ``source_field``."""
        if callable(self.source_field):
            try:
                ids = self.source_field(batch)
            except Exception as err:  # the user's callable: say where it failed
                raise PluginError(f"colm: the source_field callable failed on the batch: {err!r}") from err
            where = f"source_field callable {getattr(self.source_field, '__name__', self.source_field)!r}"
        else:
            try:
                ids = read_field(batch, self.source_field)
            except KeyError:
                raise PluginError(
                    f"colm: the batch has no field {self.source_field!r} (option `source_field`), so CoLM cannot tell "
                    f"the examples' sources apart. Set source_field to the path of the field holding each example's "
                    f"source id (fields of this batch: {', '.join(_fields_of(batch)) or type(batch).__name__}), or "
                    f"add one to the batch (e.g. a 'source' key in each example's dict)") from None
            where = f"field {self.source_field!r} (option `source_field`)"
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError):
            raise PluginError(f"colm: {where} must give one integer source id per example, got "
                              f"{type(ids).__name__}") from None
        if ids.shape != (n,) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise PluginError(f"colm: {where} must give one integer source id per example ([{n}] integers), got a "
                              f"{ids.dtype} tensor of shape {tuple(ids.shape)}")
        return ids.long()

    def select(self, batch: Any, features: dict[str, torch.Tensor], z: torch.Tensor | None, keep: int,
               spec: Any) -> Selection:
        """The coreset of the (global) large batch, through the host's selection across ranks."""

        def choose(gathered: dict[str, torch.Tensor], k: int) -> torch.Tensor:
            if "c" in gathered:
                c = gathered["c"]
                grads = c[:, None] * z.reshape(1, -1).to(device=c.device, dtype=torch.float32)   # g_i = c_i z
            else:
                grads = gathered["g"]
            return select_coreset(grads, gathered["source"], k, small_sources=self.small_sources,
                                  small_threshold=self.small_threshold, normalizer=self.normalizer, dims=self.dims)

        return select_across_ranks(batch, features, choose, keep, scope=self.scope, spec=spec)

    def _synchronise_moments(self, t_before: int, d: int, device: torch.device) -> None:
        """Every rank ends the step with the same Adam moments: under ``scope="global"`` rank 0's
        (the only rank that selected), under ``scope="rank"`` the mean of the ranks' updates.

        Each rank that updated its moments this step contributes (m_prev, v_prev, 1), the others
        zeros; one all-reduce of 2d + 1 numbers sums them. With a single contributor the result is
        its moments exactly (x + 0 = x, x / 1 = x)."""
        if self.normalizer is None or not dist.is_distributed():
            return
        norm = self.normalizer
        updated = norm.t != t_before
        buffer = torch.zeros(2 * d + 1, device=device, dtype=torch.float32)
        if updated:
            buffer[:d] = norm.m_prev.to(device)
            buffer[d:2 * d] = norm.v_prev.to(device)
            buffer[-1] = 1
        dist.all_reduce(buffer)
        count = float(buffer[-1])
        if count == 0:  # no rank selected a large-source example: the moments stay
            return
        norm.m_prev, norm.v_prev = buffer[:d] / count, buffer[d:2 * d] / count
        norm.t = t_before + 1

    # -- state -------------------------------------------------------------------------------------

    @hookimpl
    def batchkit_state_dict(self) -> dict[str, Any]:
        return {"directions": self.directions.state_dict(),
                "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
                "param": self._param_name}

    @hookimpl
    def batchkit_load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["normalizer"] is None) != (self.normalizer is None):
            raise PluginError(f"colm: the checkpoint was saved with normalize={state['normalizer'] is not None}; "
                              f"set the same to resume")
        if self._param_name is not None and state["param"] not in (None, self._param_name):
            raise PluginError(f"colm: the checkpoint's moments belong to parameter {state['param']!r}, but option "
                              f"`param` now resolves to {self._param_name!r}; set param: {state['param']}")
        self.directions.load_state_dict(state["directions"])
        if self.normalizer is not None:
            try:
                self.normalizer.load_state_dict(state["normalizer"])
            except ValueError as err:  # other Adam hyper-parameters
                raise PluginError(str(err).replace("configure the same values", "set adam_betas and adam_eps to "
                                                   "those values")) from None
        self._param_name = self._param_name or state["param"]
