"""Backbone names hpseg knows by heart: the official DINO ViTs and the shipped demo ViT.

Any timm ViT name (``vit_small_patch14_dinov2``, ``vit_base_patch14_reg4_dinov2``, …) works
too; :func:`is_timm_name` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEMO_ASSET",
    "DEMO_BACKBONE",
    "DINO_BASE_URL",
    "DINO_WEIGHTS",
    "Registered",
    "available_backbones",
    "heads_for_width",
    "is_timm_name",
]

DINO_BASE_URL = "https://dl.fbaipublicfiles.com/dino/"


@dataclass(frozen=True)
class Registered:
    """A backbone with built-in weights: its shape and where the weights come from."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    url_path: str | None  # relative to DINO_BASE_URL; None = shipped in the package
    img_size: int

    @property
    def file_name(self) -> str | None:
        """The weights file's name (the hub cache keeps it under this name)."""
        return None if self.url_path is None else self.url_path.rsplit("/", 1)[-1]


#: official DINO checkpoints (ViT-S/8 is the HP default)
DINO_WEIGHTS: dict[str, Registered] = {
    "dino_vits8": Registered(8, 384, 12, 6, "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth", 224),
    "dino_vits16": Registered(16, 384, 12, 6, "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", 224),
    "dino_vitb8": Registered(8, 768, 12, 12, "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", 224),
    "dino_vitb16": Registered(16, 768, 12, 12, "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", 224),
}
#: the tiny self-supervised ViT shipped in the package (``hpseg demo``; works offline)
DEMO_BACKBONE = "hpseg_demo_vit"
DEMO = Registered(8, 192, 4, 3, None, 96)
DEMO_ASSET = "demo_vit.safetensors"

#: DINO heads by width (head dim 64 otherwise)
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}


def available_backbones() -> list[str]:
    """Names with built-in weights; any timm ViT name (e.g. ``vit_small_patch14_dinov2``) works too."""
    return [*DINO_WEIGHTS, DEMO_BACKBONE]


def heads_for_width(width: int) -> int | None:
    """Attention heads of a DINO ViT of this width (None when it cannot be told)."""
    if width in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[width]
    return width // 64 if width % 64 == 0 else None


def is_timm_name(name: str) -> bool:
    """Whether ``name`` is a timm model name."""
    import timm

    return bool(timm.is_model(name))
