"""The Hidden Positives contrastive loss, GHP + LHP (docs/method.md §5), and the λ schedule.

How the loss is evaluated. With ``w = A + λ·T`` and ``W_i = Σ_j w_ij``, the reference's
per-image term ``mean_i(mean_pos[i]·pnm[i])`` over the ``K`` kept anchors of an image equals
``Σ_i Σ_j w_ij·log_p[i,j] / Σ_i W_i`` (reweighting on) or ``(1/K) Σ_i Σ_j w_ij·log_p[i,j] / W_i``
(off): every kept anchor gets a coefficient ``c_i`` and the loss is linear in the per-anchor
sums ``Σ_j w_ij·log_p[i,j]``. Their gradient with respect to ``logit[i,j]`` is
``w_ij − W_i·softmax_den(i)_j``, so the exact gradient of a chunk is available while its
``(chunk·S², N)`` similarity block is in memory. :class:`_HiddenPositiveLoss` accumulates it
there and keeps only ``(N, D)`` gradients for the backward pass: no ``N×N`` matrix is ever
retained by autograd and nothing is recomputed. Anchors that are dropped (no task-agnostic
positive) never enter a logarithm, so neither values nor gradients can become NaN, even with
``rho = 0`` or an image without any kept anchor (that image contributes 0).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from hpseg.errors import HPSegError
from hpseg.hidden_positives.masks import PositiveMasks, _similarity, positive_masks
from hpseg.hidden_positives.pools import default_matmul_dtype, pool_thresholds

log = logging.getLogger(__name__)

#: The loss is scaled by ``tau / BASE_TEMPERATURE`` (SupCon convention kept by the authors).
BASE_TEMPERATURE = 0.07
#: Images per anchor chunk: 8 images at S=28 hold (6272, N) blocks, ~1.3 GB each in float32 at N=50,176.
DEFAULT_CHUNK_IMAGES = 8


def lambda_schedule(it: int, warmup: int, max_iters: int) -> float:
    """Weight λ of task-specific positives at training iteration ``it`` (docs/method.md §5).

    0 while ``it <= warmup``, then ``(it - warmup) / (max_iters - warmup)``, rising linearly to 1
    at ``it == max_iters``. Like the authors' code there is no clamp above 1; when
    ``max_iters <= warmup`` (no ramp possible) λ is 1 after the warm-up.
    """
    if it <= warmup:
        return 0.0
    if max_iters <= warmup:
        return 1.0
    return (it - warmup) / (max_iters - warmup)


@dataclass(frozen=True)
class _LossOptions:
    num_images: int
    tau: float
    lam: float
    rho: float
    reweight: bool
    chunk_images: int
    matmul_dtype: torch.dtype
    generator: torch.Generator | None
    need_grad: tuple[bool, bool]


def _draw_keep(
    m: int, n: int, rho: float, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor | None:
    """Bernoulli(rho) negatives ``(m, n)`` bool; ``None`` means "keep all" (rho ≥ 1)."""
    if rho >= 1.0:
        return None
    if rho <= 0.0:
        return torch.zeros(m, n, dtype=torch.bool, device=device)
    gen_device = generator.device if generator is not None else device
    keep = torch.empty(m, n, dtype=torch.bool, device=gen_device).bernoulli_(rho, generator=generator)
    return keep.to(device)


def _anchor_coefficients(
    masks: PositiveMasks, weight_sum: torch.Tensor, images: int, reweight: bool
) -> torch.Tensor:
    """``c_i`` such that an image's term is ``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` ``(M,)``.

    Reweighting on: ``c_i = 1/Σ_k W_k`` over the kept anchors ``k`` of i's image (this is
    ``mean_i(mean_pos·pnm)`` with ``pnm_i = W_i / mean_k W_k``); off: ``c_i = 1/(K·W_i)``.
    Dropped anchors get 0, and so does every anchor of an image without a kept one.
    """
    kept = masks.kept.view(images, -1)
    w = torch.where(kept, weight_sum.view(images, -1), torch.zeros_like(weight_sum.view(images, -1)))
    if reweight:
        total = w.sum(dim=1, keepdim=True)  # (images, 1)
        coef = torch.where(kept, 1.0 / total.clamp_min(1e-30), torch.zeros_like(w))
    else:
        count = kept.sum(dim=1, keepdim=True).clamp_min(1).to(w.dtype)
        coef = torch.where(kept, 1.0 / (count * w.clamp_min(1e-30)), torch.zeros_like(w))
    return coef.reshape(-1)


def _contrastive_chunk(
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
    """``Σ_i c_i·Σ_j w_ij·log_p[i,j]`` for the anchors ``rows`` of embeddings ``e`` (docs/method.md §5).

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


class _HiddenPositiveLoss(torch.autograd.Function):
    """Chunked HP loss whose gradients are computed alongside the value (see module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: torch.Tensor,
        z_lhp: torch.Tensor,
        feats: torch.Tensor,
        code_ema: torch.Tensor,
        pool_agnostic: torch.Tensor,
        pool_specific: torch.Tensor,
        negative_keep: torch.Tensor | None,
        opt: _LossOptions,
    ) -> torch.Tensor:
        n = z.shape[0]
        per_image = n // opt.num_images
        dtype = opt.matmul_dtype
        embeddings = (z.detach().float(), z_lhp.detach().float())
        grads = [torch.zeros_like(x) if need else None for x, need in zip(embeddings, opt.need_grad)]
        f = feats.detach().float()
        s = code_ema.detach().float()
        r_ag = pool_thresholds(f, pool_agnostic.detach(), matmul_dtype=dtype)
        with_specific = opt.lam != 0.0
        r_sp = pool_thresholds(s, pool_specific.detach(), matmul_dtype=dtype) if with_specific else r_ag
        # loss = −(τ/0.07)/2 · mean over images of the per-image terms, for z and z_lhp
        scale = -(opt.tau / BASE_TEMPERATURE) / (2.0 * opt.num_images)
        total = torch.zeros((), dtype=torch.float32, device=z.device)
        for first in range(0, opt.num_images, opt.chunk_images):
            images = min(opt.chunk_images, opt.num_images - first)
            rows = slice(first * per_image, (first + images) * per_image)
            m = rows.stop - rows.start
            keep: torch.Tensor | None
            if negative_keep is not None:
                keep = negative_keep[rows]
            else:
                keep = _draw_keep(m, n, opt.rho, z.device, opt.generator)
            masks = positive_masks(
                f, s, r_ag, r_sp, rows, keep=keep, with_specific=with_specific, matmul_dtype=dtype
            )
            del keep
            weights = masks.agnostic.to(torch.float32)
            weight_sum = masks.agnostic.sum(dim=1).to(torch.float32)
            if masks.specific is not None:
                weights.add_(masks.specific, alpha=opt.lam)
                weight_sum += opt.lam * masks.specific.sum(dim=1).to(torch.float32)
            coef = _anchor_coefficients(masks, weight_sum, images, opt.reweight)
            for e, grad in zip(embeddings, grads):
                total += _contrastive_chunk(
                    e, rows, masks, weights, weight_sum, coef, opt.tau, dtype, grad, scale
                )
            del masks, weights
        ctx.save_for_backward(*(g.to(x.dtype) if g is not None else None for g, x in zip(grads, (z, z_lhp))))
        return (total * scale).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_z, grad_z_lhp = (None if g is None else grad_output * g for g in ctx.saved_tensors)
        return grad_z, grad_z_lhp, None, None, None, None, None, None


def _check_loss_inputs(
    z: torch.Tensor,
    z_lhp: torch.Tensor,
    feats: torch.Tensor,
    code_ema: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    negative_keep: torch.Tensor | None,
    num_images: int,
    tau: float,
    lam: float,
    rho: float,
    chunk_images: int,
) -> None:
    named = {
        "z": z,
        "z_lhp": z_lhp,
        "feats": feats,
        "code_ema": code_ema,
        "pool_agnostic": pool_agnostic,
        "pool_specific": pool_specific,
    }
    for name, t in named.items():
        if t.dim() != 2:
            raise HPSegError(
                f"hidden_positive_loss: {name} must be 2-D, got shape {tuple(t.shape)}; "
                "flatten (B, C, S, S) maps to (B·S², C) with patches of image 0 first"
            )
        if t.device != z.device:
            raise HPSegError(
                f"hidden_positive_loss: {name} is on {t.device} but z is on {z.device}; move all inputs "
                "to one device"
            )
    n = z.shape[0]
    if z_lhp.shape != z.shape:
        raise HPSegError(
            f"hidden_positive_loss: z_lhp {tuple(z_lhp.shape)} must match z {tuple(z.shape)}; "
            "project code_lhp with the same projection head"
        )
    for name in ("feats", "code_ema"):
        if named[name].shape[0] != n:
            raise HPSegError(
                f"hidden_positive_loss: {name} has {named[name].shape[0]} rows but z has {n}; "
                "pass one row per patch for every input"
            )
    if pool_agnostic.shape[1] != feats.shape[1]:
        raise HPSegError(
            f"hidden_positive_loss: pool_agnostic width {pool_agnostic.shape[1]} != feats width "
            f"{feats.shape[1]}; build the task-agnostic pool from the backbone features"
        )
    if pool_specific.shape[1] != code_ema.shape[1]:
        raise HPSegError(
            f"hidden_positive_loss: pool_specific width {pool_specific.shape[1]} != code_ema width "
            f"{code_ema.shape[1]}; build the task-specific pool from the EMA-head codes"
        )
    if pool_agnostic.shape[0] == 0 or pool_specific.shape[0] == 0:
        raise HPSegError("hidden_positive_loss: a reference pool is empty; fill it before training")
    if num_images < 1 or n == 0 or n % num_images != 0:
        raise HPSegError(
            f"hidden_positive_loss: N={n} rows are not divisible into num_images={num_images} images; "
            "pass num_images = batch size (N = num_images·S²)"
        )
    if chunk_images < 1:
        raise HPSegError(f"hidden_positive_loss: chunk_images must be ≥ 1, got {chunk_images}")
    if not (tau > 0 and math.isfinite(tau)):
        raise HPSegError(f"hidden_positive_loss: tau must be a positive number, got {tau}")
    if not (lam >= 0 and math.isfinite(lam)):
        raise HPSegError(
            f"hidden_positive_loss: lam must be a finite number ≥ 0, got {lam}; see lambda_schedule"
        )
    if not 0.0 <= rho <= 1.0:
        raise HPSegError(f"hidden_positive_loss: rho must lie in [0, 1], got {rho}")
    if negative_keep is not None:
        if negative_keep.shape != (n, n) or negative_keep.dtype != torch.bool:
            raise HPSegError(
                f"hidden_positive_loss: negative_keep must be an (N, N) = ({n}, {n}) bool tensor, got "
                f"{tuple(negative_keep.shape)} {negative_keep.dtype}; or pass None to draw Bernoulli(rho)"
            )
        if negative_keep.device != z.device:
            raise HPSegError(
                f"hidden_positive_loss: negative_keep is on {negative_keep.device} but z on {z.device}; "
                "move it to the inputs' device"
            )


def hidden_positive_loss(
    z: torch.Tensor,
    z_lhp: torch.Tensor,
    feats: torch.Tensor,
    code_ema: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    *,
    num_images: int,
    tau: float,
    lam: float,
    rho: float = 1.0,
    negative_keep: torch.Tensor | None = None,
    reweight: bool = True,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
    generator: torch.Generator | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The Hidden Positives contrastive loss, GHP + LHP (docs/method.md §4–5), ``(L(z) + L(z_lhp))/2``.

    For ``e ∈ {z, z_lhp}``, anchors ``i`` and candidates ``j ≠ i`` over the whole batch:
    ``log_p[i,j] = e_i·e_j/τ − log Σ_{j∈den(i)} exp(e_i·e_j/τ)``, ``den(i) = A_i | keep_i``,
    ``w = A + λT``; anchors without task-agnostic positives are dropped; per image
    ``−(τ/0.07)·mean_i(Σ_j w_ij·log_p[i,j] / W_i · pnm_i)``, ``pnm_i = W_i / mean_k W_k``
    (1 without reweighting); images are averaged (an image with no kept anchor adds 0).
    Both branches share masks, weights and denominators.

    Args:
        z: projected, L2-normalised codes ``(N, D)``, ``N = num_images·S²``, image by image.
        z_lhp: the same for the LHP-propagated codes ``(N, D)``.
        feats: L2-normalised (dropped-out) backbone features ``f`` ``(N, F)``; no gradient.
        code_ema: L2-normalised EMA-head codes ``s`` ``(N, D')``; no gradient.
        pool_agnostic: task-agnostic pool ``(P, F)``; pool_specific: task-specific pool ``(P', D')``.
        num_images: images in the batch (B).
        tau: temperature τ. lam: weight λ of task-specific positives (see :func:`lambda_schedule`).
        rho: probability that a non-positive candidate is kept in the denominator.
        negative_keep: explicit ``(N, N)`` bool keep matrix replacing the Bernoulli(rho) draw.
        reweight: the authors' ``pnm`` reweighting of anchors.
        chunk_images: images whose anchors are processed together; peak memory is a few
            ``(chunk_images·S², N)`` matrices (never ``N×N``), the result does not depend on it.
        generator: random generator for the Bernoulli draw (drawn chunk by chunk).
        matmul_dtype: dtype of the similarity products; default float16 on CUDA (the
            authors' autocast; gradient products then use bfloat16), float32 elsewhere.

    Returns:
        Scalar loss. Differentiable w.r.t. ``z`` and ``z_lhp`` (first order only).
    """
    _check_loss_inputs(
        z,
        z_lhp,
        feats,
        code_ema,
        pool_agnostic,
        pool_specific,
        negative_keep,
        num_images,
        tau,
        lam,
        rho,
        chunk_images,
    )
    opt = _LossOptions(
        num_images=num_images,
        tau=float(tau),
        lam=float(lam),
        rho=float(rho),
        reweight=bool(reweight),
        chunk_images=min(chunk_images, num_images),
        matmul_dtype=matmul_dtype or default_matmul_dtype(z.device),
        generator=generator,
        need_grad=(
            torch.is_grad_enabled() and z.requires_grad,
            torch.is_grad_enabled() and z_lhp.requires_grad,
        ),
    )
    # an enclosing autocast region must not lower the precision of our float32 reductions: the
    # products' dtype is chosen explicitly above
    with torch.autocast(z.device.type, enabled=False):
        out = _HiddenPositiveLoss.apply(
            z, z_lhp, feats, code_ema, pool_agnostic, pool_specific, negative_keep, opt
        )
    return out  # type: ignore[no-any-return]
