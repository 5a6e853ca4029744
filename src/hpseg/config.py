"""Typed configuration: dataclasses, YAML presets per dataset, ``key=value`` overrides.

A run's configuration is built in three layers, later layers winning:

1. the dataclass defaults below,
2. a preset (``src/hpseg/presets/<name>.yaml``: the paper's hyper-parameters per dataset),
3. ``key=value`` overrides from the command line (``train.batch_size=32``,
   ``data.root=/data``, or the short aliases ``backbone=…``, ``weights=…``, ``seeds=[0,1,2]``).

The resolved configuration is written next to every run (``config.yaml``) and stored inside
every checkpoint, so a figure can always be traced back to what produced it.
"""

from __future__ import annotations

import difflib
import hashlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hpseg.errors import HPSegError

#: dataset names (the registry of readers is :mod:`hpseg.data`; kept here so that reading a
#: configuration needs no torch)
DATASETS = ("cocostuff27", "cityscapes27", "potsdam3", "folder", "synthetic")
#: the datasets of the paper, with fixed classes and official layouts
PAPER_DATASETS = ("cocostuff27", "cityscapes27", "potsdam3")
#: numeric precisions of ``train.precision`` (see :mod:`hpseg.runtime`)
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
#: which candidates an anchor sees in a multi-process run (``loss.candidates``; README "Multi-GPU")
CANDIDATES = ("global", "local")


@dataclass
class DataConfig:
    """Which images to read and how to crop them (docs/method.md §8)."""

    dataset: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    five_crop: bool = False  # train on <root>/cropped/<dataset>_five_crop_<ratio> (``hpseg prepare``)
    crop_ratio: float = 0.5
    resolution: int = 224  # training crop
    eval_resolution: int = 320  # evaluation: resize shorter side + centre crop
    interpolation: str = "bilinear"  # image resize; the authors' code uses "nearest" (paper presets)
    aug_on_normalized: bool = False  # photometric aug after normalisation, as the authors' code
    num_workers: int = 2
    max_skipped_fraction: float = 0.1  # folders: unreadable images left out (listed) up to this fraction
    n_classes: int | None = None  # folder datasets: number of classes / clusters wanted
    class_names: list[str] | None = None
    max_val_images: int | None = None  # evaluate on the first N validation images only
    holdout: float = 0.0  # folders without val/ sub-folder: fraction of images held out for validation
    synthetic_train_images: int = 512
    synthetic_val_images: int = 64
    synthetic_classes: int = 5
    synthetic_seed: int = 0


@dataclass
class ModelConfig:
    """Backbone and head sizes (docs/method.md §1–2)."""

    backbone: str = "dino_vits8"
    weights: str | None = None  # local weights file; None = official download / cache
    pretrained: bool = True  # false: random backbone weights (tests, ablations)
    dim: int = 512  # head width D
    n_clusters: int | None = None  # K; None = number of classes (K > C: over-clustering)
    dropout: float = 0.1


@dataclass
class LossConfig:
    """Hidden-positive loss hyper-parameters (docs/method.md §3–7)."""

    tau: float = 0.8
    rho: float = 0.02
    alpha: float = 0.05  # consistency-loss weight
    warmup: int = 1000  # λ = 0 for the first `warmup` iterations
    pool_size: int = 2048
    renew_interval: int = 100  # task-specific pool renewal period (iterations)
    ema_m: float = 0.99
    sigma: float = 28.0  # local propagation scale
    reweight: bool = True
    memory_gb: float | None = None  # memory budget of the loss's similarity blocks (None: sized for the device)
    chunk_images: int | None = None  # anchor images per chunk of the loss; None: from memory_gb
    compile: bool = False  # torch.compile the dense path's chunk (fused kernels; for GPUs, see RESULTS.md)
    path: str = "auto"  # how the loss is evaluated: auto, dense, sparse or fused (same values; speed only)
    # multi-process runs: "global" — every anchor sees the candidates of the whole global batch (the
    # paper's loss; equals one process); "local" — only its own process's share (less communication)
    candidates: str = "global"


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping (docs/method.md §7)."""

    epochs: int = 3
    max_iters: int | None = None  # stop after this many iterations (None: all epochs)
    batch_size: int = 64
    lr_head: float = 5e-4
    weight_decay: float = 0.1
    lr_projection: float = 5e-4
    lr_linear: float = 1e-3
    lr_cluster: float = 5e-3
    grad_clip: float = 10.0
    precision: str = "auto"  # fp16 | bf16 | fp32 | auto (bf16 where supported, else fp16); CUDA only
    valid_freq: int = 100  # validate every N iterations (and at the end of each epoch)
    log_freq: int = 25
    seed: int = 0
    seeds: list[int] | None = None  # one run per seed into RUN/seed-<n>/
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    out_dir: str | None = None  # None: runs/<dataset> (runs/<folder name> for image folders)
    cache_features: bool = False  # precompute frozen backbone outputs of un-augmented images
    progress: bool = True
    counting: str = "epoch"  # epoch: renew/validate on the batch index within the epoch (authors); global
    valid_images: int | None = None  # validation images used during training (None: all)
    auto_schedule: bool = True  # folder datasets: fit warm-up, renewal, validation to the run (hpseg.schedule)
    deterministic: bool = True  # bit-identical reruns and resumes on one GPU (deterministic kernels; README)
    save_on_signal: str | None = None  # SIGUSR1 | SIGUSR2: save last.pt at the next step and go on (SLURM --signal)
    dist_timeout: float = 300.0  # seconds a torchrun process waits in a collective for the others before failing


@dataclass
class EvalConfig:
    """Evaluation protocol (docs/method.md §8)."""

    crf: bool = False
    batch_size: int = 16
    matching: str = "hungarian"  # hungarian | majority (cluster → class assignment)
    n_gallery: int = 6  # images in the prediction grid / HTML report
    cluster_refit: bool = False  # also score the cluster probe refitted by k-means on training code
    gallery_per_cluster: int = 6  # example regions per cluster in the cluster gallery


@dataclass
class Config:
    """A full run configuration."""

    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint friendly)."""
        return asdict(self)

    def to_yaml(self) -> str:
        """YAML text of the whole configuration."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: short names accepted on the command line
ALIASES = {
    "backbone": "model.backbone",
    "weights": "model.weights",
    "seeds": "train.seeds",
    "seed": "train.seed",
    "root": "data.root",
    "out": "train.out_dir",
    "device": "train.device",
    "crf": "eval.crf",
    "precision": "train.precision",
}

#: keys of older versions, translated on the way in (old checkpoints store their configuration)
LEGACY = {"train.amp": ("train.precision", lambda v: "auto" if v in (True, "true", "True", "1", 1) else "fp32")}


def available_presets() -> list[str]:
    """Names of the presets shipped with the package."""
    folder = resources.files("hpseg") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The nested dict of preset ``name`` (a shipped name or a path to a YAML file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        res = resources.files("hpseg") / "presets" / f"{name}.yaml"
        if not res.is_file():
            raise HPSegError(
                f"unknown preset {name!r}: choose one of {', '.join(available_presets())} "
                "or give a path to a YAML file"
            )
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise HPSegError(f"preset {name!r} is not a mapping of sections; see src/hpseg/presets/")
    return data


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML-parsed value to the dataclass field type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except HPSegError as exc:
                errors.append(str(exc))
        raise HPSegError(errors[0] if errors else f"{key}: cannot use {value!r}")
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise HPSegError(f"{key} expects a list like [0,1,2], got {value!r}")
        return [_coerce(v, args[0] if args else Any, key) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise HPSegError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise HPSegError(f"{key} expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: accept Python's spelling
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HPSegError(f"{key} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise HPSegError(f"{key} expects a string, got {value!r}")
        return str(value)
    return value


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def _set(cfg: Config, dotted: str, raw: Any, *, parse: bool) -> None:
    dotted = ALIASES.get(dotted, dotted)
    if dotted in LEGACY:
        dotted, translate = LEGACY[dotted]
        raw = translate(raw)
    parts = dotted.split(".")
    sections = {f.name for f in fields(Config) if f.name != "preset"}
    if len(parts) != 2 or parts[0] not in sections:
        candidates = [f"{s}.{f.name}" for s in sections for f in fields(getattr(cfg, s))]
        candidates += list(ALIASES)
        close = difflib.get_close_matches(dotted, candidates, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; see `hpseg config --preset NAME`"
        raise HPSegError(f"unknown config key {dotted!r}{hint}")
    section = getattr(cfg, parts[0])
    hints = _section_types(section)
    if parts[1] not in hints:
        close = difflib.get_close_matches(parts[1], list(hints), n=1)
        hint = f"; did you mean {parts[0]}.{close[0]}?" if close else ""
        raise HPSegError(f"unknown config key {dotted!r}{hint}")
    value = yaml.safe_load(raw) if parse and isinstance(raw, str) else raw
    if parse and isinstance(raw, str) and hints[parts[1]] is not Any and _is_str_type(hints[parts[1]]):
        # keep strings verbatim (paths like 0001 or "yes" must not be re-typed)
        value = None if raw.lower() in ("null", "none", "~") and _allows_none(hints[parts[1]]) else raw
    setattr(section, parts[1], _coerce(value, hints[parts[1]], dotted))


def _is_str_type(tp: Any) -> bool:
    args = typing.get_args(tp)
    return tp is str or (bool(args) and str in args and all(a in (str, type(None)) for a in args))


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _apply_mapping(cfg: Config, data: dict[str, Any], source: str) -> None:
    for sec_name, values in data.items():
        if sec_name == "preset":
            continue
        if not isinstance(values, dict):
            raise HPSegError(f"{source}: section {sec_name!r} must be a mapping of keys to values")
        for key, value in values.items():
            _set(cfg, f"{sec_name}.{key}", value, parse=False)


def build_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← preset ← ``key=value`` overrides, validated.

    Raises:
        HPSegError: unknown preset or key, a value of the wrong type, or an invalid setting.
    """
    cfg = Config(preset=preset)
    if preset:
        _apply_mapping(cfg, load_preset(preset), f"preset {preset}")
    apply_overrides(cfg, overrides or [])
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings to ``cfg`` in place, then validate it; returns ``cfg``."""
    for item in overrides:
        if "=" not in item:
            raise HPSegError(f"override {item!r} is not key=value (for example train.batch_size=32)")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), raw.strip(), parse=True)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. from a checkpoint)."""
    cfg = Config(preset=data.get("preset"))
    _apply_mapping(cfg, {k: v for k, v in data.items() if isinstance(v, dict)}, "stored config")
    return cfg


def validate(cfg: Config) -> None:
    """Check settings that would otherwise fail deep inside training (not the data root: a
    configuration can be printed before the data exists; see :func:`require_data_root`)."""
    d, m, lo, t, e = cfg.data, cfg.model, cfg.loss, cfg.train, cfg.eval
    if d.dataset not in DATASETS:
        raise HPSegError(f"data.dataset={d.dataset!r} is unknown: use one of {', '.join(DATASETS)}")
    checks = [
        (t.batch_size >= 2, "train.batch_size must be at least 2 (positives are mined across images)"),
        (t.epochs >= 1, "train.epochs must be at least 1"),
        (t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}"),
        (0.0 < lo.tau, "loss.tau must be positive"),
        (0.0 <= lo.rho <= 1.0, "loss.rho must lie in [0, 1]"),
        (0.0 <= lo.ema_m <= 1.0, "loss.ema_m must lie in [0, 1]"),
        (lo.pool_size >= 1, "loss.pool_size must be at least 1"),
        (lo.renew_interval >= 1, "loss.renew_interval must be at least 1"),
        (lo.chunk_images is None or lo.chunk_images >= 1, "loss.chunk_images must be at least 1"),
        (lo.memory_gb is None or lo.memory_gb > 0, "loss.memory_gb must be positive"),
        (lo.path in ("auto", "dense", "sparse", "fused"),
         f"loss.path must be auto, dense, sparse or fused, got {lo.path!r}"),
        (lo.candidates in CANDIDATES, f"loss.candidates must be global or local, got {lo.candidates!r}"),
        (m.dim >= 1, "model.dim must be at least 1"),
        (m.n_clusters is None or m.n_clusters >= 1, "model.n_clusters must be at least 1"),
        (0.0 <= m.dropout < 1.0, "model.dropout must lie in [0, 1)"),
        (d.resolution >= 8 and d.eval_resolution >= 8, "data.resolution must be at least 8 pixels"),
        (0.0 <= d.max_skipped_fraction <= 1.0, "data.max_skipped_fraction must lie in [0, 1] (e.g. 0.1)"),
        (e.matching in ("hungarian", "majority"), "eval.matching must be hungarian or majority"),
        (t.max_iters is None or t.max_iters >= 1, "train.max_iters must be at least 1"),
        (t.valid_freq >= 1 and t.log_freq >= 1, "train.valid_freq and train.log_freq must be at least 1"),
        (d.interpolation in ("bilinear", "bicubic", "nearest"), "data.interpolation must be bilinear, bicubic or nearest"),
        (0.0 <= d.holdout < 1.0, "data.holdout must lie in [0, 1) (e.g. 0.2 holds out a fifth of the images)"),
        (t.counting in ("epoch", "global"), "train.counting must be epoch or global"),
        (t.valid_images is None or t.valid_images >= 1, "train.valid_images must be at least 1"),
        (t.save_on_signal is None or str(t.save_on_signal).upper().removeprefix("SIG") in ("USR1", "USR2"),
         f"train.save_on_signal must be SIGUSR1 or SIGUSR2 (or null), got {t.save_on_signal!r}"),
        (t.dist_timeout > 0, "train.dist_timeout must be a positive number of seconds (e.g. 300)"),
    ]
    for ok, message in checks:
        if not ok:
            raise HPSegError(message)


def check_resolutions(cfg: Config, patch: int, backbone: str, *, training: bool = True) -> None:
    """Refuse a ``data.resolution`` (when ``training``) or ``data.eval_resolution`` that is not
    a multiple of the backbone's ``patch`` size, naming the setting and a value that fits."""
    keys = ("resolution", "eval_resolution") if training else ("eval_resolution",)
    for key in keys:
        value = int(getattr(cfg.data, key))
        if value % patch:
            raise HPSegError(f"data.{key}={value} is not a multiple of the patch size {patch} of {backbone}: set "
                             f"data.{key}={max(patch, round(value / patch) * patch)} (any multiple of {patch})")


def require_data_root(cfg: Config) -> None:
    """Raise :class:`HPSegError` when the dataset needs ``data.root`` and it is not set."""
    if cfg.data.dataset != "synthetic" and not cfg.data.root:
        raise HPSegError(
            f"data.root is not set: add data.root=DIR (the folder that holds the {cfg.data.dataset} data)"
        )


def _stored_root(folder: Path) -> Path | None:
    """The absolute ``data.root`` of the run stored in ``folder/config.yaml`` (None: no run)."""
    saved = folder / "config.yaml"
    if not saved.is_file():
        return None
    data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    root = (data.get("data") or {}).get("root") if isinstance(data, dict) else None
    return Path(str(root)).expanduser().resolve() if root else None


def run_dir(cfg: Config) -> Path:
    """``train.out_dir``, or ``runs/<folder name>`` for image folders and ``runs/<dataset>`` otherwise.

    Two image folders with one name (``a/photos``, ``b/photos``) do not share a run folder: when
    ``runs/photos`` holds a run of another folder, this one is ``runs/photos-<6 hex digits of
    the SHA-1 of its absolute path>``.
    """
    if cfg.train.out_dir:
        return Path(cfg.train.out_dir)
    if cfg.data.dataset == "folder" and cfg.data.root:
        root = Path(cfg.data.root).expanduser().resolve()
        plain = Path("runs") / (root.name or "folder")
        stored = _stored_root(plain)
        if stored is None or stored == root:
            return plain
        return plain.with_name(f"{plain.name}-{hashlib.sha1(str(root).encode('utf-8')).hexdigest()[:6]}")
    return Path("runs") / cfg.data.dataset


def describe(cfg: Config) -> str:
    """One-line summary for logs."""
    return (
        f"{cfg.data.dataset} · {cfg.model.backbone} · D={cfg.model.dim} · batch {cfg.train.batch_size} · "
        f"τ={cfg.loss.tau} ρ={cfg.loss.rho} α={cfg.loss.alpha} · precision {cfg.train.precision} · "
        f"seed {cfg.train.seed}"
    )


__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "available_presets",
    "build_config",
    "check_resolutions",
    "config_from_dict",
    "describe",
    "load_preset",
    "require_data_root",
    "run_dir",
    "validate",
]
