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

The meters pool over pixels. :class:`ImageCounts` keeps the same counts **per image** (what each
image adds to the pooled sums), so that the pooled figures can be recomputed on any resample of
the images (:mod:`hpseg.verdict`'s bootstrap) by :func:`pooled_figures`; on all images once each
they equal the meters' figures. It also keeps, per image and cluster, the intersection a random
segmentation with the same cluster sizes would have (:func:`chance_intersection`), from which
each stability figure has a chance level and a chance-corrected form
``100 · (S − S₀) / (100 − S₀)``: 0 = no more stable than random labels of the same sizes,
100 = perfectly stable, whatever K.

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
    "POOLED_FIGURES",
    "ImageCounts",
    "StabilityMeter",
    "boundary_counts",
    "chance_corrected",
    "chance_intersection",
    "agreement_scores",
    "edge_map",
    "match_clusters",
    "photometric_change",
    "pooled_figures",
    "segment_boundaries",
    "stability_counts",
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


# ------------------------------------------------------------------------------------------
# per-image counts: the pooled figures on any resample of the images
# ------------------------------------------------------------------------------------------


def _sizes(ids: torch.Tensor, k: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``ids`` ``(B, P)``, the pixels of each cluster (only where ``keep``) → ``(B, K)`` float64."""
    n = ids.shape[0]
    shifted = ids + (torch.arange(n) * k).unsqueeze(1)
    flat = shifted[keep] if keep is not None else shifted.flatten()
    return torch.bincount(flat, minlength=n * k).view(n, k).double()


def stability_counts(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image and cluster, the intersection and union of ``a`` and ``b`` (``(B, H, W)`` cluster
    ids in ``[0, k)``) → two ``(B, K)`` float64 arrays (what :class:`StabilityMeter` sums)."""
    a, b = _check(a, k).flatten(1).cpu(), _check(b, k).flatten(1).cpu()
    inter = _sizes(a, k, a == b)
    return inter.numpy(), (_sizes(a, k) + _sizes(b, k) - inter).numpy()


def chance_intersection(a: torch.Tensor, b: torch.Tensor, k: int) -> np.ndarray:
    """Per image and cluster, the expected intersection of two random segmentations with the
    cluster sizes of ``a`` and ``b`` (``(B, H, W)``), each pixel's id drawn independently:
    ``|a = c| · |b = c| / pixels`` → ``(B, K)`` float64."""
    a, b = _check(a, k).flatten(1).cpu(), _check(b, k).flatten(1).cpu()
    return (_sizes(a, k) * _sizes(b, k) / max(a.shape[1], 1)).numpy()


def boundary_counts(pred: torch.Tensor, edges: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the boundary pixels of ``pred`` (``(B, H, W)``) lying on ``edges`` and all its
    boundary pixels → two ``(B,)`` float64 arrays (what :class:`BoundaryMeter` sums)."""
    if pred.shape != edges.shape:
        raise HPSegError(f"cluster maps {tuple(pred.shape)} and edge maps {tuple(edges.shape)} differ in size")
    bounds = segment_boundaries(pred).flatten(1)
    on_edge = (bounds & edges.flatten(1).bool()).sum(1)
    return on_edge.double().cpu().numpy(), bounds.sum(1).double().cpu().numpy()


def _stability(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Mean over clusters with a union of the IoU in %: ``(..., K)`` → ``(...)`` (NaN: no pixel)."""
    present = union > 0
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=present)
    count = present.sum(-1)
    return np.divide(100.0 * iou.sum(-1), count, out=np.full(count.shape, np.nan), where=count > 0)


def chance_corrected(value: np.ndarray | float, chance: np.ndarray | float) -> np.ndarray:
    """``100 · (value − chance) / (100 − chance)`` for figures in %: 0 at the chance level, 100 at
    the maximum (NaN where the chance level is 100 or a value is NaN)."""
    value, chance = np.asarray(value, dtype=np.float64), np.asarray(chance, dtype=np.float64)
    room = 100.0 - chance
    return np.divide(100.0 * (value - chance), room, out=np.full(np.broadcast(value, room).shape, np.nan),
                     where=room > 1e-12)


def _balance(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster entropy / log K and the number of empty clusters of sizes ``(..., K)``."""
    k = pixels.shape[-1]
    total = pixels.sum(-1, keepdims=True)
    p = np.divide(pixels, total, out=np.zeros_like(pixels), where=total > 0)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    entropy = -(p * logs).sum(-1) / math.log(k) if k > 1 else np.zeros(p.shape[:-1])
    return np.clip(entropy, 0.0, 1.0), (pixels == 0).sum(-1).astype(np.float64)


#: the figures :func:`pooled_figures` returns, in order
POOLED_FIGURES = ("flip_stability", "flip_stability_chance", "flip_stability_corrected", "photometric_stability",
                  "photometric_stability_chance", "photometric_stability_corrected", "stability_corrected",
                  "boundary_edge_precision", "boundary_edge_chance", "boundary_edge_corrected", "cluster_entropy",
                  "empty_clusters")


class ImageCounts:
    """Per-image counts of one method's label-free figures on ``N`` images (rows in order of
    :meth:`update`): the flip and photometric intersections, unions and chance intersections
    ``(N, K)``, boundary pixels on edges and in all ``(N,)``, edge pixels and pixels ``(N,)``,
    and cluster sizes ``(N, K)``."""

    _KEYS = ("flip_inter", "flip_union", "flip_chance", "photo_inter", "photo_union", "photo_chance",
             "on_edge", "boundary", "edge", "total", "pixels")

    def __init__(self, k: int) -> None:
        self.k = k
        self.rows: dict[str, list[np.ndarray]] = {key: [] for key in self._KEYS}

    def update(self, pred: torch.Tensor, flipped: torch.Tensor, changed: torch.Tensor, edges: torch.Tensor) -> None:
        """One batch: ``pred`` the segmentation ``(B, H, W)``, ``flipped`` that of the mirror image
        flipped back, ``changed`` that of the photometric change, ``edges`` :func:`edge_map`."""
        for name, other in (("flip", flipped), ("photo", changed)):
            inter, union = stability_counts(pred, other, self.k)
            self.rows[f"{name}_inter"].append(inter)
            self.rows[f"{name}_union"].append(union)
            self.rows[f"{name}_chance"].append(chance_intersection(pred, other, self.k))
        on_edge, boundary = boundary_counts(pred, edges)
        self.rows["on_edge"].append(on_edge)
        self.rows["boundary"].append(boundary)
        self.rows["edge"].append(edges.flatten(1).sum(1).double().cpu().numpy())
        self.rows["total"].append(np.full(pred.shape[0], float(pred[0].numel() if len(pred) else 0)))
        self.rows["pixels"].append(_sizes(_check(pred, self.k).flatten(1).cpu(), self.k).numpy())

    def __len__(self) -> int:
        return int(sum(len(r) for r in self.rows["on_edge"]))

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-image counts: ``(N, K)`` or ``(N,)`` float64 arrays."""
        empty = {key: np.zeros((0, self.k) if key.endswith(("inter", "union", "chance")) or key == "pixels" else 0)
                 for key in self._KEYS}
        return {key: np.concatenate(rows) if rows else empty[key] for key, rows in self.rows.items()}


def pooled_figures(counts: dict[str, np.ndarray], weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The label-free figures pooled over images, each image counted ``weights`` times.

    Args:
        counts: :meth:`ImageCounts.arrays` of ``N`` images.
        weights: ``(R, N)`` multiplicities (one row per resample of the images, e.g. a bootstrap
            resample), or None for all images once (``R = 1``).

    Returns:
        Each of :data:`POOLED_FIGURES` → ``(R,)`` float64 (NaN where undefined, e.g. no boundary
        pixel): the stabilities in %, their chance level (random segmentations with the same
        cluster sizes per image) and chance-corrected form (:func:`chance_corrected`), their mean
        ``stability_corrected``, the boundary precision in %, its chance level (share of edge
        pixels) and corrected form, the cluster entropy / log K and the empty clusters.
    """
    n = len(counts["on_edge"])
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    sums = {key: w @ value for key, value in counts.items()}  # (R, K) or (R,)
    out: dict[str, np.ndarray] = {}
    for name, short in (("flip_stability", "flip"), ("photometric_stability", "photo")):
        inter, union, chance = sums[f"{short}_inter"], sums[f"{short}_union"], sums[f"{short}_chance"]
        out[name] = _stability(inter, union)
        out[f"{name}_chance"] = _stability(chance, np.where(union > 0, inter + union - chance, 0.0))
        out[f"{name}_corrected"] = chance_corrected(out[name], out[f"{name}_chance"])
    out["stability_corrected"] = (out["flip_stability_corrected"] + out["photometric_stability_corrected"]) / 2
    boundary = sums["boundary"]
    out["boundary_edge_precision"] = np.divide(100.0 * sums["on_edge"], boundary,
                                               out=np.full(boundary.shape, np.nan), where=boundary > 0)
    out["boundary_edge_chance"] = np.divide(100.0 * sums["edge"], sums["total"],
                                            out=np.full(boundary.shape, np.nan), where=sums["total"] > 0)
    out["boundary_edge_corrected"] = chance_corrected(out["boundary_edge_precision"], out["boundary_edge_chance"])
    out["cluster_entropy"], out["empty_clusters"] = _balance(sums["pixels"])
    return {key: out[key] for key in POOLED_FIGURES}
