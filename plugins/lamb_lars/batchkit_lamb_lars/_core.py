"""What LAMB and LARS share: validation, fp32 state, per-parameter steps, path choice,
global gradient clipping and the ZeRO fragment view.

A subclass declares its state names and implements ``_run(batch, group, clip, impl)``; this
module turns each param group into one or more :class:`Batch` es (one per dtype, or one per
flat ZeRO shard) and decides which path runs them.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import sys

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _zero

IMPLS = ("auto", "reference", "foreach", "fused")

Reducer = Callable[[Tensor], Tensor]


@dataclass
class Batch:
    """Parallel lists of tensors that step together (one device, one param dtype)."""

    params: list[Tensor]  # what gets updated: parameters, or views of a flat ZeRO shard
    grads: list[Tensor]
    state: dict[str, list[Tensor | None]]  # fp32 state lists keyed by state name
    steps: list[Tensor]  # per-tensor fp32 step counters, already incremented
    first: list[bool]  # True where the state was created by this step
    reduce: Reducer | None = None  # per-tensor squared norms -> whole-parameter ones
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.params)


def _fused_module():
    try:
        import batchkit_cuda_ext
    except ImportError:
        return None
    return batchkit_cuda_ext


_warned_no_ext = False


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernels serve ``device``; builds them on first use."""
    global _warned_no_ext
    ext = _fused_module()
    if ext is None:
        if not _warned_no_ext:
            _warned_no_ext = True
            warnings.warn(
                "batchkit-lamb-lars: batchkit-cuda-ext is not installed, so the fused LAMB/LARS "
                "kernels are unavailable; using the torch._foreach path. "
                "`pip install batchkit-cuda-ext` or pass impl='foreach' to silence this.",
                UserWarning,
                stacklevel=4,
            )
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    return ext.is_available(device)


class LayerwiseOptimizer(Optimizer):
    """Base of :class:`~batchkit_lamb_lars.Lamb` and :class:`~batchkit_lamb_lars.Lars`."""

    #: fp32 state tensors shaped like the parameter (never downcast on load)
    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params, defaults: dict, *, zero_aware: bool = True):
        self._origin: dict[int, list[Tensor]] = {}
        self._zero_aware = zero_aware
        self._lr_buffers: dict[torch.device, Tensor] = {}
        super().__init__(params, defaults)
        self._all_groups = list(self.param_groups)
        self._check_one_device()

    # ------------------------------------------------------------ construction checks
    def _validate_group(self, group: dict) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("impl", "auto") not in IMPLS:
            raise ValueError(f"{type(self).__name__}: impl={group['impl']!r}; choose one of {IMPLS}")
        self._validate_group(group)
        for p in group["params"]:
            if not (p.is_floating_point()):
                raise ValueError(f"{type(self).__name__}: parameter of dtype {p.dtype} is not floating point")
        self._origin[id(group)] = list(group["params"])
        if hasattr(self, "_all_groups"):
            self._all_groups.append(group)
            self._check_one_device()

    def _check_one_device(self) -> None:
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            names = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(
                f"{type(self).__name__}: parameters are on several devices ({names}). One optimizer "
                "steps one device: move the model to a single device first (model.to(device)), or "
                "build one optimizer per device."
            )

    # ------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """Load like torch, but keep moments and step counters fp32 on the parameter's device.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the *parameter* dtype,
        which would silently turn fp32 moments of bf16/fp16 parameters into bf16/fp16.
        """
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        origins = [self._origin.get(id(g), list(g["params"])) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, origin in zip(self.param_groups, origins):
            self._origin[id(group)] = origin
        self._all_groups = list(self.param_groups)
        keys_to_params = {
            key: p
            for saved, group in zip(saved_groups, self.param_groups)
            for key, p in zip(saved["params"], group["params"])
        }
        for key, saved in saved_state.items():
            p = keys_to_params.get(key)
            if p is None:
                continue
            for name, value in saved.items():
                if torch.is_tensor(value) and (name in self.state_names or name == "step"):
                    if name != "step" and value.numel() != p.numel():
                        # the fused kernels trust these sizes: refuse rather than read out of bounds
                        raise ValueError(
                            f"{type(self).__name__}.load_state_dict: state {name!r} has {value.numel()} "
                            f"elements for a parameter of {p.numel()}; this state_dict belongs to "
                            "another model (or another parameter order)."
                        )
                    self.state[p][name] = value.detach().to(device=p.device, dtype=torch.float32, copy=True)

    # ------------------------------------------------------------ step plumbing
    def _origin_of(self, group: dict) -> list[Tensor]:
        origin = self._origin.get(id(group))
        if origin is None:  # a group dict we never saw (e.g. rebuilt by a wrapper)
            origin = self._origin[id(group)] = list(group["params"])
        return origin

    def _zero_layout(self, group: dict) -> _zero.ZeroLayout | None:
        if not self._zero_aware:
            return None
        origin = self._origin_of(group)
        if not _zero.is_flattened(group["params"], origin):
            return None
        return _zero.zero_layout(group["params"], origin, type(self).__name__)

    def _new_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for name in self.state_names:
            if self._needs_state(name, group):
                # fp32 whatever the parameter dtype: bf16 moments lose the small updates
                state[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    def _needs_state(self, name: str, group: dict) -> bool:
        return True

    def _group_batches(self, group: dict) -> list[Batch]:
        """The group's tensors with gradients, as batches; increments step counters."""
        # One pass and one state lookup per parameter: with hundreds of tensors this loop is a
        # good part of a GPU step's host time.
        names = self.state_names
        by_kind: dict[tuple, Batch] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients: layer-wise trust "
                    "ratios need dense norms. Use nn.Embedding(sparse=False) or a sparse optimizer "
                    "(torch.optim.SparseAdam) for those parameters."
                )
            st = self.state[p]
            first = len(st) == 0
            if first:
                self._new_state(p, group)
            elif st["step"].device != p.device:
                raise RuntimeError(
                    f"{type(self).__name__}: a parameter is on {p.device} but its optimizer state is on "
                    f"{st['step'].device}; the model was moved after the optimizer took steps. Move the "
                    "model before building the optimizer, or build a new optimizer (and load its "
                    "state_dict, which places the state on each parameter's device)."
                )
            key = (p.device, p.dtype, grad.dtype)
            batch = by_kind.get(key)
            if batch is None:
                batch = by_kind[key] = Batch([], [], {n: [] for n in names}, [], [])
            batch.params.append(p)
            batch.grads.append(grad)
            for n in names:
                batch.state[n].append(st.get(n))
            batch.steps.append(st["step"])
            batch.first.append(first)
        steps = [t for batch in by_kind.values() for t in batch.steps]
        if steps:
            torch._foreach_add_(steps, 1.0)

        layout = self._zero_layout(group)
        if layout is None:
            return list(by_kind.values())
        # ZeRO: the group holds this rank's flat shard; step per-parameter views of it.
        owned = next(iter(by_kind.values()), None)
        entries = []
        if owned is not None:
            flat, st = owned.params[0], self.state[owned.params[0]]
            state_views = {
                n: layout.views(st[n]) if st.get(n) is not None else [None] * len(layout.starts)
                for n in names
            }
            entries = [
                (x, g, {n: state_views[n][i] for n in names}, st["step"], owned.first[0])
                for i, (x, g) in enumerate(zip(layout.views(flat), layout.views(flat.grad)))
            ]
        batch = self._make_batch(entries)
        batch.reduce = layout.reducer()
        return [batch]

    def _make_batch(self, entries: list) -> Batch:
        return Batch(
            params=[e[0] for e in entries],
            grads=[e[1] for e in entries],
            state={n: [e[2][n] for e in entries] for n in self.state_names},
            steps=[e[3] for e in entries],
            first=[e[4] for e in entries],
        )

    def _choose_impl(self, group: dict, batch: Batch) -> str:
        impl = group.get("impl", "auto")
        if impl in ("reference", "foreach"):
            return impl
        if not batch.params:
            return "foreach"
        device = batch.params[0].device
        # The fused kernels take contiguous fp32/bf16/fp16 params with grads of the same dtype.
        # (a batch holds one param dtype and one grad dtype: see _group_batches)
        fusable = (
            batch.params[0].dtype in (torch.float32, torch.bfloat16, torch.float16)
            and batch.grads[0].dtype == batch.params[0].dtype
            and all(p.is_contiguous() and g.is_contiguous() for p, g in zip(batch.params, batch.grads))
        )
        if fusable and fused_available(device):
            return "fused"
        return "foreach"

    def _lr_tensor(self, lr, device: torch.device) -> Tensor:
        """lr as a 1-element fp32 tensor on ``device`` (a fill launch, not a host->device sync)."""
        if torch.is_tensor(lr):
            return lr.detach().to(device=device, dtype=torch.float32).reshape(1)
        buf = self._lr_buffers.get(device)
        if buf is None:
            buf = self._lr_buffers[device] = torch.empty(1, dtype=torch.float32, device=device)
        return buf.fill_(lr)

    def _clip_divisor(self, max_grad_norm: float | None, groups: list[dict]) -> Tensor | None:
        """max(1, ||g||_global / max_grad_norm) as a 0-dim fp32 tensor, or None.

        The norm covers every group of this optimizer; under ZeRO the shard sums are
        all-reduced so every rank clips by the same, global factor.
        """
        if not max_grad_norm:
            return None
        if self._zero_aware and any(_zero.is_stage3(self._origin_of(g)) for g in groups):
            raise ValueError(
                f"{type(self).__name__}(max_grad_norm={max_grad_norm}) under DeepSpeed ZeRO stage 3: "
                "DeepSpeed steps one parameter sub-group at a time, so no global gradient norm is "
                "visible here. Set max_grad_norm=None and clip with DeepSpeed's `gradient_clipping` "
                "(Lightning: Trainer(gradient_clip_val=...)), which uses the true global norm."
            )
        zero_layouts = [self._zero_layout(g) for g in groups]
        zero = any(layout is not None for layout in zero_layouts)
        if zero and len(self._all_groups) > 1:
            raise ValueError(
                f"{type(self).__name__}(max_grad_norm={max_grad_norm}) under DeepSpeed ZeRO with "
                f"{len(self._all_groups)} param groups: DeepSpeed hands the optimizer one group's "
                "gradient shard at a time, so no global norm is visible here. Set max_grad_norm=None "
                "and clip with DeepSpeed's `gradient_clipping` (Lightning: Trainer(gradient_clip_val=...)), "
                "which uses the true global norm; or use a single param group."
            )
        grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else self._device()
        total = torch.zeros((), dtype=torch.float32, device=device)
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for same in by_dtype.values():
            norms = torch._foreach_norm(same)
            total += torch.stack(norms).float().square().sum()
        if zero:
            layout = next(layout for layout in zero_layouts if layout is not None)
            from ._dist import all_reduce_sum

            all_reduce_sum(total, layout.process_group)
        return (total.sqrt() / max_grad_norm).clamp_(min=1.0)

    def _device(self) -> torch.device:
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        return torch.device("cpu")

    def _run(self, batch: Batch, group: dict, clip: Tensor | None, impl: str) -> None:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        clip = self._clip_divisor(self.defaults.get("max_grad_norm"), groups)
        for group in groups:
            for batch in self._group_batches(group):
                if not batch.params and batch.reduce is None:
                    continue
                impl = self._choose_impl(group, batch)
                self._run(batch, group, clip, impl)
        return loss


# ---------------------------------------------------------------- validation helpers
# Options are real numbers of any numeric type (int, float, numpy scalars such as np.float32,
# 0-dim tensors); the checks return them as Python floats, which is what the groups then hold
# (lr may stay a tensor: a device-side lr for CUDA graphs). bool is refused: lr=True is a slip.
def as_real(value) -> float | None:
    """``value`` as a float when it is a single real number, else None."""
    numpy = sys.modules.get("numpy")  # numpy scalars are numbers.Real; numpy is not a dependency
    if value is None or isinstance(value, bool) or (numpy is not None and isinstance(value, numpy.bool_)):
        return None
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value.detach().reshape(()).cpu())
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_real(owner: str, name: str, value, *, low: float = 0.0, high: float = math.inf,
               low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """``value`` as a float if it is a finite real in the interval, else a ValueError naming it."""
    x = as_real(value)
    ok = (
        x is not None and math.isfinite(x)
        and (x > low if low_open else x >= low)
        and (x < high if high_open else x <= high)
    )
    if not ok:
        if high == math.inf:
            what = f"> {low:g}" if low_open else f">= {low:g}"
            rule = f"a finite number {what}"
        else:
            rule = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name}={value!r} is invalid; it must be {rule}.{hint}")
    return x


def check_lr(owner: str, lr):
    """The learning rate: a finite real >= 0 (a 1-element tensor is kept as a tensor)."""
    x = as_real(lr)
    if x is None or not math.isfinite(x) or x < 0.0:
        raise ValueError(
            f"{owner}: lr={lr!r} is invalid; the learning rate must be a finite number >= 0 (e.g. lr=1e-3)."
        )
    return lr if torch.is_tensor(lr) else x


def check_nonneg(owner: str, name: str, value, hint: str = "") -> float:
    return check_real(owner, name, value, hint=hint)


def check_positive(owner: str, name: str, value, hint: str = "") -> float:
    return check_real(owner, name, value, low_open=True, hint=hint)


def as_pair(value) -> tuple | None:
    """Two items (tuple, list, array, tensor), or None when ``value`` is not a pair."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        pair = tuple(value)
    except TypeError:
        return None
    return pair if len(pair) == 2 else None
