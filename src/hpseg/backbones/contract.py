"""What HP needs from a frozen backbone, written down once (docs/method.md §1).

Every family adapter (:mod:`~hpseg.backbones.vit` for timm ``VisionTransformer`` and DINO v1
files, :mod:`~hpseg.backbones.eva` for timm ``Eva``, i.e. DINOv3 and the other RoPE ViTs) is a
:class:`~hpseg.backbones.vit.Backbone` that satisfies :class:`BackboneContract`; the rest of
hpseg (model, training, LHP, feature cache, export) uses nothing else.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

__all__ = ["BackboneContract", "BackboneOutput"]


class BackboneOutput(NamedTuple):
    """``feats`` (B, F, h, w): final-norm patch tokens; ``attn_logits`` (B, heads, 1+h·w, 1+h·w):
    the last block's pre-softmax attention, CLS first, registers removed (None when skipped)."""

    feats: torch.Tensor
    attn_logits: torch.Tensor | None


@runtime_checkable
class BackboneContract(Protocol):
    """A frozen ViT as HP uses it.

    Attributes:
        name: the backbone's name (short name, timm name or a custom label).
        patch_size: p; the patch grid of an ``H × W`` image is ``(H/p, W/p)`` at any size.
        embed_dim: F, the width of the patch features.
        num_heads: heads of the last block's attention (the logits' second axis).
        num_prefix_tokens: CLS + register/storage tokens ahead of the patches (never in the grid).
        num_registers: register/storage tokens only.
        mean, std: the RGB statistics the backbone was trained with. Inputs arrive normalised
            with the ImageNet statistics (``hpseg.imaging``); a backbone trained with other
            statistics re-normalises them itself, so its blocks see its own statistics.

    ``backbone(images (B, 3, H, W), with_attention=True)`` returns :class:`BackboneOutput`:
    ``feats (B, F, H/p, W/p)`` and ``attn_logits (B, heads, 1+h·w, 1+h·w)`` — the last block's
    attention logits ``q·kᵀ·d^-0.5`` exactly as that block computes them (after its rotary
    position encoding, if any), CLS first, register tokens removed. ``features(images)`` is
    ``feats`` alone; ``token_base(h, w)`` caches everything that depends only on the grid
    (resampled positions, RoPE tables), so that a traced graph holds it as a constant.
    """

    name: str
    patch_size: int
    embed_dim: int
    num_heads: int
    num_prefix_tokens: int
    num_registers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: torch.Tensor, with_attention: bool = True) -> BackboneOutput: ...

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def token_base(self, h: int, w: int) -> torch.Tensor: ...
