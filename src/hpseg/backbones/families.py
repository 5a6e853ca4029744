"""The backbone families hpseg supports, and building a timm model into one of them.

Each family is one adapter class (a :class:`~hpseg.backbones.vit.Backbone` subclass) with
``accepts(model)``; :func:`adapt` wraps a timm model in the first family that accepts it, or
fails with one line naming the families supported. Adding a family is one adapter here and
one test.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from hpseg.backbones.eva import TimmEva, fill_absent_qv_biases, prepare_dinov3_state_dict
from hpseg.backbones.registry import is_timm_name, resolve_timm_name
from hpseg.backbones.vit import Backbone, BackboneArch, DinoViT, TimmViT
from hpseg.errors import HPSegError

__all__ = [
    "FAMILIES",
    "adapt",
    "adapt_family",
    "backbone_from_arch",
    "convert_state_dict",
    "require_supported",
    "supported_families",
    "timm_model",
]

#: the adapters, most specific first (DINO v1 files are chosen explicitly, never by shape)
FAMILIES: tuple[type[Backbone], ...] = (TimmEva, TimmViT, DinoViT)


def supported_families() -> str:
    """One line: the families hpseg supports."""
    return "; ".join(f.covers for f in FAMILIES)


def adapt(model: nn.Module, name: str) -> Backbone:
    """``model`` (a timm model) as a frozen :class:`Backbone` of the first family that accepts it.

    Raises:
        HPSegError: no family accepts it — naming the families supported.
    """
    return adapt_family(model, name)(model, name)


def timm_model(name: str, *, pretrained: bool, **kwargs: Any) -> Any:
    """``timm.create_model`` with a dynamic image size and no classifier; short names resolved."""
    import timm

    try:
        return timm.create_model(
            resolve_timm_name(name), pretrained=pretrained, dynamic_img_size=True, num_classes=0, **kwargs
        )
    except TypeError as exc:  # e.g. a CNN: no dynamic_img_size
        raise HPSegError(
            f"backbone {name!r} cannot be built as a ViT with a dynamic image size ({exc}): pick a ViT with a "
            f"CLS token from the supported families ({supported_families()})"
        ) from exc


def require_supported(name: str, **kwargs: Any) -> None:
    """Fail fast (before any download) when the timm model ``name`` is of no supported family:
    it is built on the ``meta`` device (no memory, no weights) and checked."""
    with torch.device("meta"):
        model = timm_model(name, pretrained=False, **kwargs)
    adapt_family(model, name)


def adapt_family(model: nn.Module, name: str) -> type[Backbone]:
    """The family (adapter class) of ``model``.

    Raises:
        HPSegError: no family accepts it — naming the families supported.
    """
    for family in FAMILIES:
        if family is not DinoViT and family.accepts(model):
            if getattr(model, "cls_token", None) is None:
                raise HPSegError(
                    f"backbone {name!r} has no CLS token: HP needs a ViT with a class token (e.g. "
                    "dinov3_vits16, vit_small_patch14_reg4_dinov2)"
                )
            return family
    raise HPSegError(
        f"backbone {name!r} is a timm {type(model).__name__}, which HP cannot use: pick a ViT with a "
        f"CLS token from the supported families ({supported_families()})"
    )


def convert_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict in any layout timm converts for ``model``'s class (timm's own, Meta's
    DINOv2/DINOv3 releases, …) in ``model``'s key naming, via the model module's
    ``checkpoint_filter_fn``."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    sd = prepare_dinov3_state_dict(sd, model)
    if filter_fn is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # timm prints while converting some layouts
            sd = filter_fn(dict(sd), model)
    return fill_absent_qv_biases(sd, model)  # no-op unless the model has separate q/v biases (Eva)


def backbone_from_arch(arch: BackboneArch, *, init: bool = True) -> Backbone:
    """A backbone of architecture ``arch`` whose weights are loaded separately.

    ``init=False`` skips timm's weight initialisation (for DINO-family backbones), for speed
    when the weights are about to be overwritten anyway.
    """
    if arch.dino_family:
        from timm.models.vision_transformer import VisionTransformer

        if arch.pos_grid[0] != arch.pos_grid[1]:
            raise HPSegError(f"DINO-family backbones need a square position grid, got {arch.pos_grid}")
        vit = VisionTransformer(
            img_size=arch.pos_grid[0] * arch.patch_size,
            patch_size=arch.patch_size,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=arch.mlp_ratio,
            qkv_bias=arch.qkv_bias,
            init_values=1.0 if arch.layer_scale else None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=0,
            dynamic_img_size=True,
            weight_init="" if init else "skip",
        )
        return DinoViT(vit, arch.name)
    if not is_timm_name(arch.name):
        raise HPSegError(f"{arch.name!r} is neither a DINO-family backbone nor a timm model name")
    vit = timm_model(
        arch.name,
        pretrained=False,
        img_size=(arch.pos_grid[0] * arch.patch_size, arch.pos_grid[1] * arch.patch_size),
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
    )
    return adapt(vit, arch.name)
