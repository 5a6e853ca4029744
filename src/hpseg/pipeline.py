"""Run-level entry points: the only layer that reads a :class:`~hpseg.config.Config`.

It builds datasets, the model and the training settings from the configuration, runs one
training per seed into ``RUN/seed-<n>/`` (or ``RUN/`` for a single seed), evaluates checkpoints
and run folders, and writes the resolved configuration next to every run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from hpseg import distributed as dist
from hpseg.backbones import build_backbone
from hpseg.config import Config, apply_overrides, build_config, config_from_dict
from hpseg.data import build_dataset
from hpseg.errors import HPSegError
from hpseg.evaluate import (
    EvalOutput,
    aggregate_seeds,
    evaluate_model,
    format_iou_table,
    format_protocol,
    format_table,
    kmeans_baseline,
    protocol_block,
    results_document,
    write_results,
)
from hpseg.io import atomic_write_text
from hpseg.model import HPModel, load_model
from hpseg.runtime import resolve_device, seed_everything
from hpseg.train import LossWeights, TrainSettings, fit

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------


def _dataset_kwargs(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    if d.dataset == "synthetic":
        return {"n_classes": d.synthetic_classes, "seed": d.synthetic_seed}
    common = {"interpolation": d.interpolation, "aug_on_normalized": d.aug_on_normalized}
    if d.dataset == "folder":
        return {"n_classes": d.n_classes, "class_names": d.class_names, **common}
    return common


def build_train_set(cfg: Config) -> Dataset:
    """The training dataset (train transforms with the photometric view)."""
    d = cfg.data
    kwargs = _dataset_kwargs(cfg)
    if d.dataset == "synthetic":
        kwargs["n_images"] = d.synthetic_train_images
    elif d.dataset in ("cocostuff27", "cityscapes27", "potsdam3"):
        kwargs["five_crop"] = d.five_crop
        kwargs["crop_ratio"] = d.crop_ratio
    return build_dataset(d.dataset, d.root, d.train_split, mode="train", resolution=d.resolution, **kwargs)


def build_val_set(cfg: Config, split: str | None = None) -> Dataset:
    """The evaluation dataset (resize + centre crop at ``data.eval_resolution``)."""
    d = cfg.data
    kwargs = _dataset_kwargs(cfg)
    if d.dataset == "synthetic":
        kwargs["n_images"] = d.synthetic_val_images
    ds = build_dataset(d.dataset, d.root, split or d.val_split, mode="eval", resolution=d.eval_resolution, **kwargs)
    if d.max_val_images is not None and d.max_val_images < len(ds):  # type: ignore[arg-type]
        sub = Subset(ds, range(d.max_val_images))
        sub.class_names = ds.class_names  # type: ignore[attr-defined]
        sub.n_classes = ds.n_classes  # type: ignore[attr-defined]
        return sub
    return ds


def build_model(cfg: Config, n_classes: int, class_names: list[str]) -> HPModel:
    """A fresh HP model: the configured frozen backbone and newly initialised heads."""
    backbone = build_backbone(cfg.model.backbone, cfg.model.weights, pretrained=cfg.model.pretrained,
                              img_size=cfg.data.resolution)
    return HPModel.create(
        backbone,
        dim=cfg.model.dim,
        n_classes=n_classes,
        n_clusters=cfg.model.n_clusters or n_classes,
        class_names=class_names,
        dropout=cfg.model.dropout,
    )


def eval_loader(dataset: Dataset, cfg: Config) -> DataLoader:
    """Deterministic loader for evaluation."""
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=cfg.data.num_workers)


def _class_info(dataset: Dataset) -> tuple[int, list[str]]:
    n = int(dataset.n_classes)  # type: ignore[attr-defined]
    names = list(dataset.class_names)  # type: ignore[attr-defined]
    return n, names


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def _settings(cfg: Config, out_dir: Path, validate: Any) -> TrainSettings:
    t, lo = cfg.train, cfg.loss
    return TrainSettings(
        out_dir=out_dir,
        epochs=t.epochs,
        batch_size=t.batch_size,
        max_iters=t.max_iters,
        lr_head=t.lr_head,
        weight_decay=t.weight_decay,
        lr_projection=t.lr_projection,
        lr_linear=t.lr_linear,
        lr_cluster=t.lr_cluster,
        grad_clip=t.grad_clip,
        amp=t.amp,
        valid_freq=t.valid_freq,
        log_freq=t.log_freq,
        seed=t.seed,
        warmup=lo.warmup,
        pool_size=lo.pool_size,
        renew_interval=lo.renew_interval,
        ema_m=lo.ema_m,
        num_workers=cfg.data.num_workers,
        progress=t.progress,
        loss=LossWeights(
            tau=lo.tau, rho=lo.rho, alpha=lo.alpha, sigma=lo.sigma, reweight=lo.reweight,
            chunk_images=lo.chunk_images, dropout=cfg.model.dropout,
        ),
        config=cfg.to_dict(),
        validate=validate,
    )


def _check_resume_config(out_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run folder that was started with a different configuration."""
    saved = out_dir / "config.yaml"
    if not (out_dir / "last.pt").is_file() or not saved.is_file():
        return
    import yaml

    before = config_from_dict(yaml.safe_load(saved.read_text()))
    keys = ("data", "model", "loss")
    changed = [k for k in keys if getattr(before, k) != getattr(cfg, k)]
    tb, tc = before.train, cfg.train
    if (tb.batch_size, tb.epochs, tb.seed) != (tc.batch_size, tc.epochs, tc.seed):
        changed.append("train")
    if changed:
        raise HPSegError(
            f"{out_dir} holds an unfinished run with different {', '.join(changed)} settings: "
            "choose another train.out_dir or delete its last.pt to start over"
        )


def train_one(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Train one seed into ``out_dir`` (resuming if it holds ``last.pt``) and evaluate the best model."""
    device = dist.local_device(resolve_device(cfg.train.device))
    dist.init_from_env(device)
    seed_everything(cfg.train.seed + dist.rank())
    _check_resume_config(out_dir, cfg)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    train_set = build_train_set(cfg)
    val_set = build_val_set(cfg)
    n_classes, class_names = _class_info(val_set)
    model = build_model(cfg, n_classes, class_names)
    if cfg.train.cache_features:
        from hpseg.feature_cache import CachedFeatures

        train_set = CachedFeatures.wrap(
            train_set, model.backbone, out_dir / "feature_cache", device, num_workers=cfg.data.num_workers
        )
    loader = eval_loader(val_set, cfg)

    def validate(m: HPModel) -> dict[str, Any]:
        return evaluate_model(m, loader, device, crf=False, matching=cfg.eval.matching, amp=cfg.train.amp).metrics

    log.info("training %s → %s", cfg.data.dataset, out_dir)
    summary = fit(model, train_set, _settings(cfg, out_dir, validate), device)
    return summary


def seed_dirs(out_dir: Path, seeds: list[int] | None) -> list[tuple[int, Path]]:
    """``[(seed, folder)]``: ``RUN/seed-<n>`` for several seeds, ``RUN`` for one."""
    if not seeds:
        return []
    return [(s, out_dir / f"seed-{s}") for s in seeds]


def run_training(cfg: Config) -> list[Path]:
    """Train once per seed (``train.seeds``) or once (``train.seed``); returns the run folders."""
    out_dir = Path(cfg.train.out_dir)
    runs = seed_dirs(out_dir, cfg.train.seeds)
    if not runs:
        train_one(cfg, out_dir)
        return [out_dir]
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    folders = []
    for seed, folder in runs:
        seeded = config_from_dict(cfg.to_dict())
        seeded.train.seed = seed
        seeded.train.seeds = None
        seeded.train.out_dir = str(folder)
        train_one(seeded, folder)
        folders.append(folder)
    return folders


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """What ``hpseg evaluate`` prints and writes."""

    document: dict[str, Any]
    text: str


def _model_config(model: HPModel, overrides: list[str]) -> Config:
    """The config stored with a checkpoint (defaults for the authors' files), with overrides."""
    stored = getattr(model, "config", None)
    cfg = config_from_dict(stored) if isinstance(stored, dict) and stored else Config()
    return apply_overrides(cfg, overrides)


def evaluate_checkpoint(
    checkpoint: Path,
    overrides: list[str] | None = None,
    *,
    preset: str | None = None,
    out_dir: Path | None = None,
    backbone: str | None = None,
    n_gallery: int | None = None,
    baseline: bool = False,
) -> EvaluationReport:
    """Evaluate one checkpoint (ours or the authors' ``ckpt.pth``) on its validation set.

    With ``baseline`` the k-means baseline on the same frozen backbone is scored too and
    reported beside HP (``results.json["baseline"]``).
    """
    model = load_model(checkpoint, backbone=backbone)
    if preset:
        cfg = build_config(preset, overrides or [])
    else:
        cfg = _model_config(model, overrides or [])
    device = resolve_device(cfg.train.device)
    model.to(device).eval()
    val_set = build_val_set(cfg)
    n_classes, class_names = _class_info(val_set)
    if model.linear_probe_classes() != n_classes:
        raise HPSegError(
            f"{checkpoint} predicts {model.linear_probe_classes()} classes but {cfg.data.dataset} has {n_classes}: "
            "evaluate it on the dataset it was trained for (--preset NAME data.root=DIR)"
        )
    loader = eval_loader(val_set, cfg)
    n_gal = cfg.eval.n_gallery if n_gallery is None else n_gallery
    output = evaluate_model(model, loader, device, crf=cfg.eval.crf, matching=cfg.eval.matching,
                            n_gallery=n_gal, amp=cfg.train.amp, progress=cfg.train.progress)
    protocol = protocol_block(
        dataset=cfg.data.dataset, split=cfg.data.val_split, n_images=output.n_images,
        eval_resolution=cfg.data.eval_resolution, crf=cfg.eval.crf,
        n_clusters=int(model.cluster_probe.clusters.shape[0]), n_classes=n_classes,
        matching=cfg.eval.matching, checkpoint=checkpoint, backbone=model.spec.backbone, device=device,
    )
    rows = dict(output.metrics)
    extra: dict[str, Any] = {}
    if baseline:
        base = baseline_for(cfg, model.backbone, int(model.cluster_probe.clusters.shape[0]), device)
        rows["k-means baseline"] = base.metrics["unsupervised"]
        extra["baseline"] = base.metrics
    doc = results_document(output, protocol, class_names, extra=extra)
    text = "\n".join([
        format_protocol(protocol),
        "",
        format_table(rows),
        "",
        "per-class IoU (unsupervised):",
        format_iou_table(output.metrics["unsupervised"]["iou"], class_names),
    ])
    if out_dir is not None:
        write_results(out_dir, doc, output, class_names)
    return EvaluationReport(document=doc, text=text)


def find_seed_runs(run_dir: Path) -> list[Path]:
    """``RUN/seed-*`` folders that hold a checkpoint, sorted by seed."""
    found = [p for p in run_dir.glob("seed-*") if (p / "best.pt").is_file()]

    def key(p: Path) -> tuple[int, str]:
        tail = p.name.split("-", 1)[1]
        return (int(tail), "") if tail.lstrip("-").isdigit() else (1 << 30, tail)

    return sorted(found, key=key)


def evaluate_path(
    path: Path,
    overrides: list[str] | None = None,
    *,
    preset: str | None = None,
    out_dir: Path | None = None,
    backbone: str | None = None,
    baseline: bool = False,
) -> EvaluationReport:
    """Evaluate a checkpoint file, a run folder (``best.pt``) or a multi-seed run folder.

    For a multi-seed folder every seed's row is reported, then the mean ± std over seeds;
    ``results.json`` holds ``"seeds"`` (per-seed metrics) and ``"aggregate"``.
    """
    if path.is_file():
        report = evaluate_checkpoint(path, overrides, preset=preset, out_dir=out_dir, backbone=backbone,
                                     baseline=baseline)
        return report
    if not path.is_dir():
        raise HPSegError(f"{path} does not exist: give a checkpoint file (.pt/.pth) or a run folder")
    seeds = find_seed_runs(path)
    if not seeds:
        best = path / "best.pt"
        if not best.is_file():
            raise HPSegError(f"{path} holds no best.pt and no seed-*/best.pt: train first (hpseg train …)")
        return evaluate_checkpoint(best, overrides, preset=preset, out_dir=out_dir or path / "eval",
                                   backbone=backbone, baseline=baseline)
    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    protocols = []
    for folder in seeds:
        rep = evaluate_checkpoint(folder / "best.pt", overrides, preset=preset, out_dir=folder / "eval",
                                  backbone=backbone, baseline=baseline)
        per_seed[folder.name] = dict(rep.document["metrics"])
        if baseline:
            per_seed[folder.name]["k-means baseline"] = rep.document["baseline"]["unsupervised"]
        protocols.append(rep.document["protocol"])
    agg = aggregate_seeds(per_seed)
    protocol = {k: v for k, v in protocols[0].items() if k not in ("checkpoint", "checkpoint_sha256")}
    protocol["checkpoints"] = {f.name: p["checkpoint_sha256"] for f, p in zip(seeds, protocols)}
    protocol["seeds"] = [f.name for f in seeds]
    doc = {"protocol": protocol, "seeds": per_seed, "aggregate": agg}
    rows: dict[str, dict[str, Any]] = {}
    for name, metrics in per_seed.items():
        for head, m in metrics.items():
            rows[f"{head} [{name}]"] = m
    for head in per_seed[seeds[0].name]:  # same head order as the per-seed rows
        rows[f"{head} [mean ± std]"] = agg[head]
    text = "\n".join([
        format_protocol({**protocols[0], "checkpoint_sha256": f"{len(seeds)} seeds"}),
        "",
        format_table(rows),
    ])
    target = out_dir or path
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target / "results.json", json.dumps(doc, indent=2))
    return EvaluationReport(document=doc, text=text)


def _baseline_train_set(cfg: Config) -> Dataset:
    """Training images with evaluation transforms (no augmentation): k-means fitting data."""
    d = cfg.data
    kwargs = _dataset_kwargs(cfg)
    if d.dataset == "synthetic":
        kwargs["n_images"] = d.synthetic_train_images
    return build_dataset(d.dataset, d.root, d.train_split, mode="eval", resolution=d.resolution, **kwargs)


def baseline_for(cfg: Config, backbone: torch.nn.Module, n_clusters: int, device: torch.device,
                 n_gallery: int = 0) -> EvalOutput:
    """k-means (K = ``n_clusters``) on the frozen backbone's features, on the configured data."""
    val_set = build_val_set(cfg)
    n_classes, _ = _class_info(val_set)
    return kmeans_baseline(
        backbone, eval_loader(_baseline_train_set(cfg), cfg), eval_loader(val_set, cfg), device,
        n_clusters=n_clusters, n_classes=n_classes, matching=cfg.eval.matching, seed=cfg.train.seed,
        n_gallery=n_gallery, amp=cfg.train.amp,
    )


def run_baseline(preset: str | None, overrides: list[str]) -> EvaluationReport:
    """``hpseg baseline``: k-means on the configured backbone's features, with the HP protocol."""
    cfg = build_config(preset, overrides)
    device = resolve_device(cfg.train.device)
    backbone = build_backbone(cfg.model.backbone, cfg.model.weights, pretrained=cfg.model.pretrained,
                              img_size=cfg.data.resolution).to(device)
    val_set = build_val_set(cfg)
    n_classes, class_names = _class_info(val_set)
    k = cfg.model.n_clusters or n_classes
    output = baseline_for(cfg, backbone, k, device)
    protocol = protocol_block(
        dataset=cfg.data.dataset, split=cfg.data.val_split, n_images=output.n_images,
        eval_resolution=cfg.data.eval_resolution, crf=False, n_clusters=k, n_classes=n_classes,
        matching=cfg.eval.matching, checkpoint=None, backbone=cfg.model.backbone, device=device,
    )
    doc = results_document(output, protocol, class_names, extra={"method": "k-means on frozen backbone features"})
    text = "\n".join([format_protocol(protocol), "", format_table({"k-means baseline": output.metrics["unsupervised"]})])
    return EvaluationReport(document=doc, text=text)
