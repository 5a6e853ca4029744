"""Frozen ViT backbones: DINO weights (official, training checkpoints, the authors' files),
the shipped demo ViT, DINOv3 (timm or Meta's files) and other timm ViTs (docs/method.md §1).

* :mod:`~hpseg.backbones.contract` — what HP needs from a backbone (:class:`BackboneContract`);
* :mod:`~hpseg.backbones.registry` — short names and where their weights come from;
* :mod:`~hpseg.backbones.weights` — downloads, weight files and their layouts, offline errors;
* :mod:`~hpseg.backbones.vit` — the :class:`Backbone` module shared by every family, the timm
  ``VisionTransformer`` and DINO v1 adapters (DINO's position-embedding rule);
* :mod:`~hpseg.backbones.eva` — the timm ``Eva`` adapter (DINOv3: RoPE, storage tokens);
* :mod:`~hpseg.backbones.families` — the supported families, wrapping a timm model in one;
* this module — :func:`build_backbone`, which puts them together.
"""

from __future__ import annotations

import http.client
import logging
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hpseg.backbones.contract import BackboneContract, BackboneOutput
from hpseg.backbones.eva import TimmEva
from hpseg.backbones.families import (
    FAMILIES,
    adapt,
    backbone_from_arch,
    convert_state_dict,
    require_supported,
    supported_families,
    timm_model,
)
from hpseg.backbones.registry import (
    DEMO,
    DEMO_ASSET,
    DEMO_BACKBONE,
    DINO_BASE_URL,
    DINO_WEIGHTS,
    DINOV3_WEIGHTS,
    available_backbones,
    is_timm_name,
    resolve_timm_name,
)
from hpseg.backbones.vit import Backbone, BackboneArch, DinoViT, TimmViT, dino_interpolate_pos_embed
from hpseg.backbones.weights import (
    cached_meta_file,
    check_timm_weights_reachable,
    demo_weights,
    download_dino,
    infer_dino_arch,
    load_weights_file,
    normalize_state_dict,
)
from hpseg.errors import HPSegError

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_BACKBONE",
    "DINOV3_WEIGHTS",
    "DINO_BASE_URL",
    "DINO_WEIGHTS",
    "FAMILIES",
    "Backbone",
    "BackboneArch",
    "BackboneContract",
    "BackboneOutput",
    "DinoViT",
    "TimmEva",
    "TimmViT",
    "adapt",
    "available_backbones",
    "backbone_from_arch",
    "build_backbone",
    "dino_interpolate_pos_embed",
    "supported_families",
    "infer_dino_arch",
    "load_weights_file",
    "normalize_state_dict",
]


def _load_strict(backbone: Backbone, sd: Mapping[str, torch.Tensor], source: str) -> None:
    own = backbone.vit.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing:
        raise HPSegError(
            f"{source} lacks {len(missing)} backbone weights (e.g. {', '.join(missing[:3])}): "
            f"it does not fit {backbone.name}; pass the matching backbone name or weights file"
        )
    if unexpected:
        log.warning(
            "%s: ignoring %d unexpected keys (e.g. %s)", source, len(unexpected), ", ".join(unexpected[:3])
        )
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise HPSegError(
            f"{source}: weight {k} has shape {tuple(sd[k].shape)} but {backbone.name} expects "
            f"{tuple(own[k].shape)}; pass the matching backbone name"
        )
    backbone.vit.load_state_dict({k: sd[k] for k in own}, strict=True)
    backbone.token_bases_clear()


def _dino_backbone(
    name: str, sd: Mapping[str, torch.Tensor], source: str, num_heads: int | None, *, official: bool = False
) -> Backbone:
    """A DINO-family backbone shaped by ``sd``.

    A registry ``name`` whose width/patch contradict user-given weights is only a label: the
    weights win (with a warning; the backbone is renamed to what they are). For the official
    DINO weights (download, hub cache) a contradiction is an error. The demo ViT's shape is
    whatever its shipped file holds.
    """
    reg = DINO_WEIGHTS.get(name)
    shape = infer_dino_arch(sd, name, num_heads or 1)
    if reg is not None and (shape.embed_dim, shape.patch_size) != (reg.embed_dim, reg.patch_size):
        fits = [
            n
            for n, r in DINO_WEIGHTS.items()
            if (r.embed_dim, r.patch_size, r.depth) == (shape.embed_dim, shape.patch_size, shape.depth)
        ]
        message = (
            f"{source} holds a {shape.embed_dim}-wide ViT with patch {shape.patch_size}, but {name} is "
            f"{reg.embed_dim}-wide with patch {reg.patch_size}"
        )
        if official:
            raise HPSegError(f"{message}: delete the file and download it again, or pass weights=PATH")
        new_name = fits[0] if fits else "dino_custom"
        log.warning("%s; building the backbone the weights describe, named %s", message, new_name)
        name, reg = new_name, DINO_WEIGHTS.get(new_name)
    if num_heads is None and reg is not None:
        num_heads = reg.num_heads
    arch = infer_dino_arch(sd, name, num_heads)
    backbone = backbone_from_arch(arch, init=False)
    _load_strict(backbone, sd, source)
    return backbone


def _timm_backbone(
    name: str, sd: Mapping[str, torch.Tensor] | None, source: str, pretrained: bool, kwargs: dict[str, Any]
) -> Backbone:
    """A timm-built backbone: random, timm's pretrained weights, Meta's file in the torch hub
    cache (DINOv3 short names), or ``sd`` in any layout timm converts."""
    release = DINOV3_WEIGHTS.get(name)
    if sd is None and pretrained and release is not None:
        meta = cached_meta_file(release)
        if meta is not None:
            log.info("%s: using Meta's weights file %s", name, meta)
            sd, source = load_weights_file(meta), str(meta)
    if sd is None:
        if pretrained:
            require_supported(name, **kwargs)  # before naming files to download for it
            check_timm_weights_reachable(resolve_timm_name(name), release, label=name)
        try:
            vit = timm_model(name, pretrained=pretrained, **kwargs)
        except (OSError, urllib.error.URLError, http.client.HTTPException, RuntimeError) as exc:
            if not pretrained:
                raise
            raise HPSegError(
                f"cannot fetch the pretrained timm weights of {name} ({type(exc).__name__}: {exc}); "
                "connect to the Hugging Face hub once (weights are cached), or pass weights=PATH"
            ) from exc
        return adapt(vit, name)
    vit = timm_model(name, pretrained=False, **kwargs)
    backbone = adapt(vit, name)
    _load_strict(backbone, convert_state_dict(sd, vit), source)
    return backbone


def build_backbone(
    name: str,
    weights: str | Path | None = None,
    *,
    pretrained: bool = True,
    img_size: int = 224,
    state_dict: Mapping[str, Any] | None = None,
    num_heads: int | None = None,
    timm_kwargs: dict[str, Any] | None = None,
) -> Backbone:
    """A frozen backbone by name.

    Args:
        name: ``dino_vits8`` | ``dino_vits16`` | ``dino_vitb8`` | ``dino_vitb16`` (official DINO),
            ``hpseg_demo_vit`` (shipped tiny ViT), a DINOv3 short name (``dinov3_vits16`` …,
            :data:`DINOV3_WEIGHTS`), any timm model name of a supported family (e.g.
            ``vit_small_patch14_reg4_dinov2``, ``vit_small_patch16_dinov3``), or any name for a
            DINO-style ``state_dict``.
        weights: local weights file (plain/DINO-training/wrapped state dict, ``.safetensors``,
            the authors' ``ckpt.pth``, Meta's official DINOv2/DINOv3 files); overrides the download.
        pretrained: with no ``weights``/``state_dict``: load the official weights (download or
            torch-hub cache; for DINOv3 short names Meta's file in the torch-hub cache first, then
            the timm hub). False = random initialisation.
        img_size: position grid size (pixels) of randomly initialised DINO-family backbones.
        state_dict: raw weights (e.g. the ``model.*`` part of the authors' checkpoint); the
            architecture is read from it.
        num_heads: attention heads when they cannot be read from the weights.
        timm_kwargs: extra ``timm.create_model`` arguments for timm names.

    Raises:
        HPSegError: unknown name, unreadable or mismatching weights, weights unavailable offline.
    """
    timm_kwargs = dict(timm_kwargs or {})
    is_dino = name in DINO_WEIGHTS or name == DEMO_BACKBONE
    if state_dict is not None or weights is not None:
        if state_dict is not None:
            sd, source = normalize_state_dict(state_dict), "the given state dict"
        else:
            assert weights is not None
            sd, source = load_weights_file(weights), str(weights)
        if not is_dino and is_timm_name(name):
            return _timm_backbone(name, sd, source, pretrained, timm_kwargs)
        return _dino_backbone(name, sd, source, num_heads)
    if name == DEMO_BACKBONE:
        if pretrained:
            return _dino_backbone(
                name, demo_weights(), f"hpseg/assets/{DEMO_ASSET}", num_heads or DEMO.num_heads
            )
        reg = DEMO
    elif name in DINO_WEIGHTS:
        reg = DINO_WEIGHTS[name]
        if pretrained:
            assert reg.file_name is not None
            return _dino_backbone(name, download_dino(name, reg), reg.file_name, num_heads, official=True)
    elif is_timm_name(name):
        return _timm_backbone(name, None, name, pretrained, timm_kwargs)
    else:
        raise HPSegError(
            f"unknown backbone {name!r}: use one of {', '.join(available_backbones())} or a timm model name "
            f"of a supported family ({supported_families()})"
        )
    if img_size % reg.patch_size:
        p = reg.patch_size
        raise HPSegError(f"data.resolution={img_size} is not a multiple of the patch size {p} of {name}: set "
                         f"data.resolution={max(p, round(img_size / p) * p)} (any multiple of {p})")
    grid = img_size // reg.patch_size
    arch = BackboneArch(
        name, reg.patch_size, reg.embed_dim, reg.depth, num_heads or reg.num_heads, (grid, grid)
    )
    return backbone_from_arch(arch)
