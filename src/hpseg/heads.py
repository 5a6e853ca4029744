"""Trainable heads on frozen backbone features (docs/method.md §2, §7).

Attribute names are chosen so that the authors' checkpoints map by renaming prefixes only:
``cluster1.0.*`` → ``head.linear.*``, ``cluster2.{0,2}.*`` → ``head.nonlinear.{0,2}.*``,
``ema_model1/2`` → ``ema_head.linear/nonlinear``, the linear probe's ``weight``/``bias`` →
``linear_probe.*`` and ``clusters`` → ``cluster_probe.clusters``.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hpseg import distributed as dist
from hpseg.config import ModelConfig
from hpseg.errors import HPSegError

__all__ = [
    "ClusterProbe",
    "EMAHead",
    "LinearProbe",
    "ProjectionHead",
    "SegmentationHead",
    "probe_cross_entropy",
    "share_dropout2d",
    "upsample_bilinear",
]


def share_dropout2d(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout2d(x, p, training)`` for this rank's share of the global batch.

    ``x`` ``(b, C, …)`` holds this rank's images. Inside :func:`hpseg.distributed.batch_share`
    with more than one process, the ``(B, C)`` channel mask of the whole global batch is drawn
    (``F.dropout2d`` of ones: the same draw from the same stream as one process's
    ``F.dropout2d`` of the global batch) and this rank's rows of it are applied, so a mask
    belongs to an image, not to a rank. Otherwise exactly ``F.dropout2d``.
    """
    share = dist.current_share()
    if share is None or not training or p == 0 or share.total == x.shape[0]:
        return F.dropout2d(x, p, training)
    noise = F.dropout2d(x.new_ones((share.total, x.shape[1], *([1] * (x.dim() - 2)))), p, True)
    return x * noise[share.start : share.start + x.shape[0]]


def _nonlinear(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))


class SegmentationHead(nn.Module):
    """``code = linear(drop(feats)) + nonlinear(drop(feats))``.

    ``linear``: 1×1 conv F→D; ``nonlinear``: 1×1 conv F→F, ReLU, 1×1 conv F→D; ``drop``:
    Dropout2d(p) in training only, a fresh channel mask for each branch.
    """

    def __init__(self, in_dim: int, dim: int, dropout: float = ModelConfig.dropout) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.dim = dim
        self.dropout = nn.Dropout2d(p=dropout)
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = _nonlinear(in_dim, dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats (B, F, S, S) -> code (B, D, S, S)``."""
        p, training = self.dropout.p, self.training
        return self.linear(share_dropout2d(feats, p, training)) + self.nonlinear(share_dropout2d(feats, p, training))


class EMAHead(nn.Module):
    """Exponential-moving-average copy of a :class:`SegmentationHead` (never trained by gradients).

    Initialised equal to ``head``. Its forward is deterministic by default (no dropout of its
    own, in any mode): the trainer applies Dropout2d around it (``drop(ema_head(drop(feats)))``,
    docs/method.md §2); ``forward(feats, dropout=p)`` draws a mask per branch instead.
    """

    def __init__(self, head: SegmentationHead) -> None:
        super().__init__()
        self.linear = copy.deepcopy(head.linear)
        self.nonlinear = copy.deepcopy(head.nonlinear)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, feats: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """``feats (B, F, S, S) -> code_ema (B, D, S, S)``.

        ``dropout > 0`` applies Dropout2d to the input of each branch with its own mask, as the
        authors' featurizer does for its EMA branches (any mode; default: none).
        """
        if dropout > 0:
            return self.linear(share_dropout2d(feats, dropout, True)) + self.nonlinear(
                share_dropout2d(feats, dropout, True)
            )
        return self.linear(feats) + self.nonlinear(feats)

    @torch.no_grad()
    def ema_update(self, head: SegmentationHead, momentum: float) -> None:
        """``θ_ema ← m·θ_ema + (1−m)·θ`` for every parameter of ``head``; buffers are copied."""
        online = dict(head.named_parameters())
        for name, p_ema in self.named_parameters():
            p_ema.copy_(p_ema * momentum + online[name].detach() * (1.0 - momentum))
        online_buffers = dict(head.named_buffers())
        for name, b_ema in self.named_buffers():
            b_ema.copy_(online_buffers[name])


class ProjectionHead(nn.Module):
    """Linear(D, D) per patch followed by L2 normalisation: ``(N, D) -> (N, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x), dim=-1)


class LinearProbe(nn.Conv2d):
    """1×1 conv D→C on code: ``(B, D, h, w) -> (B, C, h, w)`` logits (keys ``weight``, ``bias``)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__(dim, n_classes, 1)

    @property
    def n_classes(self) -> int:
        return int(self.out_channels)


class ClusterProbe(nn.Module):
    """Cosine cluster assignment to ``n_clusters`` learnable centroids (STEGO's cluster lookup).

    ``clusters``: ``(K, D)``, standard-normal initialisation.
    """

    def __init__(self, dim: int, n_clusters: int) -> None:
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_clusters, dim))

    @property
    def n_clusters(self) -> int:
        return int(self.clusters.shape[0])

    def cosine(self, code: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each pixel's code to each centroid: ``(B, D, h, w) -> (B, K, h, w)``."""
        clusters = F.normalize(self.clusters, dim=1)
        return torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), clusters.to(code.dtype))

    def forward(
        self, code: torch.Tensor, alpha: float | None = None, log_probs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, probs)`` for ``code (B, D, h, w)``.

        ``probs`` (B, K, h, w): one-hot of the nearest centroid when ``alpha`` is None, else
        ``softmax(alpha·cos)``; ``loss = −mean(Σ_k probs·cos)``. With ``log_probs`` the second
        output is ``log_softmax(alpha·cos)`` instead (``alpha`` required).
        """
        cos = self.cosine(code)
        if alpha is None:
            # one-hot of the nearest centroid (F.one_hot would read the indices back on CPU)
            probs = torch.zeros_like(cos).scatter_(1, cos.argmax(1, keepdim=True), 1.0)
        else:
            probs = torch.softmax(cos * alpha, dim=1)
        loss = -(probs * cos).sum(1).mean()
        if log_probs:
            if alpha is None:
                raise HPSegError("log_probs=True needs a temperature alpha")
            return loss, torch.log_softmax(cos * alpha, dim=1)
        return loss, probs


def _bilinear_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """``(size_out, size_in)`` weights of bilinear resizing along one axis, as
    ``F.interpolate(mode="bilinear", align_corners=False)`` computes them."""
    scale = float(np.float32(size_in) / np.float32(size_out))  # in float32, as interpolate computes it
    src = ((torch.arange(size_out, dtype=torch.float32, device=device) + 0.5) * scale - 0.5).clamp_min(0.0)
    low = src.floor().to(torch.int64).clamp_max(size_in - 1)
    high = (low + 1).clamp_max(size_in - 1)
    frac = src - low
    rows = torch.arange(size_out, device=device)
    out = torch.zeros(size_out, size_in, device=device)
    out.index_put_((rows, low), 1.0 - frac, accumulate=True)
    out.index_put_((rows, high), frac, accumulate=True)
    return out


def upsample_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, h, w) -> (B, C, H, W)`` bilinear resizing (``align_corners=False``) as two matrix
    products: the same values as ``F.interpolate`` up to float rounding, and a backward without
    atomic additions (deterministic on GPUs, where ``interpolate``'s backward is not)."""
    rows = _bilinear_matrix(x.shape[-2], size[0], x.device).to(x.dtype)
    cols = _bilinear_matrix(x.shape[-1], size[1], x.device).to(x.dtype)
    return rows @ x @ cols.t()


def probe_cross_entropy(logits: torch.Tensor, label: torch.Tensor, *, across_ranks: bool = False) -> torch.Tensor:
    """Cross-entropy of probe logits ``(B,C,h,w)`` upsampled to the labels ``(B,H,W)``.

    Labels < 0 or ≥ C are ignored: the mean over the valid pixels, and 0 (with a graph) when no
    label is valid, e.g. for unlabelled folders — decided on the device, without reading anything
    back to the host, and with deterministic kernels only (:func:`upsample_bilinear`, a gather).

    ``across_ranks`` (a collective in a distributed run: one all-reduce of the count): this
    rank's sum over its valid pixels divided by the global batch's valid pixels per rank, so
    that the mean over ranks (DDP's gradient averaging) is the global batch's mean even when the
    ranks' images have different numbers of ignored pixels.
    """
    n_classes = logits.shape[1]
    log_p = torch.log_softmax(upsample_bilinear(logits.float(), (label.shape[-2], label.shape[-1])), dim=1)
    valid = (label >= 0) & (label < n_classes)
    nll = -log_p.gather(1, torch.where(valid, label, 0).unsqueeze(1)).squeeze(1)
    total = torch.where(valid, nll, 0.0).sum()
    if across_ranks and dist.world_size() > 1:
        count = dist.all_reduce_sum(valid.sum().to(total.dtype))
        return total / (count.clamp_min(1) / dist.world_size())
    return total / valid.sum().clamp_min(1)
