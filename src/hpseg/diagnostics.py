"""Training diagnostics: are the hidden positives right, and does the cluster probe keep up?

Pure functions on tensors (and one small accumulator) that a trainer calls at validation time.
They answer two questions that the probes' mIoU alone cannot:

* **Does this backbone give HP good positives on this data?** With patch labels available
  (the synthetic demo, the paper's datasets, labelled folders), :class:`PositiveStats` counts,
  with the very masks the loss uses (:func:`hpseg.hidden_positives.pool_thresholds` and
  :func:`hpseg.hidden_positives.positive_masks`), how many positive pairs each anchor gets and
  which fraction of them join two patches of the same class:

  - ``positive_precision_agnostic`` / ``positive_precision_specific``: among the positive pairs
    ``(i, j)`` of the task-agnostic mask ``A`` (backbone features vs the task-agnostic pool) /
    the task-specific mask ``T`` (EMA-head code vs the task-specific pool) whose two patches
    both carry a label, the fraction whose patch labels agree (absent when no such pair exists);
  - ``positives_per_anchor`` (and ``positives_per_anchor_specific``): positive pairs per anchor,
    ``|A| / N`` (``|T| / N``), over all ``N`` anchors (dropped anchors count with 0);
  - ``kept_anchor_fraction``: anchors with at least one task-agnostic positive (the loss drops
    the others).

* **Has the code learnt a clustering that the online cluster probe misses?**
  :func:`kmeans_code_miou` runs k-means with ``K`` clusters on the validation code and scores it
  like the cluster probe (Hungarian matching); :func:`assignment_miou` scores any per-patch
  assignment (e.g. the probe's own) at the same patch level, so the two compare directly.

Without labels, :func:`cluster_usage` summarises a probe's assignment (normalised entropy of the
cluster sizes and the number of empty clusters): a collapsing or dead-centroid probe shows there.

:func:`hidden_positive_diagnostics` runs all of this over a validation loader for a model and its
reference pools (the trainer's validation calls it), adding the held-out HP loss.

Everything here works on *patches*: pixel labels become one label per patch by majority vote
(:func:`patch_labels`), so these mIoU figures are patch-level and differ slightly from the
pixel-level mIoU of :func:`hpseg.evaluate.evaluate_model`. No function changes the model or
draws random numbers except k-means (seeded).

Shapes: ``B`` images, an ``S×S`` patch grid, ``N = B·S²`` patches (image by image, row-major),
``F`` backbone width, ``D`` code width, ``P`` pool size, ``M`` patches pooled over a split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hpseg.clustering import kmeans
from hpseg.errors import HPSegError
from hpseg.hidden_positives import hidden_positive_loss, local_propagation, pool_thresholds, positive_masks
from hpseg.metrics import SegmentationMetrics
from hpseg.model import HPModel
from hpseg.runtime import Runtime

__all__ = [
    "PositiveCounts",
    "PositiveStats",
    "assignment_miou",
    "cluster_usage",
    "hidden_positive_diagnostics",
    "kmeans_code_miou",
    "patch_labels",
    "positive_counts",
]

#: Anchor rows whose ``(rows, N)`` masks are built at once by :func:`positive_counts`.
DEFAULT_BLOCK_ROWS = 2304


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, S, S) -> (B·S², C)``, patches of image 0 first (row-major)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def patch_labels(label: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The majority label of each patch: ``(B, H, W)`` int → ``(B, S_h, S_w)`` int64.

    Pixel ``(y, x)`` belongs to patch ``(⌊y·S_h/H⌋, ⌊x·S_w/W⌋)`` (exact ``P×P`` blocks when ``H``
    and ``W`` are multiples of the grid, as with ViT patches). Pixels with a label ``< 0`` are
    ignored; a patch without any labelled pixel gets −1. Ties go to the smallest class id.

    Args:
        label: ``(B, H, W)`` integer labels, −1 (any negative value) = ignore.
        grid: ``(S_h, S_w)`` patches per column and per row, each at most the image's side.
    """
    if label.dim() != 3 or label.is_floating_point():
        raise HPSegError(f"patch_labels needs integer labels (B, H, W), got {tuple(label.shape)} {label.dtype}")
    b, h, w = label.shape
    sh, sw = int(grid[0]), int(grid[1])
    if not (1 <= sh <= h and 1 <= sw <= w):
        raise HPSegError(f"patch grid {grid} does not fit labels of {h}x{w} pixels")
    label = label.long()
    labelled = label >= 0
    if not bool(labelled.any()):
        return torch.full((b, sh, sw), -1, dtype=torch.long, device=label.device)
    n_classes = int(label.max()) + 1
    py = torch.arange(h, device=label.device) * sh // h  # (H,)
    px = torch.arange(w, device=label.device) * sw // w  # (W,)
    cell = (torch.arange(b, device=label.device).view(b, 1, 1) * sh + py.view(1, h, 1)) * sw + px.view(1, 1, w)
    index = (cell * n_classes + label.clamp_min(0))[labelled]
    counts = torch.bincount(index, minlength=b * sh * sw * n_classes).view(b, sh, sw, n_classes)
    best = counts.argmax(dim=-1)
    return torch.where(counts.sum(dim=-1) > 0, best, torch.full_like(best, -1))


@dataclass(frozen=True)
class PositiveCounts:
    """Integer counts of one batch (or a sum of batches), from :func:`positive_counts`.

    Attributes:
        anchors: patches ``N``.
        kept_anchors: anchors with at least one task-agnostic positive.
        pairs_agnostic / pairs_specific: ordered positive pairs ``(i, j)``, ``i ≠ j``, of ``A`` / ``T``.
        labelled_agnostic / labelled_specific: those pairs whose two patches both carry a label.
        agreeing_agnostic / agreeing_specific: those labelled pairs whose labels are equal.
    """

    anchors: int = 0
    kept_anchors: int = 0
    pairs_agnostic: int = 0
    labelled_agnostic: int = 0
    agreeing_agnostic: int = 0
    pairs_specific: int = 0
    labelled_specific: int = 0
    agreeing_specific: int = 0

    def __add__(self, other: PositiveCounts) -> PositiveCounts:
        return PositiveCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def summary(self) -> dict[str, float]:
        """The diagnostics as plain floats; a precision is absent when it has no labelled pair."""
        out: dict[str, float] = {}
        if self.labelled_agnostic > 0:
            out["positive_precision_agnostic"] = self.agreeing_agnostic / self.labelled_agnostic
        if self.labelled_specific > 0:
            out["positive_precision_specific"] = self.agreeing_specific / self.labelled_specific
        if self.anchors > 0:
            out["positives_per_anchor"] = self.pairs_agnostic / self.anchors
            out["positives_per_anchor_specific"] = self.pairs_specific / self.anchors
            out["kept_anchor_fraction"] = self.kept_anchors / self.anchors
        return out


def _pair_counts(mask: torch.Tensor, rows: slice, labels: torch.Tensor) -> tuple[int, int, int]:
    """``(pairs, labelled pairs, agreeing pairs)`` of a ``(M, N)`` bool mask for anchors ``rows``."""
    anchor = labels[rows].unsqueeze(1)  # (M, 1)
    cand = labels.unsqueeze(0)  # (1, N)
    both = mask & (anchor >= 0) & (cand >= 0)
    agree = both & (anchor == cand)
    return int(mask.sum()), int(both.sum()), int(agree.sum())


@torch.no_grad()
def positive_counts(
    f: torch.Tensor,
    s: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    labels: torch.Tensor,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> PositiveCounts:
    """Count the hidden positives of one batch and how many of them agree with the labels.

    The masks are exactly the loss's (:func:`hpseg.hidden_positives.positive_masks`, thresholds by
    :func:`hpseg.hidden_positives.pool_thresholds`): ``A`` from ``f`` vs ``pool_agnostic``, ``T``
    from ``s`` vs ``pool_specific``, both symmetric with the anchor itself excluded; candidates
    are all ``N`` patches of the batch, as in training. Pass a batch of the training size for
    figures that describe training (positives are mined within a batch).

    Args:
        f: L2-normalised backbone features ``(N, F)`` (``normalize(feats)`` flattened).
        s: L2-normalised EMA-head code ``(N, D)`` (``normalize(code_ema)`` flattened).
        pool_agnostic: task-agnostic pool ``(P, F)``; pool_specific: task-specific pool ``(P', D)``.
        labels: patch labels ``(N,)`` int (:func:`patch_labels` flattened), −1 = unlabelled.
        block_rows: anchors per block (memory ``O(block_rows·N)``; the result does not depend on it).
    """
    n = f.shape[0]
    if f.dim() != 2 or s.dim() != 2 or s.shape[0] != n or labels.shape != (n,):
        raise HPSegError(
            f"positive_counts needs f (N, F), s (N, D) and labels (N,), got {tuple(f.shape)}, "
            f"{tuple(s.shape)} and {tuple(labels.shape)}"
        )
    f, s = f.float(), s.float()
    labels = labels.to(f.device).long()
    dtype = torch.float32
    r_agnostic = pool_thresholds(f, pool_agnostic.float(), matmul_dtype=dtype)
    r_specific = pool_thresholds(s, pool_specific.float(), matmul_dtype=dtype)
    total = PositiveCounts()
    for start in range(0, n, max(1, block_rows)):
        rows = slice(start, min(n, start + max(1, block_rows)))
        masks = positive_masks(f, s, r_agnostic, r_specific, rows, keep=None, with_specific=True,
                               matmul_dtype=dtype)
        specific = masks.specific if masks.specific is not None else torch.zeros_like(masks.agnostic)
        a = _pair_counts(masks.agnostic, rows, labels)
        t = _pair_counts(specific, rows, labels)
        total = total + PositiveCounts(rows.stop - rows.start, int(masks.kept.sum()), *a, *t)
    return total


class PositiveStats:
    """Sums :func:`positive_counts` over validation batches; :meth:`result` gives the diagnostics.

    Example::

        stats = PositiveStats()
        for batch in val_batches:                       # batches of the training batch size
            stats.update(f, s, pool_agnostic, pool_specific, labels)
        stats.result()   # {"positive_precision_agnostic": 0.79, ..., "kept_anchor_fraction": 0.97}
    """

    def __init__(self) -> None:
        self.counts = PositiveCounts()

    def update(
        self,
        f: torch.Tensor,
        s: torch.Tensor,
        pool_agnostic: torch.Tensor,
        pool_specific: torch.Tensor,
        labels: torch.Tensor,
    ) -> PositiveCounts:
        """Add one batch (arguments as :func:`positive_counts`); returns that batch's counts."""
        batch = positive_counts(f, s, pool_agnostic, pool_specific, labels)
        self.counts = self.counts + batch
        return batch

    def result(self) -> dict[str, float]:
        """``positive_precision_agnostic``, ``positive_precision_specific`` (each absent without a
        labelled pair), ``positives_per_anchor``, ``positives_per_anchor_specific`` and
        ``kept_anchor_fraction``, as fractions (not percent); ``{}`` before any update."""
        return self.counts.summary()


def assignment_miou(assign: torch.Tensor, labels: torch.Tensor, k: int, n_classes: int | None = None) -> float | None:
    """Hungarian-matched mIoU (%) of cluster ids ``assign (M,)`` in ``[0, k)`` against labels ``(M,)``.

    Unlabelled entries (label < 0) are ignored; ``n_classes`` defaults to
    ``max(k, max label + 1)``. Returns None when no entry is labelled.
    """
    labels = labels.reshape(-1).long()
    valid = labels >= 0
    if not bool(valid.any()):
        return None
    c = n_classes if n_classes is not None else max(k, int(labels[valid].max()) + 1)
    meter = SegmentationMetrics(c, n_clusters=k, matching="hungarian")
    meter.update(assign.reshape(-1).long()[valid], labels[valid])
    return float(meter.compute()["miou"])


@torch.no_grad()
def kmeans_code_miou(
    code: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0, *, n_classes: int | None = None
) -> float | None:
    """k-means (``k`` clusters, spherical, seeded) on code patches, Hungarian-matched mIoU (%).

    This is what the cluster probe *could* score if its centroids were where k-means puts them:
    compare it with :func:`assignment_miou` of the probe's own assignment of the same patches.
    Fitted and scored on the same patches (a diagnostic, not an evaluation protocol).

    Args:
        code: ``(M, D)`` code vectors (normalised inside, as the cosine probe does).
        labels: ``(M,)`` patch labels, −1 = unlabelled (such patches are left out of fit and score).
        k: clusters (the probe's ``K``).
        seed: k-means++ seed.
        n_classes: ``C`` (default ``max(k, max label + 1)``).

    Returns:
        mIoU in percent, or None when fewer than ``k`` patches are labelled.
    """
    if code.dim() != 2 or labels.reshape(-1).shape[0] != code.shape[0]:
        raise HPSegError(f"kmeans_code_miou needs code (M, D) and labels (M,), got {tuple(code.shape)}, "
                         f"{tuple(labels.shape)}")
    labels = labels.reshape(-1).long().to(code.device)
    valid = labels >= 0
    if int(valid.sum()) < k:
        return None
    x = F.normalize(code[valid].float(), dim=1)
    centroids = kmeans(x, k, seed=seed)
    assign = (x @ centroids.T).argmax(dim=1)
    return assignment_miou(assign, labels[valid], k, n_classes)


def cluster_usage(counts: list[int] | np.ndarray | torch.Tensor) -> dict[str, float | int]:
    """How evenly ``K`` clusters are used, from their sizes (no labels needed).

    Args:
        counts: ``(K,)`` entries (pixels, patches) assigned to each cluster, e.g.
            ``torch.bincount(assign.flatten(), minlength=K)``.

    Returns:
        ``cluster_entropy``: entropy of the cluster frequencies divided by ``log K`` — 1 when all
        clusters are equally used, 0 when one takes everything (0 for ``K = 1`` or no entry);
        ``empty_clusters``: clusters that took no entry.
    """
    c = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64).reshape(-1)
    if c.size and (c < 0).any():
        raise HPSegError(f"cluster_usage needs non-negative cluster sizes, got min {c.min()}")
    k, total = len(c), c.sum()
    empty = int((c == 0).sum())
    if total <= 0 or k < 2:
        return {"cluster_entropy": 0.0, "empty_clusters": empty}
    p = c[c > 0] / total
    entropy = float(-(p * np.log(p)).sum() / math.log(k))
    return {"cluster_entropy": min(1.0, max(0.0, entropy)), "empty_clusters": empty}


# ------------------------------------------------------------------------------------------
# the diagnostics of a validation set (docs/method.md §3–6)
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def hidden_positive_diagnostics(
    model: HPModel,
    loader: DataLoader,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    runtime: Runtime,
    *,
    tau: float,
    sigma: float,
    seed: int = 0,
) -> dict[str, Any]:
    """What the training objective sees on held-out images, without dropout.

    Batches of ``loader`` should have the training batch size (positives are mined within a
    batch). Returns the label-free numbers — ``heldout_hp_loss`` (the hidden-positive loss at
    λ = 0 and ρ = 1, so that it is deterministic and comparable across validations),
    ``positives_per_anchor`` (and ``_specific``: the positives an anchor gets among the
    ``B·S² − 1`` candidates of a batch of the loader's batch size ``B``, i.e. the fraction of
    candidate pairs that are positive times ``B·S² − 1``, so that a smaller last batch or a
    smaller validation set does not change it), ``kept_anchor_fraction`` — and, where the images have labels,
    ``positive_precision_agnostic``/``_specific`` and ``kmeans_code_miou`` next to
    ``cluster_probe_patch_miou`` (the probe scored on the same patches).
    """
    stats = PositiveStats()
    losses: list[float] = []
    codes: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    candidates, per_image = 0, 1
    for batch in loader:
        images = batch["img"].to(runtime.device)
        with runtime.autocast():
            out = model.backbone(images)
            code = model.head(out.feats).float()
        feats, attn = out.feats.float(), out.attn_logits.float()  # type: ignore[union-attr]
        f = F.normalize(_flat(feats), dim=1)
        s = F.normalize(_flat(model.ema_head(feats)), dim=1)
        patches = patch_labels(batch["label"].to(runtime.device), (code.shape[-2], code.shape[-1])).reshape(-1)
        stats.update(f, s, pool_agnostic, pool_specific, patches)
        candidates += f.shape[0] * (f.shape[0] - 1)
        per_image = code.shape[-2] * code.shape[-1]
        if images.shape[0] > 1:
            z = model.projection(_flat(code))
            z_lhp = model.projection(_flat(local_propagation(attn, code, sigma=sigma)))
            losses.append(float(hidden_positive_loss(z, z_lhp, f, s, pool_agnostic, pool_specific,
                                                     num_images=images.shape[0], tau=tau, lam=0.0, rho=1.0)))
        codes.append(_flat(code).cpu())
        labels.append(patches.cpu())
    out_doc: dict[str, Any] = dict(stats.result())
    reference = int(loader.batch_size or 1) * per_image - 1  # candidates of an anchor in a full batch
    if candidates > 0 and reference > 0:
        out_doc["positives_per_anchor"] = stats.counts.pairs_agnostic / candidates * reference
        out_doc["positives_per_anchor_specific"] = stats.counts.pairs_specific / candidates * reference
    if losses:
        out_doc["heldout_hp_loss"] = sum(losses) / len(losses)
    all_codes, all_labels = torch.cat(codes), torch.cat(labels)
    k = model.n_clusters
    km = kmeans_code_miou(all_codes, all_labels, k, seed=seed, n_classes=model.n_classes)
    if km is not None:
        out_doc["kmeans_code_miou"] = km
        probe = model.cluster_probe.cosine(all_codes.T.reshape(1, -1, all_codes.shape[0], 1).to(runtime.device))
        patch_miou = assignment_miou(probe.argmax(1).reshape(-1).cpu(), all_labels, k, model.n_classes)
        if patch_miou is not None:
            out_doc["cluster_probe_patch_miou"] = patch_miou
    return out_doc
