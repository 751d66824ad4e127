"""JEST: joint example selection (Evans, Parthasarathy, Merzic, Hénaff, "Data curation via joint
example selection further accelerates multimodal learning", 2024).

Pure functions: embeddings and loss matrices in, indices out. The plugin (phase 2) computes the
embeddings of a super-batch of B examples with the learner and the reference model and keeps
b = B (1 - f) of them.

**Pairwise losses.** JEST scores batches with the sigmoid (SigLIP) loss because it is a sum of
terms over pairs, one per (image i, text j)::

    logit_ij = t <a_i, b_j> + bias           t, bias: the model's own temperature and bias
    z_ij     = +1 if i == j else -1           positives on the diagonal
    l_ij     = -log sigmoid(z_ij logit_ij)    L = [l_ij], a B x B matrix per model

**Learnability.** The score of a sub-batch A is the sum of its pairs' terms in a B x B matrix S::

    s(A) = sum_{i in A} sum_{j in A} S[i, j]
    S    = L_learner - L_reference            "learnability" (default)
         = L_learner                           "hard_learner"
         = -L_reference                        "easy_reference"

S must come from the two models' *pairwise* matrices. The third-party port built it from
per-example losses, S[i, j] = l_i - l_j, which has a zero diagonal and cancels in the conditional
logits below, so that selection silently becomes uniform; :func:`learnability_matrix` refuses
per-example vectors and a reference equal to the learner (the port's second bug).

**Conditional logits.** Adding example k to a selected set A changes the score by::

    s(A + {k}) - s(A) = S[k, k] + sum_{j in A} S[k, j] + sum_{i in A} S[i, k]

**Blocked sampling.** The batch is drawn in ``n_chunks`` chunks of n_draws = b / n_chunks
examples. Each chunk is drawn without replacement from softmax(conditional logits given all
earlier chunks), and selected examples are masked out. With A empty the conditional logit is
S[k, k], so the first chunk is drawn from softmax(diag S): one rule for every chunk. (The paper's
Algorithm 1, as the reference notes read it, draws the first chunk from the diagonal scores; the
third-party port draws it uniformly and says so in a comment. We could not open the PDF to check;
the conditional rule with A empty is the consistent choice.) The logits are not normalised by the
number of terms (the port's division by 2|A| + 1 is not in the paper), so later chunks, whose
logits sum more terms, are drawn more greedily.

Draws use the Gumbel-top-k trick (the top n of logits + Gumbel noise is a draw of n without
replacement from the softmax, in Plackett-Luce order), with the noise of all chunks drawn at once,
as one [n_chunks, B] float64 tensor, from a caller's ``torch.Generator``: the same generator state
gives the same batch, so a plugin resumes exactly by seeding it from
(seed, step) or by saving its state. The conditional logits are kept as running row and column
sums, so the whole draw costs O(B b) after S is built, not O(n_chunks B^2).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


__all__ = [
    "VARIANTS",
    "conditional_logits",
    "gumbel_noise",
    "gumbel_topk",
    "independent_scores",
    "independent_topk",
    "joint_sample",
    "learnability_matrix",
    "siglip_pair_losses",
]

Variant = Literal["learnability", "hard_learner", "easy_reference"]
VARIANTS: tuple[str, ...] = ("learnability", "hard_learner", "easy_reference")


def siglip_pair_losses(
    a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor, bias: float | torch.Tensor
) -> torch.Tensor:
    """The B x B pairwise sigmoid losses ``l_ij = -log sigmoid(z_ij (t <a_i, b_j> + bias))``.

    ``a`` and ``b`` are the two towers' embeddings of the same B examples ([B, D] each), as the
    model's own loss sees them (SigLIP L2-normalises them first); ``t`` is the multiplicative
    temperature (SigLIP's exp(t'), 10 at init) and ``bias`` the bias (-10 at init). Computed in at
    least float32. The mean of the matrix times B is SigLIP's loss on this batch.
    """
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"siglip_pair_losses: embeddings must be [B, D] matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"siglip_pair_losses: the two towers' embeddings must have the same shape [B, D], got {tuple(a.shape)} "
            f"and {tuple(b.shape)}; pair_embeddings(batch) must return one row per example from each tower, in the "
            f"same space"
        )
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    t = torch.as_tensor(t, dtype=dtype, device=a.device)
    bias = torch.as_tensor(bias, dtype=dtype, device=a.device)
    logits = t * (a.to(dtype) @ b.to(dtype).T) + bias
    z = 2.0 * torch.eye(a.shape[0], dtype=dtype, device=a.device) - 1.0  # z_ii = +1, z_ij = -1
    return -F.logsigmoid(z * logits)


def _check_pairwise(name: str, losses: torch.Tensor, variant: str) -> None:
    if losses.dim() == 1:
        raise ValueError(
            f"learnability_matrix: {name} is a vector of per-example losses (shape {tuple(losses.shape)}); JEST "
            f"needs the pairwise [B, B] matrix from siglip_pair_losses(a, b, t, bias). An S built from per-example "
            f"losses, S[i, j] = l_i - l_j, cancels in the conditional logits and makes the selection uniform "
            f"(variant {variant!r})"
        )
    if losses.dim() != 2 or losses.shape[0] != losses.shape[1]:
        raise ValueError(
            f"learnability_matrix: {name} must be a square [B, B] pairwise loss matrix, got shape {tuple(losses.shape)}"
        )


def learnability_matrix(
    learner_losses: torch.Tensor | None,
    reference_losses: torch.Tensor | None,
    variant: Variant = "learnability",
) -> torch.Tensor:
    """S for ``variant``, from the learner's and the reference model's pairwise loss matrices.

    ``learnability``: S = L_learner - L_reference (both needed); ``hard_learner``: S = L_learner;
    ``easy_reference``: S = -L_reference. A matrix the variant does not use may be None. Refused,
    with the fix: per-example loss vectors, non-square or mismatched matrices, and (learnability) a
    reference that is the learner's own matrix, or equal to it, which would make S zero.
    """
    if variant not in VARIANTS:
        raise ValueError(f"learnability_matrix: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    needed = {"learnability": ("learner_losses", "reference_losses"), "hard_learner": ("learner_losses",),
              "easy_reference": ("reference_losses",)}[variant]
    given = {"learner_losses": learner_losses, "reference_losses": reference_losses}
    for name in needed:
        losses = given[name]
        if losses is None:
            raise ValueError(
                f"learnability_matrix: variant {variant!r} needs {name} (a [B, B] matrix from siglip_pair_losses), "
                f"got None"
            )
        _check_pairwise(name, losses, variant)
    if variant == "hard_learner":
        return learner_losses
    if variant == "easy_reference":
        return -reference_losses
    assert learner_losses is not None and reference_losses is not None
    if learner_losses.shape != reference_losses.shape:
        raise ValueError(
            f"learnability_matrix: learner and reference loss matrices differ in shape, "
            f"{tuple(learner_losses.shape)} vs {tuple(reference_losses.shape)}; score the same super-batch with both "
            f"models"
        )
    if reference_losses is learner_losses or torch.equal(reference_losses, learner_losses):
        raise ValueError(
            "learnability_matrix: the reference losses equal the learner's, so S = L_learner - L_reference is zero "
            "and the selection would be uniform; compute reference_losses with the frozen reference model's "
            "embeddings, temperature and bias"
        )
    return learner_losses - reference_losses


def conditional_logits(scores: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """For every k: ``S[k, k] + sum_{j in A} S[k, j] + sum_{i in A} S[i, k]``, A = ``selected`` ([B] bool).

    This is s(A + {k}) - s(A) for k not in A; for k in A the value has no meaning (the sampler
    masks those). The reference form of what :func:`joint_sample` keeps as running sums.
    """
    in_a = selected.to(scores.dtype)
    return scores.diagonal() + scores @ in_a + in_a @ scores  # S[k,k] + sum_j S[k,j] + sum_i S[i,k]


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """i.i.d. Gumbel(0, 1) noise, float64, drawn from ``generator`` on its own device."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float64).tiny)))  # u = 0 would give -inf


def gumbel_topk(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k indices drawn without replacement from softmax(``logits``) along the last dimension.

    ``top_k(logits + g)``, g_i ~ Gumbel(0, 1) i.i.d. (Gumbel-top-k; the order is the order of
    sequential draws). ``-inf`` logits are never drawn while finite ones remain.
    """
    noise = gumbel_noise(tuple(logits.shape), generator).to(logits.device)
    return torch.topk(logits + noise, k, dim=-1).indices


def _check_square(caller: str, scores: torch.Tensor, batch_size: int) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(
            f"{caller}: scores must be a square [B, B] learnability matrix, got shape {tuple(scores.shape)}"
        )
    if not 1 <= batch_size <= scores.shape[0]:
        raise ValueError(f"{caller}: batch_size must be in [1, B = {scores.shape[0]}], got {batch_size}")


@torch.no_grad()
def joint_sample(
    scores: torch.Tensor, batch_size: int, *, n_chunks: int = 16, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``batch_size`` distinct indices of the super-batch by JEST's blocked sampling.

    ``scores`` is S ([B, B]); the result is a LongTensor of ``batch_size`` indices in draw order
    (chunk after chunk), on S's device. ``batch_size`` must be a multiple of ``n_chunks``.
    """
    _check_square("joint_sample", scores, batch_size)
    if n_chunks < 1:
        raise ValueError(f"joint_sample: n_chunks must be >= 1, got {n_chunks}")
    if batch_size % n_chunks:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        below = max(d for d in divisors if d <= n_chunks)
        above = min((d for d in divisors if d >= n_chunks), default=batch_size)
        raise ValueError(
            f"joint_sample: the batch size b = {batch_size} is not divisible by n_chunks = {n_chunks}; every chunk "
            f"draws b / n_chunks examples. Set n_chunks to a divisor of {batch_size} (nearest: "
            f"{' or '.join(map(str, sorted({below, above})))}) or make the batch size a multiple of {n_chunks}"
        )
    if not bool(torch.isfinite(scores.sum(dtype=torch.float64))):  # NaN or inf anywhere; a float64 sum cannot overflow
        raise ValueError(
            "joint_sample: scores contain NaN or inf; check the embeddings, temperature and bias of both models"
        )
    super_batch = scores.shape[0]
    n_draws = batch_size // n_chunks
    diag = scores.diagonal()
    to_selected = torch.zeros(super_batch, dtype=scores.dtype, device=scores.device)    # sum_{j in A} S[k, j]
    from_selected = torch.zeros(super_batch, dtype=scores.dtype, device=scores.device)  # sum_{i in A} S[i, k]
    selected = torch.zeros(super_batch, dtype=torch.bool, device=scores.device)
    noise = gumbel_noise((n_chunks, super_batch), generator).to(scores.device)  # one row per chunk, drawn at once
    chunks = []
    for c in range(n_chunks):
        logits = (diag + to_selected + from_selected).masked_fill(selected, float("-inf"))
        chunk = torch.topk(logits + noise[c], n_draws).indices  # Gumbel-top-k: n_draws from softmax(logits)
        selected[chunk] = True
        to_selected += scores.index_select(1, chunk).sum(dim=1)
        from_selected += scores.index_select(0, chunk).sum(dim=0)
        chunks.append(chunk)
    return torch.cat(chunks)


def independent_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-example learnability for independent prioritisation (the comparison to joint selection).

    ``s_i = sum_j S[i, j] + sum_j S[j, i] - S[i, i]``: every term of S that involves example i, i.e.
    its learnability as one example of the whole super-batch (image i against all texts, text i
    against all images), scored on its own, without regard to what else is selected.
    """
    return scores.sum(dim=1) + scores.sum(dim=0) - scores.diagonal()


@torch.no_grad()
def independent_topk(scores: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The ``batch_size`` examples of highest :func:`independent_scores`, best first (ties to the lower index)."""
    _check_square("independent_topk", scores, batch_size)
    order = torch.sort(independent_scores(scores), descending=True, stable=True).indices
    return order[:batch_size]
