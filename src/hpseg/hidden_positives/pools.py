"""Reference pools and per-patch thresholds of the hidden positives (docs/method.md §3).

* :func:`sample_pool_entries` — one random patch per image, L2-normalised: entries of a pool.
* :func:`pool_thresholds` — ``r[i] = max_p x_i·pool[p]``, the bar a candidate must clear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError

#: Rows of ``x @ pool.T`` evaluated at once by :func:`pool_thresholds`.
_THRESHOLD_BLOCK_ROWS = 8192


def sample_pool_entries(
    x: torch.Tensor, generator: torch.Generator | None = None, *, share: tuple[int, int] | None = None
) -> torch.Tensor:
    """One random patch per image, L2-normalised: entries of a reference pool (docs/method.md §3).

    Args:
        x: feature maps ``(B, C, h, w)`` (``drop(feats)`` for the task-agnostic pool,
            ``drop(code_ema)`` for the task-specific one).
        generator: optional random generator (on any device) for the patch positions.
        share: ``(start, total)``: ``x`` holds images ``[start, start + B)`` of a global batch of
            ``total``; the positions of all ``total`` images are drawn (as one process would)
            and these images' are used. None: ``x`` is the whole batch.

    Returns:
        ``(B, C)`` float32 rows of unit norm.
    """
    if x.dim() != 4:
        raise HPSegError(
            f"sample_pool_entries needs feature maps (B, C, h, w), got shape {tuple(x.shape)}; "
            "pass the un-flattened maps"
        )
    b, c = x.shape[:2]
    flat = x.flatten(2)  # (B, C, h·w)
    start, total = share if share is not None else (0, b)
    idx = _patch_positions(flat.shape[2], total, generator, x.device)[start : start + b]
    rows = flat[torch.arange(b, device=x.device), :, idx]  # (B, C)
    return F.normalize(rows.float(), dim=1)


def _patch_positions(patches: int, count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``count`` positions in ``[0, patches)`` ``(count,)`` int64 on ``device``, drawn from ``generator``.

    A generator on the host with ``device`` a CUDA device (the training pools: one host generator
    whose state ``last.pt`` saves, the same positions on every device): the positions are drawn
    straight into pinned memory and copied without blocking — no pageable copy, which would
    make the host wait for the device at every batch of a pool pass.
    """
    gen_device = generator.device if generator is not None else device
    if gen_device.type == "cpu" and device.type == "cuda":
        staged = torch.randint(patches, (count,), generator=generator, pin_memory=True)
        return staged.to(device, non_blocking=True)  # the host allocator keeps the block until the copy is done
    return torch.randint(patches, (count,), generator=generator, device=gen_device).to(device)


#: Alias named in docs/DEVELOPING.md.
sample_pool = sample_pool_entries


def default_matmul_dtype(device: torch.device) -> torch.dtype:
    """float16 similarities on CUDA (unit vectors: |x·y| ≤ 1, no overflow), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


@torch.no_grad()
def pool_thresholds(
    x: torch.Tensor, pool: torch.Tensor, *, matmul_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-row threshold ``r[i] = max_p x_i·pool[p]`` (docs/method.md §3).

    Args:
        x: L2-normalised rows ``(N, C)``.
        pool: L2-normalised reference pool ``(P, C)``.
        matmul_dtype: dtype of the similarity products (default: float16 on CUDA, float32
            otherwise); the result holds exactly the values of that dtype, so it compares
            consistently with similarities computed in it.

    Returns:
        ``(N,)`` float32 thresholds. Evaluated in row blocks: memory ``O(block·P)``.
    """
    if x.dim() != 2 or pool.dim() != 2 or x.shape[1] != pool.shape[1]:
        raise HPSegError(
            f"pool_thresholds needs x (N, C) and pool (P, C) of one width, got {tuple(x.shape)} and "
            f"{tuple(pool.shape)}; build the pool from the same features as x"
        )
    if pool.shape[0] == 0:
        raise HPSegError("the reference pool is empty; fill it with sample_pool_entries before training")
    dtype = matmul_dtype or default_matmul_dtype(x.device)
    pool_t = pool.to(dtype).t()
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _THRESHOLD_BLOCK_ROWS):
        block = x[start : start + _THRESHOLD_BLOCK_ROWS].to(dtype)
        out[start : start + block.shape[0]] = (block @ pool_t).amax(dim=1).float()
    return out

