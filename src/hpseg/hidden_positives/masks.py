"""Global hidden positives: the task-agnostic and task-specific masks (docs/method.md §4).

The rule. Anchor ``i`` and candidate ``j ≠ i`` are positives when ``x_i·x_j > r_i`` or
``x_i·x_j > r_j``, that is when the *margin* ``x_i·x_j − min(r_i, r_j)`` is positive
(:func:`threshold_margin`, the one implementation of the rule; IEEE subtraction of two finite
floats is positive exactly when the first is larger, so the two forms agree bit for bit).

Two ways to evaluate it, on the same margins:

* :func:`positive_masks` / :func:`block_masks` — dense boolean ``(M, N)`` masks for a block of
  ``M`` anchor rows (the dense loss path and the tests' reference);
* :func:`positive_pair_keys` — the positives of the whole batch as a sorted list of pair keys
  ``i·N + j`` (the sparse loss path). Positives are rare (a candidate must beat the closest of the
  ``P`` pool entries, about ``1/P`` of candidates per side), so they are found by screening blocks
  of margins with a max-reduction and examining only the blocks that hold one. The relation is
  symmetric, so only the upper triangle ``j > i`` is computed (half the products) and mirrored.
  (On CPU the positive margins are located with NumPy, whose compare and ``flatnonzero`` are
  several times faster than torch's; the block screening serves other devices.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpseg.hidden_positives.pools import default_matmul_dtype
from hpseg.hidden_positives.sparse import sort_values

#: Columns per screening block of :func:`positive_pair_keys` (a max over 64 contiguous margins).
SCREEN_BLOCK = 64
#: Above this fraction of candidate blocks, screening is skipped and every margin is examined.
_SCREEN_MAX_FRACTION = 0.3


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


def threshold_margin(
    sim: torch.Tensor, r_rows: torch.Tensor, r_cols: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sim_ij − min(r_i, r_j)`` in float32 ``(M, N)``: positive exactly where ``j`` is a positive of ``i``.

    Args:
        sim: similarities ``x_i·x_j`` ``(M, N)`` in the products' dtype.
        r_rows: thresholds of the anchors ``(M,)``; r_cols: thresholds of the candidates ``(N,)``.
        out: optional float32 ``(M, N)`` buffer for the result; must not alias ``sim``.
    """
    margin = torch.minimum(r_rows.unsqueeze(1), r_cols.unsqueeze(0), out=out)
    return torch.sub(sim, margin, out=margin)  # promotes a float16 ``sim`` to float32: exact sign


def _symmetric_positives(
    x_rows: torch.Tensor, x: torch.Tensor, r_rows: torch.Tensor, r: torch.Tensor, self_cols: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x_i·x_j > r_i or x_i·x_j > r_j`` for the anchor rows ``x_rows`` against ``x``, ``j ≠ i`` ``(M, N)`` bool."""
    sim = _similarity(x_rows, x, dtype)
    margin = threshold_margin(sim, r_rows, r)
    del sim
    mask = margin > 0
    del margin
    return mask.scatter_(1, self_cols.unsqueeze(1), False)  # an anchor is not its own positive


def block_masks(
    f_rows: torch.Tensor,
    f: torch.Tensor,
    s_rows: torch.Tensor,
    s: torch.Tensor,
    thresholds_rows: tuple[torch.Tensor, torch.Tensor],
    thresholds: tuple[torch.Tensor, torch.Tensor],
    self_cols: torch.Tensor,
    keep: torch.Tensor | None,
    *,
    with_specific: bool,
    dtype: torch.dtype,
) -> PositiveMasks:
    """:func:`positive_masks` on anchor rows already cut out of the batch (``(M, ·)`` tensors and
    ``self_cols`` ``(M,)``, each anchor's own column): no Python slice, so that one compiled graph
    serves every chunk of a batch (:mod:`~hpseg.hidden_positives.dense`)."""
    agnostic = _symmetric_positives(f_rows, f, thresholds_rows[0], thresholds[0], self_cols, dtype)
    specific = None
    if with_specific:
        specific = _symmetric_positives(s_rows, s, thresholds_rows[1], thresholds[1], self_cols, dtype)
    denominator = torch.ones_like(agnostic) if keep is None else agnostic | keep
    denominator.scatter_(1, self_cols.unsqueeze(1), False)
    return PositiveMasks(agnostic, specific, denominator, agnostic.any(dim=1))


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
    return block_masks(feats[rows], feats, code_ema[rows], code_ema, (r_agnostic[rows], r_specific[rows]),
                       (r_agnostic, r_specific), self_cols, keep, with_specific=with_specific, dtype=dtype)


# ------------------------------------------------------------------------------------------
# sparse: the positives as pair keys
# ------------------------------------------------------------------------------------------


def _positive_entries(
    margin: torch.Tensor, block: int = SCREEN_BLOCK, screen: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the positive entries of ``margin`` ``(t, w)`` float32, contiguous,
    ``w`` a multiple of ``block``, in row-major order.

    On CPU through NumPy; elsewhere screens blocks of ``block`` columns by their maximum (a fast
    reduction) and examines only the blocks that hold a positive margin (all of them when too
    many do). ``screen`` forces the screening (``True``) or NumPy (``False``, CPU only).
    """
    t, w = margin.shape
    if not (
        margin.device.type != "cpu" if screen is None else screen
    ):  # NumPy's vectorised compare + flatnonzero: ~8× torch's gt + nonzero
        flat = torch.from_numpy(np.flatnonzero(margin.numpy() > 0))
        rr = flat.div(w, rounding_mode="floor")
        return rr, flat - rr * w
    blocks = margin.view(t * (w // block), block)
    hot = (blocks.amax(dim=1) > 0).nonzero().view(-1)  # flat (row, block) ids, increasing
    if hot.numel() > _SCREEN_MAX_FRACTION * blocks.shape[0]:
        rr, cc = (margin > 0).nonzero().unbind(1)
        return rr, cc
    which, offset = (blocks.index_select(0, hot) > 0).nonzero().unbind(1)
    flat = hot.index_select(0, which) * block + offset
    rr = flat.div(w, rounding_mode="floor")
    return rr, flat - rr * w


def positive_pair_keys(
    x: torch.Tensor,
    r: torch.Tensor,
    *,
    tile_rows: int,
    matmul_dtype: torch.dtype | None = None,
    max_pairs: int | None = None,
    rows: slice | None = None,
) -> torch.Tensor | None:
    """All positives ``(i, j)``, ``j ≠ i``, of the batch as sorted keys ``i·N + j`` (docs/method.md §4).

    Same rule and same margins as :func:`positive_masks`, evaluated once per unordered pair: row
    tiles of ``tile_rows`` anchors are compared with the candidates at or after the tile
    (``x[s:s+t] @ x[s:].T``), the strict upper triangle is kept and mirrored.

    Args:
        x: L2-normalised rows ``(N, C)`` (``f`` or ``s``).
        r: their pool thresholds ``(N,)`` float32 (:func:`pool_thresholds`).
        tile_rows: anchors per tile; memory is about ``tile_rows·N·(4 + dtype bytes)``.
        matmul_dtype: dtype of the products (default as in :func:`pool_thresholds`).
        max_pairs: give up (return ``None``) once more than this many unordered pairs are found,
            so a batch whose positives are not rare never builds a huge list.
        rows: only the anchors ``rows`` (a contiguous slice of the ``N`` rows; a process's share of
            a global batch, :mod:`~hpseg.hidden_positives.loss`): their positives among all ``N``
            candidates, ``M × N`` products (no triangle: the other rows belong to other processes),
            ``max_pairs`` counting ordered pairs. None: the whole batch.

    Returns:
        ``(2·pairs,)`` int64 keys, sorted (row-major order of the symmetric ``N × N`` mask), or ``None``.

    Note: each unordered pair's similarity is computed once, so the result is exactly
    symmetric; :func:`positive_masks` computes ``x_i·x_j`` and ``x_j·x_i`` in separate products,
    which agree up to the product's rounding. A pair within rounding of its threshold (|margin|
    ~1e-7) could therefore be classified differently by the two; on the golden data and the
    tests' cases they agree exactly.
    """
    n = x.shape[0]
    dtype = matmul_dtype or default_matmul_dtype(x.device)
    tile_rows = max(1, min(int(tile_rows), n))
    if rows is not None and (rows.start, rows.stop) != (0, n):
        return _row_pair_keys(x.to(dtype), r, rows, tile_rows, max_pairs)
    block = SCREEN_BLOCK if x.device.type != "cpu" else 1  # screening: margins padded to whole blocks
    xd = x.to(dtype)
    width = -(-n // block) * block
    sim_buf = torch.empty(tile_rows * n, dtype=dtype, device=x.device)
    margin_buf = torch.empty(tile_rows * width, dtype=torch.float32, device=x.device)
    keys: list[torch.Tensor] = []
    found = 0
    with torch.autocast(x.device.type, enabled=False):
        for s in range(0, n, tile_rows):
            t = min(tile_rows, n - s)
            w = n - s
            wp = -(-w // block) * block
            sim = torch.mm(xd[s : s + t], xd[s:].t(), out=sim_buf[: t * w].view(t, w))
            margin = margin_buf[: t * wp].view(t, wp)
            threshold_margin(sim, r[s : s + t], r[s:], out=margin[:, :w] if wp > w else margin)
            if wp > w:
                margin[:, w:] = float("-inf")
            rr, cc = _positive_entries(margin, block, screen=block > 1)
            upper = cc > rr  # j > i: each unordered pair once (the diagonal and below are dropped)
            rr, cc = rr[upper], cc[upper]
            keys.append((rr + s) * n + (cc + s))
            found += rr.numel()
            if max_pairs is not None and found > max_pairs:
                return None
    del sim_buf, margin_buf
    up = torch.cat(keys) if keys else torch.empty(0, dtype=torch.int64, device=x.device)
    anchor = up.div(n, rounding_mode="floor")
    mirrored = (up - anchor * n) * n + anchor
    return sort_values(torch.cat([up, mirrored]))


def _row_pair_keys(
    xd: torch.Tensor, r: torch.Tensor, rows: slice, tile_rows: int, max_pairs: int | None
) -> torch.Tensor | None:
    """:func:`positive_pair_keys` of the anchors ``rows`` against all ``N`` candidates (``xd`` in the
    products' dtype): sorted keys ``i·N + j`` with ``i`` in ``rows``, ``j ≠ i``; None past ``max_pairs``."""
    n = xd.shape[0]
    block = SCREEN_BLOCK if xd.device.type != "cpu" else 1
    width = -(-n // block) * block
    tile_rows = max(1, min(tile_rows, rows.stop - rows.start))
    sim_buf = torch.empty(tile_rows * n, dtype=xd.dtype, device=xd.device)
    margin_buf = torch.empty(tile_rows * width, dtype=torch.float32, device=xd.device)
    keys: list[torch.Tensor] = []
    found = 0
    with torch.autocast(xd.device.type, enabled=False):
        for s in range(rows.start, rows.stop, tile_rows):
            t = min(tile_rows, rows.stop - s)
            sim = torch.mm(xd[s : s + t], xd.t(), out=sim_buf[: t * n].view(t, n))
            margin = margin_buf[: t * width].view(t, width)
            threshold_margin(sim, r[s : s + t], r, out=margin[:, :n] if width > n else margin)
            if width > n:
                margin[:, n:] = float("-inf")
            rr, cc = _positive_entries(margin, block, screen=block > 1)
            other = cc != rr + s  # an anchor is not its own positive
            rr, cc = rr[other], cc[other]
            keys.append((rr + s) * n + cc)  # row-major within the tile, tiles in order: sorted
            found += rr.numel()
            if max_pairs is not None and found > max_pairs:
                return None
    return torch.cat(keys) if keys else torch.empty(0, dtype=torch.int64, device=xd.device)
