"""Lightning + DeepSpeed with gradient accumulation: divide the loss by the accumulation count once.

What goes wrong (Lightning 2.6, DeepSpeed 0.19; a reproduction without batchkit is in
docs/config.md, "DeepSpeed and gradient accumulation"):

1. Lightning's automatic optimization divides every micro-batch loss by
   ``accumulate_grad_batches`` (``ClosureResult.from_training_step_output``), so that the summed
   gradients of N micro-batches are their mean.
2. Its DeepSpeed precision plugin then calls ``engine.backward(loss)``, whose default
   ``scale_wrt_gas=True`` divides by ``gradient_accumulation_steps()`` again, and Lightning's
   DeepSpeed strategy sets that to the same ``accumulate_grad_batches``.

The gradient is therefore 1/N of the DDP one: plain SGD and LARS train with the lr divided by
N, gradient clipping is N times looser, and Adam-type optimizers hide most of it (only ``eps``
sees the scale). Lightning's GPU ``DeepSpeedStrategy`` runs the same code.

batchkit's correction, in :func:`corrected_backward` only: under automatic optimization it passes
``scale_wrt_gas=False`` to ``engine.backward`` so that Lightning's division is the only one. It
applies where the installed ``DeepSpeedEngine.backward`` takes that argument (checked from its
signature), checks on the first accumulating micro-batch that the engine really left the loss
undivided (warning once if not), and logs once that it is active.
:class:`~batchkit.lightning.CPUDeepSpeedStrategy` applies it itself; ``BatchKitCallback`` applies it
to any other Lightning ``DeepSpeedStrategy`` (the GPU one) for the duration of ``fit``.
Opt out with the environment variable ``BATCHKIT_DEEPSPEED_GAS_FIX=0``. Manual optimization is
left alone: Lightning divides nothing there (and allows no accumulation).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

#: Set to 0 (or false/no/off) to keep DeepSpeed's second division (Lightning's behaviour).
ENV_VAR = "BATCHKIT_DEEPSPEED_GAS_FIX"

_logged = False  # the "applied" message went out (once per process)
_verified = False  # the engine's return value was checked (once per process)
_warned: set[str] = set()


def enabled() -> bool:
    """Whether the correction is switched on (it is unless ``BATCHKIT_DEEPSPEED_GAS_FIX=0``)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def engine_accepts_scale_wrt_gas() -> bool:
    """Whether the installed ``DeepSpeedEngine.backward`` has a ``scale_wrt_gas`` parameter.

    DeepSpeed wraps it in ``instrument_w_nvtx`` (a ``(*args, **kwargs)`` wrapper without
    ``functools.wraps``), so the function is looked up through ``__wrapped__`` and closures.
    """
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return "scale_wrt_gas" in _parameters(DeepSpeedEngine.backward)


def _parameters(fn: Any, depth: int = 0) -> set[str]:
    """Named parameters of ``fn``, or of the function it wraps when ``fn`` takes only *args, **kwargs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if named or depth > 3:
        return named
    inner = getattr(fn, "__wrapped__", None)
    candidates = [inner] if inner is not None else [
        cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ())
        if inspect.isfunction(cell.cell_contents)
    ]
    for candidate in candidates:
        found = _parameters(candidate, depth + 1)
        if found:
            return found
    return set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def backward_kwargs(strategy: Any) -> dict[str, Any]:
    """What to add to ``strategy.backward``'s keyword arguments: ``{"scale_wrt_gas": False}``
    where the correction applies, else ``{}``."""
    module = strategy.lightning_module
    if module is None or not module.automatic_optimization or not enabled():
        return {}
    if not engine_accepts_scale_wrt_gas():
        import deepspeed

        _warn_once(
            "unsupported",
            f"batchkit: DeepSpeed {deepspeed.__version__}'s engine.backward has no scale_wrt_gas argument, so "
            "batchkit cannot undo its division of the loss by gradient_accumulation_steps; with "
            "accumulate_grad_batches=N > 1 Lightning divides too and the update is 1/N of the DDP one.",
        )
        return {}
    return {"scale_wrt_gas": False}


def corrected_backward(strategy: Any, backward: Callable[..., Any], closure_loss: torch.Tensor,
                       optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    """``backward(closure_loss, optimizer, ...)`` (a DeepSpeed strategy's ``backward``) with the
    correction applied, a caller's own ``scale_wrt_gas`` winning."""
    extra = backward_kwargs(strategy)
    if not extra:
        return backward(closure_loss, optimizer, *args, **kwargs)
    engine = strategy.deepspeed_engine
    steps = int(engine.gradient_accumulation_steps())
    if steps > 1:
        _log_once(steps)
    global _verified
    if steps > 1 and not _verified and "scale_wrt_gas" not in kwargs:
        _verified = True
        return _verify(engine, steps, lambda: backward(closure_loss, optimizer, *args, **extra, **kwargs))
    return backward(closure_loss, optimizer, *args, **{**extra, **kwargs})


def _log_once(steps: int) -> None:
    global _logged
    if _logged:
        return
    _logged = True
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(
        f"batchkit: DeepSpeed with gradient accumulation over {steps} micro-batches: calling engine.backward "
        "with scale_wrt_gas=False, because Lightning already divides each micro-batch loss by "
        f"accumulate_grad_batches (with both divisions the update would be 1/{steps} of the DDP one). "
        f"Set {ENV_VAR}=0 to turn this off."
    )


def _verify(engine: Any, steps: int, run: Callable[[], Any]) -> Any:
    """Run one backward and check that the engine left the loss undivided: its ``backward``
    returns the loss it back-propagated (divided by ``steps`` when it applies its own scaling)."""
    original = engine.backward
    seen: dict[str, Any] = {}

    def probe(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(loss, *args, **kwargs)
        seen["in"], seen["out"] = loss, result
        return result

    shadowed = "backward" in vars(engine)
    engine.backward = probe
    try:
        result = run()
    finally:
        if shadowed:
            engine.backward = original
        else:
            del engine.backward
    given, returned = seen.get("in"), seen.get("out")
    if torch.is_tensor(given) and torch.is_tensor(returned) and given.numel() == 1 and given.item() != 0:
        ratio = returned.detach().float().item() / given.detach().float().item()
        if abs(ratio * steps - 1.0) < 1e-3:
            import deepspeed

            _warn_once(
                "ignored",
                f"batchkit: DeepSpeed {deepspeed.__version__} was called with scale_wrt_gas=False but still divided "
                f"the loss by gradient_accumulation_steps={steps}; Lightning divides too, so the update is "
                f"1/{steps} of the DDP one. Please report this to batchkit ({ENV_VAR}=0 silences this).",
            )
    return result


def corrects(strategy: Any) -> bool:
    """Whether ``strategy`` applies the correction itself (batchkit's CPUDeepSpeedStrategy)."""
    return bool(getattr(type(strategy), "batchkit_corrects_gas_scaling", False))


def backward_for(strategy: Any) -> Callable[..., Any] | None:
    """A replacement for ``strategy.backward`` (to set on the instance) when ``strategy`` is a
    Lightning DeepSpeed strategy that does not correct the scaling itself; else None."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy) or corrects(strategy):
        return None
    original = strategy.backward

    def backward(closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        return corrected_backward(strategy, original, closure_loss, optimizer, *args, **kwargs)

    return backward


__all__ = ["ENV_VAR", "backward_for", "backward_kwargs", "corrected_backward", "corrects", "enabled",
           "engine_accepts_scale_wrt_gas"]
