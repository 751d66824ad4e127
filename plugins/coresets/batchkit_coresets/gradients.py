"""Per-example gradient estimates g_i on one parameter θ (see :mod:`.parameter`).

The model is given as a function ``loss_fn(module, batch) -> [n]`` of per-example losses L_i, so
any batch layout and any loss works (a LightningModule's ``per_sample_loss`` is
``lambda m, b: m.per_sample_loss(b)``). Both estimators run inside the host's
:func:`batchkit.batch.scoring_pass`: every submodule in eval mode (dropout off, BatchNorm on its
running statistics), each one's own training flag, the parameters' ``.grad`` and the random streams
restored afterwards, and (zeroth order) θ copied back bit for bit; neither changes the module's
parameters or buffers.

**zeroth_order** (CoLM, after MeZO): two forward passes, no backward::

    z ~ N(0, I)  of θ's shape                                   (RandomDirection)
    c_i = (L_i(θ + εz) − L_i(θ − εz)) / (2ε),   ε = 1e-3        (directional_derivatives)
    g_i = c_i · z                                                (zeroth_order)

c_i estimates the directional derivative <∇_θ L_i, z> (error O(ε²)), so g_i is the projection of
the true gradient on z, scaled by |z|²: an unbiased estimate of ∇_θ L_i over z, since E[z zᵀ] = I.

**exact**: ∇_θ L_i for every i with ``torch.func`` (``vmap`` over ``grad``), one backward's worth of
work per example through the whole network: for models where the n × |θ| result and the per-example
activations fit in memory.
"""

from __future__ import annotations

from typing import Any
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.func import grad
from torch.func import vmap

from batchkit.batch import scoring_pass

#: ``(module, batch) -> per-example losses [n]``
LossFn = Callable[[nn.Module, Any], torch.Tensor]

#: the paper's perturbation size (MeZO's ``eps``)
DEFAULT_EPS = 1e-3


class RandomDirection:
    """The perturbation directions z ~ N(0, I) of :func:`zeroth_order`, drawn on the CPU in float32
    from a seeded generator, so every rank with the same ``seed`` draws the same z.

    ``redraw=True`` (default): a new z at every :meth:`draw` (MeZO's choice). ``redraw=False``: the
    same z every time (what CoLM's reference code does: it seeds once in ``__init__``).

    Why redrawing is the default: with a fixed z every estimate g_i = c_i z lies on the one line
    spanned by z, so the examples differ only by the scalar c_i, one random projection of their
    gradients. Adam normalisation maps the line to a curve (per coordinate, a monotone function of
    c_i), so the coreset is chosen on one random directional derivative for the whole of training,
    and what that one projection cannot see (most of the gradient) never influences selection.
    Redrawing keeps each step's choice on one projection too, but a different one each step, so
    over training the selection sees every direction, and the Adam moments m, v average estimates
    along many directions (E[g_i] = ∇L_i over z) rather than rescaling a single one.

    The stream is checkpointed (:meth:`state_dict`), so a resumed run draws what the uninterrupted
    one would have.
    """

    def __init__(self, seed: int = 0, redraw: bool = True) -> None:
        self.seed = int(seed)
        self.redraw = bool(redraw)
        self._generator = torch.Generator().manual_seed(self.seed)

    def draw(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """z ~ N(0, I) of ``shape`` (float32, CPU): the next one, or the fixed one."""
        if not self.redraw:
            return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed))
        return torch.randn(shape, generator=self._generator)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "redraw": self.redraw, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.redraw = int(state["seed"]), bool(state["redraw"])
        self._generator.set_state(state["generator"])


def directional_derivatives(loss_fn: LossFn, module: nn.Module, batch: Any, param_name: str, z: torch.Tensor,
                            eps: float = DEFAULT_EPS) -> torch.Tensor:
    """c_i = (L_i(θ + εz) − L_i(θ − εz)) / (2ε) for every example i of ``batch``: ``[n]`` float32.

    θ is the parameter ``param_name`` of ``module``; z has θ's shape (any dtype and device: it is
    cast to θ's). The scoring pass copies θ back afterwards, bit for bit, also if ``loss_fn``
    raises. In low precision (bf16, fp16) the perturbation actually applied is the rounded
    θ ± εz, so c_i is noisier (as in the reference code, which runs fp16).
    """
    theta = module.get_parameter(param_name)
    if z.shape != theta.shape:
        raise ValueError(f"colm: direction z has shape {tuple(z.shape)}, parameter {param_name!r} has "
                         f"{tuple(theta.shape)}")
    step = eps * z.to(device=theta.device, dtype=theta.dtype)   # εz
    with scoring_pass(module, restore=[theta]):                   # eval, no grad; θ restored on exit
        base = theta.detach().clone()                             # θ (the pass keeps its own copy to restore)
        theta.copy_(base + step)                                  # θ + εz
        loss_plus = _at_least_float32(loss_fn(module, batch))     # L_i(θ + εz)
        theta.copy_(base - step)                                  # θ − εz
        loss_minus = _at_least_float32(loss_fn(module, batch))    # L_i(θ − εz)
    if loss_plus.dim() != 1:
        raise ValueError(f"colm: the per-example loss must have shape [n], got {tuple(loss_plus.shape)}")
    return ((loss_plus - loss_minus) / (2 * eps)).float()


def _at_least_float32(loss: torch.Tensor) -> torch.Tensor:
    """The losses in float32, or float64 if they are: the difference of two nearby losses loses
    the leading digits, so it is taken in at least single precision."""
    return loss.to(torch.promote_types(loss.dtype, torch.float32))


def zeroth_order(loss_fn: LossFn, module: nn.Module, batch: Any, param_name: str, z: torch.Tensor,
                 eps: float = DEFAULT_EPS) -> torch.Tensor:
    """g_i = c_i · z, flattened: ``[n, |θ|]`` float32 on θ's device (see
    :func:`directional_derivatives` for c_i)."""
    c = directional_derivatives(loss_fn, module, batch, param_name, z, eps)
    return c[:, None] * z.reshape(1, -1).to(device=c.device, dtype=torch.float32)


class _LossOf(nn.Module):
    """``loss_fn(module, batch)`` as a module's forward, so ``functional_call`` can swap θ in."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.module, batch)


def _per_example_dims(batch: Any) -> Any:
    """``vmap``'s in_dims for a batch: 0 for every tensor with a leading dimension (taken to be the
    example axis), None for everything else; same structure as the batch."""
    if isinstance(batch, torch.Tensor):
        return 0 if batch.dim() >= 1 else None
    if isinstance(batch, dict):
        return {key: _per_example_dims(value) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_per_example_dims(value) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_per_example_dims(value) for value in batch)
    return None


def _as_batch_of_one(example: Any) -> Any:
    """An example (tensors without the example axis) as a batch of one."""
    if isinstance(example, torch.Tensor):
        return example.unsqueeze(0)
    if isinstance(example, dict):
        return {key: _as_batch_of_one(value) for key, value in example.items()}
    if isinstance(example, tuple) and hasattr(example, "_fields"):
        return type(example)(*(_as_batch_of_one(value) for value in example))
    if isinstance(example, (list, tuple)):
        return type(example)(_as_batch_of_one(value) for value in example)
    return example


def exact(loss_fn: LossFn, module: nn.Module, batch: Any, param_name: str,
          chunk_size: int | None = None) -> torch.Tensor:
    """g_i = ∇_θ L_i for every example i, flattened: ``[n, |θ|]`` float32.

    ``vmap(grad(L_i))`` over the examples, θ the only input differentiated; every tensor in
    ``batch`` with a leading dimension is split along it (the example axis), everything else is
    passed whole. ``loss_fn`` is called on one example at a time, as a batch of one, and must be
    vmap-compatible (no data-dependent shapes such as ``nonzero`` or ``.item()``).
    ``chunk_size`` bounds how many examples are vectorised at once (memory).
    """
    theta = module.get_parameter(param_name)
    wrapper = _LossOf(module, loss_fn)
    key = f"module.{param_name}"

    def loss_of_one(theta_value: torch.Tensor, example: Any) -> torch.Tensor:
        return functional_call(wrapper, {key: theta_value}, (_as_batch_of_one(example),)).sum()

    per_example = vmap(grad(loss_of_one), in_dims=(None, _per_example_dims(batch)), chunk_size=chunk_size)
    # Autograd off outside: grad() is a function transform and differentiates θ under an outer
    # no_grad all the same (torch.func's documented behaviour), while with autograd on the other
    # parameters, which require grad, would keep a graph through the whole vmapped computation
    # (measured on the benchmark LM at B = 32: 48.2 vs 44.6 MiB peak, identical gradients).
    with scoring_pass(module):                # eval mode, no grad, random streams restored
        grads = per_example(theta.detach(), batch)
    return grads.reshape(grads.shape[0], -1).float()
