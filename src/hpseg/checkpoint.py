"""Checkpoints: hpseg's own format and the authors' released ``ckpt.pth``.

Two layouts are read by :func:`load_model`:

* ours (``{"format": "hpseg", "format_version": 1, ...}``, written by :func:`save_checkpoint`),
  loadable with ``torch.load(weights_only=True)`` so that an untrusted file cannot run code; it
  describes itself (model spec, class names, cluster → class assignment, cluster names, the run
  configuration, hpseg and torch versions) and carries the backbone weights too, so it needs no
  download;
* the authors' released ``ckpt.pth`` (``net_model_state_dict`` with ``model.*`` DINO keys,
  ``cluster1/2.*``, ``ema_model1/2.*``; ``linear_model_state_dict``;
  ``cluster_model_state_dict``), converted on the fly (:func:`convert_authors_checkpoint`
  writes it in our format).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hpseg.backbones import (
    BackboneArch,
    backbone_from_arch,
    build_backbone,
    infer_dino_arch,
    normalize_state_dict,
)
from hpseg.config import ModelConfig
from hpseg.errors import HPSegError
from hpseg.io import atomic_torch_save, safe_torch_load
from hpseg.model import HPModel, ModelSpec

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "convert_authors_checkpoint",
    "is_authors_checkpoint",
    "load_model",
    "read_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_cluster_names",
]

FORMAT = "hpseg"
FORMAT_VERSION = 1
_RESERVED = (
    "format",
    "format_version",
    "hpseg_version",
    "torch_version",
    "spec",
    "class_names",
    "assignment",
    "cluster_names",
    "config",
    "state_dict",
)


# checkpoints
# ------------------------------------------------------------------------------------------


def _plain(obj: Any, where: str = "value") -> Any:
    """``obj`` as plain Python (dict/list/str/int/float/bool/None/tensor) for weights_only loading."""
    if obj is None:
        return None
    for exact in (bool, int, float, str):  # exact types: numpy.float64 subclasses float
        if isinstance(obj, exact):
            return exact(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(asdict(obj), where)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_plain(v, where) for v in obj]
    item = getattr(obj, "item", None)  # numpy scalars
    if callable(item) and getattr(obj, "shape", None) == ():
        return _plain(item(), where)
    tolist = getattr(obj, "tolist", None)  # numpy arrays
    if callable(tolist):
        return _plain(tolist(), where)
    log.warning("checkpoint: storing %s of type %s as its string", where, type(obj).__name__)
    return str(obj)


def save_checkpoint(
    path: str | Path,
    model: HPModel,
    *,
    config: Mapping[str, Any] | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically in hpseg's format.

    The file is a dict loadable with ``torch.load(weights_only=True)``: ``format`` ("hpseg"),
    ``format_version`` (1), ``hpseg_version``, ``torch_version``, ``spec`` (:class:`ModelSpec`
    as a dict), ``class_names``, ``assignment`` (cluster → class, or None), ``cluster_names``
    (or None), ``config`` (plain dict; defaults to ``model.config``),
    ``state_dict`` (the whole model, backbone included, on CPU), and the keys of ``extra``
    (plain values, e.g. metrics or the iteration).
    """
    from hpseg import __version__

    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise HPSegError(f"extra keys {clash} are reserved in hpseg checkpoints: rename them")
    if config is None:
        config = model.config
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hpseg_version": __version__,
        "torch_version": str(torch.__version__),
        "spec": model.spec.to_dict(),
        "class_names": [str(n) for n in model.class_names],
        "assignment": None if model.assignment is None else [int(a) for a in model.assignment],
        "cluster_names": None if model.cluster_names is None else [str(n) for n in model.cluster_names],
        "config": _plain(config, "config"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    for key, value in extra.items():
        payload[key] = _plain(value, key)
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def is_authors_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) has the layout of the authors' released ``ckpt.pth``."""
    return isinstance(obj, Mapping) and isinstance(obj.get("net_model_state_dict"), Mapping)


def _run_numbers(folder: Path, prefix: str) -> list[str]:
    """Names of ``folder``'s sub-runs ``<prefix>N`` that hold a ``best.pt``, by number."""
    found = [p.name for p in folder.glob(f"{prefix}*") if (p / "best.pt").is_file()]
    tail = len(prefix)
    return sorted(found, key=lambda n: (0, int(n[tail:]), "") if n[tail:].lstrip("-").isdigit() else (1, 0, n))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: the file itself, or a run folder's ``best.pt`` — the
    one rule of every command that takes a model (``evaluate``, ``segment``, ``export``,
    ``name``; ``hpseg.Segmenter.from_checkpoint``, :func:`load_model`).

    Raises:
        HPSegError: nothing there, or a folder without ``best.pt`` — naming what it holds instead
            (one run per seed or per K, an unfinished run) and what to give.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise HPSegError(f"{path} does not exist: give a run folder (e.g. runs/photos) or a checkpoint file (best.pt)")
    if (path / "best.pt").is_file():
        return path / "best.pt"
    for prefix, what in (("seed-", "seed"), ("k-", "K (hpseg sweep-k)")):
        runs = _run_numbers(path, prefix)
        if runs:
            raise HPSegError(f"{path} holds one run per {what} ({', '.join(runs)}): give one of them, "
                             f"e.g. {path / runs[0]}")
    if (path / "last.pt").is_file():
        raise HPSegError(f"{path} holds an unfinished run (last.pt, no best.pt yet): finish it by typing its "
                         "hpseg train command again")
    raise HPSegError(f"{path} holds no best.pt: give a run folder that finished training (hpseg train …) "
                     "or a checkpoint file")


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> Any:
    """The raw content of a checkpoint file, loaded with ``weights_only=True``.

    Raises:
        HPSegError: missing, damaged or foreign file (one line naming it; exports are recognised).
    """
    return safe_torch_load(
        path, map_location=map_location,
        expected="an hpseg checkpoint (hpseg train / hpseg convert) or the authors' ckpt.pth",
        fix="give a run folder or its best.pt / final.pt",
    )


def _class_names(
    n_classes: int, stored: list[str] | None, dataset: str | None, class_names: list[str] | None
) -> list[str]:
    if class_names is not None:
        names = [str(n) for n in class_names]
    elif dataset is not None:
        from hpseg.data.common import class_names_of

        try:
            names = class_names_of(dataset)
        except KeyError as exc:
            raise HPSegError(
                f"no class names known for dataset {dataset!r}: use cocostuff27, cityscapes27 or potsdam3"
            ) from exc
    elif stored is not None:
        names = list(stored)
    else:
        names = [f"class {i}" for i in range(n_classes)]
    if len(names) != n_classes:
        raise HPSegError(
            f"the checkpoint predicts {n_classes} classes but {len(names)} class names were given"
        )
    return names


def _stored_assignment(ckpt: Mapping[str, Any], n_clusters: int) -> list[int] | None:
    """The cluster → class assignment stored with a checkpoint (top level, or in the metrics of
    the validation that selected it), if it has one entry per cluster."""
    found = ckpt.get("assignment")
    metrics = ckpt.get("metrics")
    if found is None and isinstance(metrics, Mapping) and isinstance(metrics.get("unsupervised"), Mapping):
        found = metrics["unsupervised"].get("assignment")
    if isinstance(found, list) and len(found) == n_clusters:
        return [int(a) for a in found]
    return None


def _load_ours(
    ckpt: Mapping[str, Any], path: Path, backbone: str | None, weights: str | Path | None
) -> tuple[HPModel, dict[str, torch.Tensor]]:
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise HPSegError(
            f"{path} has hpseg checkpoint format version {version!r}; this hpseg reads up to "
            f"{FORMAT_VERSION}: upgrade hpseg"
        )
    spec = ModelSpec.from_dict(ckpt.get("spec") or {})
    if backbone is not None and backbone != spec.backbone:
        raise HPSegError(
            f"{path} was trained with backbone {spec.backbone!r}, not {backbone!r}: drop --backbone"
        )
    if weights is not None:
        log.warning("%s carries its own backbone weights; ignoring weights=%s", path, weights)
    config = ckpt.get("config")
    model = HPModel(
        backbone_from_arch(spec.arch, init=False),
        spec,
        ckpt.get("class_names"),
        config if isinstance(config, dict) else None,
    )
    model.assignment = _stored_assignment(ckpt, spec.n_clusters)
    names = ckpt.get("cluster_names")
    if isinstance(names, list) and len(names) == spec.n_clusters:
        model.cluster_names = [str(n) for n in names]
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise HPSegError(f"{path} has no state_dict: the file is truncated or not an hpseg checkpoint")
    return model, dict(state)


def _authors_backbone_name(arch: BackboneArch) -> str:
    if arch.depth == 12:
        width = {384: "s", 768: "b"}.get(arch.embed_dim)
        if width is not None and arch.patch_size in (8, 16):
            return f"dino_vit{width}{arch.patch_size}"
    return "dino_custom"


def _load_authors(
    ckpt: Mapping[str, Any], path: Path, backbone: str | None, weights: str | Path | None
) -> tuple[HPModel, dict[str, torch.Tensor]]:
    net = ckpt["net_model_state_dict"]
    linear = ckpt.get("linear_model_state_dict")
    cluster = ckpt.get("cluster_model_state_dict")
    if not isinstance(linear, Mapping) or not isinstance(cluster, Mapping) or "clusters" not in cluster:
        raise HPSegError(
            f"{path} lacks linear_model_state_dict / cluster_model_state_dict: expected a complete "
            "ckpt.pth as released by the HP authors"
        )
    needed = (
        "cluster1.0.weight",
        "cluster2.0.weight",
        "cluster2.2.weight",
        "ema_model1.0.weight",
        "ema_model2.2.weight",
    )
    missing = [k for k in needed if k not in net]
    if missing:
        raise HPSegError(
            f"{path}: net_model_state_dict lacks {', '.join(missing)}; only the nonlinear HP head "
            "(cluster1 + cluster2, ema_model1 + ema_model2) is supported"
        )
    backbone_sd = {k[len("model.") :]: v for k, v in net.items() if k.startswith("model.")}
    if backbone_sd:
        sd = normalize_state_dict(backbone_sd)
        if backbone is None:
            backbone = _authors_backbone_name(infer_dino_arch(sd))
        bb = build_backbone(backbone, weights, state_dict=None if weights is not None else sd)
    else:
        if backbone is None:
            raise HPSegError(
                f"{path} holds no backbone weights (model.*): pass backbone=NAME (and weights=PATH)"
            )
        bb = build_backbone(backbone, weights)
    dim = int(net["cluster1.0.weight"].shape[0])
    n_classes = int(linear["weight"].shape[0])
    spec = ModelSpec(bb.arch, dim, n_classes, int(cluster["clusters"].shape[0]), ModelConfig.dropout)
    if int(net["cluster1.0.weight"].shape[1]) != bb.embed_dim:
        raise HPSegError(
            f"{path}: the head expects {int(net['cluster1.0.weight'].shape[1])}-wide features but backbone "
            f"{bb.name} gives {bb.embed_dim}: pass the matching backbone name"
        )
    model = HPModel(bb, spec)
    state: dict[str, torch.Tensor] = {}
    renames = {
        "cluster1.0.": "head.linear.",
        "cluster2.": "head.nonlinear.",
        "ema_model1.0.": "ema_head.linear.",
        "ema_model2.": "ema_head.nonlinear.",
    }
    for key, value in net.items():
        for old, new in renames.items():
            if key.startswith(old):
                state[new + key[len(old) :]] = value
    for key, value in linear.items():
        state[f"linear_probe.{key}"] = value
    state["cluster_probe.clusters"] = cluster["clusters"]
    # the backbone (loaded above) and the projection head (not saved by the authors) come from the model
    for key, value in model.state_dict().items():
        if key.startswith("backbone.") or key.startswith("projection."):
            state[key] = value
    return model, state


def load_model(
    path: str | Path,
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    map_location: Any = "cpu",
    n_classes: int | None = None,
    dataset: str | None = None,
    class_names: list[str] | None = None,
) -> HPModel:
    """An :class:`HPModel` in eval mode from our checkpoint or the authors' ``ckpt.pth``.

    Args:
        path: checkpoint file (the layout is detected) or run folder (its ``best.pt``:
            :func:`resolve_checkpoint`).
        backbone: backbone name. For the authors' files it names the backbone (default: read
            from the ``model.*`` weights, e.g. ``dino_vits8``); our files record theirs.
        weights: backbone weights for authors' files that hold none (``model.*`` absent).
        map_location: as for ``torch.load``.
        n_classes: if given, checked against the linear probe (HPSegError on mismatch).
        dataset: ``cocostuff27`` | ``cityscapes27`` | ``potsdam3``: take the class names from it.
        class_names: explicit class names (override stored or dataset names).

    Raises:
        HPSegError: missing/unreadable file, unknown layout, mismatching backbone or classes.
    """
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path, map_location)
    if isinstance(ckpt, Mapping) and ckpt.get("format") == FORMAT:
        model, state = _load_ours(ckpt, path, backbone, weights)
        stored_names = model.class_names
    elif is_authors_checkpoint(ckpt):
        model, state = _load_authors(ckpt, path, backbone, weights)
        stored_names = None
    else:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise HPSegError(
            f"{path} is neither an hpseg checkpoint (format='hpseg') nor the authors' ckpt.pth "
            f"(net_model_state_dict, linear_model_state_dict, cluster_model_state_dict); found {keys}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise HPSegError(
            f"{path} does not fit its recorded architecture ({exc}): the file is damaged"
        ) from exc
    c = model.n_classes
    if n_classes is not None and n_classes != c:
        raise HPSegError(
            f"{path} predicts {c} classes, not {n_classes}: use the checkpoint trained for this dataset"
        )
    model.class_names = _class_names(c, stored_names, dataset, class_names)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def _config_for_dataset(dataset: str, spec: ModelSpec) -> dict[str, Any]:
    """The dataset preset's configuration (unvalidated: no data root) with the model's sizes."""
    from hpseg.config import config_from_dict, load_preset

    data = load_preset(dataset)
    cfg = config_from_dict({"preset": dataset, **{k: v for k, v in data.items() if isinstance(v, dict)}})
    cfg.model.backbone = spec.arch.name
    cfg.model.dim = spec.dim
    cfg.model.n_clusters = spec.n_clusters
    return cfg.to_dict()


def convert_authors_checkpoint(
    src: str | Path,
    dst: str | Path,
    class_names: list[str] | None = None,
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    dataset: str | None = None,
) -> Path:
    """Rewrite the authors' ``ckpt.pth`` as an hpseg checkpoint at ``dst``; returns ``dst``.

    ``dataset`` (``cocostuff27`` | ``cityscapes27`` | ``potsdam3``) sets the class names and
    stores that preset's configuration, so ``hpseg evaluate dst`` needs no ``--preset``.
    """
    src = Path(src)
    ckpt = read_checkpoint(src, "cpu")
    if not is_authors_checkpoint(ckpt):
        raise HPSegError(f"{src} is not the authors' ckpt.pth (no net_model_state_dict): nothing to convert")
    model = load_model(src, backbone=backbone, weights=weights, dataset=dataset, class_names=class_names)
    config = _config_for_dataset(dataset, model.spec) if dataset else None
    book = {k: ckpt[k] for k in ("epoch", "iter", "best", "best_epoch", "best_iter") if k in ckpt}
    return save_checkpoint(
        dst, model, config=config, extra={"converted_from": str(src), "authors_bookkeeping": book}
    )


def set_cluster_names(path: str | Path, names: Sequence[str]) -> Path:
    """Store names for the K clusters in an hpseg checkpoint (rewritten atomically).

    ``names`` has one entry per cluster; clusters given the same name are one label in every
    later output (segment PNGs, legends, overlays, the report, ONNX metadata).

    Raises:
        HPSegError: not an hpseg checkpoint, or not one name per cluster.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT):
        raise HPSegError(f"{path} is not an hpseg checkpoint: convert it first (hpseg convert)")
    k = int(ModelSpec.from_dict(ckpt.get("spec") or {}).n_clusters)
    if len(names) != k:
        raise HPSegError(f"{path} has {k} clusters but {len(names)} names were given: name every cluster")
    ckpt["cluster_names"] = [str(n) for n in names]
    atomic_torch_save(ckpt, path)
    return path
