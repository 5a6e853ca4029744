"""Global hidden positives: the task-agnostic and task-specific masks (docs/method.md §4).

For a block of anchor rows against every patch of the batch, :func:`positive_masks` returns
``A`` (task-agnostic positives), ``T`` (task-specific positives), the denominator set and the
kept anchors (those with at least one task-agnostic positive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpseg.hidden_positives.pools import default_matmul_dtype


@dataclass(frozen=True)
class PositiveMasks:
    """Masks of one block of ``M`` anchor rows against all ``N`` candidates (all bool).

    Attributes:
        agnostic: ``A`` ``(M, N)``: task-agnostic positives, self excluded.
        specific: ``T`` ``(M, N)``: task-specific positives, self excluded; ``None`` when λ = 0
            (not needed).
        denominator: ``(M, N)``: candidates of the softmax denominator, ``(A | keep) & ¬self``.
        kept: ``(M,)``: anchors with at least one task-agnostic positive.
    """

    agnostic: torch.Tensor
    specific: torch.Tensor | None
    denominator: torch.Tensor
    kept: torch.Tensor


def _similarity(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b.T`` in ``dtype`` ``(M, N)``; autocast is disabled so the dtype is exactly ours."""
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype).t()


def _symmetric_positives(
    x: torch.Tensor, r: torch.Tensor, rows: slice, self_cols: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``x_i·x_j > r_i or x_i·x_j > r_j`` for anchors ``i`` in ``rows``, ``j ≠ i`` ``(M, N)`` bool."""
    sim = _similarity(x[rows], x, dtype)
    mask = sim > r[rows].unsqueeze(1)
    mask.logical_or_(sim > r.unsqueeze(0))
    del sim
    mask[torch.arange(mask.shape[0], device=mask.device), self_cols] = False
    return mask


def positive_masks(
    feats: torch.Tensor,
    code_ema: torch.Tensor,
    r_agnostic: torch.Tensor,
    r_specific: torch.Tensor,
    rows: slice,
    *,
    keep: torch.Tensor | None = None,
    with_specific: bool = True,
    matmul_dtype: torch.dtype | None = None,
) -> PositiveMasks:
    """Hidden-positive masks for the anchor rows ``rows`` of the batch (docs/method.md §4).

    Args:
        feats: ``f``, L2-normalised backbone features ``(N, F)``.
        code_ema: ``s``, L2-normalised EMA-head codes ``(N, D)``.
        r_agnostic: :func:`pool_thresholds` of ``feats`` vs the task-agnostic pool ``(N,)``.
        r_specific: :func:`pool_thresholds` of ``code_ema`` vs the task-specific pool ``(N,)``.
        rows: the anchors, a contiguous slice ``start:stop`` of the ``N`` rows.
        keep: negatives kept in the denominator for these anchors ``(M, N)`` bool; ``None`` keeps
            every candidate (``rho = 1``).
        with_specific: compute ``T`` (skip it when λ = 0).
        matmul_dtype: dtype of the similarity products (as in :func:`pool_thresholds`).

    Returns:
        :class:`PositiveMasks` with ``M = stop − start`` rows.
    """
    dtype = matmul_dtype or default_matmul_dtype(feats.device)
    self_cols = torch.arange(rows.start, rows.stop, device=feats.device)
    agnostic = _symmetric_positives(feats, r_agnostic, rows, self_cols, dtype)
    specific = _symmetric_positives(code_ema, r_specific, rows, self_cols, dtype) if with_specific else None
    if keep is None:
        denominator = torch.ones_like(agnostic)
    else:
        denominator = agnostic | keep
    denominator[torch.arange(agnostic.shape[0], device=agnostic.device), self_cols] = False
    return PositiveMasks(agnostic, specific, denominator, agnostic.any(dim=1))

