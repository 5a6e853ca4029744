"""The dense evaluation of the HP contrastive terms: ``(M, N)`` masks, logits and gradient products.

For an anchor chunk of ``M`` rows, :func:`dense_chunk_terms` computes the masks
(:func:`~hpseg.hidden_positives.masks.block_masks`), the anchors' coefficients
(:func:`anchor_coefficients`) and, for ``z`` and ``z_lhp``, ``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` with
its exact gradient (:func:`contrastive_terms`; the sum and its gradient are derived in
:mod:`~hpseg.hidden_positives.loss`). It is the reference the sparse path
(:mod:`~hpseg.hidden_positives.sparse`) is tested against, and the path used on GPUs, where
float16 tensor-core products make dense blocks cheap. Its ``(M, N)`` keep mask of the Bernoulli(ρ)
negatives is :func:`~hpseg.hidden_positives.negatives.negative_keep_mask`, the sparse path's draw.

:func:`dense_chunk_terms` takes only tensors of the chunk's shape and plain numbers and returns
its results instead of writing into buffers, so that ``torch.compile`` can turn its element-wise
passes over the ``(M, N)`` blocks into a few fused kernels (``loss.compile=true``,
:func:`compiled_dense_chunk_terms`); called as it is, it is the eager reference. The compiled
path passes λ as a 0-dim tensor and "with the task-specific term" as a static flag: dynamo guards
on the value of a Python float, so a float λ, which changes at every iteration after the warm-up,
would recompile the chunk at every step until dynamo's recompile limit turns compilation off;
with a tensor λ there is one graph for every λ ≠ 0 and one for λ = 0 (per chunk shape).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hpseg.hidden_positives.masks import PositiveMasks, _similarity, block_masks

ChunkTerms = tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor] | None]]


def anchor_coefficients(kept: torch.Tensor, weight_sum: torch.Tensor, images: int, reweight: bool) -> torch.Tensor:
    """``c_i`` such that an image's term is ``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` ``(M,)``.

    Reweighting on: ``c_i = 1/Σ_k W_k`` over the kept anchors ``k`` of i's image (this is
    ``mean_i(mean_pos·pnm)`` with ``pnm_i = W_i / mean_k W_k``); off: ``c_i = 1/(K·W_i)``.
    Dropped anchors get 0, and so does every anchor of an image without a kept one.

    Args:
        kept: ``(M,)`` bool, anchors with at least one task-agnostic positive.
        weight_sum: ``W`` ``(M,)`` float32. images: images in the chunk (``M = images·S²``).
    """
    kept = kept.view(images, -1)
    w = torch.where(kept, weight_sum.view(images, -1), torch.zeros_like(weight_sum.view(images, -1)))
    if reweight:
        total = w.sum(dim=1, keepdim=True)  # (images, 1)
        coef = torch.where(kept, 1.0 / total.clamp_min(1e-30), torch.zeros_like(w))
    else:
        count = kept.sum(dim=1, keepdim=True).clamp_min(1).to(w.dtype)
        coef = torch.where(kept, 1.0 / (count * w.clamp_min(1e-30)), torch.zeros_like(w))
    return coef.reshape(-1)


def contrastive_terms(
    anchors: torch.Tensor,
    e: torch.Tensor,
    masks: PositiveMasks,
    weights: torch.Tensor,
    weight_sum: torch.Tensor,
    coef: torch.Tensor,
    tau: float,
    dtype: torch.dtype,
    need_grad: bool,
    grad_scale: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` for ``anchors`` (rows of ``e``) and, when ``need_grad``, the
    two parts of ``grad_scale ×`` its gradient w.r.t. ``e`` (docs/method.md §5).

    Works on one ``(M, N)`` float32 block (plus the products' dtype copies).

    Args:
        anchors: the chunk's rows of ``e`` ``(M, D)``; e: L2-normalised embeddings ``(N, D)``
            float32 (``z`` or ``z_lhp``).
        masks: the chunk's :class:`PositiveMasks` (denominator and kept anchors are used).
        weights: ``w = A + λT`` ``(M, N)`` float32. weight_sum: ``W = Σ_j w_ij`` ``(M,)``.
        coef: anchor coefficients ``c`` ``(M,)`` (0 for dropped anchors).
        tau: temperature. dtype: dtype of the similarity product.

    Returns:
        The sum (0-dim) and ``(grad_anchors (M, D), grad_all (N, D))``: the gradient is
        ``grad_all`` plus ``grad_anchors`` added to the anchors' rows; ``None`` without ``need_grad``.
    """
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
    if not need_grad:
        return total, None
    # ∂/∂logit_ij = c_i·(w_ij − W_i·p_ij/Σ_den p);  ∂logit_ij = (e_i·∂e_j + ∂e_i·e_j)/τ
    c = (coef * (grad_scale / tau)).unsqueeze(1)
    ratio = torch.where(kept, weight_sum / sum_exp, zero).unsqueeze(1)
    g = p.mul_(-ratio * c).addcmul_(weights, c)  # (M, N), in place of p
    grad_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    with torch.autocast(e.device.type, enabled=False):
        g_low = g.to(grad_dtype)
        del g, p
        grad_anchors = (g_low @ e.to(grad_dtype)).float()
        grad_all = (g_low.t() @ anchors.to(grad_dtype)).float()
    return total, (grad_anchors, grad_all)


def dense_chunk_terms(
    anchors: tuple[torch.Tensor, torch.Tensor],
    embeddings: tuple[torch.Tensor, torch.Tensor],
    f_rows: torch.Tensor,
    f: torch.Tensor,
    s_rows: torch.Tensor,
    s: torch.Tensor,
    thresholds_rows: tuple[torch.Tensor, torch.Tensor],
    thresholds: tuple[torch.Tensor, torch.Tensor],
    self_cols: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    images: int,
    lam: float | torch.Tensor,
    tau: float,
    reweight: bool,
    dtype: torch.dtype,
    need_grad: tuple[bool, bool],
    grad_scale: float,
    with_specific: bool | None = None,
) -> ChunkTerms:
    """One anchor chunk on the dense path: its contribution to the loss, its counts and gradients.

    Args:
        anchors: the chunk's rows of ``z`` and ``z_lhp`` ``(M, D)``; embeddings: ``z``, ``z_lhp`` ``(N, D)``.
        f_rows, f: backbone features of the chunk ``(M, F)`` and the batch ``(N, F)``.
        s_rows, s: EMA codes ``(M, D')``, ``(N, D')``. thresholds_rows / thresholds: the pool
            thresholds ``(r_agnostic, r_specific)`` of the chunk ``(M,)`` and the batch ``(N,)``.
        self_cols: each anchor's own column ``(M,)``. keep: kept negatives ``(M, N)`` bool, or
            ``None`` to keep every candidate.
        images: images in the chunk. lam: λ, a number (the eager path) or a 0-dim float32
            tensor on the chunk's device (the compiled path: its value is then no part of the graph).
        tau: τ. reweight: the authors' ``pnm``.
        dtype: dtype of the similarity products. need_grad: per embedding.
        grad_scale: factor of the gradients (the loss's scale).
        with_specific: whether the task-specific positives enter (λ ≠ 0); ``None``: ``lam != 0``,
            for a number only (a tensor λ needs the flag: reading its value would synchronise).

    Returns:
        ``(total, counts, grads)``: the sum over both embeddings (0-dim), the float64 counts
        ``(A, T, kept anchors, |den|)`` and per embedding ``(grad_anchors, grad_all)`` or ``None``.
    """
    if with_specific is None:
        if isinstance(lam, torch.Tensor):
            raise ValueError("dense_chunk_terms: a tensor lam needs with_specific (the flag is static)")
        with_specific = lam != 0.0
    masks = block_masks(f_rows, f, s_rows, s, thresholds_rows, thresholds, self_cols, keep,
                        with_specific=with_specific, dtype=dtype)
    weights = masks.agnostic.to(torch.float32)
    count_a = weights.sum(dim=1)
    count_t = torch.zeros_like(count_a)
    if masks.specific is not None:
        if isinstance(lam, torch.Tensor):  # w = A + λ·T with the same float32 values as alpha=λ (T is 0 or 1)
            weights.add_(masks.specific * lam)
        else:
            weights.add_(masks.specific, alpha=lam)
        count_t = masks.specific.sum(dim=1).to(torch.float32)
    weight_sum = count_a + lam * count_t
    coef = anchor_coefficients(masks.kept, weight_sum, images, reweight)
    total = torch.zeros((), dtype=torch.float32, device=f.device)
    grads: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for a, e, need in zip(anchors, embeddings, need_grad):
        part, grad = contrastive_terms(a, e, masks, weights, weight_sum, coef, tau, dtype, need, grad_scale)
        total = total + part
        grads.append(grad)
    counts = torch.stack([count_a.sum(), count_t.sum(), masks.kept.sum(), masks.denominator.sum()]).double()
    return total, counts, grads


_compiled: dict[str, Callable[..., Any]] = {}


def compiled_dense_chunk_terms(backend: str = "inductor") -> Callable[..., ChunkTerms]:
    """:func:`dense_chunk_terms` through ``torch.compile`` (built once per backend and reused).

    Call it with ``lam`` a 0-dim float32 tensor and ``with_specific`` given (as
    :func:`~hpseg.hidden_positives.loss.hidden_positive_loss` does): then it holds one graph per
    chunk shape (the full chunks and the last one) and per flag, for every λ of a run. Same values
    as the eager reference up to the fused kernels' float rounding."""
    if backend not in _compiled:
        _compiled[backend] = torch.compile(dense_chunk_terms, backend=backend, dynamic=False)
    return _compiled[backend]
