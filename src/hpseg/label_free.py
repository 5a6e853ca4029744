"""Label-free figures of a segmentation: is it stable, balanced, aligned with edges, and how far
is it from another one? What a user without labels can compare between runs, between values
of K, and between HP and k-means on the frozen backbone.

Every figure is accumulated over images by a small meter (``update`` per batch, ``result`` at
the end); all take cluster maps ``(B, H, W)`` of integer ids in ``[0, K)``:

* :class:`StabilityMeter` — the mean over clusters of the IoU between a segmentation and the
  segmentation of a transformed image mapped back (a mirror image flipped back; a photometric
  change), in percent. The same model labels both, so ids compare directly. Higher is better.
* :class:`BoundaryMeter` — of the segment boundary pixels, the percentage lying within one pixel
  of a strong image edge (the top ``EDGE_QUANTILE`` of the Sobel gradient magnitude of each
  image), with the chance level (the percentage of all pixels within one pixel of such an edge:
  what boundaries drawn at random would score). Higher is better.
* :class:`AgreementMeter` — the normalised mutual information (arithmetic mean normalisation)
  and the adjusted Rand index between two segmentations of the same images, from their
  ``(K₁, K₂)`` contingency table; cluster ids need not correspond. Neither direction is better:
  they say how far one method moved from the other.
* the balance of cluster sizes is :func:`hpseg.diagnostics.cluster_usage` (normalised entropy).

:func:`photometric_change` is the fixed photometric transform of the stability figure, and
:func:`match_clusters` maps one segmentation's ids onto another's (for colours that correspond).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError
from hpseg.imaging import denormalize, normalize

__all__ = [
    "EDGE_QUANTILE",
    "AgreementMeter",
    "BoundaryMeter",
    "StabilityMeter",
    "agreement_scores",
    "edge_map",
    "match_clusters",
    "photometric_change",
    "segment_boundaries",
]

#: the strongest fraction of each image's gradients that counts as an edge
EDGE_QUANTILE = 0.2


def _check(pred: torch.Tensor, k: int) -> torch.Tensor:
    if pred.dim() != 3 or pred.is_floating_point():
        raise HPSegError(f"cluster maps must be integer (B, H, W), got {tuple(pred.shape)} {pred.dtype}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
        raise HPSegError(f"cluster ids must lie in [0, {k}), got {int(pred.min())}..{int(pred.max())}")
    return pred.long()


class StabilityMeter:
    """Mean IoU (%) over clusters between segmentations ``a`` and ``b`` of the same images, with
    intersections and unions summed over all images (clusters absent from both are skipped)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.inter = torch.zeros(k, dtype=torch.float64)
        self.union = torch.zeros(k, dtype=torch.float64)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """``a``, ``b``: ``(B, H, W)`` cluster ids of the same pixels."""
        a, b = _check(a, self.k).flatten().cpu(), _check(b, self.k).flatten().cpu()
        same = a == b
        inter = torch.bincount(a[same], minlength=self.k).double()
        self.inter += inter
        self.union += torch.bincount(a, minlength=self.k).double() + torch.bincount(b, minlength=self.k).double() - inter

    def result(self) -> float | None:
        """Mean IoU in percent, None before any pixel."""
        present = self.union > 0
        if not bool(present.any()):
            return None
        return float((self.inter[present] / self.union[present]).mean() * 100)


def photometric_change(images: torch.Tensor) -> torch.Tensor:
    """A fixed photometric change of normalised images ``(B, 3, H, W)``: brightness × 0.8,
    contrast × 1.25 around each image's mean grey, saturation × 0.6; returns normalised images."""
    rgb = denormalize(images.float()).clamp(0, 1) * 0.8
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
    rgb = (rgb - grey.mean(dim=(2, 3), keepdim=True)) * 1.25 + grey.mean(dim=(2, 3), keepdim=True)
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
    rgb = grey + 0.6 * (rgb - grey)
    return normalize(rgb.clamp(0, 1)).to(images.dtype)


def edge_map(images: torch.Tensor, quantile: float = EDGE_QUANTILE) -> torch.Tensor:
    """Strong edges of normalised images ``(B, 3, H, W)`` → ``(B, H, W)`` bool: pixels within one
    pixel of the top ``quantile`` of each image's Sobel gradient magnitude (of its grey values)."""
    rgb = denormalize(images.float()).clamp(0, 1)
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).unsqueeze(1)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device)
    kernels = torch.stack([sobel, sobel.T]).unsqueeze(1)  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels).pow(2).sum(1).sqrt()  # (B, H, W)
    flat = grad.flatten(1)
    threshold = torch.quantile(flat, 1.0 - quantile, dim=1).view(-1, 1, 1)
    strong = (grad >= threshold) & (grad > 0)
    return F.max_pool2d(strong.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0


def segment_boundaries(pred: torch.Tensor) -> torch.Tensor:
    """Boundary pixels of cluster maps ``(B, H, W)``: pixels whose right or lower neighbour has
    another id → ``(B, H, W)`` bool."""
    out = torch.zeros(pred.shape, dtype=torch.bool, device=pred.device)
    out[:, :, :-1] |= pred[:, :, :-1] != pred[:, :, 1:]
    out[:, :-1, :] |= pred[:, :-1, :] != pred[:, 1:, :]
    return out


class BoundaryMeter:
    """Percentage of segment boundary pixels on strong image edges (:func:`edge_map`), and the
    chance level (percentage of all pixels on such edges)."""

    def __init__(self) -> None:
        self.on_edge = self.boundary = self.edge = self.pixels = 0

    def update(self, pred: torch.Tensor, edges: torch.Tensor) -> None:
        """``pred``: ``(B, H, W)`` cluster ids; ``edges``: :func:`edge_map` of the same images."""
        if pred.shape != edges.shape:
            raise HPSegError(f"cluster maps {tuple(pred.shape)} and edge maps {tuple(edges.shape)} differ in size")
        bounds = segment_boundaries(pred)
        self.boundary += int(bounds.sum())
        self.on_edge += int((bounds & edges).sum())
        self.edge += int(edges.sum())
        self.pixels += edges.numel()

    def result(self) -> tuple[float | None, float | None]:
        """``(precision %, chance %)``; precision is None without any boundary pixel."""
        precision = 100.0 * self.on_edge / self.boundary if self.boundary else None
        chance = 100.0 * self.edge / self.pixels if self.pixels else None
        return precision, chance


def agreement_scores(table: np.ndarray) -> dict[str, float]:
    """``{"nmi": …, "ari": …}`` of a ``(K₁, K₂)`` contingency table of two partitions.

    NMI: mutual information over the arithmetic mean of the two entropies (1 when one partition
    is a renaming of the other; 1 also when both are a single cluster; 0 when independent).
    ARI: the Rand index adjusted for chance (1 identical, about 0 for random labelling).
    """
    t = np.asarray(table, dtype=np.float64)
    n = t.sum()
    if n <= 0:
        raise HPSegError("agreement of two segmentations needs at least one pixel")
    a, b = t.sum(1), t.sum(0)

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0] / n
        return float(-(p * np.log(p)).sum())

    nz = t > 0
    mi = float((t[nz] / n * np.log(t[nz] * n / np.outer(a, b)[nz])).sum())
    h = (entropy(a) + entropy(b)) / 2
    nmi = 1.0 if h <= 0 else max(0.0, min(1.0, mi / h))
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    index, sa, sb = comb(t).sum(), comb(a).sum(), comb(b).sum()
    expected = sa * sb / comb(n) if n > 1 else 0.0
    top = (sa + sb) / 2
    ari = 1.0 if math.isclose(top, expected) else float((index - expected) / (top - expected))
    return {"nmi": nmi, "ari": ari}


class AgreementMeter:
    """Contingency table of two segmentations (``k_a`` and ``k_b`` clusters) of the same pixels."""

    def __init__(self, k_a: int, k_b: int) -> None:
        self.k_a, self.k_b = k_a, k_b
        self.table = torch.zeros(k_a * k_b, dtype=torch.long)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """``a``, ``b``: ``(B, H, W)`` cluster ids of the same pixels."""
        a, b = _check(a, self.k_a).flatten().cpu(), _check(b, self.k_b).flatten().cpu()
        self.table += torch.bincount(a * self.k_b + b, minlength=self.k_a * self.k_b)

    def contingency(self) -> np.ndarray:
        """``(k_a, k_b)`` pixel counts."""
        return self.table.view(self.k_a, self.k_b).numpy()

    def result(self) -> dict[str, float]:
        """:func:`agreement_scores` of the table; ``{}`` before any pixel."""
        return agreement_scores(self.contingency()) if int(self.table.sum()) else {}


def match_clusters(table: np.ndarray) -> np.ndarray:
    """For a ``(K_a, K_b)`` contingency table, the id of ``a`` that each cluster of ``b`` maps to
    (one-to-one by maximal overlap; clusters of ``b`` left over keep ids from ``K_a`` on), so that
    ``mapping[b_map]`` draws ``b`` in ``a``'s colours: ``(K_b,)`` int."""
    from scipy.optimize import linear_sum_assignment

    t = np.asarray(table)
    rows, cols = linear_sum_assignment(t, maximize=True)
    mapping = np.full(t.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    spare = iter(range(t.shape[0], t.shape[0] + t.shape[1]))
    for j in range(t.shape[1]):
        if mapping[j] < 0:
            mapping[j] = next(spare)
    return mapping
