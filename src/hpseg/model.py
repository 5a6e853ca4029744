"""The HP model: a frozen backbone, the segmentation head (+ its EMA copy), the projection head
and the two probes — and the one inference path every consumer uses.

:meth:`HPModel.scores` is the single way from images to per-pixel scores (evaluation, the
segmenter, ONNX/TorchScript export and its verification all call it): one backbone token pass
without attention, the segmentation head, bilinear upsampling of the code, the probes.
Attention logits and the EMA head are computed only by :meth:`HPModel.encode`, for training.
Checkpoints are read and written by :mod:`hpseg.checkpoint`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.backbones import Backbone, BackboneArch
from hpseg.config import ModelConfig
from hpseg.errors import HPSegError
from hpseg.heads import ClusterProbe, EMAHead, LinearProbe, ProjectionHead, SegmentationHead

__all__ = ["HEADS", "HPModel", "ModelSpec"]

#: the probes :meth:`HPModel.scores` can score with
HEADS = ("cluster", "linear")


@dataclass
class ModelSpec:
    """What rebuilds an :class:`HPModel` without the original weights files.

    ``arch``: the backbone's architecture; ``dim`` (D), ``n_classes`` (C, linear probe),
    ``n_clusters`` (K, cluster probe), ``dropout`` (Dropout2d of the head's inputs in training).
    Stored in checkpoints as one flat dict (:meth:`to_dict`).
    """

    arch: BackboneArch
    dim: int
    n_classes: int
    n_clusters: int
    dropout: float

    @property
    def backbone(self) -> str:
        """The backbone's name."""
        return self.arch.name

    def to_dict(self) -> dict[str, Any]:
        """Flat plain dict: the backbone architecture's fields (``backbone`` = its name, lists
        for tuples) and the head sizes."""
        arch = dataclasses.asdict(self.arch)
        arch["backbone"] = arch.pop("name")
        arch["pos_grid"] = [int(x) for x in self.arch.pos_grid]
        return {**arch, "dim": self.dim, "n_classes": self.n_classes, "n_clusters": self.n_clusters,
                "dropout": self.dropout}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        arch_fields = {f.name for f in dataclasses.fields(BackboneArch)}
        arch = {k: v for k, v in data.items() if k in arch_fields}
        arch["name"] = data.get("backbone")
        try:
            arch["pos_grid"] = (int(data["pos_grid"][0]), int(data["pos_grid"][1]))
            return cls(
                BackboneArch(**arch),
                dim=int(data["dim"]),
                n_classes=int(data["n_classes"]),
                n_clusters=int(data["n_clusters"]),
                dropout=float(data.get("dropout", ModelConfig.dropout)),
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise HPSegError(f"checkpoint model spec is incomplete ({exc!r}): re-save it with this hpseg") from exc


class HPModel(nn.Module):
    """Frozen backbone, segmentation head (+ EMA copy), projection head and the two probes.

    Attributes:
        backbone: :class:`~hpseg.backbones.Backbone` (frozen, always eval).
        head: :class:`~hpseg.heads.SegmentationHead` F→D; ``ema_head``: its EMA copy.
        projection: :class:`~hpseg.heads.ProjectionHead` (training only).
        linear_probe: :class:`~hpseg.heads.LinearProbe` D→C; ``cluster_probe``:
            :class:`~hpseg.heads.ClusterProbe` with K centroids.
        spec: :class:`ModelSpec`; class_names: C names; config: the run configuration stored
            with the checkpoint (dict) or None.
        assignment: cluster → class id (−1: none) found on validation data, or None.
        cluster_names: names given to the K clusters (``hpseg name``), or None.
    """

    def __init__(
        self,
        backbone: Backbone,
        spec: ModelSpec,
        class_names: Sequence[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if backbone.embed_dim != spec.arch.embed_dim:
            raise HPSegError(f"spec says F={spec.arch.embed_dim} but the backbone is {backbone.embed_dim} wide")
        self.backbone = backbone
        self.head = SegmentationHead(spec.arch.embed_dim, spec.dim, spec.dropout)
        self.ema_head = EMAHead(self.head)
        self.projection = ProjectionHead(spec.dim)
        self.linear_probe = LinearProbe(spec.dim, spec.n_classes)
        self.cluster_probe = ClusterProbe(spec.dim, spec.n_clusters)
        names = list(class_names) if class_names is not None else [f"class {i}" for i in range(spec.n_classes)]
        if len(names) != spec.n_classes:
            raise HPSegError(f"{len(names)} class names given for {spec.n_classes} classes: pass one name per class")
        self.class_names = [str(n) for n in names]
        self.spec = spec
        self.config = config
        self.assignment: list[int] | None = None
        self.cluster_names: list[str] | None = None

    @classmethod
    def create(
        cls,
        backbone: Backbone,
        *,
        dim: int,
        n_classes: int,
        n_clusters: int | None = None,
        class_names: Sequence[str] | None = None,
        dropout: float = ModelConfig.dropout,
        config: dict[str, Any] | None = None,
    ) -> HPModel:
        """A model with freshly initialised heads on ``backbone`` (K defaults to C)."""
        spec = ModelSpec(backbone.arch, dim, n_classes, n_clusters or n_classes, dropout)
        return cls(backbone, spec, class_names, config)

    @property
    def n_classes(self) -> int:
        """C, the linear probe's classes."""
        return self.linear_probe.n_classes

    @property
    def n_clusters(self) -> int:
        """K, the cluster probe's centroids."""
        return self.cluster_probe.n_clusters

    # -- training ------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, with_attention: bool = True) -> dict[str, torch.Tensor]:
        """Backbone and head outputs, as the training step needs them.

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

    # -- inference: the one path ---------------------------------------------------------------
    def scores(
        self,
        images: torch.Tensor,
        size: tuple[int, int] | None = None,
        heads: Sequence[str] = HEADS,
        refit_centroids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-pixel scores of ``images`` at ``size`` (default: the images' size).

        One backbone pass (no attention), the segmentation head, ``code`` upsampled bilinearly
        (``align_corners=False``) to ``size``, then per pixel:

        * ``"linear"``: the linear probe's logits ``(B, C, H, W)``;
        * ``"cluster"``: cosine similarity to each of the K centroids ``(B, K, H, W)`` — its
          argmax is the cluster probe's assignment, ``log_softmax(2·cos)`` its soft version.

        ``refit_centroids`` ``(K, D)`` adds ``"cluster_refit"``: the cosine similarities to those
        centroids instead of the probe's (the optional refitted cluster probe of evaluation).
        The backbone and head run in the caller's autocast context; upsampling and probes in
        float32. Gradients are not tracked by callers (wrap in ``torch.no_grad()``).
        """
        unknown = [h for h in heads if h not in HEADS]
        if unknown:
            raise HPSegError(f"unknown head {unknown[0]!r}: use 'cluster' or 'linear'")
        if size is None:
            size = (int(images.shape[-2]), int(images.shape[-1]))
        code = self.head(self.backbone.features(images))
        with torch.autocast(images.device.type, enabled=False):
            code = F.interpolate(code.float(), size=tuple(size), mode="bilinear", align_corners=False)
            out: dict[str, torch.Tensor] = {}
            if "linear" in heads:
                out["linear"] = self.linear_probe(code)
            if "cluster" in heads:
                out["cluster"] = self.cluster_probe.cosine(code)
            if refit_centroids is not None:
                centroids = F.normalize(refit_centroids.to(code), dim=1)
                out["cluster_refit"] = torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), centroids)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Linear-probe logits and one-hot cluster assignments at ``size`` (default: image size).

        Returns:
            ``{"linear": (B, C, H, W) logits, "cluster": (B, K, H, W) one-hot}``.
        """
        out = self.scores(images, size)
        cluster = F.one_hot(out["cluster"].argmax(1), self.n_clusters).permute(0, 3, 1, 2).to(out["cluster"].dtype)
        return {"linear": out["linear"], "cluster": cluster}
