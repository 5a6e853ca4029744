"""Evaluation: the probes' predictions → metrics (before/after CRF), galleries, the k-means baseline.

The protocol (docs/method.md §8): images resized (shorter side) and centre-cropped to the
evaluation resolution, labels by nearest neighbour; :meth:`hpseg.model.HPModel.scores`
upsamples the code bilinearly to the label size and applies the probes; the cluster probe's
assignment is matched to classes (Hungarian by default) and the linear probe is scored
directly; pixel accuracy and mIoU in percent. Without labels nothing is scored: the
predictions, the cluster usage and the cluster gallery are still produced.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hpseg.backbones import Backbone
from hpseg.clustering import kmeans
from hpseg.imaging import to_uint8_hwc
from hpseg.metrics import SegmentationMetrics
from hpseg.model import HPModel
from hpseg.results import HeadScore, Results
from hpseg.runtime import Runtime
from hpseg.viz import colorize, confusion_figure, gallery_figure, save_figure, save_image

log = logging.getLogger(__name__)

__all__ = [
    "EvalOutput",
    "LabelFreeOutput",
    "Predictor",
    "evaluate_model",
    "hp_predictor",
    "kmeans",
    "kmeans_baseline",
    "kmeans_centroids",
    "kmeans_predictor",
    "label_free_evaluation",
    "write_results",
]

#: temperature turning cluster cosine similarities into log-probabilities for the CRF (authors: 2)
CLUSTER_ALPHA = 2.0
#: side of a cluster-gallery thumbnail (pixels)
_THUMB = 96


@dataclass
class EvalOutput:
    """Metrics per head (empty without labels) and the material for figures."""

    metrics: dict[str, HeadScore]
    confusion: dict[str, torch.Tensor]  # head → (K, C) counts
    n_images: int
    labelled: bool = True
    gallery: list[dict[str, np.ndarray]] = field(default_factory=list)  # image / label / prediction maps
    cluster_pixels: list[int] = field(default_factory=list)  # pixels predicted per cluster
    cluster_examples: list[list[np.ndarray]] = field(default_factory=list)  # thumbnails per cluster


class _ClusterExamples:
    """Per cluster, the images it covers most (a strip of examples for the cluster gallery)."""

    def __init__(self, k: int, per_cluster: int) -> None:
        self.k, self.n = k, per_cluster
        self.heaps: list[list[tuple[float, int, np.ndarray]]] = [[] for _ in range(k)]
        self.seen = 0

    def update(self, images: torch.Tensor, clusters: torch.Tensor) -> None:
        """``images (B,3,H,W)`` normalised, ``clusters (B,H,W)`` cluster ids."""
        if self.n <= 0:
            return
        fractions = F.one_hot(clusters, self.k).float().mean(dim=(1, 2))  # (B, K)
        for b in range(images.shape[0]):
            self.seen += 1
            for c in torch.nonzero(fractions[b] > 0.02).flatten().tolist():
                frac = float(fractions[b, c])
                heap = self.heaps[c]
                if len(heap) < self.n or frac > heap[0][0]:
                    thumb = self._thumbnail(images[b], clusters[b] == c)
                    item = (frac, self.seen, thumb)
                    heapq.heappush(heap, item) if len(heap) < self.n else heapq.heapreplace(heap, item)

    @staticmethod
    def _thumbnail(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """The image with the pixels outside the cluster dimmed, resized to a thumbnail."""
        rgb = to_uint8_hwc(image).astype(np.float32)
        keep = mask.cpu().numpy()[..., None]
        shown = np.where(keep, rgb, rgb * 0.2 + 20).clip(0, 255).astype(np.uint8)
        t = torch.from_numpy(shown).permute(2, 0, 1).float().unsqueeze(0)
        t = F.interpolate(t, size=(_THUMB, _THUMB), mode="bilinear", align_corners=False, antialias=True)
        return t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()

    def strips(self) -> list[list[np.ndarray]]:
        return [[thumb for _, _, thumb in sorted(heap, key=lambda x: -x[0])] for heap in self.heaps]


@torch.no_grad()
def evaluate_model(
    model: HPModel,
    loader: DataLoader,
    runtime: Runtime,
    *,
    crf: bool = False,
    matching: str = "hungarian",
    n_gallery: int = 0,
    per_cluster: int = 0,
    refit_centroids: torch.Tensor | None = None,
) -> EvalOutput:
    """Score the cluster probe ("unsupervised") and the linear probe on ``loader``.

    With ``crf=True`` also "unsupervised_crf" and "linear_crf" (dense CRF on the log-probabilities,
    needs the ``crf`` extra). ``matching`` applies to the cluster heads; the linear probe is
    always scored without matching. ``refit_centroids`` ``(K, D)`` adds "unsupervised_refit":
    the cluster probe with its centroids replaced (:func:`kmeans` on the training code).
    ``per_cluster`` > 0 collects that many example thumbnails per cluster.
    """
    n_classes, k = model.n_classes, model.n_clusters
    heads = ["unsupervised", "linear"] + (["unsupervised_crf", "linear_crf"] if crf else [])
    heads += ["unsupervised_refit"] if refit_centroids is not None else []
    meters = {h: SegmentationMetrics(n_classes, n_clusters=k, matching=matching) if h.startswith("unsupervised")
              else SegmentationMetrics(n_classes, matching="none") for h in heads}
    if crf:
        from hpseg.crf import batched_crf
    examples = _ClusterExamples(k, per_cluster)
    pixels = torch.zeros(k, dtype=torch.long)
    gallery: list[dict[str, np.ndarray]] = []
    n_images = 0
    model.eval()
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=not runtime.progress):
        images = batch["img"].to(runtime.device, non_blocking=True)
        label = batch["label"].to(runtime.device, non_blocking=True)
        size = (int(label.shape[-2]), int(label.shape[-1]))
        with runtime.autocast():
            out = model.scores(images, size, refit_centroids=refit_centroids)
        preds = {"unsupervised": out["cluster"].argmax(1), "linear": out["linear"].argmax(1)}
        if refit_centroids is not None:
            preds["unsupervised_refit"] = out["cluster_refit"].argmax(1)
        if crf:
            lin = batched_crf(images.cpu(), torch.log_softmax(out["linear"], 1).cpu())
            clu = batched_crf(images.cpu(), torch.log_softmax(CLUSTER_ALPHA * out["cluster"], 1).cpu())
            preds["linear_crf"] = lin.argmax(1).to(runtime.device)
            preds["unsupervised_crf"] = clu.argmax(1).to(runtime.device)
        for h in heads:
            meters[h].update(preds[h], label)
        pixels += torch.bincount(preds["unsupervised"].flatten().cpu(), minlength=k)
        examples.update(images, preds["unsupervised"])
        n_images += images.shape[0]
        for i in range(min(images.shape[0], n_gallery - len(gallery))):
            gallery.append({
                "image": to_uint8_hwc(images[i]),
                "label": label[i].cpu().numpy(),
                "unsupervised_raw": preds["unsupervised"][i].cpu().numpy(),
                "linear": preds["linear"][i].cpu().numpy(),
            })
    if n_images == 0:
        from hpseg.errors import HPSegError

        raise HPSegError("the evaluation set is empty: check data.val_split and data.max_val_images")
    labelled = int(meters["unsupervised"].confusion.sum()) > 0
    metrics: dict[str, HeadScore] = {}
    confusion: dict[str, torch.Tensor] = {}
    if labelled:
        for h, meter in meters.items():
            res = meter.compute()
            confusion[h] = res["confusion"].cpu()
            metrics[h] = HeadScore(float(res["accuracy"]), float(res["miou"]), [float(v) for v in res["iou"]],
                                   [int(a) for a in res["assignment"]] if h.startswith("unsupervised") else None)
    assignment = metrics["unsupervised"].assignment if labelled else None
    for item in gallery:  # raw cluster ids → matched classes (−1: unmatched), or raw ids without labels
        raw = item.pop("unsupervised_raw")
        item["unsupervised"] = np.asarray(assignment)[raw] if assignment is not None else raw
        if not labelled:
            item.pop("label")
            item.pop("linear")
    return EvalOutput(metrics, confusion, n_images, labelled, gallery, pixels.tolist(), examples.strips())


# ------------------------------------------------------------------------------------------
# k-means baselines (the frozen backbone's features; the refitted cluster probe)
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def patch_sample(encode: Any, loader: DataLoader, runtime: Runtime, *, max_patches: int, seed: int) -> torch.Tensor:
    """Up to ``max_patches`` L2-normalised patch vectors ``(N, C)`` of ``encode(images) →
    (B, C, h, w)`` over ``loader`` (a seeded random subset when there are more)."""
    rows: list[torch.Tensor] = []
    total = 0
    for batch in loader:
        with runtime.autocast():
            maps = encode(batch["img"].to(runtime.device))
        flat = F.normalize(maps.float().permute(0, 2, 3, 1).reshape(-1, maps.shape[1]), dim=1)
        rows.append(flat.cpu())
        total += flat.shape[0]
        if total >= max_patches:
            break
    x = torch.cat(rows)
    if x.shape[0] > max_patches:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_patches]]
    return x


#: ``predict(images (B,3,H,W), size) -> (B, *size)`` cluster ids: one segmentation method
Predictor = Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def hp_predictor(model: HPModel) -> Predictor:
    """The HP cluster probe's argmax (:meth:`HPModel.scores`) as a :data:`Predictor`."""
    return lambda images, size: model.scores(images, size)["cluster"].argmax(1)


@torch.no_grad()
def kmeans_centroids(backbone: Backbone, train_loader: DataLoader, runtime: Runtime, *, n_clusters: int,
                     seed: int = 0, max_patches: int = 100_000) -> torch.Tensor:
    """Spherical k-means centroids ``(K, F)`` of (a sample of) the frozen backbone's patch
    features over ``train_loader``, on the runtime's device."""
    x = patch_sample(backbone.features, train_loader, runtime, max_patches=max_patches, seed=seed)
    return kmeans(x, n_clusters, seed=seed).to(runtime.device)


def kmeans_predictor(backbone: Backbone, centroids: torch.Tensor) -> Predictor:
    """k-means on the frozen backbone as a :data:`Predictor`: each patch takes its nearest
    centroid by cosine similarity, the similarity maps upsampled bilinearly to ``size`` (as the
    HP cluster probe's code is) before the argmax."""

    def predict(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        feats = backbone.features(images)
        sim = torch.einsum("bfhw,kf->bkhw", F.normalize(feats.float(), dim=1), centroids.float())
        return F.interpolate(sim, size=size, mode="bilinear", align_corners=False).argmax(1)

    return predict


@torch.no_grad()
def kmeans_baseline(
    backbone: Backbone,
    train_loader: DataLoader,
    val_loader: DataLoader,
    runtime: Runtime,
    *,
    n_clusters: int,
    n_classes: int,
    max_train_patches: int = 100_000,
    matching: str = "hungarian",
    seed: int = 0,
    n_gallery: int = 0,
) -> EvalOutput:
    """k-means on the frozen backbone's patch features, scored like the cluster probe.

    Centroids are fitted on (a sample of) training-image patches (:func:`kmeans_centroids`);
    validation patches take their nearest centroid (:func:`kmeans_predictor`) and the argmax is
    matched to classes. Needs labelled validation images.
    """
    centroids = kmeans_centroids(backbone, train_loader, runtime, n_clusters=n_clusters, seed=seed,
                                 max_patches=max_train_patches)
    predict = kmeans_predictor(backbone, centroids)
    meter = SegmentationMetrics(n_classes, n_clusters=n_clusters, matching=matching)
    raw: list[np.ndarray] = []
    n_images = 0
    for batch in val_loader:
        images, label = batch["img"].to(runtime.device), batch["label"].to(runtime.device)
        with runtime.autocast():
            pred = predict(images, (int(label.shape[-2]), int(label.shape[-1])))
        meter.update(pred, label)
        n_images += images.shape[0]
        raw += [p.cpu().numpy() for p in pred[: max(0, n_gallery - len(raw))]]
    res = meter.compute()
    assignment = [int(a) for a in res["assignment"]]
    score = HeadScore(float(res["accuracy"]), float(res["miou"]), [float(v) for v in res["iou"]], assignment)
    gallery = [{"unsupervised": np.asarray(assignment)[r]} for r in raw]
    return EvalOutput({"unsupervised": score}, {"unsupervised": res["confusion"].cpu()}, n_images, True, gallery)


# ------------------------------------------------------------------------------------------
# label-free figures (hpseg.label_free): no labels needed
# ------------------------------------------------------------------------------------------


@dataclass
class LabelFreeOutput:
    """Label-free figures per method (and their agreement and verdict) and the gallery's cluster maps.

    ``figures``: ``{"methods": {name: {"flip_stability", "photometric_stability",
    "boundary_edge_precision", "cluster_entropy", "empty_clusters", the chance levels and
    chance-corrected forms of :data:`hpseg.label_free.POOLED_FIGURES`, "intervals": {figure:
    [low, high]}}}, "boundary_edge_chance", "agreement": {"methods": [a, b], "nmi", "ari"} (two
    methods), "verdict": :func:`hpseg.verdict.compare_methods` (two methods), "n_images"}``.
    ``gallery``: per image of the first ``n_gallery``, ``{name: (H, W) cluster ids}``; the second
    method's ids are mapped onto the first's (one-to-one by overlap) so that colours correspond.
    ``counts``: per method, the per-image counts (:meth:`hpseg.label_free.ImageCounts.arrays`).
    """

    figures: dict[str, Any]
    gallery: list[dict[str, np.ndarray]] = field(default_factory=list)
    counts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _method_figures(counts: dict[str, np.ndarray], weights: np.ndarray | None) -> dict[str, Any]:
    """One method's pooled figures (NaN ones left out) and, with bootstrap ``weights``, intervals."""
    from hpseg.label_free import pooled_figures
    from hpseg.verdict import figure_intervals

    figures: dict[str, Any] = {}
    for key, value in pooled_figures(counts).items():
        if key != "boundary_edge_chance" and np.isfinite(value[0]):
            figures[key] = int(value[0]) if key == "empty_clusters" else float(value[0])
    if weights is not None:
        figures["intervals"] = figure_intervals(counts, weights)
    return figures


@torch.no_grad()
def label_free_evaluation(predictors: dict[str, tuple[Predictor, int]], loader: DataLoader, runtime: Runtime, *,
                          n_gallery: int = 0) -> LabelFreeOutput:
    """The label-free figures (:mod:`hpseg.label_free`) of each method ``name → (predictor, K)``
    on ``loader``'s images (held-out images, so that nothing was fitted on them): stability under
    a horizontal flip and under :func:`~hpseg.label_free.photometric_change`, the share of segment
    boundaries on strong image edges, cluster balance, each with per-image counts; with two
    methods their agreement and the verdict of the first against the second
    (:func:`hpseg.verdict.compare_methods`, a paired bootstrap over images)."""
    from hpseg.label_free import AgreementMeter, ImageCounts, edge_map, match_clusters, photometric_change
    from hpseg.verdict import MIN_IMAGES, bootstrap_weights, compare_methods

    names = list(predictors)
    meters = {n: ImageCounts(k) for n, (_, k) in predictors.items()}
    agreement = AgreementMeter(predictors[names[0]][1], predictors[names[1]][1]) if len(names) > 1 else None
    gallery: list[dict[str, np.ndarray]] = []
    n_images = 0
    for batch in loader:
        images = batch["img"].to(runtime.device)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        edges = edge_map(images)
        preds = {}
        for name, (predict, _) in predictors.items():
            with runtime.autocast():
                pred = predict(images, size)
                flipped = predict(images.flip(-1), size).flip(-1)
                changed = predict(photometric_change(images), size)
            meters[name].update(pred, flipped, changed, edges)
            preds[name] = pred
        if agreement is not None:
            agreement.update(preds[names[0]], preds[names[1]])
        for i in range(min(images.shape[0], n_gallery - len(gallery))):
            gallery.append({"image": to_uint8_hwc(images[i]), **{n: p[i].cpu().numpy() for n, p in preds.items()}})
        n_images += images.shape[0]
    if n_images == 0:
        from hpseg.errors import HPSegError

        raise HPSegError("the evaluation set is empty: check data.val_split, data.holdout and data.max_val_images")
    counts = {n: m.arrays() for n, m in meters.items()}
    weights = bootstrap_weights(n_images) if n_images >= MIN_IMAGES else None
    figures: dict[str, Any] = {"methods": {n: _method_figures(c, weights) for n, c in counts.items()},
                               "n_images": n_images}
    chance = float(np.sum(counts[names[0]]["edge"]) / max(1.0, float(np.sum(counts[names[0]]["total"]))) * 100)
    figures["boundary_edge_chance"] = chance
    if agreement is not None:
        figures["agreement"] = {"methods": names[:2], **agreement.result()}
        figures["verdict"] = compare_methods(counts[names[0]], counts[names[1]], (names[0], names[1]))
        mapping = match_clusters(agreement.contingency())
        for row in gallery:
            row[names[1]] = mapping[row[names[1]]]
    return LabelFreeOutput(figures, gallery, counts)


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------

_GALLERY_COLUMNS = [("image", "image"), ("label", "ground truth"), ("unsupervised", "HP clusters (matched)"),
                    ("linear", "HP linear probe")]


def write_results(out_dir: Path, results: Results, output: EvalOutput) -> Path:
    """``results.json`` with confusion PNGs, the prediction grid, per-image gallery PNGs and
    the cluster gallery (one strip of example regions per cluster) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = results.class_names
    for head, conf in output.confusion.items():
        fig = confusion_figure(conf.numpy(), names, f"{head} (rows: prediction)", output.metrics[head].assignment)
        save_figure(fig, out_dir / f"confusion_{head}.png")
    if output.gallery:
        labelled = output.labelled
        label_names = names if labelled else _cluster_label_names(results)
        k = results.protocol.n_clusters
        columns = _GALLERY_COLUMNS if labelled else [("image", "image"), ("unsupervised", f"HP clusters, K={k}")]
        if all("kmeans" in row for row in output.gallery):  # k-means beside HP, in HP's colours
            columns = [*columns, ("kmeans", f"k-means (frozen backbone), K={k}")]
        save_figure(gallery_figure(output.gallery, columns, label_names), out_dir / "predictions.png", dpi=100)
        results.gallery = []
        for i, row in enumerate(output.gallery):
            entry = {}
            for key, value in row.items():
                rgb = value if value.ndim == 3 else colorize(value, len(label_names))
                entry[key] = f"gallery/{save_image(rgb, out_dir / 'gallery' / f'{i}_{key}.png').name}"
            results.gallery.append(entry)
    results.cluster_gallery = []
    cluster_names = _cluster_label_names(results)
    for c, thumbs in enumerate(output.cluster_examples):
        cluster_entry: dict[str, Any] = {"cluster": c, "name": cluster_names[c] if c < len(cluster_names) else f"cluster {c}",
                                 "pixels": int(output.cluster_pixels[c]) if c < len(output.cluster_pixels) else 0}
        if thumbs:
            strip = np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in thumbs], axis=1)
            cluster_entry["strip"] = f"clusters/{save_image(strip, out_dir / 'clusters' / f'{c}.png').name}"
        results.cluster_gallery.append(cluster_entry)
    return results.write(out_dir / "results.json")


def _cluster_label_names(results: Results) -> list[str]:
    """Names of the cluster probe's raw cluster ids: given names, matched classes, or ``cluster k``."""
    k = results.protocol.n_clusters
    if results.cluster_names:
        return list(results.cluster_names)
    assignment = results.metrics["unsupervised"].assignment if "unsupervised" in results.metrics else None
    if assignment:
        return [f"cluster {c} → {results.class_names[a]}" if a >= 0 else f"cluster {c} (unmatched)"
                for c, a in enumerate(assignment)]
    return [f"cluster {c}" for c in range(k)]
