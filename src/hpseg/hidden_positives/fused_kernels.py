"""Triton kernels of the fused HP loss (``loss.path=fused``): only ``@triton.jit`` code.

What they compute, how they are launched and why they are built this way is documented in
:mod:`~hpseg.hidden_positives.fused`, the only module that imports this one (lazily, so that
``TRITON_INTERPRET`` is read when the kernels are first needed). Shapes below: ``N`` candidate
rows, ``M`` anchor rows ``[row_start, row_end)`` of the candidates, ``NW = ⌈N/32⌉`` int32 words
per row of a bit mask (bit ``j % 32`` of word ``j // 32`` is column ``j``).

* :func:`negative_block_sums_kernel`, :func:`negative_bits_kernel` — the counter-based kept
  negatives of :mod:`~hpseg.hidden_positives.negatives` as an ``(M, NW)`` bit mask;
* :func:`rows_kernel` — pass 1: masks, counts, ``Σ_j w_ij·ℓ_ij`` and the log-sum-exp per anchor;
* :func:`gradient_kernel` — pass 2: ``∂L/∂e`` for a block of rows, both the anchor and the
  candidate (transposed) terms, written by the program that owns the rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------
# kept negatives: SplitMix64 streams, exact geometric gaps, bits
# ------------------------------------------------------------------------------------------


@triton.jit
def _mix64(z):
    """SplitMix64's finaliser on uint64 (wrapping products, logical shifts)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _uniform53(key, image, k):
    """The ``k``-th output (``k ≥ 1``, int64 block) of image ``image``'s stream, int64 in ``[0, 2^53)``."""
    start = _mix64(key.to(tl.uint64) + (image + 1).to(tl.uint64) * 0x9E3779B97F4A7C15)
    return (_mix64(start + k.to(tl.uint64) * 0x9E3779B97F4A7C15) >> 11).to(tl.int64)


@triton.jit
def _gap_steps(key, image, k, ok, table_ptr, table_len, log_q, longest):
    """``G + 1`` for the draws ``k`` (0 where not ``ok``): the geometric gap from the logarithm's
    estimate, corrected by one step against the integer thresholds (``negatives.geometric_gaps``)."""
    u = _uniform53(key, image, k)
    x = (u + 1).to(tl.float64) * 1.1102230246251565e-16  # 2^-53
    est_f = tl.floor(tl.log(x) / log_q)
    est = tl.minimum(tl.minimum(tl.maximum(est_f, 0.0), 4.0e18).to(tl.int64), longest)  # clip(·, 0, longest)
    last = table_len - 1
    g = tl.minimum(est, last - 1)
    above = tl.load(table_ptr + g + 1, mask=ok, other=0)
    at = tl.load(table_ptr + g, mask=ok, other=0)
    g = g + (u < above).to(tl.int64) - (u >= at).to(tl.int64)
    gap = tl.minimum(tl.where(est < last - 1, g, est), longest)
    return tl.where(ok, gap + 1, 0)


@triton.jit
def negative_block_sums_kernel(
    sums_ptr, table_ptr, table_len, key: tl.uint64, log_q: tl.float64, first_image, count, longest, n_blocks,
    BLOCK: tl.constexpr,
):
    """Grid ``(images, n_blocks)``: ``sums[b, blk] = Σ (G + 1)`` over the draws of block ``blk`` of image ``b``."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    k = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64) + 1
    ok = k <= count
    steps = _gap_steps(key, first_image + b, k, ok, table_ptr, table_len, log_q, longest)
    tl.store(sums_ptr + b * n_blocks + blk, tl.sum(steps, axis=0))


@triton.jit
def negative_bits_kernel(
    bits_ptr, offsets_ptr, table_ptr, table_len, key: tl.uint64, log_q: tl.float64, first_image, count, longest,
    n_blocks, per_image, n, row_start, n_words, BLOCK: tl.constexpr,
):
    """Grid ``(images, n_blocks)``: set the bits of the kept negatives of block ``blk`` of image ``b``.

    ``offsets[b, blk]`` is the exclusive prefix sum of :func:`negative_block_sums_kernel`'s sums, so
    the draw's trial index is ``offset + cumsum(G + 1) − 1``; trial ``t`` of the image is anchor
    ``t // (N − 1)`` and candidate ``t % (N − 1)``, skipping the anchor's own column. Bits are set
    with ``atomic_or`` of a constant: the result does not depend on the order.
    """
    b = tl.program_id(0)
    blk = tl.program_id(1)
    k = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64) + 1
    ok = k <= count
    steps = _gap_steps(key, first_image + b, k, ok, table_ptr, table_len, log_q, longest)
    pos = tl.load(offsets_ptr + b * n_blocks + blk) + tl.cumsum(steps, axis=0) - 1
    valid = ok & (pos < longest)
    r = pos // (n - 1)
    c = pos - r * (n - 1)
    anchor = r + b.to(tl.int64) * per_image  # row within [row_start, row_end)
    col = c + (c >= anchor + row_start).to(tl.int64)
    word = anchor * n_words + col // 32
    tl.atomic_or(bits_ptr + word, 1 << (col % 32).to(tl.int32), mask=valid, sem="relaxed")


# ------------------------------------------------------------------------------------------
# pass 1 and pass 2
# ------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc):
    """``acc + a @ b`` with float32 accumulation; float32 operands in full precision (no TF32)."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _products(x_ptr, width, rows, rows_ok, cols, cols_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """``x[rows] @ x[cols]ᵀ`` ``(BLOCK_M, BLOCK_N)`` float32 from operands in ``x``'s dtype (row stride ``width``)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    r_off = rows.to(tl.int64) * width
    c_off = cols.to(tl.int64) * width
    for k0 in range(0, width, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < width
        a = tl.load(x_ptr + r_off[:, None] + ks[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(x_ptr + c_off[None, :] + ks[:, None], mask=k_ok[:, None] & cols_ok[None, :], other=0.0)
        acc = _dot(a, b, acc)
    return acc


@triton.jit
def _positives(x_ptr, width, r_ptr, r_rows, rows, rows_ok, cols, cols_ok, valid, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``x_i·x_j − min(r_i, r_j) > 0`` on ``valid`` pairs, the similarity rounded to the operands' dtype
    first (as the dense path's product returns it): ``masks.block_masks``' rule, bit for bit."""
    sim = _products(x_ptr, width, rows, rows_ok, cols, cols_ok, BLOCK_M, BLOCK_N, BLOCK_K)
    sim = sim.to(x_ptr.dtype.element_ty).to(tl.float32)
    r_cols = tl.load(r_ptr + cols, mask=cols_ok, other=0.0)
    return ((sim - tl.minimum(r_rows[:, None], r_cols[None, :])) > 0) & valid


@triton.jit
def _bits(bits_ptr, n_words, rows_local, rows_ok, j0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bits of columns ``j0 + [0, BLOCK_N)`` (``j0`` a multiple of 32) of rows ``rows_local`` of an
    ``(·, NW)`` bit mask, as a ``(BLOCK_M, BLOCK_N)`` bool block (False where not ``rows_ok``): one load
    per word, expanded in registers."""
    w_idx = j0 // 32 + tl.arange(0, BLOCK_N // 32)
    ptrs = bits_ptr + rows_local.to(tl.int64)[:, None] * n_words + w_idx[None, :]
    words = tl.load(ptrs, mask=rows_ok[:, None] & (w_idx < n_words)[None, :], other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def _bits_transposed(bits_ptr, n_words, k0, cols_local, cols_ok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bits of columns ``k0 + [0, BLOCK_M)`` (``k0`` a multiple of 32) of rows ``cols_local`` laid out as a
    ``(BLOCK_M, BLOCK_N)`` block (entry ``(k, j)`` is bit ``(j, k)``; False where not ``cols_ok``)."""
    w_idx = k0 // 32 + tl.arange(0, BLOCK_M // 32)
    ptrs = bits_ptr + cols_local.to(tl.int64)[None, :] * n_words + w_idx[:, None]
    words = tl.load(ptrs, mask=(w_idx < n_words)[:, None] & cols_ok[None, :], other=0)
    bits = (words[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)) != 0


@triton.jit
def _store_bits(bits_ptr, n_words, rows_local, rows_ok, j0, mask, cols, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Pack a ``(BLOCK_M, BLOCK_N)`` bool tile whose first column ``j0`` is a multiple of 32 into words."""
    shifted = mask.to(tl.int32) << (cols % 32)[None, :]
    # distinct bits: their sum is their OR (bit 31 is the int32 sign; two's complement adds it exactly)
    words = tl.sum(tl.reshape(shifted, (BLOCK_M, BLOCK_N // 32, 32)), axis=2)
    w_idx = j0 // 32 + tl.arange(0, BLOCK_N // 32)
    ptrs = bits_ptr + rows_local.to(tl.int64)[:, None] * n_words + w_idx[None, :]
    tl.store(ptrs, words, mask=rows_ok[:, None] & (w_idx < n_words)[None, :])


@triton.jit
def _online_lse(e_ptr, width, rows, rows_ok, cols, cols_ok, w, den, tau, total, run_max, run_sum,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of one branch: ``Σ_j w·ℓ`` and the running max / sum of ``exp`` over the denominator."""
    logit = _products(e_ptr, width, rows, rows_ok, cols, cols_ok, BLOCK_M, BLOCK_N, BLOCK_K) / tau
    total += tl.sum(w * logit, axis=1)
    new_max = tl.maximum(run_max, tl.max(tl.where(den, logit, float("-inf")), axis=1))
    p = tl.exp(tl.where(den, logit - new_max[:, None], float("-inf")))
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(p, axis=1)
    return total, new_max, run_sum


@triton.jit
def rows_kernel(
    f_ptr, s_ptr, z_ptr, h_ptr, r_ag_ptr, r_sp_ptr, keep_ptr, a_bits_ptr, t_bits_ptr, counts_ptr, sums_ptr,
    lse_ptr, n, row_start, row_end, width_f, width_s, width_e, n_words, lam, tau,
    WITH_T: tl.constexpr, KEEP_MODE: tl.constexpr, STORE_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pass 1. Grid ``(⌈M / BLOCK_M⌉,)``; program ``p`` owns anchors ``row_start + p·BLOCK_M + [0, BLOCK_M)``
    and loops over all ``N`` candidates in tiles of ``BLOCK_N``.

    Writes per anchor (local index ``i − row_start``): ``counts (M, 3)`` int32 (|A|, |T|, |den|),
    ``sums (2, M)`` float32 ``Σ_j w_ij·ℓ_ij`` for z and z_lhp, ``lse (2, M)`` the log-sum-exp of
    ``ℓ`` over the denominator (0 where it is empty), and with ``STORE_BITS`` the ``(M, NW)`` bits
    of ``A`` and ``T``. ``KEEP_MODE``: 0 no kept negatives, 1 the bits at ``keep_ptr``, 2 all.
    """
    pid = tl.program_id(0)
    rows = row_start + pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < row_end
    local = rows - row_start
    r_ag_rows = tl.load(r_ag_ptr + rows, mask=rows_ok, other=0.0)
    r_sp_rows = tl.load(r_sp_ptr + rows, mask=rows_ok, other=0.0)
    count_a = tl.zeros((BLOCK_M,), dtype=tl.int32)
    count_t = tl.zeros((BLOCK_M,), dtype=tl.int32)
    count_d = tl.zeros((BLOCK_M,), dtype=tl.int32)
    sum_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_h = tl.zeros((BLOCK_M,), dtype=tl.float32)
    max_z = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    max_h = tl.full((BLOCK_M,), -1e30, dtype=tl.float32)
    exp_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    exp_h = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for j0 in range(0, n, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cols_ok = cols < n
        valid = rows_ok[:, None] & cols_ok[None, :] & (rows[:, None] != cols[None, :])
        agnostic = _positives(f_ptr, width_f, r_ag_ptr, r_ag_rows, rows, rows_ok, cols, cols_ok, valid,
                              BLOCK_M, BLOCK_N, BLOCK_K)
        count_a += tl.sum(agnostic.to(tl.int32), axis=1)
        w = agnostic.to(tl.float32)
        if WITH_T:
            specific = _positives(s_ptr, width_s, r_sp_ptr, r_sp_rows, rows, rows_ok, cols, cols_ok, valid,
                                  BLOCK_M, BLOCK_N, BLOCK_K)
            count_t += tl.sum(specific.to(tl.int32), axis=1)
            w = w + lam * specific.to(tl.float32)
            if STORE_BITS:
                _store_bits(t_bits_ptr, n_words, local, rows_ok, j0, specific, cols, BLOCK_M, BLOCK_N)
        if STORE_BITS:
            _store_bits(a_bits_ptr, n_words, local, rows_ok, j0, agnostic, cols, BLOCK_M, BLOCK_N)
        if KEEP_MODE == 0:
            den = agnostic
        elif KEEP_MODE == 1:
            den = (agnostic | _bits(keep_ptr, n_words, local, rows_ok, j0, BLOCK_M, BLOCK_N)) & valid
        else:
            den = valid
        count_d += tl.sum(den.to(tl.int32), axis=1)
        sum_z, max_z, exp_z = _online_lse(z_ptr, width_e, rows, rows_ok, cols, cols_ok, w, den, tau, sum_z, max_z,
                                          exp_z, BLOCK_M, BLOCK_N, BLOCK_K)
        sum_h, max_h, exp_h = _online_lse(h_ptr, width_e, rows, rows_ok, cols, cols_ok, w, den, tau, sum_h, max_h,
                                          exp_h, BLOCK_M, BLOCK_N, BLOCK_K)
    m = row_end - row_start
    tl.store(counts_ptr + local * 3, count_a, mask=rows_ok)
    tl.store(counts_ptr + local * 3 + 1, count_t, mask=rows_ok)
    tl.store(counts_ptr + local * 3 + 2, count_d, mask=rows_ok)
    tl.store(sums_ptr + local, sum_z, mask=rows_ok)
    tl.store(sums_ptr + m + local, sum_h, mask=rows_ok)
    has_den = count_d > 0
    tl.store(lse_ptr + local, tl.where(has_den, max_z + tl.log(tl.maximum(exp_z, 1e-38)), 0.0), mask=rows_ok)
    tl.store(lse_ptr + m + local, tl.where(has_den, max_h + tl.log(tl.maximum(exp_h, 1e-38)), 0.0), mask=rows_ok)


@triton.jit
def _coefficients(logit, agnostic, specific, keep, den_all, coef, weight_sum, lse, lam, WITH_T: tl.constexpr,
                  KEEP_MODE: tl.constexpr):
    """``c·(w − W·p)`` on a tile, ``p = den·exp(ℓ − LSE)``; ``coef``, ``weight_sum``, ``lse`` broadcast."""
    w = agnostic.to(tl.float32)
    if WITH_T:
        w = w + lam * specific.to(tl.float32)
    if KEEP_MODE == 0:
        den = agnostic
    elif KEEP_MODE == 1:
        den = (agnostic | keep) & den_all
    else:
        den = den_all
    p = tl.exp(tl.where(den, logit - lse, float("-inf")))
    return coef * (w - weight_sum * p)


@triton.jit
def gradient_kernel(
    e_ptr, out_ptr, coef_ptr, weight_sum_ptr, lse_ptr, a_bits_ptr, t_bits_ptr, keep_ptr, n, row_start, row_end,
    width_e, n_words, lam, tau, WITH_T: tl.constexpr, KEEP_MODE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2 for one branch ``e``. Grid ``(⌈N / BLOCK_M⌉,)``; program ``p`` owns candidate rows
    ``K = p·BLOCK_M + [0, BLOCK_M)`` and writes ``out[K] = Σ_j (G_kj + G_jk)·e_j`` ``(N, D)`` float32,
    ``G_ij = c_i·(w_ij − W_i·p_ij)`` for anchors ``i`` (0 for rows outside ``[row_start, row_end)``).

    ``ℓ`` is symmetric, so each tile's ``ℓ_KJ`` (recomputed, never stored) gives both ``G_KJ`` (rows
    ``K`` as anchors) and ``G_JKᵀ`` (rows ``J`` as anchors, bits read transposed): no atomics. A
    block without anchors only visits the tiles that hold anchors. ``coef``, ``weight_sum``, ``lse``
    are ``(M,)`` per anchor (local index); ``coef`` carries the loss scale, ``1/τ`` and any power-of-two
    scale of the operands.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n
    rows_anchor = rows_ok & (rows >= row_start) & (rows < row_end)
    rows_local = rows - row_start
    coef_k = tl.load(coef_ptr + rows_local, mask=rows_anchor, other=0.0)
    weight_k = tl.load(weight_sum_ptr + rows_local, mask=rows_anchor, other=0.0)
    lse_k = tl.load(lse_ptr + rows_local, mask=rows_anchor, other=0.0)
    has_anchor = (pid * BLOCK_M < row_end) & (pid * BLOCK_M + BLOCK_M > row_start)
    j_begin = tl.where(has_anchor, 0, (row_start // BLOCK_N) * BLOCK_N)
    j_end = tl.where(has_anchor, n, row_end)
    d_cols = tl.arange(0, BLOCK_D)
    d_ok = d_cols < width_e
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(j_begin, j_end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cols_ok = cols < n
        cols_anchor = cols_ok & (cols >= row_start) & (cols < row_end)
        cols_local = cols - row_start
        not_self = rows[:, None] != cols[None, :]
        logit = _products(e_ptr, width_e, rows, rows_ok, cols, cols_ok, BLOCK_M, BLOCK_N, BLOCK_K) / tau
        # rows K as anchors, columns J as candidates
        fwd = rows_anchor[:, None] & cols_ok[None, :]
        a_kj = _bits(a_bits_ptr, n_words, rows_local, rows_anchor, j0, BLOCK_M, BLOCK_N)
        t_kj = a_kj
        k_kj = a_kj
        if WITH_T:
            t_kj = _bits(t_bits_ptr, n_words, rows_local, rows_anchor, j0, BLOCK_M, BLOCK_N)
        if KEEP_MODE == 1:
            k_kj = _bits(keep_ptr, n_words, rows_local, rows_anchor, j0, BLOCK_M, BLOCK_N)
        g = _coefficients(logit, a_kj, t_kj, k_kj, fwd & not_self, coef_k[:, None], weight_k[:, None],
                          lse_k[:, None], lam, WITH_T, KEEP_MODE)
        # rows J as anchors, rows K as their candidates: the transposed bits
        coef_j = tl.load(coef_ptr + cols_local, mask=cols_anchor, other=0.0)
        weight_j = tl.load(weight_sum_ptr + cols_local, mask=cols_anchor, other=0.0)
        lse_j = tl.load(lse_ptr + cols_local, mask=cols_anchor, other=0.0)
        bwd = rows_ok[:, None] & cols_anchor[None, :]
        k0 = pid * BLOCK_M
        a_jk = _bits_transposed(a_bits_ptr, n_words, k0, cols_local, cols_anchor, BLOCK_M, BLOCK_N)
        t_jk = a_jk
        k_jk = a_jk
        if WITH_T:
            t_jk = _bits_transposed(t_bits_ptr, n_words, k0, cols_local, cols_anchor, BLOCK_M, BLOCK_N)
        if KEEP_MODE == 1:
            k_jk = _bits_transposed(keep_ptr, n_words, k0, cols_local, cols_anchor, BLOCK_M, BLOCK_N)
        g += _coefficients(logit, a_jk, t_jk, k_jk, bwd & not_self, coef_j[None, :], weight_j[None, :],
                           lse_j[None, :], lam, WITH_T, KEEP_MODE)
        e_cols = tl.load(e_ptr + cols.to(tl.int64)[:, None] * width_e + d_cols[None, :],
                         mask=cols_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(g.to(e_ptr.dtype.element_ty), e_cols, acc)
    out = out_ptr + rows.to(tl.int64)[:, None] * width_e + d_cols[None, :]
    tl.store(out, acc, mask=rows_ok[:, None] & d_ok[None, :])
