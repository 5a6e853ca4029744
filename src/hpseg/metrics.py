"""Confusion-matrix segmentation metrics with cluster → class matching (docs/method.md §8).

Predictions (cluster ids or class ids) and labels are accumulated into a confusion matrix
``confusion`` of shape ``(K, C)``: rows are predicted clusters, columns are labels (the
orientation of the golden ``stats``). ``compute()`` maps clusters to classes and reports pixel
accuracy and mIoU in percent:

- ``"hungarian"``: one-to-one assignment maximising matched pixels (scipy
  ``linear_sum_assignment``). With ``K > C`` the pixels of the ``K - C`` unmatched clusters
  count as errors (false negatives of their true class); they stay in the accuracy denominator.
- ``"majority"``: every cluster takes its most frequent class (many-to-one).
- ``"none"``: prediction ``k`` is class ``k``; predictions ``k >= C`` are errors.

With ``K == C`` the Hungarian and identity results equal the authors' ``UnsupervisedMetrics``.
Unlike the authors' code, predictions ``>= C`` are never dropped.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from hpseg.errors import HPSegError

log = logging.getLogger(__name__)

MATCHINGS = ("hungarian", "majority", "none")


def _resolve_matching(matching: str | None, hungarian: bool | None) -> str:
    """Combine the ``matching`` name with the legacy ``hungarian`` flag."""
    if matching is not None:
        if not isinstance(matching, str) or matching.lower() not in MATCHINGS:
            raise HPSegError(f"unknown matching {matching!r}: use one of {', '.join(MATCHINGS)}")
        matching = matching.lower()
    if hungarian is None:
        return matching or "hungarian"
    legacy = "hungarian" if hungarian else "none"
    if matching is not None and matching != legacy:
        raise HPSegError(f"hungarian={hungarian} contradicts matching={matching!r}: pass only matching=...")
    return legacy


class SegmentationMetrics:
    """Accumulate a ``(K, C)`` confusion matrix and score it after matching clusters to classes.

    Args:
        n_classes: number of label classes ``C``; labels outside ``[0, C)`` are ignored.
        n_clusters: number of predicted clusters ``K`` (default ``C``).
        matching: ``"hungarian"`` (default), ``"majority"`` or ``"none"``.
        hungarian: legacy flag: ``True`` means ``matching="hungarian"``, ``False`` ``"none"``.
        device: where the confusion matrix starts (it follows the predictions' device).

    Attributes:
        confusion: ``(K, C)`` int64 counts, rows = predictions, columns = labels. Summing it
            across processes (e.g. ``torch.distributed.all_reduce``) merges the states.
    """

    def __init__(
        self,
        n_classes: int,
        n_clusters: int | None = None,
        matching: str | None = None,
        *,
        hungarian: bool | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
            raise HPSegError(f"n_classes must be a positive integer, got {n_classes!r}")
        if n_clusters is None:
            n_clusters = int(n_classes)
        if isinstance(n_clusters, bool):
            raise HPSegError("n_clusters must be an integer: pass hungarian=... by keyword")
        if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise HPSegError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        self.n_classes = int(n_classes)
        self.n_clusters = int(n_clusters)
        self.matching = _resolve_matching(matching, hungarian)
        self.confusion = torch.zeros(
            self.n_clusters, self.n_classes, dtype=torch.int64, device=device or "cpu"
        )

    def __repr__(self) -> str:
        return (
            f"SegmentationMetrics(n_classes={self.n_classes}, n_clusters={self.n_clusters}, "
            f"matching={self.matching!r}, pixels={int(self.confusion.sum())})"
        )

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything accumulated so far (keeps the device)."""
        self.confusion.zero_()

    def merge(self, other: SegmentationMetrics) -> SegmentationMetrics:
        """Add ``other``'s counts to this meter (same ``C`` and ``K``); returns ``self``."""
        if not isinstance(other, SegmentationMetrics):
            raise HPSegError(f"can only merge another SegmentationMetrics, got {type(other).__name__}")
        if other.confusion.shape != self.confusion.shape:
            raise HPSegError(
                f"cannot merge metrics of shape {tuple(other.confusion.shape)} into "
                f"{tuple(self.confusion.shape)}: use the same n_classes and n_clusters"
            )
        self.confusion += other.confusion.to(self.confusion.device)
        return self

    def all_reduce(self, group: Any = None) -> SegmentationMetrics:
        """Sum ``confusion`` over all processes of ``torch.distributed`` (no-op when not initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM, group=group)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The meter's state (counts on CPU plus its configuration)."""
        return {
            "n_classes": self.n_classes,
            "n_clusters": self.n_clusters,
            "matching": self.matching,
            "confusion": self.confusion.detach().cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict` (the shapes must agree)."""
        confusion = torch.as_tensor(state["confusion"], dtype=torch.int64)
        if confusion.shape != self.confusion.shape:
            raise HPSegError(
                f"metrics state has shape {tuple(confusion.shape)}, expected "
                f"{tuple(self.confusion.shape)}: use the same n_classes and n_clusters"
            )
        self.confusion = confusion.to(self.confusion.device)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            preds: integer cluster ids ``(B, H, W)`` or ``(N,)``, or scores / one-hot
                ``(B, K, H, W)`` (argmax over dim 1) — one more dimension than ``target``.
            target: integer labels of the same spatial shape; values ``< 0`` or ``>= C``
                are ignored.
        """
        if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise HPSegError("preds and target must be torch tensors")
        if target.is_floating_point() or target.is_complex():
            raise HPSegError(f"target must hold integer labels, got dtype {target.dtype}")
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=1)
        elif preds.is_floating_point() or preds.is_complex():
            raise HPSegError(
                f"preds of dtype {preds.dtype} must be integer labels shaped like target "
                f"{tuple(target.shape)} or scores with a class dimension at dim 1"
            )
        if preds.shape != target.shape:
            raise HPSegError(
                f"preds shape {tuple(preds.shape)} does not match target shape "
                f"{tuple(target.shape)}: pass labels (B,H,W) or scores (B,K,H,W) for (B,H,W) targets"
            )
        device = preds.device
        if self.confusion.device != device:
            self.confusion = self.confusion.to(device)
        preds = preds.reshape(-1).long()
        target = target.reshape(-1).to(device=device, dtype=torch.long)
        k, c = self.n_clusters, self.n_classes
        if preds.numel() and bool(((preds < 0) | (preds >= k)).any()):
            lo, hi = int(preds.min()), int(preds.max())
            raise HPSegError(
                f"predictions range over [{lo}, {hi}] but n_clusters={k}: "
                f"set n_clusters to the number of clusters the model predicts"
            )
        valid = (target >= 0) & (target < c)
        # invalid pixels go to one extra bin (k*c) that is dropped: no data-dependent masking
        index = torch.where(valid, preds * c + target, torch.full_like(preds, k * c))
        counts = torch.bincount(index, minlength=k * c + 1)[: k * c]
        self.confusion += counts.view(k, c)

    # ------------------------------------------------------------------ compute
    def assignment(self) -> list[int]:
        """Cluster → class map of length ``K`` for the current counts (−1 = unmatched)."""
        conf = self.confusion.detach().cpu().numpy()
        k, c = conf.shape
        if self.matching == "hungarian":
            rows, cols = linear_sum_assignment(conf, maximize=True)
            out = np.full(k, -1, dtype=np.int64)
            out[rows] = cols
        elif self.matching == "majority":
            out = conf.argmax(axis=1).astype(np.int64)  # first class on ties
            out[conf.sum(axis=1) == 0] = -1  # a cluster with no labelled pixel takes no class
        else:
            out = np.arange(k, dtype=np.int64)
            out[out >= c] = -1
        return [int(a) for a in out]

    def compute(self) -> dict[str, Any]:
        """Match clusters to classes and score.

        Returns:
            ``accuracy`` and ``miou`` (percent, floats), ``iou`` (per class percent; NaN for a
            class absent from both predictions and labels, excluded from the mean),
            ``confusion`` (raw ``(K, C)`` counts), ``matched_confusion`` (``(C, C)``, rows =
            predicted class after matching, columns = labels; unmatched clusters dropped from
            it but counted as errors), ``assignment`` (cluster → class list, −1 = unmatched)
            and ``n_pixels`` (labelled pixels seen).
        """
        assignment = self.assignment()
        counts = self.confusion.detach().cpu()
        c = self.n_classes
        amap = torch.tensor(assignment, dtype=torch.long)
        matched_rows = amap >= 0
        matched_counts = torch.zeros(c, c, dtype=torch.int64)
        matched_counts.index_add_(0, amap[matched_rows], counts[matched_rows])
        conf, matched = counts.to(torch.float64), matched_counts.to(torch.float64)

        tp = torch.diagonal(matched)
        predicted = matched.sum(dim=1)  # pixels mapped to each class
        labelled = conf.sum(dim=0)  # every labelled pixel of each class, matched or not
        union = predicted + labelled - tp
        iou = tp / union  # 0/0 → NaN for classes absent from predictions and labels
        total = conf.sum()
        accuracy = float(tp.sum() / total) if total > 0 else math.nan
        present = ~torch.isnan(iou)
        miou = float(iou[present].mean()) if bool(present.any()) else math.nan
        if total == 0:
            log.warning("SegmentationMetrics.compute() called without any labelled pixel")
        return {
            "accuracy": 100.0 * accuracy,
            "miou": 100.0 * miou,
            "iou": [100.0 * float(v) for v in iou],
            "confusion": self.confusion.clone(),
            "matched_confusion": matched_counts.to(self.confusion.device),
            "assignment": assignment,
            "n_pixels": int(total),
        }
