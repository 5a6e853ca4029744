"""Frozen ViT backbones: DINO weights (official, training checkpoints, the authors' files),
the shipped demo ViT, and other timm ViTs (hp-method §1).

Every backbone is a timm :class:`~timm.models.vision_transformer.VisionTransformer` wrapped in
:class:`Backbone`, which returns the final-norm patch features and the last block's
pre-softmax attention logits (computed from that block's ``qkv`` projection, because timm's
fused attention never materialises them).

Position embeddings: DINO-family weights (``dino_*`` names, the authors' checkpoints, the demo
ViT) are resampled with DINO's own rule (bicubic by *scale factor* ``(h + 0.1)/√N``), so that
features match the authors' evaluation at other resolutions; other timm models use timm's
``dynamic_img_size`` resampling.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import logging
import math
import re
import urllib.error
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.errors import HPSegError

log = logging.getLogger(__name__)

__all__ = [
    "DINO_BASE_URL",
    "DINO_WEIGHTS",
    "DEMO_BACKBONE",
    "Backbone",
    "BackboneArch",
    "BackboneOutput",
    "available_backbones",
    "backbone_from_arch",
    "build_backbone",
    "dino_interpolate_pos_embed",
    "infer_dino_arch",
    "load_weights_file",
    "normalize_state_dict",
]

DINO_BASE_URL = "https://dl.fbaipublicfiles.com/dino/"


@dataclass(frozen=True)
class _Registered:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    url_path: str | None  # relative to DINO_BASE_URL; None = shipped in the package
    img_size: int


#: official DINO checkpoints (ViT-S/8 is the HP default) and the shipped demo ViT
DINO_WEIGHTS: dict[str, _Registered] = {
    "dino_vits8": _Registered(
        8, 384, 12, 6, "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth", 224
    ),
    "dino_vits16": _Registered(
        16, 384, 12, 6, "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth", 224
    ),
    "dino_vitb8": _Registered(8, 768, 12, 12, "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth", 224),
    "dino_vitb16": _Registered(16, 768, 12, 12, "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth", 224),
}
DEMO_BACKBONE = "hpseg_demo_vit"
_DEMO = _Registered(8, 192, 4, 3, None, 96)
_DEMO_ASSET = "demo_vit.safetensors"

#: DINO heads by width (head dim 64 otherwise)
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16}


def available_backbones() -> list[str]:
    """Names with built-in weights; any timm ViT name (e.g. ``vit_small_patch14_dinov2``) works too."""
    return [*DINO_WEIGHTS, DEMO_BACKBONE]


# ------------------------------------------------------------------------------------------
# architecture description
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneArch:
    """Everything needed to rebuild a backbone's modules without its weights file.

    ``dino_family`` backbones are built as a plain timm ``VisionTransformer`` from these fields
    and use DINO's position-embedding rule; the others are ``timm.create_model(name, ...)``.
    """

    name: str
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


class BackboneOutput(NamedTuple):
    """``feats`` (B, F, h, w): final-norm patch tokens; ``attn_logits`` (B, heads, 1+h·w, 1+h·w):
    the last block's pre-softmax attention, CLS first, registers removed (None when skipped)."""

    feats: torch.Tensor
    attn_logits: torch.Tensor | None


# ------------------------------------------------------------------------------------------
# position embeddings (DINO's rule)
# ------------------------------------------------------------------------------------------


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO's position-embedding resampling for an ``h × w`` patch grid.

    Args:
        pos_embed: ``(1, 1 + N, C)``, CLS first, then a square ``√N × √N`` grid.
        h, w: patch grid of the input (rows, columns).

    Returns:
        ``(1, 1 + h·w, C)``; ``pos_embed`` itself when the grid already is ``h × w``.
        Otherwise the patch part is resampled bicubically by *scale factor*
        ``((h + 0.1)/√N, (w + 0.1)/√N)`` (``align_corners=False``, no antialiasing), as DINO does.
    """
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise HPSegError(
            f"DINO position embeddings need a square grid, got {n} positions: use a timm model name"
        )
    if h == side and w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (h, w):  # pragma: no cover - guarded by the +0.1 margin
        raise RuntimeError(f"DINO position interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
    patch = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat((pos_embed[:, :1], patch), dim=1)


# ------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A frozen ViT (always in eval mode, no trainable parameters).

    Attributes:
        name: backbone name (registry, timm or custom).
        patch_size, embed_dim (F), num_heads, depth.
        num_prefix_tokens: CLS + register tokens; num_registers: register tokens only.
        pos_grid: the stored position grid ``(rows, cols)``.
        dino_family: True when DINO's position-embedding rule is used.
    """

    vit: Any  # a timm VisionTransformer (typed loosely: timm's attributes are dynamic)

    def __init__(self, vit: nn.Module, name: str, *, dino_family: bool) -> None:
        super().__init__()
        v: Any = vit
        if getattr(v, "cls_token", None) is None:
            raise HPSegError(f"backbone {name!r} has no CLS token: HP needs a ViT with a class token")
        blocks: Any = getattr(v, "blocks", None)
        if blocks is None or len(blocks) == 0 or not hasattr(blocks[-1].attn, "qkv"):
            raise HPSegError(f"backbone {name!r} is not a timm VisionTransformer with fused qkv attention")
        self.vit = v
        self.name = name
        self.dino_family = dino_family
        pe: Any = v.patch_embed
        ps = pe.patch_size
        ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
        if ps[0] != ps[1]:
            raise HPSegError(
                f"backbone {name!r} has non-square patches {ps}; only square patches are supported"
            )
        self.patch_size = int(ps[0])
        self.embed_dim = int(v.embed_dim)
        self.depth = len(blocks)
        last = blocks[-1]
        self.num_heads = int(last.attn.num_heads)
        self.num_prefix_tokens = int(getattr(v, "num_prefix_tokens", 1))
        self.num_registers = int(getattr(v, "num_reg_tokens", 0))
        if dino_family:
            if self.num_prefix_tokens != 1 or getattr(v, "no_embed_class", False) or v.pos_embed is None:
                raise HPSegError(
                    f"backbone {name!r}: DINO position embeddings need CLS-only, class-embedded positions"
                )
            side = math.isqrt(v.pos_embed.shape[1] - 1)
            self.pos_grid: tuple[int, int] = (side, side)
        else:
            if not getattr(v, "dynamic_img_size", False):
                raise HPSegError(f"backbone {name!r} must be created with dynamic_img_size=True")
            gs = pe.grid_size
            self.pos_grid = (int(gs[0]), int(gs[1]))
        self.mlp_ratio = float(last.mlp.fc1.out_features / self.embed_dim)
        self.qkv_bias = last.attn.qkv.bias is not None
        self.layer_scale = not isinstance(getattr(last, "ls1", nn.Identity()), nn.Identity)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    # -- frozen -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Backbone:
        """Backbones stay in eval mode whatever ``mode`` is (no dropout / drop-path ever)."""
        return super().train(False)

    @property
    def arch(self) -> BackboneArch:
        """The architecture, for rebuilding this backbone without its weights file."""
        return BackboneArch(
            name=self.name,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            pos_grid=self.pos_grid,
            num_registers=self.num_registers,
            dino_family=self.dino_family,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            layer_scale=self.layer_scale,
        )

    # -- forward ------------------------------------------------------------------------------
    def _tokens(self, images: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Patch + prefix tokens with position embeddings, ``(B, T, F)``, before the blocks."""
        vit = self.vit
        if self.dino_family:
            pe = vit.patch_embed
            x = pe.proj(images).flatten(2).transpose(1, 2)  # (B, h·w, F)
            x = pe.norm(x)
            cls = vit.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat((cls, x), dim=1) + dino_interpolate_pos_embed(vit.pos_embed, h, w)
            x = vit.pos_drop(x)
        else:
            x = vit.patch_embed(images)  # dynamic_img_size: (B, h, w, F)
            x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def attention_logits(self, block: Any, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax attention ``(q·kᵀ)·d^-0.5`` of ``block`` on its input tokens ``x`` (B, T, F).

        Returns ``(B, heads, 1+h·w, 1+h·w)``: CLS first, register tokens dropped.
        """
        attn = block.attn
        b, t, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if self.num_prefix_tokens > 1:
            keep = torch.cat(
                (torch.zeros(1, dtype=torch.long), torch.arange(self.num_prefix_tokens, t, dtype=torch.long))
            ).to(logits.device)
            logits = logits.index_select(2, keep).index_select(3, keep)
        return logits

    def forward(self, images: torch.Tensor, with_attention: bool = True) -> BackboneOutput:
        """Features and last-block attention logits of ``images``.

        Args:
            images: ``(B, 3, H, W)``, normalised; H and W multiples of ``patch_size``.
            with_attention: False skips the attention logits (``attn_logits`` is None).

        Returns:
            :class:`BackboneOutput` with ``feats (B, F, H/p, W/p)`` and
            ``attn_logits (B, heads, 1+h·w, 1+h·w)``.
        """
        if images.ndim != 4:
            raise HPSegError(f"backbone input must be (B, 3, H, W), got shape {tuple(images.shape)}")
        b, _, hh, ww = images.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise HPSegError(
                f"image size {hh}×{ww} is not a multiple of the patch size {p}: resize or crop to a multiple of {p}"
            )
        h, w = hh // p, ww // p
        x = self._tokens(images, h, w)
        blocks = self.vit.blocks
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        attn_logits = self.attention_logits(last, x) if with_attention else None
        x = self.vit.norm(last(x))
        feats = x[:, self.num_prefix_tokens :].reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return BackboneOutput(feats, attn_logits)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, patch={self.patch_size}, dim={self.embed_dim}, depth={self.depth}, "
            f"heads={self.num_heads}, registers={self.num_registers}, pos_grid={self.pos_grid}"
        )


# ------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sd.items():
        k = key
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "backbone.", "_orig_mod."):
                if k.startswith(prefix):
                    k = k[len(prefix) :]
                    changed = True
        out[k] = value
    return out


def normalize_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A ViT state dict in DINO/timm key naming from any of the supported layouts.

    Accepts a plain state dict, a DINO training checkpoint (``{"teacher": {"module.backbone.…"}}``),
    ``{"model": …}`` / ``{"state_dict": …}`` wrappers and the authors' HP ``ckpt.pth``
    (``net_model_state_dict["model.…"]``). ``module.``/``backbone.`` prefixes and DINO's projection
    head (``head.*``) are removed.
    """
    if not isinstance(obj, Mapping):
        raise HPSegError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    if isinstance(obj.get("net_model_state_dict"), Mapping):  # the authors' HP checkpoint
        net = obj["net_model_state_dict"]
        obj = {k[len("model.") :]: v for k, v in net.items() if k.startswith("model.")}
    else:
        for wrapper in ("teacher", "model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    sd = _strip_prefixes(obj)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.startswith("head.")}


def _allow_namespace() -> contextlib.AbstractContextManager[Any]:
    """Allow ``argparse.Namespace`` (the ``args`` of DINO training checkpoints) in weights_only loads."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (``.pth``/``.pt`` via ``torch.load(weights_only=True)``, or
    ``.safetensors``) and :func:`normalize_state_dict` it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HPSegError(f"backbone weights file {path} does not exist: check the path given as weights=")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return normalize_state_dict(load_file(str(path), device="cpu"))
        except Exception as exc:  # safetensors raises its own error types
            raise HPSegError(
                f"cannot read {path} as safetensors ({exc}): re-download or re-export it"
            ) from exc
    try:
        with _allow_namespace():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HPSegError(
            f"cannot load {path} with torch.load(weights_only=True) ({type(exc).__name__}: {exc}): "
            "pass a plain state dict / DINO checkpoint saved by torch.save"
        ) from exc
    return normalize_state_dict(obj)


def _download_dino(name: str, url_path: str) -> dict[str, torch.Tensor]:
    """The official DINO weights: torch hub cache first, then a download."""
    url = DINO_BASE_URL + url_path
    file_name = url_path.rsplit("/", 1)[-1]
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = ckpt_dir / file_name
    if cached.is_file():
        return load_weights_file(cached)
    try:
        log.info("downloading %s weights from %s", name, url)
        sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
        raise HPSegError(
            f"cannot download the {name} weights {file_name} from {url} ({exc}); "
            f"download it elsewhere and put it in {ckpt_dir}, or pass weights=PATH"
        ) from exc
    return normalize_state_dict(sd)


def _demo_weights() -> dict[str, torch.Tensor]:
    res = resources.files("hpseg") / "assets" / _DEMO_ASSET
    if not res.is_file():
        raise HPSegError(
            f"the demo backbone weights hpseg/assets/{_DEMO_ASSET} are missing: "
            "create them with `python scripts/pretrain_demo_backbone.py`"
        )
    return load_weights_file(Path(str(res)))


# ------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------


def infer_dino_arch(
    sd: Mapping[str, torch.Tensor], name: str = "dino_custom", num_heads: int | None = None
) -> BackboneArch:
    """A DINO-style ViT architecture read from its state dict (DINO/timm key naming).

    Embed dim from ``cls_token``/``pos_embed``, depth from the block indices, patch size from
    ``patch_embed.proj.weight``, position grid from ``pos_embed`` (CLS + square grid), heads
    from ``num_heads`` or the width (6 for 384, 12 for 768, …, else width/64).
    """
    required = ("pos_embed", "cls_token", "patch_embed.proj.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise HPSegError(
            f"the state dict is not a DINO ViT (missing {', '.join(missing)}): "
            "pass a DINO checkpoint or a timm model name"
        )
    if "reg_token" in sd:
        raise HPSegError("the state dict has register tokens: build it with its timm model name instead")
    embed_dim = int(sd["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise HPSegError("the state dict has no transformer blocks (blocks.N.*): is it a ViT checkpoint?")
    depth = max(blocks) + 1
    pw = sd["patch_embed.proj.weight"]
    if pw.ndim != 4 or pw.shape[-1] != pw.shape[-2]:
        raise HPSegError(f"unsupported patch embedding weight of shape {tuple(pw.shape)}")
    n = int(sd["pos_embed"].shape[1]) - 1
    side = math.isqrt(n)
    if side * side != n:
        raise HPSegError(f"pos_embed holds {n} patch positions, not a square grid: use a timm model name")
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(embed_dim)
        if num_heads is None:
            if embed_dim % 64:
                raise HPSegError(
                    f"cannot infer the number of heads of a {embed_dim}-wide ViT: pass num_heads="
                )
            num_heads = embed_dim // 64
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0] / embed_dim) if fc1 is not None else 4.0
    return BackboneArch(
        name=name,
        patch_size=int(pw.shape[-1]),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=int(num_heads),
        pos_grid=(side, side),
        num_registers=0,
        dino_family=True,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layer_scale="blocks.0.ls1.gamma" in sd,
    )


def _is_timm_name(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _timm_model(name: str, *, pretrained: bool, **kwargs: Any) -> Any:
    import timm

    return timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, num_classes=0, **kwargs)


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
        return Backbone(vit, arch.name, dino_family=True)
    if not _is_timm_name(arch.name):
        raise HPSegError(f"{arch.name!r} is neither a DINO-family backbone nor a timm model name")
    vit = _timm_model(
        arch.name,
        pretrained=False,
        img_size=(arch.pos_grid[0] * arch.patch_size, arch.pos_grid[1] * arch.patch_size),
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
    )
    return Backbone(vit, arch.name, dino_family=False)


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
    if sd is None:
        try:
            vit = _timm_model(name, pretrained=pretrained, **kwargs)
        except (OSError, urllib.error.URLError, http.client.HTTPException, RuntimeError) as exc:
            if not pretrained:
                raise
            raise HPSegError(
                f"cannot fetch the pretrained timm weights of {name} ({type(exc).__name__}: {exc}); "
                "connect to the Hugging Face hub once (weights are cached), or pass weights=PATH"
            ) from exc
        return Backbone(vit, name, dino_family=False)
    from timm.models.vision_transformer import checkpoint_filter_fn

    vit = _timm_model(name, pretrained=False, **kwargs)
    filtered = checkpoint_filter_fn(dict(sd), vit)
    backbone = Backbone(vit, name, dino_family=False)
    _load_strict(backbone, filtered, source)
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
            ``hpseg_demo_vit`` (shipped tiny ViT), any timm ViT name (e.g.
            ``vit_small_patch14_reg4_dinov2``), or any name for a DINO-style ``state_dict``.
        weights: local weights file (plain/DINO-training/wrapped state dict, ``.safetensors``,
            or the authors' ``ckpt.pth``); overrides the download.
        pretrained: with no ``weights``/``state_dict``: load the official weights (download or
            torch-hub cache; timm hub for timm names). False = random initialisation.
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
        if not is_dino and _is_timm_name(name):
            return _timm_backbone(name, sd, source, pretrained, timm_kwargs)
        return _dino_backbone(name, sd, source, num_heads)
    if name == DEMO_BACKBONE:
        if pretrained:
            return _dino_backbone(
                name, _demo_weights(), f"hpseg/assets/{_DEMO_ASSET}", num_heads or _DEMO.num_heads
            )
        reg = _DEMO
    elif name in DINO_WEIGHTS:
        reg = DINO_WEIGHTS[name]
        if pretrained:
            assert reg.url_path is not None
            file_name = reg.url_path.rsplit("/", 1)[-1]
            return _dino_backbone(
                name, _download_dino(name, reg.url_path), file_name, num_heads, official=True
            )
    elif _is_timm_name(name):
        return _timm_backbone(name, None, name, pretrained, timm_kwargs)
    else:
        raise HPSegError(
            f"unknown backbone {name!r}: use one of {', '.join(available_backbones())} or a timm ViT name "
            "(e.g. vit_small_patch14_dinov2)"
        )
    if img_size % reg.patch_size:
        raise HPSegError(f"img_size {img_size} is not a multiple of the patch size {reg.patch_size}")
    grid = img_size // reg.patch_size
    arch = BackboneArch(
        name, reg.patch_size, reg.embed_dim, reg.depth, num_heads or reg.num_heads, (grid, grid)
    )
    return backbone_from_arch(arch)
