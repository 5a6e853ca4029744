"""Backbone names hpseg knows by heart: the official DINO ViTs, the shipped demo ViT and the
DINOv3 short names (Meta's web LVD-1689M and satellite SAT-493M releases, built by timm).

Any timm ViT name (``vit_small_patch14_dinov2``, ``vit_base_patch14_reg4_dinov2``,
``vit_small_patch16_dinov3``, …) works too; :func:`is_timm_name` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEMO_ASSET",
    "DEMO_BACKBONE",
    "DINO_BASE_URL",
    "DINOV3_WEIGHTS",
    "DINOV3_REPO",
    "DINO_WEIGHTS",
    "Registered",
    "TimmRelease",
    "available_backbones",
    "heads_for_width",
    "is_timm_name",
    "resolve_timm_name",
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

DINOV3_REPO = "https://github.com/facebookresearch/dinov3"


@dataclass(frozen=True)
class TimmRelease:
    """A short name for a timm model with released weights.

    ``timm_name``: the timm model and its pretrained tag (the hub weights timm downloads);
    ``meta_file``: the start of the official file's name in Meta's release (a hash follows);
    ``release``: what the weights were trained on.
    """

    timm_name: str
    meta_file: str
    release: str


_WEB, _SAT = "web images (LVD-1689M)", "satellite images (SAT-493M)"
#: DINOv3 (RoPE, 4 storage tokens, patch 16). The ``_qkvb`` timm variants keep the q/v biases of
#: Meta's files, so an official file loads exactly (7B has no such variant).
DINOV3_WEIGHTS: dict[str, TimmRelease] = {
    "dinov3_vits16": TimmRelease("vit_small_patch16_dinov3_qkvb.lvd1689m", "dinov3_vits16_pretrain_lvd1689m", _WEB),
    "dinov3_vitsp16": TimmRelease(
        "vit_small_plus_patch16_dinov3_qkvb.lvd1689m", "dinov3_vits16plus_pretrain_lvd1689m", _WEB
    ),
    "dinov3_vitb16": TimmRelease("vit_base_patch16_dinov3_qkvb.lvd1689m", "dinov3_vitb16_pretrain_lvd1689m", _WEB),
    "dinov3_vitl16": TimmRelease("vit_large_patch16_dinov3_qkvb.lvd1689m", "dinov3_vitl16_pretrain_lvd1689m", _WEB),
    "dinov3_vith16p": TimmRelease(
        "vit_huge_plus_patch16_dinov3_qkvb.lvd1689m", "dinov3_vith16plus_pretrain_lvd1689m", _WEB
    ),
    "dinov3_vit7b16": TimmRelease("vit_7b_patch16_dinov3.lvd1689m", "dinov3_vit7b16_pretrain_lvd1689m", _WEB),
    "dinov3_vitl16_sat493m": TimmRelease(
        "vit_large_patch16_dinov3_qkvb.sat493m", "dinov3_vitl16_pretrain_sat493m", _SAT
    ),
    "dinov3_vit7b16_sat493m": TimmRelease("vit_7b_patch16_dinov3.sat493m", "dinov3_vit7b16_pretrain_sat493m", _SAT),
}

#: DINO heads by width (head dim 64 otherwise)
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}


def available_backbones() -> list[str]:
    """Short names; any timm ViT name (e.g. ``vit_small_patch14_dinov2``) works too."""
    return [*DINO_WEIGHTS, DEMO_BACKBONE, *DINOV3_WEIGHTS]


def resolve_timm_name(name: str) -> str:
    """The timm model name (with its pretrained tag) of a short name; other names unchanged."""
    release = DINOV3_WEIGHTS.get(name)
    return release.timm_name if release is not None else name


def heads_for_width(width: int) -> int | None:
    """Attention heads of a DINO ViT of this width (None when it cannot be told)."""
    if width in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[width]
    return width // 64 if width % 64 == 0 else None


def is_timm_name(name: str) -> bool:
    """Whether ``name`` is a timm model name or a short name of one."""
    import timm

    return bool(timm.is_model(resolve_timm_name(name)))
