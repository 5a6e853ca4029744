"""The dense evaluation of the HP contrastive terms: ``(M, N)`` masks, logits and gradient products.

For an anchor chunk of ``M`` rows, :func:`dense_contrastive_chunk` computes
``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` and its exact gradient from dense ``(M, N)`` blocks (the sum and
its gradient are derived in :mod:`~hpseg.hidden_positives.loss`). It is the reference the sparse
path (:mod:`~hpseg.hidden_positives.sparse`) is tested against, and the path used on GPUs, where
float16 tensor-core products make dense blocks cheap. Its ``(M, N)`` keep mask of the Bernoulli(ρ)
negatives is :func:`~hpseg.hidden_positives.negatives.negative_keep_mask`, the sparse path's draw.
"""

from __future__ import annotations

import torch

from hpseg.hidden_positives.masks import PositiveMasks, _similarity


def dense_contrastive_chunk(
    e: torch.Tensor,
    rows: slice,
    masks: PositiveMasks,
    weights: torch.Tensor,
    weight_sum: torch.Tensor,
    coef: torch.Tensor,
    tau: float,
    dtype: torch.dtype,
    grad: torch.Tensor | None,
    grad_scale: float,
) -> torch.Tensor:
    """Dense path: ``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` for the anchors ``rows`` of ``e`` (docs/method.md §5).

    When ``grad`` ``(N, D)`` is given, adds ``grad_scale ×`` the gradient of that sum w.r.t. ``e``
    to it. Works on one ``(M, N)`` float32 block (plus the products' dtype copies).

    Args:
        e: L2-normalised embeddings ``(N, D)`` float32 (``z`` or ``z_lhp``).
        rows: anchor slice (``M`` rows).
        masks: the chunk's :class:`PositiveMasks` (denominator and kept anchors are used).
        weights: ``w = A + λT`` ``(M, N)`` float32.
        weight_sum: ``W = Σ_j w_ij`` ``(M,)``.
        coef: anchor coefficients ``c`` ``(M,)`` (0 for dropped anchors).
        tau: temperature. dtype: dtype of the similarity product.
        grad: ``(N, D)`` float32 accumulator, or ``None`` for the value only.
    """
    anchors = e[rows]
    scaled = _similarity(anchors / tau, e, dtype)  # (M, N) e_i·e_j/τ
    row_max = scaled.amax(dim=1, keepdim=True).float()  # over all N candidates, a constant
    logits = torch.sub(scaled, row_max)  # float32 (M, N); the max cancels in log_p
    del scaled
    # Σ_j w_ij·logit_ij as batched row dot products (no (M, N) temporary)
    weighted_logit = torch.bmm(weights.unsqueeze(1), logits.unsqueeze(2)).view(-1)
    p = logits.exp_()  # in place: the logits are no longer needed
    p.mul_(masks.denominator)  # exp over the denominator set only
    sum_exp = p.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    kept = masks.kept
    zero = torch.zeros_like(sum_exp)
    lse = torch.where(kept, sum_exp.log(), zero)  # dropped anchors never enter a logarithm
    total = (coef * (weighted_logit - weight_sum * lse)).sum()
    if grad is not None:
        # ∂/∂logit_ij = c_i·(w_ij − W_i·p_ij/Σ_den p);  ∂logit_ij = (e_i·∂e_j + ∂e_i·e_j)/τ
        c = (coef * (grad_scale / tau)).unsqueeze(1)
        ratio = torch.where(kept, weight_sum / sum_exp, zero).unsqueeze(1)
        g = p.mul_(-ratio * c).addcmul_(weights, c)  # (M, N), in place of p
        grad_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
        with torch.autocast(e.device.type, enabled=False):
            g_low = g.to(grad_dtype)
            del g, p
            grad[rows] += (g_low @ e.to(grad_dtype)).float()
            grad += (g_low.t() @ anchors.to(grad_dtype)).float()
    return total
