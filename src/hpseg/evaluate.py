"""Evaluation: probes → metrics (before/after CRF) → results.json, tables and figures.

The protocol (hp-method §8): images resized (shorter side) and centre-cropped to the evaluation
resolution, labels by nearest neighbour; the head's ``code`` is upsampled bilinearly to the
label size; the cluster probe's assignment is matched to classes (Hungarian by default) and the
linear probe is scored directly; pixel accuracy and mIoU in percent. Every figure is written
together with the protocol that produced it (:func:`protocol_block`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hpseg.io import atomic_write_text
from hpseg.metrics import SegmentationMetrics
from hpseg.model import HPModel
from hpseg.runtime import autocast

log = logging.getLogger(__name__)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``(B,3,H,W)`` or ``(3,H,W)`` → RGB in [0, 1]."""
    mean = IMAGENET_MEAN.to(images.device).view(-1, 1, 1)
    std = IMAGENET_STD.to(images.device).view(-1, 1, 1)
    return (images * std + mean).clamp(0, 1)


@dataclass
class EvalOutput:
    """Metrics per head and the material for figures."""

    metrics: dict[str, dict[str, Any]]  # head name → {"accuracy","miou","iou","assignment"}
    confusion: dict[str, torch.Tensor]  # head name → (K, C) confusion
    n_images: int
    gallery: list[dict[str, np.ndarray]] = field(default_factory=list)  # image/label/prediction maps


@torch.no_grad()
def head_outputs(
    model: HPModel, images: torch.Tensor, size: tuple[int, int], *, amp: bool = True
) -> dict[str, torch.Tensor]:
    """Linear logits ``(B,C,H,W)``, cluster log-probabilities (α=2) ``(B,K,H,W)`` and the hard
    cluster assignment ``(B,H,W)`` at ``size``, from code upsampled bilinearly (as the authors)."""
    with autocast(images.device, amp):
        code = model.encode(images)["code"]
    code = F.interpolate(code.float(), size=size, mode="bilinear", align_corners=False)
    linear = model.linear_probe(code).float()
    _, cluster_logprobs = model.cluster_probe(code, 2.0, log_probs=True)
    _, cluster_onehot = model.cluster_probe(code, None)
    return {"linear": linear, "cluster_logprobs": cluster_logprobs.float(), "cluster": cluster_onehot.argmax(1)}


def evaluate_model(
    model: HPModel,
    loader: DataLoader,
    device: torch.device,
    *,
    crf: bool = False,
    matching: str = "hungarian",
    n_gallery: int = 0,
    amp: bool = True,
    progress: bool = False,
) -> EvalOutput:
    """Score the cluster probe ("unsupervised") and the linear probe on ``loader``.

    With ``crf=True`` also "unsupervised_crf" and "linear_crf" (dense CRF on the log-probabilities,
    needs the ``crf`` extra). ``matching`` applies to the cluster heads; the linear probe is
    always scored without matching.
    """
    n_classes = model.linear_probe.n_classes if hasattr(model.linear_probe, "n_classes") else len(model.class_names)
    n_clusters = model.cluster_probe.clusters.shape[0]
    heads = ["unsupervised", "linear"] + (["unsupervised_crf", "linear_crf"] if crf else [])
    meters = {
        h: SegmentationMetrics(n_classes, n_clusters=n_clusters, matching=matching)
        if h.startswith("unsupervised")
        else SegmentationMetrics(n_classes, matching="none")
        for h in heads
    }
    if crf:
        from hpseg.crf import batched_crf

    gallery: list[dict[str, np.ndarray]] = []
    n_images = 0
    model.eval()
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True, leave=False, disable=not progress):
        images = batch["img"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        out = head_outputs(model, images, tuple(label.shape[-2:]), amp=amp)
        preds = {"unsupervised": out["cluster"], "linear": out["linear"].argmax(1)}
        if crf:
            lin = batched_crf(images.cpu(), torch.log_softmax(out["linear"], 1).cpu())
            clu = batched_crf(images.cpu(), out["cluster_logprobs"].cpu())
            preds["linear_crf"] = lin.argmax(1).to(device)
            preds["unsupervised_crf"] = clu.argmax(1).to(device)
        for h in heads:
            meters[h].update(preds[h], label)
        n_images += images.shape[0]
        for i in range(images.shape[0]):
            if len(gallery) >= n_gallery:
                break
            item = {
                "image": (denormalize(images[i]).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8),
                "label": label[i].cpu().numpy(),
                "unsupervised_raw": preds["unsupervised"][i].cpu().numpy(),
                "linear": preds["linear"][i].cpu().numpy(),
            }
            gallery.append(item)
    if n_images == 0:
        raise ValueError("the evaluation set is empty")
    metrics: dict[str, dict[str, Any]] = {}
    confusion: dict[str, torch.Tensor] = {}
    for h, meter in meters.items():
        res = meter.compute()
        confusion[h] = res["confusion"].cpu()
        metrics[h] = {
            "accuracy": float(res["accuracy"]),
            "miou": float(res["miou"]),
            "iou": [float(v) for v in res["iou"]],
        }
        if "assignment" in res:
            metrics[h]["assignment"] = [int(a) for a in res["assignment"]]
    # map raw cluster ids of the gallery to matched classes (−1 for unmatched clusters)
    assignment = metrics["unsupervised"].get("assignment")
    for item in gallery:
        raw = item.pop("unsupervised_raw")
        item["unsupervised"] = np.asarray(assignment)[raw] if assignment is not None else raw
    return EvalOutput(metrics=metrics, confusion=confusion, n_images=n_images, gallery=gallery)


# ------------------------------------------------------------------------------------------
# the k-means baseline on frozen backbone features
# ------------------------------------------------------------------------------------------


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0, cosine: bool = True) -> torch.Tensor:
    """Lloyd's k-means with k-means++ initialisation. ``(N, F) -> centroids (k, F)``.

    With ``cosine`` the rows and centroids are L2-normalised (spherical k-means), as is usual
    for ViT features.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = F.normalize(x.float(), dim=1) if cosine else x.float()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k={k} samples, got {n}")
    first = int(torch.randint(n, (1,), generator=g))
    centroids = [x[first]]
    d2 = torch.full((n,), float("inf"), device=x.device)
    for _ in range(1, k):
        d2 = torch.minimum(d2, ((x - centroids[-1]) ** 2).sum(1))
        probs = (d2 / d2.sum().clamp_min(1e-12)).cpu()
        centroids.append(x[int(torch.multinomial(probs, 1, generator=g))])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1) if cosine else torch.cdist(x, c).argmin(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        new = new / counts.clamp_min(1)
        new[empty] = c[empty]
        if cosine:
            new = F.normalize(new, dim=1)
        if torch.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c


@torch.no_grad()
def kmeans_baseline(
    backbone: torch.nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
    *,
    n_clusters: int,
    n_classes: int,
    max_train_patches: int = 100_000,
    matching: str = "hungarian",
    seed: int = 0,
    n_gallery: int = 0,
    amp: bool = True,
) -> EvalOutput:
    """k-means on the frozen backbone's patch features, scored like the cluster probe.

    Centroids are fitted on (a sample of) training-image patches; each validation patch takes
    its nearest centroid by cosine similarity, the similarity maps are upsampled bilinearly to
    the label size (as the HP cluster probe's code is), and the argmax is matched to classes.
    """
    g = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []
    total = 0
    for batch in train_loader:
        with autocast(device, amp):
            feats = backbone(batch["img"].to(device), with_attention=False).feats
        flat = F.normalize(feats.float().permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), dim=1)
        rows.append(flat.cpu())
        total += flat.shape[0]
        if total >= max_train_patches:
            break
    x = torch.cat(rows)
    if x.shape[0] > max_train_patches:
        x = x[torch.randperm(x.shape[0], generator=g)[:max_train_patches]]
    centroids = kmeans(x, n_clusters, seed=seed).to(device)
    meter = SegmentationMetrics(n_classes, n_clusters=n_clusters, matching=matching)
    gallery: list[dict[str, np.ndarray]] = []
    n_images = 0
    for batch in val_loader:
        images = batch["img"].to(device)
        label = batch["label"].to(device)
        with autocast(device, amp):
            feats = backbone(images, with_attention=False).feats
        sim = torch.einsum("bfhw,kf->bkhw", F.normalize(feats.float(), dim=1), centroids)
        sim = F.interpolate(sim, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
        pred = sim.argmax(1)
        meter.update(pred, label)
        n_images += images.shape[0]
        for i in range(images.shape[0]):
            if len(gallery) < n_gallery:
                gallery.append({"unsupervised_raw": pred[i].cpu().numpy()})
    res = meter.compute()
    metrics = {
        "unsupervised": {
            "accuracy": float(res["accuracy"]),
            "miou": float(res["miou"]),
            "iou": [float(v) for v in res["iou"]],
            "assignment": [int(a) for a in res.get("assignment", [])],
        }
    }
    assignment = np.asarray(metrics["unsupervised"]["assignment"])
    for item in gallery:
        item["unsupervised"] = assignment[item.pop("unsupervised_raw")] if assignment.size else item["unsupervised_raw"]
    return EvalOutput(metrics=metrics, confusion={"unsupervised": res["confusion"].cpu()}, n_images=n_images,
                      gallery=gallery)


# ------------------------------------------------------------------------------------------
# protocol, tables, files
# ------------------------------------------------------------------------------------------


def file_sha256(path: str | Path, length: int = 16) -> str:
    """First ``length`` hex digits of the file's SHA-256 (identifies the checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def protocol_block(
    *,
    dataset: str,
    split: str,
    n_images: int,
    eval_resolution: int,
    crf: bool,
    n_clusters: int,
    n_classes: int,
    matching: str,
    checkpoint: str | Path | None,
    backbone: str,
    device: torch.device | str,
) -> dict[str, Any]:
    """Everything a reader needs to know about how a figure was produced."""
    import hpseg

    return {
        "dataset": dataset,
        "split": split,
        "n_images": n_images,
        "eval_resolution": eval_resolution,
        "crop": f"resize shorter side to {eval_resolution}, centre crop {eval_resolution}x{eval_resolution}; "
        "labels nearest; code upsampled bilinearly to label size",
        "crf": crf,
        "n_clusters": n_clusters,
        "n_classes": n_classes,
        "matching": f"{matching} (cluster probe; unmatched clusters count as errors); linear probe unmatched",
        "backbone": backbone,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "hpseg_version": hpseg.__version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "python": platform.python_version(),
    }


def format_protocol(protocol: dict[str, Any]) -> str:
    """The protocol as a short block of text printed above every table."""
    crf = "on" if protocol.get("crf") else "off"
    lines = [
        f"protocol: {protocol['dataset']} / {protocol['split']} ({protocol['n_images']} images) · "
        f"eval {protocol['eval_resolution']}px centre crop · CRF {crf} · K={protocol['n_clusters']} clusters, "
        f"C={protocol['n_classes']} classes · {protocol['matching'].split(' (')[0]} matching",
        f"          backbone {protocol['backbone']} · checkpoint {protocol.get('checkpoint_sha256') or '-'} · "
        f"hpseg {protocol['hpseg_version']} · torch {protocol['torch_version']} · {protocol['device']}",
    ]
    return "\n".join(lines)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per head, accuracy and mIoU (mean ± std when aggregated)."""

    def cell(m: dict[str, Any], key: str) -> str:
        if f"{key}_std" in m:
            return f"{m[key]:6.2f} ± {m[key + '_std']:.2f}"
        return f"{m[key]:6.2f}"

    width = max([20, *(len(name) for name in rows)])
    lines = [f"{'head':<{width}} {'pixel acc %':>14} {'mIoU %':>14}", "-" * (width + 30)]
    for name, m in rows.items():
        lines.append(f"{name:<{width}} {cell(m, 'accuracy'):>14} {cell(m, 'miou'):>14}")
    return "\n".join(lines)


def format_iou_table(iou: list[float], class_names: list[str]) -> str:
    """Per-class IoU, one line per class."""
    lines = [f"{'class':<24} {'IoU %':>7}"]
    for name, v in zip(class_names, iou):
        lines.append(f"{name:<24} {'   n/a' if v != v else f'{v:7.2f}'}")
    return "\n".join(lines)


def save_confusion_png(confusion: torch.Tensor, class_names: list[str], path: Path, title: str,
                       assignment: list[int] | None = None) -> None:
    """Row-normalised confusion matrix (rows: predicted cluster/class, columns: true class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = confusion.double().numpy()
    if assignment is not None:
        order = np.argsort([a if a >= 0 else 10**6 for a in assignment], kind="stable")
        conf = conf[order]
        row_names = [f"c{k}→{class_names[assignment[k]] if assignment[k] >= 0 else '∅'}" for k in order]
    else:
        row_names = class_names[: conf.shape[0]]
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = max(4.0, 0.32 * max(conf.shape) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(conf.shape[1]), class_names[: conf.shape[1]], rotation=90, fontsize=7)
    ax.set_yticks(range(conf.shape[0]), row_names, fontsize=7)
    ax.set_xlabel("ground-truth class")
    ax.set_ylabel("prediction")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def palette(n: int) -> np.ndarray:
    """A fixed, distinguishable RGB palette ``(n, 3)`` uint8 (tab20 then a seeded tail)."""
    import matplotlib

    base = (np.array(matplotlib.colormaps["tab20"](np.arange(20))[:, :3]) * 255).round().astype(np.uint8)
    if n <= len(base):
        return base[:n]
    rng = np.random.default_rng(0)
    return np.concatenate([base, rng.integers(0, 256, (n - len(base), 3), dtype=np.uint8)])


def colorize(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Label map ``(H,W)`` → RGB ``(H,W,3)``; ignore (−1) is black."""
    pal = np.concatenate([palette(n_classes), np.zeros((1, 3), np.uint8)])
    idx = np.where((labels < 0) | (labels >= n_classes), n_classes, labels)
    return pal[idx]


def save_gallery_png(
    rows: list[dict[str, np.ndarray]],
    columns: list[tuple[str, str]],
    class_names: list[str],
    path: Path,
) -> None:
    """A grid of images and label maps with a colour legend of class names.

    ``columns`` is a list of (key in each row, column title), e.g. ``("image", "image")``,
    ``("label", "ground truth")``, ``("unsupervised", "HP")``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n_classes = len(class_names)
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.2 * len(rows) + 0.9),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, (key, title) in enumerate(columns):
            ax = axes[r][c]
            value = row[key]
            ax.imshow(value if value.ndim == 3 else colorize(value, n_classes), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    pal = palette(n_classes) / 255.0
    handles = [Patch(color=pal[i], label=name) for i, name in enumerate(class_names)]
    handles.append(Patch(color=(0, 0, 0), label="ignore / unmatched"))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def results_document(
    output: EvalOutput, protocol: dict[str, Any], class_names: list[str], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON-serialisable results: protocol, metrics per head, class names, confusions."""
    doc: dict[str, Any] = {
        "protocol": protocol,
        "class_names": class_names,
        "metrics": output.metrics,
        "confusion": {k: v.tolist() for k, v in output.confusion.items()},
    }
    if extra:
        doc.update(extra)
    return doc


def write_results(out_dir: Path, doc: dict[str, Any], output: EvalOutput, class_names: list[str]) -> None:
    """``results.json``, confusion PNGs and a prediction grid in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(doc, indent=2, allow_nan=True))
    for head, conf in output.confusion.items():
        save_confusion_png(conf, class_names, out_dir / f"confusion_{head}.png", f"{head} (rows: prediction)",
                           assignment=output.metrics[head].get("assignment"))
    if output.gallery:
        cols = [("image", "image"), ("label", "ground truth"), ("unsupervised", "HP clusters (matched)"),
                ("linear", "HP linear probe")]
        save_gallery_png(output.gallery, cols, class_names, out_dir / "predictions.png")
        doc["gallery"] = save_gallery_images(output.gallery, len(class_names), out_dir / "gallery")
        atomic_write_text(out_dir / "results.json", json.dumps(doc, indent=2, allow_nan=True))


def save_gallery_images(rows: list[dict[str, np.ndarray]], n_classes: int, folder: Path) -> list[dict[str, str]]:
    """One PNG per image and map (``<i>_image.png``, ``<i>_label.png``, ``<i>_<head>.png``).

    Returns, per row, the paths relative to ``folder.parent`` (for ``results.json["gallery"]``).
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    listing = []
    for i, row in enumerate(rows):
        entry = {}
        for key, value in row.items():
            rgb = value if value.ndim == 3 else colorize(value, n_classes)
            name = f"{i}_{key}.png"
            tmp = folder / f".{name}.tmp.png"
            Image.fromarray(np.ascontiguousarray(rgb.astype(np.uint8))).save(tmp)
            tmp.replace(folder / name)
            entry[key] = f"{folder.name}/{name}"
        listing.append(entry)
    return listing


def aggregate_seeds(per_seed: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean ± std (sample std, ddof=1; 0 for one seed) of accuracy and mIoU per head over seeds."""
    heads = sorted({h for m in per_seed.values() for h in m})
    out: dict[str, dict[str, Any]] = {}
    for h in heads:
        rows = [m[h] for m in per_seed.values() if h in m]
        agg: dict[str, Any] = {"n_seeds": len(rows)}
        for key in ("accuracy", "miou"):
            vals = np.array([r[key] for r in rows], dtype=float)
            agg[key] = float(vals.mean())
            agg[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[h] = agg
    return out


Validator = Callable[[HPModel], dict[str, Any]]
