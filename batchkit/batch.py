"""Batches as plugins see them: how many samples a batch holds, per-sample selection, splitting and
joining, the per-sample-loss protocol, and a scoring pass that leaves the model as it found it.

**Fields.** A batch is a tensor, or a container (tuple, list, named tuple, dict) of *fields*; a field
is a tensor, a nested container, a list of per-sample values (strings, ids, lists of concept tags),
or anything else. A field is named by its path: dict keys and sequence positions joined by dots
(``"x"``, ``"inputs.ids"``, ``"0"``, ``"2.1"``).

**Which fields are per-sample** (the rules :class:`BatchSpec` applies, so nothing is guessed
silently):

* the number of samples N is the length of ``size_field`` if the spec names one; otherwise the
  leading dimension of the tensor fields declared ``per_sample``; otherwise the leading dimension
  that every tensor field of dimension >= 1 shares. If those tensors disagree, the batch is refused
  with an error that says which fields to declare ``shared`` (or ``per_sample``);
* a tensor field is per-sample when its leading dimension is N, unless it is declared ``shared``;
* a named tuple, and a list or tuple field that holds any tensor or mapping, is a container of
  fields (``[input_ids, attention_mask]``); any other list or tuple field of length N is a per-sample
  list (one caption, id or list of concept tags per sample), unless declared ``shared``;
* everything else (scalars, strings, tensors of another length, shared fields) is carried through
  unchanged. A field declared ``per_sample`` whose length is not N is an error.

A field that happens to have N entries but is not per-sample (class weights of a batch whose size
equals the number of classes, say) must be declared ``shared``; pass the spec to the callback
(``BatchKitCallback(..., batch_spec=BatchSpec(shared=["class_weights"]))``, or YAML
``batchkit: {batch_spec: {shared: [class_weights]}}``). Plugins read it as ``ctx.batch_spec``. For
batches these rules cannot describe, subclass :class:`BatchSpec` and override
:meth:`~BatchSpec.num_samples` and :meth:`~BatchSpec.select` (:meth:`~BatchSpec.split` and
:meth:`~BatchSpec.concat` follow).

**The per-sample-loss protocol.** A plugin that ranks the samples of a batch asks the module for the
loss of every sample, unreduced::

    class MyModule(LightningModule):
        def per_sample_loss(self, batch) -> torch.Tensor:   # shape [N], one loss per sample
            x, y = batch
            return F.cross_entropy(self(x), y, reduction="none")

``batch`` is the training batch as ``training_step`` receives it. A plugin option ``loss_method``
names another method of the module when ``per_sample_loss`` is taken. Plugins resolve it at setup
(:func:`resolve_loss_method`) and call it inside :func:`scoring_pass` through
:func:`per_sample_losses`, which checks the result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Iterator
from typing import Literal
from typing import Sequence

import torch
from torch import nn

from batchkit.errors import PluginError


PathPart = str
_LEAF_TYPES = (str, bytes, int, float, bool, type(None))


def _is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _is_container_sequence(value: Any) -> bool:
    """A list/tuple field that holds fields (a named tuple, or any tensor or mapping inside), not
    per-sample values (strings, ids, lists of tags)."""
    if _is_named_tuple(value):
        return True
    return isinstance(value, (list, tuple)) and any(
        isinstance(v, (torch.Tensor, Mapping)) or _is_container_sequence(v) for v in value
    )


def _children(value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield str(k), v
    else:
        for i, v in enumerate(value):
            yield str(i), v


class BatchSpec:
    """How to count, select, split and join the samples of a batch (rules in the module docstring).

    :param per_sample: paths of fields that are per-sample (they fix N when given).
    :param shared: paths of fields that are not per-sample even if their length equals N.
    :param size_field: the path of the field whose length is N.
    """

    def __init__(self, per_sample: Iterable[str] = (), shared: Iterable[str] = (), size_field: str | None = None) -> None:
        self.per_sample = frozenset(str(p) for p in per_sample)
        self.shared = frozenset(str(p) for p in shared)
        if self.per_sample & self.shared:
            raise PluginError(
                f"batchkit: BatchSpec declares {sorted(self.per_sample & self.shared)} both per_sample and shared; "
                "a field is one or the other"
            )
        self.size_field = size_field
        #: whether any field is named (else a batch of same-length tensors is counted without a walk)
        self.names_fields = bool(self.per_sample or self.shared or size_field is not None)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | BatchSpec | None) -> BatchSpec:
        """A spec from YAML (``{per_sample: [...], shared: [...], size_field: ...}``)."""
        if config is None:
            return cls()
        if isinstance(config, BatchSpec):
            return config
        unknown = set(config) - {"per_sample", "shared", "size_field"}
        if unknown:
            raise PluginError(
                f"batchkit: batch_spec has unknown keys {sorted(unknown)}; it takes per_sample (list of field paths), "
                "shared (list of field paths) and size_field (a field path)"
            )
        return cls(config.get("per_sample") or (), config.get("shared") or (), config.get("size_field"))

    def __repr__(self) -> str:
        return f"BatchSpec(per_sample={sorted(self.per_sample)}, shared={sorted(self.shared)}, size_field={self.size_field!r})"

    # -- counting -------------------------------------------------------------------------------

    def _leaves(self, batch: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """``(path, field)`` for every leaf field (tensors, per-sample-list candidates, other values)."""
        if isinstance(batch, torch.Tensor) and not prefix:
            yield "", batch
            return
        if self._is_container(batch, prefix):
            for key, value in _children(batch):
                yield from self._leaves(value, f"{prefix}.{key}" if prefix else key)
            return
        yield prefix, batch

    def _is_container(self, value: Any, prefix: str) -> bool:
        """Whether ``value`` (at ``prefix``) holds fields rather than being one. The top level of a
        batch always holds fields; a path the spec names is always a field."""
        if prefix and (prefix in self.per_sample or prefix in self.shared):
            return False
        if isinstance(value, Mapping):
            return True
        return isinstance(value, (list, tuple)) and (not prefix or _is_container_sequence(value))

    def num_samples(self, batch: Any) -> int:
        """N, the number of samples in ``batch``."""
        leaves = dict(self._leaves(batch))
        if self.size_field is not None:
            if self.size_field not in leaves:
                raise PluginError(
                    f"batchkit: batch_spec.size_field is {self.size_field!r}, but the batch has no such field "
                    f"(fields: {sorted(leaves)}); name one of its fields"
                )
            return _length(leaves[self.size_field])
        declared = [p for p in self.per_sample if p in leaves]
        if self.per_sample and not declared:
            raise PluginError(
                f"batchkit: batch_spec.per_sample is {sorted(self.per_sample)}, but the batch has none of these fields "
                f"(fields: {sorted(leaves)})"
            )
        candidates = declared or [
            p for p, v in leaves.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and p not in self.shared
        ]
        lengths = {p: _length(leaves[p]) for p in candidates}
        if not lengths:
            raise PluginError(
                f"batchkit: found no per-sample tensor in the batch ({type(batch).__name__} with fields {sorted(leaves)}); "
                "declare the per-sample fields with batch_spec (per_sample: [...]) or name the size_field"
            )
        distinct = set(lengths.values())
        if len(distinct) > 1:
            if declared:
                raise PluginError(f"batchkit: the fields batch_spec declares per_sample have different lengths {lengths}")
            raise PluginError(
                f"batchkit: the batch's tensor fields have different lengths {lengths}, so the number of samples is "
                f"ambiguous; declare the fields that are not per-sample as shared (or the ones that are as per_sample): "
                f"BatchKitCallback(..., batch_spec=BatchSpec(shared=[...])) or YAML batchkit: {{batch_spec: {{shared: [...]}}}}"
            )
        return distinct.pop()

    def per_sample_paths(self, batch: Any, n: int | None = None) -> list[str]:
        """The paths of the fields that :meth:`select` indexes."""
        n = self.num_samples(batch) if n is None else n
        return [p for p, v in self._leaves(batch) if self._is_per_sample(p, v, n)]

    def _is_per_sample(self, path: str, value: Any, n: int) -> bool:
        if path in self.shared:
            return False
        if isinstance(value, torch.Tensor):
            per_sample = value.dim() >= 1 and value.shape[0] == n
        elif isinstance(value, (list, tuple)):
            per_sample = len(value) == n
        else:
            per_sample = False
        if path in self.per_sample and not per_sample:
            raise PluginError(
                f"batchkit: batch_spec declares {path!r} per-sample, but it has {_describe(value)} and the batch "
                f"has {n} samples"
            )
        return per_sample

    # -- selecting and splitting ----------------------------------------------------------------

    def select(self, batch: Any, index: torch.Tensor | Sequence[int]) -> Any:
        """The batch restricted to the samples ``index`` (in that order), in the same container
        types; fields that are not per-sample are carried through unchanged."""
        n = self.num_samples(batch)
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() != 1:
            raise PluginError(f"batchkit: select() needs a 1-d index, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise PluginError(f"batchkit: select() index out of range for a batch of {n} samples")
        positions: list[int] | None = None

        def pick(path: str, value: Any) -> Any:
            nonlocal positions
            if not self._is_per_sample(path, value, n):
                return value
            if isinstance(value, torch.Tensor):
                return value.index_select(0, index.to(value.device))
            if positions is None:
                positions = index.tolist()
            picked = [value[i] for i in positions]
            return picked if isinstance(value, list) else tuple(picked)

        return self._rebuild(batch, pick)

    def split(self, batch: Any, sizes: int | Sequence[int]) -> list[Any]:
        """Contiguous pieces of ``batch``: ``sizes`` pieces of (nearly) equal size, or pieces of the
        given sizes (which must add up to N)."""
        n = self.num_samples(batch)
        if isinstance(sizes, int):
            if sizes < 1:
                raise PluginError(f"batchkit: split() needs at least one piece, got {sizes}")
            base, extra = divmod(n, sizes)
            sizes = [base + (1 if i < extra else 0) for i in range(sizes)]
        if sum(sizes) != n:
            raise PluginError(f"batchkit: split() sizes {list(sizes)} add up to {sum(sizes)}, not the batch's {n} samples")
        pieces, start = [], 0
        for size in sizes:
            pieces.append(self.select(batch, torch.arange(start, start + size)))
            start += size
        return pieces

    def concat(self, batches: Sequence[Any]) -> Any:
        """Join batches of the same structure along the sample dimension (the inverse of
        :meth:`split`); fields that are not per-sample are taken from the first batch."""
        if not batches:
            raise PluginError("batchkit: concat() needs at least one batch")
        first = batches[0]
        n0 = self.num_samples(first)
        flat = [dict(self._leaves(b)) for b in batches]
        counts = [self.num_samples(b) for b in batches]

        def join(path: str, value: Any) -> Any:
            if not self._is_per_sample(path, value, n0):
                return value
            parts = [f[path] for f in flat]
            for p, c in zip(parts, counts):
                if _length(p) != c:
                    raise PluginError(f"batchkit: concat(): field {path!r} is not per-sample in every batch")
            if isinstance(value, torch.Tensor):
                return torch.cat([p.to(value.device) for p in parts])
            joined = [x for p in parts for x in p]
            return joined if isinstance(value, list) else tuple(joined)

        return self._rebuild(first, join)

    def _rebuild(self, batch: Any, leaf: Callable[[str, Any], Any], prefix: str = "") -> Any:
        if isinstance(batch, torch.Tensor) and not prefix:
            return leaf("", batch)
        if isinstance(batch, Mapping) and prefix not in self.per_sample and prefix not in self.shared:
            items = {k: self._rebuild(v, leaf, f"{prefix}.{k}" if prefix else str(k)) for k, v in batch.items()}
            try:
                return type(batch)(items)
            except TypeError:  # a mapping type that cannot be built from a dict
                return items
        if self._is_container(batch, prefix):
            values = [self._rebuild(v, leaf, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(batch)]
            if _is_named_tuple(batch):
                return type(batch)(*values)
            return type(batch)(values)
        return leaf(prefix, batch)


def _length(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            raise PluginError("batchkit: a 0-d tensor has no samples; it cannot be the batch's size field")
        return int(value.shape[0])
    if isinstance(value, (list, tuple)):
        return len(value)
    raise PluginError(f"batchkit: a field of type {type(value).__name__} has no length")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"{len(value)} entries"
    return f"type {type(value).__name__}"


# -------------------------------------------------------------------------------------------------
# The per-sample-loss protocol
# -------------------------------------------------------------------------------------------------

DEFAULT_LOSS_METHOD = "per_sample_loss"


def resolve_loss_method(plugin: str, module: Any, loss_method: str = DEFAULT_LOSS_METHOD) -> Callable[[Any], torch.Tensor]:
    """The module's per-sample loss method, or a :class:`PluginError` that says how to add it."""
    method = getattr(module, loss_method, None)
    if callable(method):
        return method
    what = type(module).__name__
    if loss_method == DEFAULT_LOSS_METHOD:
        raise PluginError(
            f"{plugin}: the module {what} has no {loss_method}(batch) method, which {plugin} needs to score "
            f"the samples of a batch. Add one that returns the unreduced loss of every sample, e.g.\n"
            f"    def {loss_method}(self, batch):\n"
            f"        x, y = batch\n"
            f"        return torch.nn.functional.cross_entropy(self(x), y, reduction='none')\n"
            f"or point the option loss_method at an existing method of {what} with that contract."
        )
    raise PluginError(
        f"{plugin}: option loss_method={loss_method!r}, but the module {what} has no callable {loss_method!r}. "
        f"Give the name of a method of {what} that takes the training batch and returns one loss per sample "
        f"(a 1-d tensor), or remove the option to use {DEFAULT_LOSS_METHOD}(batch)."
    )


def check_per_sample_losses(plugin: str, loss_method: str, losses: Any, batch_size: int) -> torch.Tensor:
    """Refuse anything but a 1-d tensor with one entry per sample."""
    if not isinstance(losses, torch.Tensor):
        raise PluginError(
            f"{plugin}: {loss_method}(batch) returned {type(losses).__name__}, not a tensor; return the "
            f"unreduced loss of every sample (e.g. cross_entropy(..., reduction='none'))"
        )
    if losses.dim() != 1 or losses.shape[0] != batch_size:
        raise PluginError(
            f"{plugin}: {loss_method}(batch) returned a tensor of shape {tuple(losses.shape)}, but the batch has "
            f"{batch_size} samples; return shape [{batch_size}] (reduction='none', and average any "
            "per-token or per-pixel losses within each sample)"
        )
    return losses


def per_sample_losses(plugin: str, method: Callable[[Any], torch.Tensor], batch: Any, spec: BatchSpec | None = None,
                      loss_method: str = DEFAULT_LOSS_METHOD) -> torch.Tensor:
    """Call the module's per-sample loss on ``batch`` and check the result (shape [N], detached,
    float32). Call it inside :func:`scoring_pass`."""
    n = (spec or BatchSpec()).num_samples(batch)
    losses = check_per_sample_losses(plugin, loss_method, method(batch), n)
    return losses.detach().float()


# -------------------------------------------------------------------------------------------------
# The scoring pass
# -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scoring_pass(
    module: nn.Module,
    mode: Literal["eval", "train"] = "eval",
    *,
    grad: bool = False,
    restore: Iterable[torch.Tensor] = (),
    preserve_rng: bool = True,
) -> Iterator[None]:
    """Run a forward that scores samples without training anything.

    * ``mode="eval"`` (default): every submodule in eval mode (BatchNorm uses its running
      statistics, dropout is off), each one's own training flag restored afterwards;
      ``mode="train"``: the module's current mode, with every BatchNorm running mean, variance and
      batch counter saved first and put back afterwards.
    * autograd off (``grad=True`` keeps it on, for per-example gradients with ``torch.func``; the
      parameters' ``.grad`` are saved and restored either way);
    * ``restore``: tensors (parameters a zeroth-order estimate perturbs, say) copied first and
      copied back afterwards, bit for bit;
    * the random number generators (CPU, and CUDA where the module lives on a GPU) restored, so the
      training step draws the same dropout masks whether or not a scoring pass ran before it.
    """
    if mode not in ("eval", "train"):
        raise PluginError(f"batchkit: scoring_pass mode must be 'eval' or 'train', got {mode!r}")
    flags = [(m, m.training) for m in module.modules()]
    norms = []
    if mode == "train":
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                norms.append((m, [None if b is None else b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]))
    else:
        module.eval()
    saved = [(t, t.detach().clone()) for t in restore]
    grads = [(p, p.grad) for p in module.parameters()] if grad else []
    cpu_rng = torch.get_rng_state() if preserve_rng else None
    cuda_devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda}) if preserve_rng else []
    cuda_rng = [torch.cuda.get_rng_state(d) for d in cuda_devices]
    try:
        with torch.set_grad_enabled(grad):
            yield
    finally:
        for m, training in flags:
            m.training = training
        for m, values in norms:
            for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), values):
                if buffer is not None and value is not None:
                    buffer.copy_(value)
        with torch.no_grad():
            for tensor, copy in saved:
                tensor.copy_(copy)
        for p, g in grads:
            p.grad = g
        if cpu_rng is not None:
            torch.set_rng_state(cpu_rng)
        for d, state in zip(cuda_devices, cuda_rng):
            torch.cuda.set_rng_state(state, d)
