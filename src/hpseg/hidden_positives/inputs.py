"""Validation of the hidden-positive loss's inputs: every check, one line per problem (docs/DEVELOPING.md)."""

from __future__ import annotations

import math

import torch

from hpseg.errors import HPSegError
from hpseg.hidden_positives.budget import PATHS
from hpseg.hidden_positives.fused import require_fused


def check_loss_inputs(
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
    chunk_images: int | None,
    memory_gb: float | None,
    path: str,
    *,
    keep_rows: int | None = None,
) -> None:
    """Every check of the loss's inputs (the functional form and the module both call this).

    ``keep_rows``: the side of ``negative_keep`` (the candidates; default the ``N`` rows given).
    """
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
    _check_settings(tau, lam, rho, chunk_images, memory_gb, path, z.device)
    if negative_keep is not None:
        n = keep_rows or n
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


def _check_settings(tau: float, lam: float, rho: float, chunk_images: int | None, memory_gb: float | None,
                    path: str, device: torch.device) -> None:
    """The loss's scalar settings (and, for ``path="fused"``, that it can run on ``device``)."""
    if chunk_images is not None and chunk_images < 1:
        raise HPSegError(f"hidden_positive_loss: chunk_images must be ≥ 1, got {chunk_images}")
    if memory_gb is not None and not (memory_gb > 0 and math.isfinite(memory_gb)):
        raise HPSegError(
            f"hidden_positive_loss: memory_gb must be a positive number of GiB, got {memory_gb}; "
            "or None for the device's default"
        )
    if path not in PATHS:
        raise HPSegError(f"hidden_positive_loss: path must be one of {', '.join(PATHS)}, got {path!r}")
    if path == "fused":
        require_fused(device)  # triton, and CUDA tensors or TRITON_INTERPRET=1
    if not (tau > 0 and math.isfinite(tau)):
        raise HPSegError(f"hidden_positive_loss: tau must be a positive number, got {tau}")
    if not (lam >= 0 and math.isfinite(lam)):
        raise HPSegError(
            f"hidden_positive_loss: lam must be a finite number ≥ 0, got {lam}; see lambda_schedule"
        )
    if not 0.0 <= rho <= 1.0:
        raise HPSegError(f"hidden_positive_loss: rho must lie in [0, 1], got {rho}")
