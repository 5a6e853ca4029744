"""The fused path of the HP loss (``loss.path=fused``): two tiled Triton passes, no ``(M × N)`` block.

Notation of docs/method.md §4–5 and :mod:`~.loss`: ``N`` candidate rows (the batch), anchors the
contiguous rows ``[row_start, row_end)`` of the candidates (``M`` of them, whole images), ``ℓ_ij =
e_i·e_j/τ`` for each branch ``e ∈ {z, z_lhp}``, ``w = A + λT``, ``den = (A | keep) & j ≠ i``,
``W_i = Σ_j w_ij``, ``c_i`` the anchor coefficients (:func:`~.dense.anchor_coefficients`). The
loss is ``Σ_i c_i·(S_i − W_i·LSE_i)`` with ``S_i = Σ_j w_ij·ℓ_ij`` and ``LSE_i`` over ``den(i)``;
its gradient is ``∂L/∂e_k = Σ_j (G_kj + G_jk)·e_j/τ`` with ``G_ij = c_i·(w_ij − W_i·p_ij)``,
``p_ij = den_ij·exp(ℓ_ij − LSE_i)``. Kernels: :mod:`~.fused_kernels`.

1. **Negatives** (:func:`draw_keep_bits`): the counter-based draw of :mod:`~.negatives` cannot be
   evaluated per pair in registers — a pair is kept when a *prefix sum* of geometric gaps lands on
   it — so two kernels over ``(image, block of draws)`` compute each block's sum of gaps, torch
   takes the exclusive prefix sum over blocks (``(B, ⌈K/BLOCK⌉)`` int64), and the second kernel
   recomputes the gaps, scans them inside the block and sets the kept pairs' bits with ``atomic_or``
   (an integer OR of a constant: the result does not depend on the order). ``(M, ⌈N/32⌉)`` int32,
   bit-identical to :func:`~.negatives.negative_keep_mask`. An explicit ``negative_keep=`` mask is
   packed to the same bits (:func:`pack_bits`); ρ = 1 and ρ = 0 need no bits at all.
2. **Pass 1** (:func:`fused_chunk_terms`, ``rows_kernel``): one program per ``BLOCK_M`` anchors,
   looping over candidate tiles: the four products ``f·f'``, ``s·s'``, ``z·z'``, ``z_lhp·z_lhp'``
   (``tl.dot``), the masks with ``masks.block_masks``' rule (similarity rounded to the products'
   dtype, ``x_i·x_j − min(r_i, r_j) > 0``, self excluded), the kept negatives from the bits, per
   branch an online log-sum-exp over ``den`` and ``S``; per anchor ``|A|, |T|, |den|``. O(N) outputs.
   Then O(N) torch work: ``W``, kept anchors, ``c`` per image, the loss value — no host read.
3. **Pass 2** (``gradient_kernel``, per branch needing a gradient): one program per ``BLOCK_M``
   rows of the *candidates* recomputes ``ℓ`` per tile and, because ``ℓ`` is symmetric, forms both
   ``G_KJ`` (its rows as anchors) and ``G_JKᵀ`` (its rows as candidates of the tile's anchors) from
   it, accumulating ``(G_KJ + G_JKᵀ)·e_J`` into its own rows: no float atomics, every sum in a
   fixed order — bitwise deterministic. Rows outside the anchor range visit only the anchor tiles.

**Masks: stored as bits, not recomputed.** Pass 1 writes ``A`` and ``T`` as ``(M, ⌈N/32⌉)`` bit
masks (``N²/8`` bytes each, ~0.3 GB each at paper scale, N = 50,176). Recomputing them in pass 2
would cost two more products per tile (``F + D'`` = 896 of the pass's 2·2·512 per pair: +44 % of
pass 2's tensor-core work, ≈ 4.5 TFLOP ≈ 6–9 ms on an H100 at paper scale), while writing and
reading the bits moves ~1.3 GB ≈ 0.4 ms of bandwidth. Stored bits are also *consistent*: pass 2
sees, for ``G_JK``, exactly the masks from which pass 1 computed ``W_J`` and ``LSE_J``; a
recomputation in another orientation could flip a pair within rounding of its threshold.

**Numerics.** All products in the run's ``matmul_dtype`` (fp16 by default on CUDA, bf16 on
request, fp32 on CPU) with fp32 accumulation (``input_precision="ieee"``: no TF32 for fp32). The
mask similarities are rounded to that dtype before the comparison, as the dense path's product
returns them, so both paths draw the same masks. The gradient product ``G·e`` takes ``G`` in the
same dtype: for fp16, ``c`` is multiplied by a **power-of-two scale** chosen per chunk on the
device (no host read) so that ``max|G_kj + G_jk|``, bounded by ``2·max_i |c_i|·max(1+λ, W_i)``,
lies in ``(2^12, 2^13]`` (fp16 holds up to 65,504); ``G``'s small coefficients (~2e-5 and below
of the largest) then sit in fp16's normal range (≥ 2^-14) instead of being flushed, with fp16's
11-bit significand (bf16, which the dense path uses, has 8), and the result is divided by the
same power of two (exact). bf16 and fp32 need no scale. The interpreter
cannot check bf16 (``tl.dot`` in bf16 is wrong there, triton-lang/triton#11584): bf16 is refused
under ``TRITON_INTERPRET=1``.

**Tiles** (:class:`FusedTiles`, :data:`GPU_TILES`): on CUDA pass 1 runs 64 × 64 anchor ×
candidate tiles and pass 2 32 × 32 tiles, 32-wide product slices, 8 warps: the largest found that
compile for sm_90 without register spills (pass 2 keeps a ``(BLOCK_M, D)`` float32 accumulator,
``D`` rounded up to a power of two: 64 KB for 32 rows at D = 512). Not yet timed on a GPU; the
interpreter uses few large tiles (its cost is per operation). Candidates for GPU tuning: pass 2
holding its rows' ``e`` (full width) across the loop and loading each tile's ``e_J`` once for both
products cuts its operand traffic ~3× but spills 80 bytes at 32 × 32 (sm_90); pass 1 computing the
two mask products once per unordered tile pair would save ~2.3 TFLOP at paper scale.

**Row ranges.** :func:`fused_chunk_terms` takes the anchors as a ``slice`` of the candidate rows:
the whole batch (the default of :mod:`~.loss`: one chunk when the bit masks fit the memory
budget), an anchor chunk, or a rank's own rows of gathered candidates. The gradient it returns
covers all ``N`` candidate rows (the anchor and the candidate terms together).

**Availability.** ``triton`` importable and either CUDA tensors or ``TRITON_INTERPRET=1`` (CPU
tensors; tests). The variable is read when the kernels are built: :func:`_kernels` rebuilds them
when it changes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
from dataclasses import dataclass
from types import ModuleType

import torch

from hpseg.errors import HPSegError
from hpseg.hidden_positives.dense import anchor_coefficients
from hpseg.hidden_positives.negatives import _threshold_table, draws_per_image, step_key

#: How the denominator's kept negatives are given to the kernels.
KEEP_NONE, KEEP_BITS, KEEP_ALL = 0, 1, 2
#: Largest ``max|G|`` after the fp16 gradient's power-of-two scale.
_FP16_GRADIENT_TARGET = 2.0**13


@dataclass(frozen=True)
class FusedTiles:
    """Tile sizes of the fused kernels (powers of two).

    Attributes:
        rows, cols: anchors per program and candidates per tile of pass 1, each ≥ 32 (whole
            bit-mask words). grad_rows, grad_cols: rows per program and tile width of pass 2, ≥ 32.
        depth: feature columns per product slice, ≥ 16. draws: negatives drawn per program.
        warps, grad_warps: Triton warps per program of pass 1 and pass 2.
    """

    rows: int = 64
    cols: int = 64
    depth: int = 32
    warps: int = 8
    grad_rows: int = 32
    grad_cols: int = 32
    grad_warps: int = 8
    draws: int = 1024


#: Tiles on CUDA: the largest found that compile for sm_90 with fp16/bf16 operands and D = 512
#: without register spills (``scripts/check_fused_kernels.py``: pass 1 ≤ 255 registers, ≤ 8 bytes
#: of stack; pass 2 ≤ 232 registers, none; 64 × 64 pass-2 tiles spill ~1 KB, its (rows, D) float32
#: accumulator being the limit; fp32 operands spill up to ~350 bytes). Not yet timed on a GPU.
GPU_TILES = FusedTiles()
#: Tiles under ``TRITON_INTERPRET=1`` (CPU): few, large tiles (the interpreter's cost is per operation).
INTERPRETER_TILES = FusedTiles(depth=128, warps=4, grad_rows=64, grad_cols=64, grad_warps=4, draws=4096)


@dataclass(frozen=True)
class KeepBits:
    """The kept negatives of ``M`` anchor rows: ``mode`` (:data:`KEEP_NONE`, :data:`KEEP_BITS`,
    :data:`KEEP_ALL`) and, for :data:`KEEP_BITS`, the ``(M, ⌈N/32⌉)`` int32 bits."""

    mode: int
    bits: torch.Tensor | None = None


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``, read now)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def fused_unavailable(device: torch.device) -> str | None:
    """Why the fused path cannot run on ``device`` (one phrase), or ``None`` when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda" or interpreting():
        return None
    return f"its Triton kernels need CUDA tensors (the inputs are on {device.type})"


def require_fused(device: torch.device, matmul_dtype: torch.dtype | None = None) -> None:
    """Raise :class:`HPSegError` (one line: what is missing, the fix) unless the fused path can run."""
    reason = fused_unavailable(device)
    if reason is not None:
        raise HPSegError(
            f"hidden_positive_loss: path='fused' is unavailable: {reason}; use loss.path=dense, or install "
            "triton and run on a GPU (tests: set TRITON_INTERPRET=1 to run the kernels on CPU)"
        )
    if interpreting() and not _library_interpreted():
        raise HPSegError(
            "hidden_positive_loss: path='fused' cannot run in Triton's interpreter here: TRITON_INTERPRET=1 was "
            "set after triton had been imported, so Triton's own library is compiled for a GPU; set "
            "TRITON_INTERPRET=1 in the environment before starting Python"
        )
    if matmul_dtype == torch.bfloat16 and interpreting():
        raise HPSegError(
            "hidden_positive_loss: path='fused' cannot use bfloat16 products in Triton's interpreter "
            "(tl.dot is wrong there, triton-lang/triton#11584); use matmul_dtype float16 or float32 there"
        )


def _library_interpreted() -> bool:
    """Whether Triton's own ``@triton.jit`` library (``tl.sum``, ``tl.max``, …) was built for the
    interpreter: Triton decides it when it is first imported, from ``TRITON_INTERPRET`` then."""
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def _kernels() -> ModuleType:
    """The kernel module, built for the current ``TRITON_INTERPRET`` (rebuilt when it changed)."""
    module = importlib.import_module("hpseg.hidden_positives.fused_kernels")
    if (type(module.rows_kernel).__name__ == "InterpretedFunction") != interpreting():
        module = importlib.reload(module)
    return module


def default_tiles(device: torch.device) -> FusedTiles:
    """:data:`GPU_TILES` on CUDA, :data:`INTERPRETER_TILES` in the interpreter."""
    return GPU_TILES if device.type == "cuda" and not interpreting() else INTERPRETER_TILES


def _on(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------
# bit masks and the kept negatives
# ------------------------------------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``(M, N)`` bool → ``(M, ⌈N/32⌉)`` int32: bit ``j % 32`` of word ``j // 32`` is column ``j``."""
    m, n = mask.shape
    words = -(-n // 32)
    padded = torch.nn.functional.pad(mask, (0, words * 32 - n)).view(m, words, 32).to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=mask.device),
                                       torch.arange(32, device=mask.device))
    packed = (padded * weights).sum(dim=2)  # in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``(M, ⌈N/32⌉)`` int32 → ``(M, N)`` bool."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    unpacked = torch.bitwise_right_shift(bits.unsqueeze(2), shifts).bitwise_and_(1).bool()
    return unpacked.view(bits.shape[0], -1)[:, :n]


def keep_bits_from_mask(keep: torch.Tensor | None) -> KeepBits:
    """An explicit ``(M, N)`` bool keep mask as :class:`KeepBits` (``None``: keep every candidate)."""
    if keep is None:
        return KeepBits(KEEP_ALL)
    return KeepBits(KEEP_BITS, pack_bits(keep))


def draw_keep_bits(
    rows: slice, per_image: int, n: int, *, rho: float, seed: int, step: int, device: torch.device,
    tiles: FusedTiles | None = None,
) -> tuple[KeepBits, torch.Tensor]:
    """The kept negatives of the anchors ``rows`` (whole images) as bits, drawn on ``device``.

    Same draw, bit for bit, as :func:`~.negatives.negative_keep_mask` (module docstring, item 1).

    Returns:
        ``(keep, truncated)``: :class:`KeepBits` (``(M, ⌈N/32⌉)`` int32 bits for ``0 < ρ < 1``)
        and the 0-dim int64 number of images whose stream ran out (0 in practice).
    """
    m = rows.stop - rows.start
    truncated = torch.zeros((), dtype=torch.int64, device=device)
    trials = per_image * (n - 1)
    if rho >= 1.0:
        return KeepBits(KEEP_ALL), truncated
    if trials <= 0 or rho <= 0.0 or m == 0:
        return KeepBits(KEEP_NONE), truncated
    tiles = tiles or default_tiles(device)
    kernels = _kernels()
    count, key = draws_per_image(trials, rho), step_key(seed, step)
    table = _threshold_table(rho, trials, device)
    images, first_image = m // per_image, rows.start // per_image
    blocks = -(-count // tiles.draws)
    sums = torch.empty((images, blocks), dtype=torch.int64, device=device)
    constants = (table, table.shape[0], key, math.log1p(-rho), first_image, count, trials, blocks)
    n_words = -(-n // 32)
    bits = torch.zeros((m, n_words), dtype=torch.int32, device=device)
    with _on(device):
        kernels.negative_block_sums_kernel[(images, blocks)](sums, *constants, BLOCK=tiles.draws, num_warps=4)
        offsets = sums.cumsum(dim=1) - sums  # exclusive: trials before each block
        # the last draw still inside the image: its stream ran out (as negatives._draw counts it)
        truncated = (sums.sum(dim=1) - 1 < trials).sum()
        kernels.negative_bits_kernel[(images, blocks)](bits, offsets, *constants, per_image, n, rows.start,
                                                       n_words, BLOCK=tiles.draws, num_warps=4)
    return KeepBits(KEEP_BITS, bits), truncated


# ------------------------------------------------------------------------------------------
# the two passes
# ------------------------------------------------------------------------------------------


def _gradient_scale(coef: torch.Tensor, weight_sum: torch.Tensor, lam: float, dtype: torch.dtype) -> torch.Tensor:
    """Power of two (0-dim float32) that brings ``max|G_kj + G_jk|`` to about :data:`_FP16_GRADIENT_TARGET`
    for fp16 operands; 1 for other dtypes. ``|G_ij| ≤ |c_i|·max(1 + λ, W_i)`` since ``0 ≤ p ≤ 1``."""
    one = torch.ones((), dtype=torch.float32, device=coef.device)
    if dtype != torch.float16 or coef.numel() == 0:
        return one
    bound = 2.0 * (coef.abs() * weight_sum.clamp_min(1.0 + lam)).amax()
    exponent = torch.floor(torch.log2(_FP16_GRADIENT_TARGET / bound.clamp_min(2.0**-100))).clamp(-100, 100)
    return torch.exp2(exponent)


def fused_chunk_terms(
    rows: slice,
    embeddings: tuple[torch.Tensor, torch.Tensor],
    f: torch.Tensor,
    s: torch.Tensor,
    thresholds: tuple[torch.Tensor, torch.Tensor],
    keep: KeepBits,
    *,
    images: int,
    lam: float,
    tau: float,
    reweight: bool,
    dtype: torch.dtype,
    need_grad: tuple[bool, bool],
    grad_scale: float,
    tiles: FusedTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """The anchors ``rows`` of the candidates on the fused path: their loss sum, counts and gradients.

    Args:
        rows: the anchors, a contiguous range of whole images of the candidate rows.
        embeddings: ``z``, ``z_lhp`` of all candidates ``(N, D)``. f: features ``(N, F)``; s: EMA codes
            ``(N, D')``. thresholds: ``(r_agnostic, r_specific)`` of the candidates, each ``(N,)`` float32.
        keep: the anchors' kept negatives (:func:`draw_keep_bits`, :func:`keep_bits_from_mask`).
        images: images among the anchors. lam, tau, reweight: as in :func:`~.loss.hidden_positive_loss`.
        dtype: the products' dtype. need_grad: per embedding. grad_scale: factor of the gradients.
        tiles: tile sizes (default :func:`default_tiles`).

    Returns:
        ``(total, counts, grads)``: ``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` over both embeddings (0-dim
        float32), the float64 counts ``(A, T, kept anchors, |den|)`` and per embedding
        ``grad_scale ×`` the gradient of the sum w.r.t. all ``N`` rows ``(N, D)`` float32, or ``None``.
    """
    device = f.device
    require_fused(device, dtype)
    tiles = tiles or default_tiles(device)
    kernels = _kernels()
    n, m, d = f.shape[0], rows.stop - rows.start, embeddings[0].shape[1]
    n_words, with_t, store_bits = -(-n // 32), lam != 0.0, any(need_grad)
    z, h = (e.to(dtype).contiguous() for e in embeddings)
    f_op = f.to(dtype).contiguous()
    s_op = s.to(dtype).contiguous() if with_t else f_op
    r_ag = thresholds[0].float().contiguous()
    r_sp = thresholds[1].float().contiguous() if with_t else r_ag
    counts = torch.empty((m, 3), dtype=torch.int32, device=device)
    sums = torch.empty((2, m), dtype=torch.float32, device=device)
    lse = torch.empty((2, m), dtype=torch.float32, device=device)
    a_bits = torch.empty((m, n_words), dtype=torch.int32, device=device) if store_bits else counts
    t_bits = torch.empty((m, n_words), dtype=torch.int32, device=device) if store_bits and with_t else a_bits
    keep_bits = keep.bits if keep.bits is not None else counts
    blocks = dict(BLOCK_M=tiles.rows, BLOCK_N=tiles.cols, BLOCK_K=tiles.depth, num_warps=tiles.warps)
    grad_blocks = dict(BLOCK_M=tiles.grad_rows, BLOCK_N=tiles.grad_cols, BLOCK_K=tiles.depth,
                       num_warps=tiles.grad_warps)
    with _on(device):
        kernels.rows_kernel[(-(-m // tiles.rows),)](
            f_op, s_op, z, h, r_ag, r_sp, keep_bits, a_bits, t_bits, counts, sums, lse, n, rows.start, rows.stop,
            f.shape[1], s_op.shape[1], d, n_words, float(lam), float(tau),
            WITH_T=with_t, KEEP_MODE=keep.mode, STORE_BITS=store_bits, **blocks,
        )
    count_a, count_t = counts[:, 0].to(torch.float32), counts[:, 1].to(torch.float32)
    kept = counts[:, 0] > 0
    weight_sum = count_a + lam * count_t
    coef = anchor_coefficients(kept, weight_sum, images, reweight)
    total = (coef * (sums - weight_sum * torch.where(kept, lse, torch.zeros_like(lse)))).sum()
    totals = counts.sum(dim=0, dtype=torch.int64)
    stats = torch.stack([totals[0], totals[1], kept.sum(), totals[2]]).double()
    grads: list[torch.Tensor | None] = [None, None]
    if store_bits:
        scale = _gradient_scale(coef * (grad_scale / tau), weight_sum, lam, dtype)
        c = coef * (grad_scale / tau) * scale
        for branch, e in enumerate((z, h)):
            if not need_grad[branch]:
                continue
            out = torch.empty((n, d), dtype=torch.float32, device=device)
            with _on(device):
                kernels.gradient_kernel[(-(-n // tiles.grad_rows),)](
                    e, out, c, weight_sum, lse[branch], a_bits, t_bits, keep_bits, n, rows.start, rows.stop, d,
                    n_words, float(lam), float(tau), WITH_T=with_t, KEEP_MODE=keep.mode,
                    BLOCK_D=max(16, 1 << (d - 1).bit_length()), **grad_blocks,
                )
            grads[branch] = out if dtype != torch.float16 else out / scale
    return total, stats, grads
