"""The photometric consistency loss (docs/method.md §7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError


def consistency_loss(z: torch.Tensor, z_aug: torch.Tensor) -> torch.Tensor:
    """Photometric consistency ``mean_i ‖z_i − z_aug_i‖₂`` (docs/method.md §7).

    Computed as ``torch.nn.PairwiseDistance`` does (``‖z − z_aug + 1e-6‖₂`` per row).

    Args:
        z: embeddings of the images ``(N, D)``.
        z_aug: embeddings of the augmented images ``(N, D)``.

    Returns:
        A scalar tensor.
    """
    if z.dim() != 2 or z.shape != z_aug.shape:
        raise HPSegError(
            f"consistency_loss needs two (N, D) tensors of one shape, got {tuple(z.shape)} and "
            f"{tuple(z_aug.shape)}; flatten both views with the same patch order"
        )
    return F.pairwise_distance(z, z_aug, p=2.0, eps=1e-6).mean()
