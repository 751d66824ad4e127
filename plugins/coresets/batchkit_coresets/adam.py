"""Adam normalisation of the gradient estimates, with tracked moments (CoLM; reference code's `mezo_optim=adam`).

The coreset should match the large batch's *update*, and with Adam the update is the normalised
gradient, not the gradient. CoLM therefore turns each example's estimate g_i into the Adam update it
would make on its own, from moments tracked across steps::

    m_i = β1 · m_prev + (1 − β1) · g_i
    v_i = β2 · v_prev + (1 − β2) · g_i²
    u_i = (m_i / (1 − β1^(t+1))) / (sqrt(v_i / (1 − β2^(t+1))) + eps)

and, once the coreset S is chosen, carries the moments forward as the mean over the selected
examples of the large sources (small sources kept whole do not enter them)::

    m_prev ← mean_{i ∈ S} m_i,    v_prev ← mean_{i ∈ S} v_i,    t ← t + 1

m_prev and v_prev start at zero with the shape of g_i. t counts updates; the reference code uses
the trainer's global step, which is the same number when every step updates the moments. The
moments are the normaliser's own, not the optimizer's: with zeroth-order estimates they are
moments of projections along z, not of the gradients the optimizer sees.
"""

from __future__ import annotations

from typing import Any

import torch


class AdamNormalizer:
    """The tracked Adam moments m_prev, v_prev and step t, and the normalisation above.

    :param beta1: β1 (decay of the first moment).
    :param beta2: β2 (decay of the second moment).
    :param eps: added to sqrt(v̂) (Adam's epsilon).
    """

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"colm: Adam betas must lie in [0, 1), got beta1={beta1}, beta2={beta2}")
        if eps <= 0:
            raise ValueError(f"colm: Adam eps must be positive, got {eps}")
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.m_prev: torch.Tensor | None = None  # [d]; None until the first update
        self.v_prev: torch.Tensor | None = None  # [d]
        self.t = 0

    def normalize(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, m, v), each ``[n, d]``, for the estimates ``g`` ``[n, d]``; the state is unchanged."""
        if g.dim() != 2:
            raise ValueError(f"colm: gradient estimates must be [n, d], got shape {tuple(g.shape)}")
        g = g.float()
        d = g.shape[1]
        if self.m_prev is not None and self.m_prev.numel() != d:
            raise ValueError(f"colm: the tracked Adam moments have {self.m_prev.numel()} dimensions, the estimates "
                             f"{d}: the parameter changed (option `param`) since they were saved")
        zeros = g.new_zeros(d)
        m_prev = zeros if self.m_prev is None else self.m_prev.to(g.device)
        v_prev = zeros if self.v_prev is None else self.v_prev.to(g.device)
        b1, b2 = self.beta1, self.beta2
        # in place where it is safe: three [n, d] results and no [n, d] temporaries, since at small
        # models these arrays, not the network, dominate the selection pass's memory
        m = g.mul(1 - b1).add_(m_prev, alpha=b1)                        # m_i = β1 m_prev + (1 − β1) g_i
        v = g.mul(g).mul_(1 - b2).add_(v_prev, alpha=b2)                 # v_i = β2 v_prev + (1 − β2) g_i²
        bias1, bias2 = 1 - b1 ** (self.t + 1), 1 - b2 ** (self.t + 1)   # bias corrections with the step t
        u = v.div(bias2).sqrt_().add_(self.eps)                         # sqrt(v̂_i) + eps,  v̂_i = v_i / bias2
        u = u.reciprocal_().mul_(m).div_(bias1)                         # u_i = m̂_i / (sqrt(v̂_i) + eps)
        return u, m, v

    def update(self, m_selected: torch.Tensor, v_selected: torch.Tensor) -> None:
        """m_prev, v_prev ← the means over the selected rows of m and v; t ← t + 1.

        ``m_selected``/``v_selected``: the rows of :meth:`normalize`'s m and v for the selected
        large-source examples (at least one row).
        """
        if m_selected.dim() != 2 or len(m_selected) == 0 or m_selected.shape != v_selected.shape:
            raise ValueError(f"colm: update needs the selected rows of m and v, shapes [k, d] with k >= 1; got "
                             f"{tuple(m_selected.shape)} and {tuple(v_selected.shape)}")
        self.m_prev = m_selected.float().mean(0).detach()
        self.v_prev = v_selected.float().mean(0).detach()
        self.t += 1

    def state_dict(self) -> dict[str, Any]:
        return {"beta1": self.beta1, "beta2": self.beta2, "eps": self.eps, "t": self.t,
                "m_prev": None if self.m_prev is None else self.m_prev.detach().cpu().clone(),
                "v_prev": None if self.v_prev is None else self.v_prev.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the moments and step; the moments move to the estimates' device at the next
        :meth:`normalize`. The hyper-parameters must be those the state was saved with."""
        saved = (state["beta1"], state["beta2"], state["eps"])
        if saved != (self.beta1, self.beta2, self.eps):
            raise ValueError(f"colm: the checkpoint's Adam normalisation (beta1, beta2, eps) = {saved} differs from "
                             f"the configured {(self.beta1, self.beta2, self.eps)}: configure the same values "
                             f"to resume")
        self.t = int(state["t"])
        self.m_prev = None if state["m_prev"] is None else state["m_prev"].clone()
        self.v_prev = None if state["v_prev"] is None else state["v_prev"].clone()
