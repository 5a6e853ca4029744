"""The HP model (frozen backbone + heads + probes) and its checkpoints.

Two checkpoint layouts are read by :func:`load_model`:

* ours (``{"format": "hpseg", "format_version": 1, ...}``, written by :func:`save_checkpoint`),
  loadable with ``torch.load(weights_only=True)``; it carries the backbone weights too, so it
  needs no download;
* the authors' released ``ckpt.pth`` (``net_model_state_dict`` with ``model.*`` DINO keys,
  ``cluster1/2.*``, ``ema_model1/2.*``; ``linear_model_state_dict``;
  ``cluster_model_state_dict``), converted on the fly (:func:`convert_authors_checkpoint`
  writes it in our format).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.backbones import (
    Backbone,
    BackboneArch,
    backbone_from_arch,
    build_backbone,
    infer_dino_arch,
    normalize_state_dict,
)
from hpseg.errors import HPSegError
from hpseg.heads import ClusterProbe, EMAHead, LinearProbe, ProjectionHead, SegmentationHead
from hpseg.io import atomic_torch_save

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HPModel",
    "ModelSpec",
    "convert_authors_checkpoint",
    "is_authors_checkpoint",
    "load_model",
    "save_checkpoint",
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
    "config",
    "state_dict",
)


@dataclass
class ModelSpec:
    """Everything needed to rebuild an :class:`HPModel` without the original weights file.

    Backbone: ``backbone`` (name), ``patch_size``, ``embed_dim`` (F), ``depth``, ``num_heads``,
    ``pos_grid`` (stored position grid, rows × cols), ``num_registers``, ``dino_family``
    (DINO's position rule; False = a timm model by name), ``mlp_ratio``, ``qkv_bias``,
    ``layer_scale``. Heads: ``dim`` (D), ``n_classes`` (C, linear probe), ``n_clusters`` (K),
    ``dropout``.
    """

    backbone: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    pos_grid: tuple[int, int]
    num_registers: int = 0
    dino_family: bool = True
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_scale: bool = False
    dim: int = 512
    n_classes: int = 27
    n_clusters: int = 27
    dropout: float = 0.1

    @classmethod
    def from_backbone(
        cls, backbone: Backbone, *, dim: int, n_classes: int, n_clusters: int, dropout: float = 0.1
    ) -> ModelSpec:
        a = backbone.arch
        return cls(
            backbone=a.name,
            patch_size=a.patch_size,
            embed_dim=a.embed_dim,
            depth=a.depth,
            num_heads=a.num_heads,
            pos_grid=tuple(a.pos_grid),  # type: ignore[arg-type]
            num_registers=a.num_registers,
            dino_family=a.dino_family,
            mlp_ratio=a.mlp_ratio,
            qkv_bias=a.qkv_bias,
            layer_scale=a.layer_scale,
            dim=dim,
            n_classes=n_classes,
            n_clusters=n_clusters,
            dropout=dropout,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            spec = cls(**kwargs)
        except TypeError as exc:
            raise HPSegError(
                f"checkpoint model spec is incomplete ({exc}): re-save it with this hpseg"
            ) from exc
        spec.pos_grid = (int(spec.pos_grid[0]), int(spec.pos_grid[1]))
        return spec

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists for tuples) for checkpoints."""
        d = asdict(self)
        d["pos_grid"] = [int(x) for x in self.pos_grid]
        return d

    def backbone_arch(self) -> BackboneArch:
        return BackboneArch(
            name=self.backbone,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            pos_grid=(int(self.pos_grid[0]), int(self.pos_grid[1])),
            num_registers=self.num_registers,
            dino_family=self.dino_family,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            layer_scale=self.layer_scale,
        )


class HPModel(nn.Module):
    """Frozen backbone, segmentation head (+ EMA copy), projection head and the two probes.

    Attributes:
        backbone: :class:`~hpseg.backbones.Backbone` (frozen, always eval).
        head: :class:`~hpseg.heads.SegmentationHead` F→D; ``ema_head``: its EMA copy.
        projection: :class:`~hpseg.heads.ProjectionHead` (training only).
        linear_probe: :class:`~hpseg.heads.LinearProbe` D→C; ``cluster_probe``:
            :class:`~hpseg.heads.ClusterProbe` with K centroids.
        class_names: C names; spec: :class:`ModelSpec`; config: the run configuration stored
            with the checkpoint (dict) or None.
    """

    def __init__(
        self,
        backbone: Backbone,
        spec: ModelSpec,
        class_names: list[str] | None = None,
        config: dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        if backbone.embed_dim != spec.embed_dim:
            raise HPSegError(f"spec says F={spec.embed_dim} but the backbone is {backbone.embed_dim} wide")
        self.backbone = backbone
        self.head = SegmentationHead(spec.embed_dim, spec.dim, spec.dropout)
        self.ema_head = EMAHead(self.head)
        self.projection = ProjectionHead(spec.dim)
        self.linear_probe = LinearProbe(spec.dim, spec.n_classes)
        self.cluster_probe = ClusterProbe(spec.dim, spec.n_clusters)
        names = (
            list(class_names) if class_names is not None else [f"class {i}" for i in range(spec.n_classes)]
        )
        if len(names) != spec.n_classes:
            raise HPSegError(
                f"{len(names)} class names given for {spec.n_classes} classes: pass one name per class"
            )
        self.class_names = names
        self.spec = spec
        self.config = config

    @classmethod
    def create(
        cls,
        backbone: Backbone,
        *,
        dim: int,
        n_classes: int,
        n_clusters: int | None = None,
        class_names: list[str] | None = None,
        dropout: float = 0.1,
        config: dict[str, Any] | str | None = None,
    ) -> HPModel:
        """A model with freshly initialised heads on ``backbone`` (K defaults to C)."""
        spec = ModelSpec.from_backbone(
            backbone, dim=dim, n_classes=n_classes, n_clusters=n_clusters or n_classes, dropout=dropout
        )
        return cls(backbone, spec, class_names, config)

    def linear_probe_classes(self) -> int:
        """C, the number of classes of the linear probe."""
        return self.linear_probe.n_classes

    def encode(self, images: torch.Tensor, with_attention: bool = True) -> dict[str, torch.Tensor]:
        """Backbone and head outputs.

        Args:
            images: ``(B, 3, H, W)`` normalised; H, W multiples of the patch size.
            with_attention: False skips the attention logits (the key is then absent).

        Returns:
            ``feats (B,F,h,w)``, ``attn_logits (B,heads,1+hw,1+hw)``, ``code (B,D,h,w)``,
            ``code_ema (B,D,h,w)``. In eval mode no dropout is applied.
        """
        out = self.backbone(images, with_attention=with_attention)
        result = {"feats": out.feats, "code": self.head(out.feats), "code_ema": self.ema_head(out.feats)}
        if out.attn_logits is not None:
            result["attn_logits"] = out.attn_logits
        return result

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Linear-probe logits and one-hot cluster assignments at ``size`` (default: image size).

        ``code`` is upsampled bilinearly (``align_corners=False``) to ``size`` first, then both
        probes are applied per pixel (as the authors' evaluation does).

        Returns:
            ``{"linear": (B, C, H, W) logits, "cluster": (B, K, H, W) one-hot}``.
        """
        if size is None:
            size = (int(images.shape[-2]), int(images.shape[-1]))
        code = self.head(self.backbone(images, with_attention=False).feats)
        code = F.interpolate(code, size=tuple(size), mode="bilinear", align_corners=False)
        _, cluster = self.cluster_probe(code, None)
        return {"linear": self.linear_probe(code), "cluster": cluster}


# ------------------------------------------------------------------------------------------
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
    as a dict), ``class_names``, ``config`` (plain dict or str; defaults to ``model.config``),
    ``state_dict`` (the whole model, backbone included, on CPU), and the keys of ``extra``
    (plain values, e.g. metrics or the iteration).
    """
    from hpseg import __version__

    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} are reserved in hpseg checkpoints")
    if config is None:
        config = model.config
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hpseg_version": __version__,
        "torch_version": str(torch.__version__),
        "spec": model.spec.to_dict(),
        "class_names": [str(n) for n in model.class_names],
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


def _read(path: Path, map_location: Any) -> Any:
    if not path.is_file():
        raise HPSegError(f"checkpoint {path} does not exist: check the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise HPSegError(
            f"cannot read {path} as a checkpoint ({type(exc).__name__}: {exc}); expected an hpseg "
            "checkpoint (hpseg train / hpseg convert) or the authors' ckpt.pth"
        ) from exc


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
    model = HPModel(
        backbone_from_arch(spec.backbone_arch(), init=False),
        spec,
        ckpt.get("class_names"),
        ckpt.get("config"),
    )
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
    spec = ModelSpec.from_backbone(
        bb, dim=dim, n_classes=n_classes, n_clusters=int(cluster["clusters"].shape[0])
    )
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
        path: checkpoint file; the layout is detected.
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
    path = Path(path)
    ckpt = _read(path, map_location)
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
    c = model.linear_probe_classes()
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
    cfg.model.backbone = spec.backbone
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
    ckpt = _read(src, "cpu")
    if not is_authors_checkpoint(ckpt):
        raise HPSegError(f"{src} is not the authors' ckpt.pth (no net_model_state_dict): nothing to convert")
    model = load_model(src, backbone=backbone, weights=weights, dataset=dataset, class_names=class_names)
    config = _config_for_dataset(dataset, model.spec) if dataset else None
    book = {k: ckpt[k] for k in ("epoch", "iter", "best", "best_epoch", "best_iter") if k in ckpt}
    return save_checkpoint(
        dst, model, config=config, extra={"converted_from": str(src), "authors_bookkeeping": book}
    )
