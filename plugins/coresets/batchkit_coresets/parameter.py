"""Which parameter CoLM takes per-example gradients of (the option ``param``).

CoLM represents each example by the gradient of its loss with respect to **one** weight matrix
near the output (the paper: the LoRA-B of the last layer's ``v_proj``); the rest of the network is
not differentiated. The option names it:

* an exact parameter name, as ``module.named_parameters()`` spells it
  (``blocks.3.attn.v_proj.weight``);
* otherwise a regular expression that must match the **whole** name (``re.fullmatch``) of exactly
  one parameter (``blocks\\.3\\..*v_proj\\.weight``);
* ``None`` (default): the weight of the last ``nn.Linear`` before the output layer, where the
  output layer is taken to be the last ``nn.Linear`` registered in the module (the LM head).

Names are those of the module the plugin is given, so a LightningModule that holds its network in
an attribute ``model`` has names starting with ``model.``.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

#: how many candidate names an error message lists before "... and N more"
_SHOWN = 12


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def linear_weight_names(module: nn.Module) -> list[str]:
    """Names of the weights of every ``nn.Linear`` in ``module``, in registration order."""
    return [f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def resolve_parameter(module: nn.Module, param: str | None = None) -> str:
    """The full name of the parameter CoLM differentiates (see the module docstring).

    :raises ValueError: naming the option ``param`` and the fix, when the name or pattern matches no
        parameter or several, the pattern is not a valid regular expression, or the default cannot
        be found (fewer than two ``nn.Linear`` layers).
    """
    names = [name for name, _ in module.named_parameters()]
    if param is None:
        linears = linear_weight_names(module)
        if len(linears) < 2:
            raise ValueError(
                f"colm: option `param` is not set and its default (the last nn.Linear before the output "
                f"layer) needs at least two nn.Linear layers; {type(module).__name__} has {len(linears)}. "
                f"Set `param` to a parameter name, one of: {_listing(names)}")
        return linears[-2]
    if param in names:
        return param
    try:
        pattern = re.compile(param)
    except re.error as err:
        raise ValueError(f"colm: option `param`={param!r} is neither a parameter name of {type(module).__name__} "
                         f"nor a valid regular expression ({err}). Set it to one of: {_listing(names)}") from None
    matches = [name for name in names if pattern.fullmatch(name)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(f"colm: option `param`={param!r} matches {len(matches)} parameters of "
                         f"{type(module).__name__}: {_listing(matches)}. It must name exactly one: use the full "
                         f"name or a narrower pattern.")
    partial = [name for name in names if pattern.search(name)]
    hint = (f" The pattern must match the whole name (re.fullmatch); it occurs inside: {_listing(partial)}."
            if partial else "")
    close = difflib.get_close_matches(param, names, n=5, cutoff=0.5)
    suggestion = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"colm: option `param`={param!r} matches no parameter of {type(module).__name__}.{hint} "
                     f"Fix: {suggestion}set it to a parameter name (module.named_parameters()), e.g. a Linear "
                     f"weight: {_listing(linear_weight_names(module))}")
