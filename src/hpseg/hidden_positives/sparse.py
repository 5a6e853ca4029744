"""Sparse evaluation of the HP contrastive terms: only the pairs that carry weight or gradient.

The loss of an anchor chunk is ``Σ_i c_i·(Σ_j w_ij·logit_ij − W_i·lse_i)`` (module docstring of
:mod:`~hpseg.hidden_positives.loss`) and its gradient with respect to ``logit_ij`` is
``c_i·(w_ij − W_i·p_ij/Σ_den p)``. Both vanish outside the *kept pairs* of the kept anchors:
``den(i) = A_i ∪ keep_i`` (where ``p`` lives) and ``T_i`` (where ``w`` may live without ``p``).
With ``rho = 0.02`` and positives at about ``1/P`` per side that is ~2 % of the ``M × N`` block,
so this module lists those pairs and computes logits, log-sum-exps, weighted sums and both
gradient products on them alone:

* the Bernoulli(ρ) negatives arrive as index sets (:mod:`~hpseg.hidden_positives.negatives`),
  never as an ``M × N`` random matrix;
* :class:`ChunkPairs` / :func:`chunk_pairs` — the kept pairs of one anchor chunk, grouped by
  anchor (CSR order), with their weight ``w_ij`` and denominator flag, plus the transposed order;
* :func:`sparse_contrastive_chunk` — value and exact gradient of the chunk's contrastive sum
  for one embedding (``z`` or ``z_lhp``): a sampled dense-dense product for the logits
  (``torch.sparse.sampled_addmm``), segment sums (``index_add_``) for the denominators and the
  weighted sums, and two sparse-dense products (CSR ``@`` dense) for the gradient.

Memory access decides the speed of the sampled and sparse products (each pair reads a ``D``-wide
row): when the ``N × D`` embeddings outgrow the cache (:data:`_GATHER_CACHE_BYTES`), the logits
are sampled candidate by candidate (the anchor block is what gets gathered) and ``G @ e`` runs over
column blocks of ``G`` whose rows of ``e`` fit in cache (:meth:`ChunkPairs.spmm`).

The masks keep the device's product dtype (:func:`~hpseg.hidden_positives.masks.positive_pair_keys`);
the sampled and sparse products here are float32 on every device (they are bound by reading the
rows, not by arithmetic, on CPU; a lower-precision variant for GPUs is not implemented).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

#: Bytes per kept pair held while a chunk is processed (lists, CSR indices, per-branch values).
BYTES_PER_PAIR = 112
#: Above this size of the embeddings, the sampled logits are computed candidate by candidate.
_GATHER_CACHE_BYTES = 16 * 2**20
#: Bytes of ``e`` rows per column block of :meth:`ChunkPairs.spmm` (about a core's L2 share).
_SPMM_BLOCK_BYTES = 2**20


@dataclass
class ChunkPairs:
    """Kept pairs of one chunk of ``M`` anchors against ``N`` candidates, grouped by anchor.

    Attributes:
        rows: ``(K,)`` int64 anchor index within the chunk, non-decreasing.
        cols: ``(K,)`` int64 candidate index.
        crow: ``(M + 1,)`` CSR row pointers of ``rows``.
        weight: ``(K,)`` float32 ``w_ij = A_ij + λ·T_ij``.
        in_den: ``(K,)`` bool: the pair is in the softmax denominator (``A_ij`` or kept negative).
        order_t: ``(K,)`` permutation grouping the pairs by candidate: the transposed CSR.
        rows_t: ``rows[order_t]``, the column indices of the transposed pattern.
        crow_t: ``(N + 1,)`` row pointers of the transposed pattern.
        m, n: block shape.
        denominator_size: ``Σ_i |den(i)|`` over *all* anchors of the chunk (dropped ones included).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    weight: torch.Tensor
    in_den: torch.Tensor
    order_t: torch.Tensor
    rows_t: torch.Tensor
    crow_t: torch.Tensor
    m: int
    n: int
    denominator_size: int
    _column_blocks: tuple[int, torch.Tensor, list[int], torch.Tensor, torch.Tensor] | None = None

    @property
    def count(self) -> int:
        return int(self.rows.numel())

    def _index_dtype(self) -> torch.dtype:
        return torch.int32 if max(self.count, self.m, self.n) < 2**31 - 1 else torch.int64

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """``(M, N)`` sparse CSR matrix with these pairs and ``values``."""
        idx = self._index_dtype()
        return _csr(self.crow.to(idx), self.cols.to(idx), values, (self.m, self.n))

    def spmm(self, values: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``G @ e`` ``(M, D)`` for ``G`` the ``(M, N)`` matrix of these pairs with ``values``.

        When ``e`` is larger than the cache (:data:`_GATHER_CACHE_BYTES`), ``G``'s columns are
        taken in blocks whose rows of ``e`` fit in cache (~6× faster at N = 50,176 than one
        product that gathers ``e_j`` from memory for every pair).
        """
        if e.numel() * e.element_size() <= _GATHER_CACHE_BYTES or self.count == 0:
            return self.csr(values) @ e
        blocks = self._blocks(max(64, _SPMM_BLOCK_BYTES // (e.shape[1] * e.element_size())))
        width, perm, starts, crows, local_cols = blocks
        v = values.index_select(0, perm)
        out = torch.zeros(self.m, e.shape[1], dtype=e.dtype, device=e.device)
        for b in range(len(starts) - 1):
            lo, hi = starts[b], starts[b + 1]
            if hi > lo:
                first = b * width
                part = _csr(crows[b], local_cols[lo:hi], v[lo:hi], (self.m, min(width, self.n - first)))
                out.addmm_(part, e[first : first + width])
        return out

    def _blocks(self, width: int) -> tuple[int, torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
        """The pairs partitioned by column block (stable: still grouped by anchor), cached."""
        if self._column_blocks is None or self._column_blocks[0] != width:
            nb = -(-self.n // width)
            block = self.cols.div(width, rounding_mode="floor")
            if block.device.type == "cpu":  # NumPy's stable sort of small integers is a radix sort
                small = np.int16 if nb < 2**15 else np.int32
                perm = torch.from_numpy(np.argsort(block.numpy().astype(small), kind="stable")).to(
                    torch.int64
                )
            else:
                perm = torch.sort(block, stable=True).indices
            block = block.index_select(0, perm)
            rows = self.rows.index_select(0, perm)
            idx = self._index_dtype()
            counts = torch.bincount(block * self.m + rows, minlength=nb * self.m).view(nb, self.m)
            crows = torch.zeros(nb, self.m + 1, dtype=torch.int64, device=rows.device)
            torch.cumsum(counts, 1, out=crows[:, 1:])
            starts = [0] + torch.cumsum(counts.sum(1), 0).tolist()
            local = (self.cols.index_select(0, perm) - block * width).to(idx)
            self._column_blocks = (width, perm, starts, crows.to(idx), local)
        return self._column_blocks

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """``(N, M)`` sparse CSR of the transpose (``values`` in pair order)."""
        idx = self._index_dtype()
        return _csr(
            self.crow_t.to(idx), self.rows_t.to(idx), values.index_select(0, self.order_t), (self.n, self.m)
        )


def sort_values(x: torch.Tensor) -> torch.Tensor:
    """``torch.sort(x).values`` (1-D); on CPU through NumPy, whose vectorised sort is ~10× faster."""
    if x.device.type == "cpu" and x.numel() > 1:
        return torch.from_numpy(np.sort(x.numpy()))
    return torch.sort(x).values


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat int64 indices of the true entries of a contiguous bool tensor (NumPy on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy())).to(torch.int64)
    return mask.reshape(-1).nonzero().view(-1)


def argsort(x: torch.Tensor) -> torch.Tensor:
    """A permutation sorting ``x`` (1-D; not stable); NumPy's vectorised sort on CPU."""
    if x.device.type == "cpu" and x.numel() > 1:
        return torch.from_numpy(np.argsort(x.numpy())).to(torch.int64)
    return torch.argsort(x)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _row_pointers(rows: torch.Tensor, m: int) -> torch.Tensor:
    crow = torch.zeros(m + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=m), 0, out=crow[1:])
    return crow


def chunk_pairs(
    agnostic: torch.Tensor,
    specific: torch.Tensor | None,
    negatives: torch.Tensor,
    kept: torch.Tensor,
    m: int,
    n: int,
    lam: float,
) -> ChunkPairs:
    """The kept pairs of a chunk from its sorted key lists (keys ``i_local·N + j``).

    Args:
        agnostic: ``A`` keys (sorted). specific: ``T`` keys (sorted), or ``None`` when λ = 0.
        negatives: kept-negative keys (sorted; may overlap ``A`` and ``T``).
        kept: ``(M,)`` bool anchors with a task-agnostic positive; pairs of other anchors are dropped.
        lam: weight λ of ``T``.

    The union is formed without sorting: each list is de-duplicated against the earlier ones on a
    one-byte ``(M, N)`` tag map, then the three sorted lists are interleaved row by row (counts
    and offsets); within an anchor the candidates are not sorted, which no consumer needs.
    """
    device = agnostic.device
    tags = torch.zeros(m * n, dtype=torch.uint8, device=device)
    tags.index_fill_(0, agnostic, 1)
    lists: list[torch.Tensor] = [agnostic]
    weights: list[torch.Tensor] = []
    dens: list[torch.Tensor] = []
    if specific is not None:
        t_tags = tags.index_select(0, specific)  # 1 where also in A
        tags.index_copy_(0, specific, t_tags | 2)
        tags.index_copy_(0, negatives, tags.index_select(0, negatives) | 4)
        weights.append(1.0 + lam * (tags.index_select(0, agnostic) & 2).bool().to(torch.float32))
        dens.append(torch.ones(agnostic.numel(), dtype=torch.bool, device=device))
        only_t = specific[t_tags == 0]
        lists.append(only_t)
        weights.append(torch.full((only_t.numel(),), float(lam), device=device))
        dens.append((tags.index_select(0, only_t) & 4).bool())
        only_k = negatives[tags.index_select(0, negatives) == 4]
    else:
        weights.append(torch.ones(agnostic.numel(), device=device))
        dens.append(torch.ones(agnostic.numel(), dtype=torch.bool, device=device))
        only_k = negatives[tags.index_select(0, negatives) == 0]
    del tags
    denominator_size = int(agnostic.numel() + only_k.numel()) + (
        int(dens[1].sum()) if specific is not None else 0
    )
    lists.append(only_k)
    weights.append(torch.zeros(only_k.numel(), device=device))
    dens.append(torch.ones(only_k.numel(), dtype=torch.bool, device=device))

    # drop the pairs of anchors without a task-agnostic positive (they carry no loss)
    row_lists, col_lists = [], []
    all_kept = bool(kept.all())
    for i, keys in enumerate(lists):
        r = keys.div(n, rounding_mode="floor")
        if not all_kept:
            keep = kept.index_select(0, r)
            r, keys, weights[i], dens[i] = r[keep], keys[keep], weights[i][keep], dens[i][keep]
        row_lists.append(r)
        col_lists.append(keys - r * n)

    # interleave the row-sorted lists row by row: position = start of the row in the union +
    # entries of that row in the earlier lists + rank within the row in this list
    counts = [torch.bincount(r, minlength=m) for r in row_lists]
    total = torch.stack(counts).sum(0)
    crow = torch.zeros(m + 1, dtype=torch.int64, device=device)
    torch.cumsum(total, 0, out=crow[1:])
    k = int(crow[-1])
    rows = torch.empty(k, dtype=torch.int64, device=device)
    cols = torch.empty(k, dtype=torch.int64, device=device)
    weight = torch.empty(k, dtype=torch.float32, device=device)
    in_den = torch.empty(k, dtype=torch.bool, device=device)
    offset = crow[:-1].clone()
    for r, c, cnt, w, d in zip(row_lists, col_lists, counts, weights, dens):
        if r.numel():
            first = torch.cumsum(cnt, 0).sub_(cnt).sub_(offset)  # this list's row starts − union's
            pos = torch.arange(r.numel(), device=device).sub_(first.index_select(0, r))
            rows.index_copy_(0, pos, r)
            cols.index_copy_(0, pos, c)
            weight.index_copy_(0, pos, w)
            in_den.index_copy_(0, pos, d)
        offset += cnt
    order_t = argsort(cols)  # the transposed pattern; entries of a candidate in any order
    crow_t = _row_pointers(cols, n)
    rows_t = rows.index_select(0, order_t)
    return ChunkPairs(rows, cols, crow, weight, in_den, order_t, rows_t, crow_t, m, n, denominator_size)


def sparse_contrastive_chunk(
    e: torch.Tensor,
    rows: slice,
    pairs: ChunkPairs,
    weight_sum: torch.Tensor,
    coef: torch.Tensor,
    kept: torch.Tensor,
    tau: float,
    grad: torch.Tensor | None,
    grad_scale: float,
) -> torch.Tensor:
    """``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` for anchors ``rows`` of ``e``, on the kept pairs only.

    Equal to the dense :func:`~hpseg.hidden_positives.dense.dense_contrastive_chunk` (same arguments
    except the pairs replace the masks and weights). When ``grad`` ``(N, D)`` is given, adds
    ``grad_scale ×`` the gradient of the sum with respect to ``e`` to it.

    Args:
        e: L2-normalised embeddings ``(N, D)`` float32.
        rows: anchor slice (``M`` rows). pairs: the chunk's :class:`ChunkPairs`.
        weight_sum: ``W_i = Σ_j w_ij`` ``(M,)``. coef: ``c_i`` ``(M,)`` (0 for dropped anchors).
        kept: ``(M,)`` bool anchors with a task-agnostic positive.
        tau: temperature. grad: ``(N, D)`` float32 accumulator, or ``None`` for the value only.
    """
    anchors = e[rows]
    zero = torch.zeros_like(weight_sum)
    if pairs.count == 0:
        return zero.sum()
    with torch.autocast(e.device.type, enabled=False):
        zeros = torch.zeros(pairs.count, dtype=torch.float32, device=e.device)
        if e.numel() * e.element_size() > _GATHER_CACHE_BYTES:
            # candidate by candidate: each e_j is read once and the (smaller) anchor block is
            # gathered, which stays in cache (3× faster at N = 50,176 than gathering e_j)
            logits_t = torch.sparse.sampled_addmm(
                pairs.csr_t(zeros), e, anchors.t(), beta=0.0, alpha=1.0 / tau
            ).values()
            logits = torch.empty_like(logits_t).index_copy_(0, pairs.order_t, logits_t)
        else:
            logits = torch.sparse.sampled_addmm(
                pairs.csr(zeros), anchors, e.t(), beta=0.0, alpha=1.0 / tau
            ).values()
    # stabiliser: an upper bound of every logit of the row (Cauchy–Schwarz; ‖e_i‖²/τ for unit
    # rows, the dense path's row maximum); it cancels in log_p
    norms = anchors.norm(dim=1)
    shift = norms * e.norm(dim=1).amax() / tau  # (M,)
    shifted = logits - shift.index_select(0, pairs.rows)
    p = torch.where(pairs.in_den, shifted.exp(), torch.zeros_like(shifted))
    sum_exp = (
        torch.zeros_like(weight_sum).index_add_(0, pairs.rows, p).clamp_min_(torch.finfo(torch.float32).tiny)
    )
    weighted = torch.zeros_like(weight_sum).index_add_(0, pairs.rows, pairs.weight * shifted)
    lse = torch.where(kept, sum_exp.log(), zero)  # dropped anchors never enter a logarithm
    total = (coef * (weighted - weight_sum * lse)).sum()
    if grad is not None:
        # ∂/∂logit_ij = c_i·(w_ij − W_i·p_ij/Σ_den p);  ∂logit_ij = (e_i·∂e_j + ∂e_i·e_j)/τ
        c = coef * (grad_scale / tau)
        ratio = torch.where(kept, weight_sum / sum_exp, zero)
        g = (pairs.weight - ratio.index_select(0, pairs.rows) * p).mul_(c.index_select(0, pairs.rows))
        with torch.autocast(e.device.type, enabled=False):
            grad[rows] += pairs.spmm(g, e)
            grad += pairs.csr_t(g) @ anchors
    return total


def explicit_negative_keys(negative_keep: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """Kept negatives of the anchors ``rows`` from an explicit ``(N, N)`` bool matrix, as sorted
    local keys ``i_local·N + j`` (the anchor itself never)."""
    keys = flat_nonzero(negative_keep[rows].contiguous())
    local = keys.div(n, rounding_mode="floor")
    return keys[keys - local * n != local + rows.start]


def slice_keys(keys: torch.Tensor | None, rows: slice, n: int) -> torch.Tensor | None:
    """The keys of anchors ``rows`` from a sorted batch-wide key list, made local to the chunk."""
    if keys is None:
        return None
    bounds = torch.tensor([rows.start * n, rows.stop * n], dtype=keys.dtype, device=keys.device)
    lo, hi = torch.searchsorted(keys, bounds).tolist()
    return keys[lo:hi] - rows.start * n
