"""The frozen ViT module: patch features and the last block's attention logits.

Every backbone is a timm :class:`~timm.models.vision_transformer.VisionTransformer` wrapped in
:class:`Backbone`, which returns the final-norm patch features and the last block's
pre-softmax attention logits (computed from that block's ``qkv`` projection, because timm's
fused attention never materialises them; docs/method.md §1).

Position embeddings: DINO-family weights (``dino_*`` names, the authors' checkpoints, the demo
ViT) are resampled with DINO's own rule (bicubic by *scale factor* ``(h + 0.1)/√N``), so that
features match the authors' evaluation at other resolutions; other timm models use timm's
``dynamic_img_size`` resampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.errors import HPSegError

__all__ = ["Backbone", "BackboneArch", "BackboneOutput", "backbone_from_arch", "dino_interpolate_pos_embed"]


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
        self._token_bases: dict[tuple[int, int], torch.Tensor] = {}
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
    def token_bases_clear(self) -> None:
        """Forget the cached token bases (after the weights changed)."""
        self._token_bases.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> Backbone:  # .to(), .half(), …
        self._token_bases.clear()
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._token_bases.clear()
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def token_base(self, h: int, w: int) -> torch.Tensor:
        """``(1, prefix + h·w, F)``: the token sequence of an image whose patch embeddings are 0.

        That is the prefix tokens (CLS, registers) and the position embeddings resampled for an
        ``h × w`` grid — DINO's rule for DINO-family weights, timm's otherwise. Every forward
        adds the patch embeddings to it, which equals each family's own token assembly
        exactly (both add positions linearly). Cached per grid, so the resampling runs once
        per size and an exported graph holds it as a constant.
        """
        key = (int(h), int(w))  # ints even while tracing (shapes may be traced tensors)
        h, w = key
        base = self._token_bases.get(key)
        if base is None:
            vit = self.vit
            with torch.autocast(vit.cls_token.device.type, enabled=False):
                if self.dino_family:
                    zeros = vit.cls_token.new_zeros(1, h * w, self.embed_dim)
                    base = torch.cat((vit.cls_token, zeros), dim=1) + dino_interpolate_pos_embed(vit.pos_embed, h, w)
                else:
                    base = vit._pos_embed(vit.cls_token.new_zeros(1, h, w, self.embed_dim))
            base = base.detach()
            self._token_bases[key] = base
        return base

    def _tokens(self, images: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Patch + prefix tokens with position embeddings, ``(B, T, F)``, before the blocks."""
        vit = self.vit
        pe = vit.patch_embed
        if self.dino_family:
            patches = pe.norm(pe.proj(images).flatten(2).transpose(1, 2))  # (B, h·w, F)
        else:
            patches = pe(images).flatten(1, 2)  # dynamic_img_size: (B, h, w, F) → (B, h·w, F)
        prefix = patches.new_zeros(patches.shape[0], self.num_prefix_tokens, patches.shape[2])
        x = torch.cat((prefix, patches), dim=1) + self.token_base(h, w).to(patches.dtype)
        x = vit.patch_drop(vit.pos_drop(x))
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

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Final-norm patch features ``(B, F, H/p, W/p)`` (no attention: inference)."""
        return self.forward(images, with_attention=False).feats

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, patch={self.patch_size}, dim={self.embed_dim}, depth={self.depth}, "
            f"heads={self.num_heads}, registers={self.num_registers}, pos_grid={self.pos_grid}"
        )


# ------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------




def is_timm_name(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def timm_model(name: str, *, pretrained: bool, **kwargs: Any) -> Any:
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
    return Backbone(vit, arch.name, dino_family=False)


