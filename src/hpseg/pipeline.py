"""Run-level entry points: the only layer that reads a :class:`~hpseg.config.Config`.

It builds the runtime, datasets, model, loss settings and validator from the configuration,
runs one training per seed into ``RUN/seed-<n>/`` (or ``RUN/`` for a single seed), evaluates
checkpoints and run folders, and writes the resolved configuration next to every run. Nothing
here prints: the CLI does.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from hpseg import distributed as dist
from hpseg.backbones import Backbone, build_backbone
from hpseg.checkpoint import load_model, read_checkpoint, resolve_checkpoint, set_cluster_names
from hpseg.checkpointing import REQUESTED_FILE, check_run_folder, removed_on_failure, seed_folder_states
from hpseg.clustering import kmeans
from hpseg.config import (
    Config,
    apply_overrides,
    build_config,
    check_resolutions,
    config_from_dict,
    require_data_root,
    run_dir,
)
from hpseg.data.holdout import (
    HELD_OUT_FILE,
    holdout_indices,
    write_held_out,
)
from hpseg.diagnostics import cluster_usage, hidden_positive_diagnostics
from hpseg.errors import HPSegError
from hpseg.evaluate import (
    EvalOutput,
    LabelFreeOutput,
    Predictor,
    evaluate_model,
    hp_predictor,
    kmeans_baseline,
    kmeans_centroids,
    kmeans_predictor,
    label_free_evaluation,
    patch_sample,
)
from hpseg.hidden_positives.fused import require_fused
from hpseg.io import atomic_write_text, file_sha256
from hpseg.model import HPModel
from hpseg.preemption import QuietWorkersLoader, run_folder_lock
from hpseg.results import RANDOM_WEIGHTS, Protocol, Results, aggregate_seeds
from hpseg.run_data import (
    baseline_train_set,
    build_train_set,
    build_val_set,
    held_out_files,
    holds_out,
    record_skipped,
    require_enough_images,
    validation_subset,
)
from hpseg.runtime import Runtime, make_deterministic, seed_everything
from hpseg.train import ReferencePools, fit

log = logging.getLogger(__name__)

__all__ = [
    "backbone_weights",
    "build_model",
    "build_runtime",
    "build_train_set",
    "build_val_set",
    "evaluate_checkpoint",
    "evaluate_path",
    "holdout_indices",
    "name_clusters",
    "run_baseline",
    "TrainingRun",
    "run_training",
    "train_one",
]


# ------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------


def build_runtime(cfg: Config, *, progress: bool | None = None) -> Runtime:
    """The runtime of this process: device (``cuda:<LOCAL_RANK>`` under torchrun), precision,
    rank/world from torchrun's environment, progress bars; deterministic kernels when
    ``train.deterministic`` (before any CUDA work)."""
    make_deterministic(cfg.train.deterministic)
    return Runtime.create(cfg.train.device, cfg.train.precision, rank=dist.rank(), world_size=dist.world_size(),
                          local_rank=dist.local_rank(), progress=cfg.train.progress if progress is None else progress)


def build_model(cfg: Config, n_classes: int, class_names: list[str]) -> HPModel:
    """A fresh HP model: the configured frozen backbone and newly initialised heads."""
    m = cfg.model
    backbone = build_backbone(m.backbone, m.weights, pretrained=m.pretrained, img_size=cfg.data.resolution)
    check_resolutions(cfg, int(backbone.patch_size), m.backbone)
    return HPModel.create(backbone, dim=m.dim, n_classes=n_classes, n_clusters=m.n_clusters or n_classes,
                          class_names=class_names, dropout=m.dropout, config=cfg.to_dict())


def eval_loader(dataset: Dataset, cfg: Config) -> DataLoader:
    """Deterministic loader for evaluation (its workers leave stop signals to the main process)."""
    return QuietWorkersLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False,
                              num_workers=cfg.data.num_workers)


def backbone_weights(cfg: Config) -> str:
    """:attr:`hpseg.results.Protocol.backbone_weights` of ``cfg``'s backbone: "file NAME",
    "pretrained" or "random" (``model.pretrained=false``)."""
    if cfg.model.weights:
        return f"file {Path(cfg.model.weights).name}"
    return "pretrained" if cfg.model.pretrained else RANDOM_WEIGHTS


def protocol_for(cfg: Config, runtime: Runtime, output: EvalOutput, *, n_clusters: int, n_classes: int,
                 backbone: str, checkpoint: Path | None, cluster_probe: str = "online",
                 weights: str | None = None) -> Protocol:
    """The protocol block of an evaluation of ``cfg``'s validation data (``weights``: the
    backbone's, default :func:`backbone_weights` of ``cfg``)."""
    matching = (f"{cfg.eval.matching} (cluster probe; unmatched clusters count as errors); linear probe unmatched"
                if output.labelled else "none (no labels)")
    split = f"held-out {cfg.data.holdout:.0%} of the folder" if holds_out(cfg) else cfg.data.val_split
    return Protocol(
        dataset=cfg.data.dataset, split=split, n_images=output.n_images,
        eval_resolution=cfg.data.eval_resolution, crf=cfg.eval.crf, n_clusters=n_clusters, n_classes=n_classes,
        matching=matching,
        backbone=backbone, checkpoint=str(checkpoint) if checkpoint else None,
        checkpoint_sha256=file_sha256(checkpoint) if checkpoint and checkpoint.is_file() else None,
        precision=runtime.precision, cluster_probe=cluster_probe, labelled=output.labelled,
        device=str(runtime.device), backbone_weights=weights or backbone_weights(cfg),
    )


def _as_metrics(output: EvalOutput) -> dict[str, Any]:
    """Plain metrics of an evaluation (for metrics.jsonl and checkpoints)."""
    doc: dict[str, Any] = {h: s.to_dict() for h, s in output.metrics.items()}
    doc["labelled"] = output.labelled
    doc["diagnostics"] = cluster_usage(output.cluster_pixels)
    return doc


def make_validator(cfg: Config, val_set: Dataset, runtime: Runtime) -> Any:
    """``validate(model, pools)``: the probes' metrics on the validation set (without labels:
    none) and the hidden-positive diagnostics (:func:`hpseg.diagnostics.hidden_positive_diagnostics`,
    on batches of the training size, as positives are mined in training)."""
    loader = eval_loader(val_set, cfg)
    per_rank = max(2, cfg.train.batch_size // max(1, runtime.world_size))
    batches = QuietWorkersLoader(val_set, batch_size=per_rank, shuffle=False, num_workers=cfg.data.num_workers)
    quiet = dataclasses.replace(runtime, progress=False)

    def validate(model: HPModel, pools: ReferencePools) -> dict[str, Any]:
        metrics = _as_metrics(evaluate_model(model, loader, quiet, matching=cfg.eval.matching))
        metrics["diagnostics"].update(hidden_positive_diagnostics(
            model, batches, pools.agnostic, pools.specific, quiet, tau=cfg.loss.tau, sigma=cfg.loss.sigma,
            seed=cfg.train.seed))
        return metrics

    return validate


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def train_one(cfg: Config, out_dir: Path, runtime: Runtime | None = None) -> dict[str, Any]:
    """Train one seed into ``out_dir`` (resuming if it holds ``last.pt``); folder runs train with
    a schedule fitted to the folder (:func:`hpseg.schedule.fit_schedule`). The folder is locked
    for the run (:func:`hpseg.preemption.run_folder_lock`, by rank 0 of a torchrun job).

    Raises:
        RunFolderBusy: another run trains into ``out_dir`` (an :class:`HPSegError`).
    """
    with run_folder_lock(out_dir, enabled=dist.rank() == 0):
        return _train_locked(cfg, out_dir, runtime)


def _train_locked(cfg: Config, out_dir: Path, runtime: Runtime | None = None) -> dict[str, Any]:
    """:func:`train_one` once the folder is locked."""
    from hpseg.schedule import fit_schedule

    runtime = runtime or build_runtime(cfg)
    if cfg.loss.path == "fused":  # said at once, not after the data and the pools are built
        require_fused(runtime.device, runtime.matmul_dtype)
    seed_everything(cfg.train.seed)  # every rank alike: one model, random backbones included, and one stream
    train_set = build_train_set(cfg)
    val_set = build_val_set(cfg)
    require_enough_images(cfg, train_set, val_set)
    requested = cfg.to_dict()
    cfg = fit_schedule(cfg, len(train_set), len(val_set), runtime.world_size).config  # type: ignore[arg-type]
    finished = check_run_folder(out_dir, cfg.to_dict(), requested=requested)
    if finished is not None:  # the same settings, already trained: nothing to do
        return finished
    model = build_model(cfg, int(val_set.n_classes), list(val_set.class_names))  # type: ignore[attr-defined]
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
        if not (out_dir / "last.pt").is_file() or not (out_dir / REQUESTED_FILE).is_file():  # as first typed
            atomic_write_text(out_dir / REQUESTED_FILE, "# the settings as given, before hpseg fitted them to the "
                              "data (config.yaml: what the run used)\n" + yaml.safe_dump(requested, sort_keys=False))
        if holds_out(cfg):
            write_held_out(out_dir, held_out_files(val_set), root=Path(str(cfg.data.root)).expanduser().resolve(),
                           fraction=cfg.data.holdout)
    record_skipped(out_dir, runtime, train_set, val_set)
    if cfg.train.cache_features:
        from hpseg.feature_cache import CachedFeatures

        train_set = CachedFeatures.wrap(train_set, model.backbone, out_dir / "feature_cache", runtime.device,
                                        num_workers=cfg.data.num_workers)
    log.info("training %s → %s (backbone %s, %s weights)", cfg.data.dataset, out_dir, cfg.model.backbone,
             backbone_weights(cfg))
    if backbone_weights(cfg) == RANDOM_WEIGHTS:
        log.warning("the backbone %s has RANDOM weights (model.pretrained=false): an untrained backbone; its "
                    "figures say nothing about the pretrained one", cfg.model.backbone)
    return fit(model, train_set, train=cfg.train, loss=cfg.loss, runtime=runtime, out_dir=out_dir,
               config=cfg.to_dict(), num_workers=cfg.data.num_workers,
               validate=make_validator(cfg, validation_subset(val_set, cfg.train.valid_images), runtime))


def _say_seed_states(out_dir: Path, seeds: list[int], runtime: Runtime) -> None:
    """Log, when a multi-seed run resumes, which seeds are finished, which continues, which are new."""
    states = seed_folder_states([out_dir / f"seed-{s}" for s in seeds])
    if runtime.is_main and (states["finished"] or states["unfinished"]):
        names = {k: ", ".join(f.name for f in v) or "none" for k, v in states.items()}
        log.info("resuming %s: finished %s (left as they are); continuing %s from last.pt; new %s", out_dir,
                 names["finished"], names["unfinished"], names["new"])


@dataclass
class TrainingRun:
    """What :func:`run_training` did: the run folders, and whether this process is the one that
    reports (rank 0; the others of a torchrun job stay silent)."""

    folders: list[Path]
    is_main: bool
    finished_before: list[Path] = dataclasses.field(default_factory=list)  # already trained: left unchanged


def run_training(cfg: Config) -> TrainingRun:
    """Train once per seed (``train.seeds``) or once (``train.seed``).

    The process group of a torchrun job is opened here and closed when training ends.
    """
    out_dir = run_dir(cfg)
    require_data_root(cfg)
    with (dist.process_group(build_runtime(cfg).device, cfg.train.dist_timeout),
          run_folder_lock(out_dir, enabled=dist.rank() == 0) as lock,  # one run per folder (rank 0 holds it)
          removed_on_failure(out_dir, existed=lock.existed)):
        runtime = build_runtime(cfg)  # rank and world size, now that the group exists
        if not cfg.train.seeds:
            done = train_one(cfg, out_dir, runtime).get("already_finished", False)
            return TrainingRun([out_dir], runtime.is_main, [out_dir] if done else [])
        _say_seed_states(out_dir, cfg.train.seeds, runtime)
        if runtime.is_main and not (out_dir / "config.yaml").is_file():  # a refused re-run keeps the first
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
        folders, finished = [], []
        for seed in cfg.train.seeds:
            seeded = config_from_dict(cfg.to_dict())
            seeded.train.seed, seeded.train.seeds = seed, None
            seeded.train.out_dir = str(out_dir / f"seed-{seed}")
            if train_one(seeded, out_dir / f"seed-{seed}", runtime).get("already_finished", False):
                finished.append(out_dir / f"seed-{seed}")
            folders.append(out_dir / f"seed-{seed}")
        return TrainingRun(folders, runtime.is_main, finished)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------


def _model_config(model: HPModel, preset: str | None, overrides: list[str]) -> Config:
    """The preset's, or the configuration stored with a checkpoint (defaults for the authors'
    files), with overrides."""
    if preset:
        return build_config(preset, overrides)
    cfg = config_from_dict(model.config) if model.config else Config()
    return apply_overrides(cfg, overrides)


def refit_centroids(cfg: Config, model: HPModel, runtime: Runtime) -> torch.Tensor:
    """The refitted cluster probe (``eval.cluster_refit``): spherical k-means with K clusters
    on the segmentation head's code of (up to 100,000 patches of) the training images."""
    loader = eval_loader(baseline_train_set(cfg), cfg)
    x = patch_sample(lambda im: model.head(model.backbone.features(im)), loader, runtime, max_patches=100_000,
                     seed=cfg.train.seed)
    return kmeans(x, model.n_clusters, seed=cfg.train.seed)


def evaluate_checkpoint(
    checkpoint: Path,
    overrides: list[str] | None = None,
    *,
    preset: str | None = None,
    out_dir: Path | None = None,
    backbone: str | None = None,
    baseline: bool = False,
) -> Results:
    """Evaluate one checkpoint (ours or the authors' ``ckpt.pth``) on its validation set.

    With ``baseline`` the k-means baseline on the same frozen backbone is scored too. With
    ``out_dir`` the results folder is written (``results.json``, figures, galleries).
    """
    model = load_model(checkpoint, backbone=backbone)
    cfg = _model_config(model, preset, overrides or [])
    check_resolutions(cfg, int(model.backbone.patch_size), model.spec.backbone, training=False)
    runtime = build_runtime(cfg)
    model.to(runtime.device).eval()
    val_set = build_val_set(cfg)
    n_classes, class_names = int(val_set.n_classes), list(val_set.class_names)  # type: ignore[attr-defined]
    if model.n_classes != n_classes:
        raise HPSegError(
            f"{checkpoint} predicts {model.n_classes} classes but {cfg.data.dataset} has {n_classes}: "
            "evaluate it on the dataset it was trained for (--preset NAME data.root=DIR)"
        )
    refit = refit_centroids(cfg, model, runtime) if cfg.eval.cluster_refit else None
    output = evaluate_model(model, eval_loader(val_set, cfg), runtime, crf=cfg.eval.crf, matching=cfg.eval.matching,
                            n_gallery=cfg.eval.n_gallery, per_cluster=cfg.eval.gallery_per_cluster,
                            refit_centroids=refit)
    protocol = protocol_for(cfg, runtime, output, n_clusters=model.n_clusters, n_classes=n_classes,
                            backbone=model.spec.backbone, checkpoint=checkpoint,
                            cluster_probe="online + refit (k-means on training code)" if refit is not None else "online",
                            weights=backbone_weights(config_from_dict(model.config)) if model.config else "pretrained")
    results = Results(protocol, class_names, metrics=output.metrics, diagnostics=cluster_usage(output.cluster_pixels),
                      confusion={h: c.tolist() for h, c in output.confusion.items()},
                      cluster_names=model.cluster_names)
    if baseline and output.labelled:
        results.baseline = baseline_for(cfg, model.backbone, model.n_clusters, runtime).metrics
    if not output.labelled:  # the label-free verdict: HP (and k-means) on the held-out images
        verdict = label_free_for(cfg, model, model.backbone, model.n_clusters, runtime, with_kmeans=baseline,
                                 n_gallery=len(output.gallery))
        results.label_free = verdict.figures
        for row, extra in zip(output.gallery, verdict.gallery):
            if "k-means" in extra:
                row["kmeans"] = extra["k-means"]
    if out_dir is not None:
        from hpseg.evaluate import write_results
        from hpseg.report import write_report

        for name in ("training_curve.png", HELD_OUT_FILE):  # the run's curve and held-out list join its evaluation
            if (checkpoint.parent / name).is_file():
                out_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(checkpoint.parent / name, out_dir / name)
        write_results(out_dir, results, output)
        write_report(out_dir)
    return results


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
) -> Results:
    """Evaluate a checkpoint file, a run folder (``best.pt``) or a multi-seed run folder.

    For a multi-seed folder every seed is evaluated into ``seed-N/eval`` and the folder's
    ``results.json`` holds the per-seed metrics (``seeds``) and their mean ± std (``metrics``).
    """
    seeds = find_seed_runs(path) if path.is_dir() else []
    if not seeds:
        checkpoint = resolve_checkpoint(path)  # a file, or a run folder's best.pt
        return evaluate_checkpoint(checkpoint, overrides, preset=preset, backbone=backbone, baseline=baseline,
                                   out_dir=out_dir or (path / "eval" if path.is_dir() else None))
    runs = [evaluate_checkpoint(f / "best.pt", overrides, preset=preset, out_dir=f / "eval", backbone=backbone,
                                baseline=baseline) for f in seeds]
    per_seed = {f.name: {**r.metrics, **({"k-means baseline": r.baseline["unsupervised"]} if r.baseline else {})}
                for f, r in zip(seeds, runs)}
    protocol = runs[0].protocol
    protocol.checkpoint, protocol.checkpoint_sha256 = None, None
    protocol.seeds = [f.name for f in seeds]
    protocol.checkpoints = {f.name: r.protocol.checkpoint_sha256 or "" for f, r in zip(seeds, runs)}
    results = Results(protocol, runs[0].class_names, metrics=aggregate_seeds(per_seed), seeds=per_seed)
    results.write((out_dir or path) / "results.json")
    return results


def baseline_for(cfg: Config, backbone: Backbone, n_clusters: int, runtime: Runtime,
                 n_gallery: int = 0) -> EvalOutput:
    """k-means (K = ``n_clusters``) on the frozen backbone's features, on the configured data."""
    val_set = build_val_set(cfg)
    return kmeans_baseline(backbone, eval_loader(baseline_train_set(cfg), cfg), eval_loader(val_set, cfg), runtime,
                           n_clusters=n_clusters, n_classes=int(val_set.n_classes),  # type: ignore[attr-defined]
                           matching=cfg.eval.matching, seed=cfg.train.seed, n_gallery=n_gallery)


def label_free_for(cfg: Config, model: HPModel | None, backbone: Backbone, n_clusters: int, runtime: Runtime, *,
                   with_kmeans: bool, n_gallery: int = 0) -> LabelFreeOutput:
    """The label-free figures of HP (``model``) and/or k-means with ``n_clusters`` on the frozen
    ``backbone`` (fitted on the training images) on the validation (held-out) images."""
    predictors: dict[str, tuple[Predictor, int]] = {}
    if model is not None:
        predictors["HP"] = (hp_predictor(model), model.n_clusters)
    if with_kmeans:
        centroids = kmeans_centroids(backbone, eval_loader(baseline_train_set(cfg), cfg), runtime,
                                     n_clusters=n_clusters, seed=cfg.train.seed)
        predictors["k-means"] = (kmeans_predictor(backbone, centroids), n_clusters)
    return label_free_evaluation(predictors, eval_loader(build_val_set(cfg), cfg), runtime, n_gallery=n_gallery)


def run_baseline(preset: str | None, overrides: list[str]) -> Results:
    """``hpseg baseline``: k-means on the configured backbone's features, with the HP protocol."""
    cfg = build_config(preset, overrides)
    runtime = build_runtime(cfg)
    backbone = build_backbone(cfg.model.backbone, cfg.model.weights, pretrained=cfg.model.pretrained,
                              img_size=cfg.data.resolution).to(runtime.device)
    val_set = build_val_set(cfg)
    require_enough_images(cfg, baseline_train_set(cfg) if cfg.data.dataset == "folder" else val_set, val_set)
    n_classes, class_names = int(val_set.n_classes), list(val_set.class_names)  # type: ignore[attr-defined]
    k = cfg.model.n_clusters or n_classes
    if not getattr(val_set, "has_labels", True):  # nothing to score: the label-free figures of k-means
        verdict = label_free_for(cfg, None, backbone, k, runtime, with_kmeans=True)
        protocol = protocol_for(cfg, runtime, EvalOutput({}, {}, int(verdict.figures["n_images"]), labelled=False),
                                n_clusters=k, n_classes=n_classes, backbone=cfg.model.backbone, checkpoint=None)
        return Results(protocol, class_names, label_free=verdict.figures,
                       notes={"method": "k-means on frozen backbone features"})
    output = baseline_for(cfg, backbone, k, runtime)
    protocol = protocol_for(cfg, runtime, output, n_clusters=k, n_classes=n_classes, backbone=cfg.model.backbone,
                            checkpoint=None)
    return Results(protocol, class_names, baseline=output.metrics,
                   notes={"method": "k-means on frozen backbone features"})


# ------------------------------------------------------------------------------------------
# naming clusters
# ------------------------------------------------------------------------------------------


def name_clusters(run: Path, names: dict[int, str]) -> list[Path]:
    """Store cluster names (``{cluster id: name}``; the other clusters keep their stored names,
    ``cluster k`` when never named) in the run's
    checkpoints (``best.pt``, ``final.pt``, or the given file) and in its evaluation's
    ``results.json`` when there is one. Returns the files changed."""
    files = [run] if run.is_file() else [p for p in (run / "best.pt", run / "final.pt") if p.is_file()]
    if not files:
        resolve_checkpoint(run)  # says what the folder holds instead (one run per K or seed, an unfinished run)
        raise HPSegError(f"{run} holds no best.pt or final.pt: give a run folder or a checkpoint file")
    from hpseg.model import ModelSpec

    stored = read_checkpoint(files[0])
    k = ModelSpec.from_dict(stored.get("spec") or {}).n_clusters
    bad = sorted(c for c in names if not 0 <= c < k)
    if bad:
        why = " (-1 marks pixels of no class: it is not a cluster and has no name)" if bad[0] < 0 else ""
        raise HPSegError(f"cluster {bad[0]} does not exist: the model has clusters 0..{k - 1}{why}")
    before = stored.get("cluster_names") or []
    before = [str(n) for n in before] if len(before) == k else [f"cluster {c}" for c in range(k)]
    full = [names.get(c, before[c]) for c in range(k)]
    changed = [set_cluster_names(f, full) for f in files]
    results_file = (run.parent if run.is_file() else run) / "eval" / "results.json"
    if results_file.is_file():
        results = Results.read(results_file)
        results.cluster_names = full
        for entry in results.cluster_gallery:
            entry["name"] = full[int(entry["cluster"])]
        changed.append(results.write(results_file))
    return changed
