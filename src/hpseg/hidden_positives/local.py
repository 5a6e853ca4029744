"""Local hidden positives: attention-weighted 3×3 gradient propagation (docs/method.md §6)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError

#: Quantiles of the LHP attention clamp (docs/method.md §6 step 2).
LHP_QUANTILES = (0.1, 0.9)
#: Largest (images·S²·S²) block handed to ``torch.quantile`` at once.
_QUANTILE_BLOCK_NUMEL = 1 << 24


def _grid(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise HPSegError(f"patch grid must be at least 1×1, got {h}×{w}")
    return h, w


_OFFSETS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


@lru_cache(maxsize=32)
def _neighbour_table(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the 3×3 neighbours of every patch ``(h·w, 9)`` (clamped) and their
    existence ``(h·w, 9)`` bool, offsets in row-major order (−1,−1), (−1,0), … (1,1).

    Cached per grid and device: built from host lists once, never inside a training step."""
    r = torch.arange(h, device=device).view(h, 1, 1).expand(h, w, 1)
    c = torch.arange(w, device=device).view(1, w, 1).expand(h, w, 1)
    dr = torch.tensor([o[0] for o in _OFFSETS], device=device)
    dc = torch.tensor([o[1] for o in _OFFSETS], device=device)
    rr, cc = r + dr, c + dc  # (h, w, 9)
    valid = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    index = rr.clamp(0, h - 1) * w + cc.clamp(0, w - 1)
    return index.reshape(h * w, 9), valid.reshape(h * w, 9)


def neighbourhood_mask(size: int | tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """3×3 spatial neighbourhood (itself included) of every patch of an ``S×S`` (or ``h×w``) grid.

    Returns:
        ``(S², S²)`` bool, ``mask[i, j]`` true iff patch ``j`` is in patch ``i``'s 3×3 window.
    """
    h, w = _grid(size)
    dev = device or torch.device("cpu")
    index, valid = _neighbour_table(h, w, dev)
    mask = torch.zeros(h * w, h * w, dtype=torch.bool, device=dev)
    rows = torch.arange(h * w, device=dev).unsqueeze(1).expand_as(index)
    mask[rows[valid], index[valid]] = True
    return mask


def neighbourhood_counts(size: int | tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Number of existing 3×3 neighbourhood cells per patch ``(S²,)`` long: 9 inside, 6 on edges,
    4 in corners (fewer on grids thinner than 3)."""
    h, w = _grid(size)
    _, valid = _neighbour_table(h, w, device or torch.device("cpu"))
    return valid.sum(dim=1)


@lru_cache(maxsize=8)
def _quantile_levels(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:data:`LHP_QUANTILES` as a tensor on ``device`` (copied once, not at every step)."""
    return torch.tensor(LHP_QUANTILES, dtype=dtype, device=device)


@torch.no_grad()
def _lhp_attention(attn_logits: torch.Tensor, sigma: float) -> torch.Tensor:
    """Steps 1–4 of docs/method.md §6: ``(B, H, 1+S², 1+S²)`` logits → ``(B, S², S²)`` float32 weights."""
    attn = attn_logits[:, :, 1:, 1:].float().mean(dim=1)  # (B, S², S²)
    q = _quantile_levels(attn.dtype, attn.device)
    per_block = max(1, _QUANTILE_BLOCK_NUMEL // attn[0].numel())
    for start in range(0, attn.shape[0], per_block):
        block = attn[start : start + per_block]
        low, high = torch.quantile(block, q, dim=2, keepdim=True)  # linear interpolation
        block = torch.maximum(torch.minimum(block, high), low)
        block = block.softmax(dim=-1) * sigma
        block = torch.where(block < block.mean(dim=2, keepdim=True), torch.zeros_like(block), block)
        attn[start : start + per_block] = block
    return attn


def local_propagation(attn_logits: torch.Tensor, code: torch.Tensor, sigma: float = 28.0) -> torch.Tensor:
    """LHP: attention-weighted average of each patch's 3×3 neighbourhood of ``code`` (docs/method.md §6).

    From the last block's pre-softmax attention: drop CLS, average heads, clamp each row to its
    [10%, 90%] quantiles, softmax, ×σ, zero entries below the row mean, keep the 3×3 window and
    ``code_lhp[i] = Σ_j a[i,j]·code[j] / n_i`` with ``n_i`` the number of window cells that exist
    (9/6/4). The attention is treated as a constant; gradients flow to ``code`` only.

    Args:
        attn_logits: ``(B, H, 1+S², 1+S²)`` pre-softmax attention, CLS first.
        code: segmentation-head output ``(B, D, S, S)`` (``h×w`` grids work too).
        sigma: the softmax scale σ.

    Returns:
        ``code_lhp`` ``(B, D, S, S)`` in ``code``'s dtype.
    """
    if code.dim() != 4 or attn_logits.dim() != 4:
        raise HPSegError(
            f"local_propagation needs attn_logits (B, H, 1+S², 1+S²) and code (B, D, S, S), got "
            f"{tuple(attn_logits.shape)} and {tuple(code.shape)}"
        )
    b, _, h, w = code.shape
    tokens = 1 + h * w
    if attn_logits.shape[0] != b or attn_logits.shape[2:] != (tokens, tokens):
        raise HPSegError(
            f"local_propagation: attn_logits {tuple(attn_logits.shape)} does not fit code "
            f"{tuple(code.shape)} (expected ({b}, heads, {tokens}, {tokens})); pass the attention "
            "of the same images with the CLS token first and register tokens removed"
        )
    attn = _lhp_attention(attn_logits.detach(), float(sigma))  # (B, S², S²)
    index, valid = _neighbour_table(h, w, code.device)
    weights = (attn.gather(2, index.unsqueeze(0).expand(b, -1, -1)) * valid).to(code.dtype)  # (B, S², 9)
    counts = valid.sum(dim=1).to(code.dtype).view(1, 1, h, w)
    padded = F.pad(code, (1, 1, 1, 1))  # out-of-grid neighbours read zeros (their weight is 0 too)
    out = torch.zeros_like(code)
    for k, (dr, dc) in enumerate(_OFFSETS):
        shifted = padded[:, :, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]
        out = out + weights[:, :, k].view(b, 1, h, w) * shifted
    return out / counts
