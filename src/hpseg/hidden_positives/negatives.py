"""The kept negatives of the denominator: a counter-based Bernoulli(ρ) draw (docs/method.md §5, §9).

Which candidates ``j`` of anchor ``i`` enter the softmax denominator besides its positives is
decided per step by i.i.d. Bernoulli(ρ) trials, fresh every step, as the authors draw them. Here
the draw is a **pure function** of ``(seed, step, image, anchor, candidate)``: no generator
state, the same result on CPU and CUDA, for every anchor chunk and both loss paths, and a resumed
run draws what an uninterrupted one drew because the step number is all it needs.

How. The trials of one image — its ``S²`` anchors against the ``N − 1`` other candidates,
row-major, ``T = S²·(N − 1)`` trials — are enumerated by the gaps between successes: the gaps are
i.i.d. Geometric(ρ) (failures before a success), so the ``k``-th success sits at
``Σ_{l≤k} (G_l + 1) − 1`` and the cost is proportional to the successes, not to the trials.
The ``k``-th gap comes from the ``k``-th output of a SplitMix64 stream whose state starts at a
key hashed from ``(seed, step, image)`` (:func:`step_key`, :func:`uniform53`); its 53 high bits
``U`` give ``G = #{g ≥ 1 : U < ⌊(1−ρ)^g·2^53⌋}``, found from ``log((U+1)/2^53) / log(1−ρ)`` and
corrected exactly against the integer thresholds (:func:`geometric_gaps`), so the floating-point
logarithm of one device never decides a draw (for ρ < 3.5·10⁻⁵, gaps longer than 2^20 — past the
threshold table — are left to the logarithm, whose last bit may differ between devices). A stream holds
:func:`draws_per_image` gaps — the mean number of successes plus 12 standard deviations plus
64 — so that running out before the end of the image has a probability below ``10⁻³⁰`` (the
loss counts such images in its statistics; none is expected in the lifetime of the universe).

Two consumers:

* :func:`negative_keys` — sorted keys ``i_local·N + j`` (the sparse path);
* :func:`negative_keep_mask` — the ``(M, N)`` bool mask (the dense path), written by a scatter
  with no host synchronisation.

Off CUDA the draw is computed with NumPy (unsigned 64-bit integers, float64), on CUDA with torch
``int64`` (wrapping multiplication, logical shifts emulated by masks) and float64. The two give
the same bits (``tests/test_negatives.py``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
#: Longest exact threshold table (entries); beyond it, rare long gaps use the logarithm alone.
_MAX_TABLE = 1 << 20


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 that holds it."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64(z: int) -> int:
    """SplitMix64's finaliser on a Python int (64-bit)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def step_key(seed: int, step: int) -> int:
    """The 64-bit key of the draws of ``step`` of run ``seed`` (a pure hash, computed on the host)."""
    return _mix64(_mix64(seed + _GOLDEN) ^ (step & _MASK64))


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64_torch(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 bit patterns (wrapping products)."""
    z = (z ^ _lsr(z, 30)) * _signed(_MIX1)
    z = (z ^ _lsr(z, 27)) * _signed(_MIX2)
    return z ^ _lsr(z, 31)


def _mix64_numpy(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        return z ^ (z >> np.uint64(31))


def uniform53(key: int, images: range, count: int, device: torch.device) -> torch.Tensor:
    """``(len(images), count)`` int64 in ``[0, 2^53)``: the first ``count`` outputs of each image's stream.

    Image ``b``'s stream starts at ``K_b = mix64(key + γ·(b+1))`` and its ``k``-th output
    (``k = 1 … count``) is ``mix64(K_b + k·γ) >> 11`` — SplitMix64 with γ the golden-ratio
    increment: a pure function of ``(key, b, k)``, computed on ``device`` from scalars.
    """
    if device.type == "cpu":
        return torch.from_numpy(_uniform53_numpy(key, images, count))
    return _uniform53_torch(key, images, count, device)


def _uniform53_torch(key: int, images: range, count: int, device: torch.device) -> torch.Tensor:
    b = torch.arange(images.start + 1, images.stop + 1, dtype=torch.int64, device=device)
    start = _mix64_torch(b * _signed(_GOLDEN) + _signed(key))
    k = torch.arange(1, count + 1, dtype=torch.int64, device=device) * _signed(_GOLDEN)
    return _lsr(_mix64_torch(start[:, None] + k[None, :]), 11)


def _uniform53_numpy(key: int, images: range, count: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        b = np.arange(images.start + 1, images.stop + 1, dtype=np.uint64)
        start = _mix64_numpy(np.uint64(key) + b * np.uint64(_GOLDEN))
        k = np.arange(1, count + 1, dtype=np.uint64) * np.uint64(_GOLDEN)
        z = _mix64_numpy(start[:, None] + k[None, :])
    return (z >> np.uint64(11)).astype(np.int64)


@lru_cache(maxsize=64)
def _threshold_table_cpu(rho: float, longest: int) -> torch.Tensor:
    """``T_g = ⌊(1−ρ)^g·2^53⌋`` for ``g = 0 … L−1``, int64, decreasing; ``T_{L−1} = 0`` unless capped."""
    log_q = math.log1p(-rho)
    zero_at = int(53 * math.log(2) / -log_q) + 2  # (1−ρ)^g·2^53 < 1 from here on
    length = min(zero_at, longest + 2, _MAX_TABLE)
    g = np.arange(length, dtype=np.float64)
    return torch.from_numpy(np.floor(np.exp(g * log_q) * 2.0**53).astype(np.int64))


_device_tables: dict[tuple[float, int, str], torch.Tensor] = {}


def _threshold_table(rho: float, longest: int, device: torch.device) -> torch.Tensor:
    """:func:`_threshold_table_cpu` on ``device`` (copied once per device and kept)."""
    table = _threshold_table_cpu(rho, longest)
    if device.type == "cpu":
        return table
    key = (rho, longest, str(device))
    if key not in _device_tables:
        _device_tables[key] = table.to(device)
    return _device_tables[key]


def geometric_gaps(u: torch.Tensor, rho: float, longest: int) -> torch.Tensor:
    """Geometric(ρ) gaps (failures before a success) from 53-bit uniforms ``u``, capped at ``longest``.

    ``G = #{g ≥ 1 : u < T_g}`` with ``T_g = ⌊(1−ρ)^g·2^53⌋``, so ``P(G ≥ g) = T_g / 2^53``. In exact
    arithmetic ``T_g > u ⟺ (1−ρ)^g·2^53 ≥ u + 1``, so ``G = ⌊log((u+1)/2^53) / log(1−ρ)⌋``; that
    floating-point estimate is corrected by one step against the integer table, which makes the
    result exact and device-independent (the estimate is never off by more than one, even where
    rounding repeats small thresholds; ``tests/test_negatives.py`` plants every boundary).
    On CPU through NumPy (the same arithmetic, faster there).
    """
    table = _threshold_table(rho, longest, u.device)
    if u.device.type == "cpu":
        return torch.from_numpy(_gaps_numpy(u.numpy(), table.numpy(), rho, longest))
    return _gaps_torch(u, table, rho, longest)


def _gaps_torch(u: torch.Tensor, table: torch.Tensor, rho: float, longest: int) -> torch.Tensor:
    last = table.shape[0] - 1
    x = (u + 1).to(torch.float64) * 2.0**-53  # float64: (an int64 tensor times a float would be float32)
    est = torch.floor(torch.log(x) / math.log1p(-rho)).clamp_(0, longest).to(torch.int64)
    g = est.clamp_max(last - 1)
    g = g + (u < table[g + 1]).to(torch.int64) - (u >= table[g]).to(torch.int64)
    return torch.where(est < last - 1, g, est).clamp_max_(longest)  # capped table (tiny ρ): the estimate


def _gaps_numpy(u: np.ndarray, table: np.ndarray, rho: float, longest: int) -> np.ndarray:
    last = table.shape[0] - 1
    est = np.clip(np.floor(np.log((u + 1) * 2.0**-53) / math.log1p(-rho)), 0, longest).astype(np.int64)
    g = np.minimum(est, last - 1)
    g += (u < table[g + 1]).astype(np.int64) - (u >= table[g])
    return np.minimum(np.where(est < last - 1, g, est), longest)


def draws_per_image(trials: int, rho: float) -> int:
    """Gaps drawn per image: mean successes + 12 standard deviations + 64 (see module docstring)."""
    mean = trials * rho
    return int(min(trials, math.ceil(mean + 12.0 * math.sqrt(mean) + 64)))


def _draw(
    seed: int, step: int, rows: slice, per_image: int, n: int, rho: float, device: torch.device,
    use_numpy: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, valid, truncated)`` of the anchors ``rows`` (whole images).

    ``keys`` ``(I, K)``: chunk-local keys ``i_local·N + j`` of the ``K`` = :func:`draws_per_image`
    drawn trials of each image (row-major: increasing along a row of valid entries); ``valid``
    ``(I, K)``: the trial lies inside the image; ``truncated``: images whose stream ran out.
    ``use_numpy`` (default: off CUDA) picks the NumPy implementation, whose results are moved to
    ``device`` (Apple MPS has no 64-bit floats); both implementations give the same bits.
    """
    trials = per_image * (n - 1)
    first_image = rows.start // per_image
    images = range(first_image, first_image + (rows.stop - rows.start) // per_image)
    count, key = draws_per_image(trials, rho), step_key(seed, step)
    if device.type != "cuda" if use_numpy is None else use_numpy:  # NumPy: ~2× torch on these passes
        table = _threshold_table_cpu(rho, trials).numpy()
        pos = np.cumsum(_gaps_numpy(_uniform53_numpy(key, images, count), table, rho, trials) + 1, axis=1) - 1
        valid = pos < trials
        # the anchor within its image: a float division is exact here (pos < S²·N ≪ 2^53, and
        # a non-multiple of N − 1 stays ≥ 1/(N − 1) below the next integer) and far faster
        r = np.floor(pos / float(n - 1)).astype(np.int64)
        c = pos - r * (n - 1)
        anchor = r + (np.arange(len(images), dtype=np.int64) * per_image)[:, None]  # chunk-local row
        keys = anchor * n + c + (c >= anchor + rows.start)
        return (torch.from_numpy(keys).to(device), torch.from_numpy(valid).to(device),
                torch.tensor(int(valid[:, -1].sum()), device=device))
    u = _uniform53_torch(key, images, count, device)
    t_pos = _gaps_torch(u, _threshold_table(rho, trials, device), rho, trials).add_(1).cumsum_(1).sub_(1)
    t_valid = t_pos < trials
    t_r = t_pos.div(n - 1, rounding_mode="floor")
    t_c = t_pos - t_r * (n - 1)
    t_anchor = t_r + torch.arange(len(images), device=device).mul_(per_image)[:, None]
    t_keys = t_anchor * n + t_c + (t_c >= t_anchor + rows.start).to(torch.int64)  # skip the anchor itself
    return t_keys, t_valid, t_valid[:, -1].sum()


def negative_keys(
    rows: slice, per_image: int, n: int, *, rho: float, seed: int, step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept negatives of the anchors ``rows`` (whole images) as sorted keys ``i_local·N + j``.

    Returns:
        ``(keys, truncated)``: int64 keys, strictly increasing (self never), and the number of
        images whose stream ran out before their last trial (a 0-dim int64 tensor; 0 in practice).
    """
    m = rows.stop - rows.start
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if per_image * (n - 1) <= 0 or rho <= 0.0 or m == 0:
        return torch.empty(0, dtype=torch.int64, device=device), zero
    if rho >= 1.0:
        i = torch.arange(m, device=device).unsqueeze(1)
        j = torch.arange(n, device=device).unsqueeze(0)
        return (i * n + j)[j != i + rows.start], zero
    keys, valid, truncated = _draw(seed, step, rows, per_image, n, rho, device)
    if device.type == "cpu":
        return torch.from_numpy(keys.numpy()[valid.numpy()]), truncated
    return keys[valid], truncated  # row-major: already sorted


def negative_keep_mask(
    rows: slice, per_image: int, n: int, *, rho: float, seed: int, step: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The ``(M, N)`` bool keep mask of the anchors ``rows`` (``None``: ρ ≥ 1, keep every candidate).

    Same draw as :func:`negative_keys`, scattered into a mask without a host synchronisation
    (invalid positions land in a spare slot that is cut off).

    Returns:
        ``(keep, truncated)`` as in :func:`negative_keys`.
    """
    m = rows.stop - rows.start
    truncated = torch.zeros((), dtype=torch.int64, device=device)
    if rho >= 1.0:
        return None, truncated
    keep = torch.zeros(m * n + 1, dtype=torch.bool, device=device)
    if per_image * (n - 1) > 0 and rho > 0.0 and m > 0:
        keys, valid, truncated = _draw(seed, step, rows, per_image, n, rho, device)
        # a constant written to each listed slot: index_fill_ is order-independent (deterministic)
        # without the sort that deterministic index_put_ needs on a GPU
        keep.index_fill_(0, torch.where(valid, keys, m * n).view(-1), True)
    return keep[: m * n].view(m, n), truncated
