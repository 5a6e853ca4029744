"""The frozen ViT module shared by every family, and the timm ``VisionTransformer`` adapters.

:class:`Backbone` implements :class:`~hpseg.backbones.contract.BackboneContract`: it returns the
final-norm patch features and the last block's pre-softmax attention logits (computed from
that block's own query/key projection, because timm's fused attention never materialises them;
docs/method.md §1). A family adapter is a subclass that says how its timm model assembles the
tokens, runs a block and forms the last block's queries and keys:

* :class:`TimmViT` — timm ``VisionTransformer`` (DINOv2, DINOv2 with registers, …), timm's
  ``dynamic_img_size`` position resampling;
* :class:`DinoViT` — DINO v1 weight files (``dino_*`` names, the authors' checkpoints, the demo
  ViT) on a ``VisionTransformer``, with DINO's own position rule (bicubic by *scale factor*
  ``(h + 0.1)/√N``), so that features match the authors' evaluation at other resolutions;
* :class:`~hpseg.backbones.eva.TimmEva` (its own module) — timm ``Eva``: DINOv3 and other RoPE ViTs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.backbones.contract import BackboneOutput
from hpseg.errors import HPSegError
from hpseg.imaging import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "Backbone",
    "BackboneArch",
    "BackboneOutput",
    "DinoViT",
    "TimmViT",
    "dino_interpolate_pos_embed",
    "model_statistics",
]


@dataclass(frozen=True)
class BackboneArch:
    """Everything needed to rebuild a backbone's modules without its weights file.

    ``dino_family`` backbones are built as a plain timm ``VisionTransformer`` from these fields
    and use DINO's position-embedding rule; the others are ``timm.create_model(name, ...)``
    (a short name such as ``dinov3_vits16`` resolves to its timm name first).
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
# the module: what every family shares
# ------------------------------------------------------------------------------------------


def _square_patch(name: str, patch_embed: Any) -> int:
    ps = patch_embed.patch_size
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    if ps[0] != ps[1]:
        raise HPSegError(f"backbone {name!r} has non-square patches {ps}; only square patches are supported")
    return int(ps[0])


def _mlp_ratio(block: Any, width: int) -> float:
    mlp = block.mlp
    fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "fc1_g", None)
    return float(fc1.out_features / width) if isinstance(fc1, nn.Linear) else 4.0


def model_statistics(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RGB mean and std a timm model was trained with (its ``pretrained_cfg``; ImageNet's
    when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:
        raise HPSegError(f"backbone statistics mean={mean} std={std} are not RGB: HP needs a 3-channel backbone")
    return mean, std


class Backbone(nn.Module):
    """A frozen ViT (always in eval mode, no trainable parameters): the
    :class:`~hpseg.backbones.contract.BackboneContract`, shared by every family.

    A family adapter (a subclass) says how its timm model assembles the tokens, runs a block
    and forms the last block's queries and keys; this class does the rest: input checks,
    re-normalisation to the backbone's own statistics, the block loop, dropping prefix tokens,
    and the grid constants' cache. ``family`` names the adapter, ``accepts(model)`` says
    whether a timm model is one of its kind.

    Attributes:
        name: backbone name (registry, timm or custom).
        patch_size, embed_dim (F), num_heads, depth.
        num_prefix_tokens: CLS + register tokens; num_registers: register tokens only.
        pos_grid: the stored position grid ``(rows, cols)``.
        mean, std: the backbone's own RGB statistics (see the contract).
        dino_family: True when DINO's position-embedding rule is used.
    """

    family: ClassVar[str] = ""
    #: what the family covers, for the list of supported families in errors and docs
    covers: ClassVar[str] = ""
    dino_family: ClassVar[bool] = False
    vit: Any  # the timm model (typed loosely: timm's attributes are dynamic)

    def __init__(self, vit: nn.Module, name: str) -> None:
        super().__init__()
        v: Any = vit
        if getattr(v, "cls_token", None) is None:
            raise HPSegError(f"backbone {name!r} has no CLS token: HP needs a ViT with a class token")
        blocks: Any = getattr(v, "blocks", None)
        if blocks is None or len(blocks) == 0:
            raise HPSegError(f"backbone {name!r} has no transformer blocks: HP needs a ViT")
        self.vit = v
        self.name = name
        self.patch_size = _square_patch(name, v.patch_embed)
        self.embed_dim = int(v.embed_dim)
        self.depth = len(blocks)
        last = blocks[-1]
        self.num_heads = int(last.attn.num_heads)
        self.num_prefix_tokens = int(getattr(v, "num_prefix_tokens", 1))
        self.num_registers = int(getattr(v, "num_reg_tokens", 0) or 0)
        reg = getattr(v, "reg_token", None)
        if reg is not None:
            self.num_registers = int(reg.shape[1])
        self.pos_grid: tuple[int, int] = self._pos_grid()
        mean, std = self._statistics()
        self.mean: tuple[float, float, float] = (mean[0], mean[1], mean[2])
        self.std: tuple[float, float, float] = (std[0], std[1], std[2])
        self.mlp_ratio = _mlp_ratio(last, self.embed_dim)
        attn = last.attn
        qkv = getattr(attn, "qkv", None)
        self.qkv_bias = (qkv is not None and qkv.bias is not None) or getattr(attn, "q_bias", None) is not None
        self.layer_scale = not isinstance(getattr(last, "ls1", nn.Identity()), nn.Identity) or (
            getattr(last, "gamma_1", None) is not None
        )
        self._set_renormalisation()
        for p in self.parameters():
            p.requires_grad_(False)
        self._grid_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        super().train(False)

    # -- the family's part ------------------------------------------------------------------------
    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Whether ``model`` (a timm model) belongs to this family."""
        return False

    def _pos_grid(self) -> tuple[int, int]:
        gs = self.vit.patch_embed.grid_size
        return int(gs[0]), int(gs[1])

    def _statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return model_statistics(self.vit)

    def _grid_constants(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(1, prefix + h·w, F)`` token base and the grid's extra constant (RoPE table), uncached."""
        raise NotImplementedError

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``(B, h·w, F)`` (no positions)."""
        raise NotImplementedError

    def _block(self, index: int, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """Block ``index`` on tokens ``x`` (B, T, F)."""
        return self.vit.blocks[index](x)  # type: ignore[no-any-return]

    def _queries_keys(
        self, x: torch.Tensor, extra: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The last block's queries and keys ``(B, heads, T, d)`` on its input ``x``, exactly as
        its attention forms them, and the logit scale."""
        raise NotImplementedError

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

    def _set_renormalisation(self) -> None:
        """Buffers (not saved) that turn ImageNet-normalised input into the backbone's own
        normalisation: ``x·scale + shift``; None when the statistics are ImageNet's."""
        same = all(
            math.isclose(a, b, abs_tol=1e-6)
            for a, b in zip((*self.mean, *self.std), (*IMAGENET_MEAN, *IMAGENET_STD))
        )
        scale = shift = None
        if not same:
            m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
            m, s = torch.tensor(self.mean), torch.tensor(self.std)
            scale, shift = (s_in / s).view(1, 3, 1, 1), ((m_in - m) / s).view(1, 3, 1, 1)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)

    # -- grid constants -------------------------------------------------------------------------
    def token_bases_clear(self) -> None:
        """Forget the cached grid constants (after the weights changed)."""
        self._grid_cache.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> Backbone:  # .to(), .half(), …
        self._grid_cache.clear()
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._grid_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def grid_constants(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token base and extra constant of an ``h × w`` grid, cached (see :meth:`token_base`)."""
        key = (int(h), int(w))  # ints even while tracing (shapes may be traced tensors)
        cached = self._grid_cache.get(key)
        if cached is None:
            with torch.autocast(self.vit.cls_token.device.type, enabled=False):
                base, extra = self._grid_constants(*key)
            cached = (base.detach(), None if extra is None else extra.detach())
            self._grid_cache[key] = cached
        return cached

    def token_base(self, h: int, w: int) -> torch.Tensor:
        """``(1, prefix + h·w, F)``: the token sequence of an image whose patch embeddings are 0.

        That is the prefix tokens (CLS, registers) and the position embeddings of an ``h × w``
        grid (each family's own rule). Every forward adds the patch embeddings to it, which
        equals each family's own token assembly exactly (positions are added linearly). Cached
        per grid with the family's other grid constants (RoPE tables), so resampling runs once
        per size and an exported graph holds them as constants.
        """
        return self.grid_constants(h, w)[0]

    # -- forward ------------------------------------------------------------------------------
    def _tokens(self, images: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Patch + prefix tokens with position embeddings, ``(B, T, F)``, before the blocks."""
        patches = self._patches(images)
        prefix = patches.new_zeros(patches.shape[0], self.num_prefix_tokens, patches.shape[2])
        x = torch.cat((prefix, patches), dim=1) + self.token_base(h, w).to(patches.dtype)
        return self.vit.norm_pre(x)  # type: ignore[no-any-return]  # position/patch dropout: identities in eval mode

    def attention_logits(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax attention ``(q·kᵀ)·d^-0.5`` of the last block on its input tokens ``x`` (B, T, F).

        Returns ``(B, heads, 1+h·w, 1+h·w)``: CLS first, register tokens dropped.
        """
        q, k, scale = self._queries_keys(x, extra)
        logits = (q * scale) @ k.transpose(-2, -1)
        t = logits.shape[-1]
        if self.num_prefix_tokens > 1:
            device = logits.device  # built on the device: no host-to-device copy in every forward
            keep = torch.cat((torch.zeros(1, dtype=torch.long, device=device),
                              torch.arange(self.num_prefix_tokens, t, dtype=torch.long, device=device)))
            logits = logits.index_select(2, keep).index_select(3, keep)
        return logits

    def forward(self, images: torch.Tensor, with_attention: bool = True) -> BackboneOutput:
        """Features and last-block attention logits of ``images``.

        Args:
            images: ``(B, 3, H, W)``, normalised with the ImageNet statistics; H and W
                multiples of ``patch_size``.
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
        scale, shift = self.input_scale, self.input_shift
        if isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor):  # not ImageNet statistics
            images = images * scale.to(images.dtype) + shift.to(images.dtype)
        extra = self.grid_constants(h, w)[1]
        x = self._tokens(images, h, w)
        for i in range(self.depth - 1):
            x = self._block(i, x, extra)
        attn_logits = self.attention_logits(x, extra) if with_attention else None
        x = self.vit.norm(self._block(self.depth - 1, x, extra))
        feats = x[:, self.num_prefix_tokens :].reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return BackboneOutput(feats, attn_logits)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Final-norm patch features ``(B, F, H/p, W/p)`` (no attention: inference)."""
        return self.forward(images, with_attention=False).feats

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, family={self.family}, patch={self.patch_size}, dim={self.embed_dim}, "
            f"depth={self.depth}, heads={self.num_heads}, registers={self.num_registers}, pos_grid={self.pos_grid}"
        )


# ------------------------------------------------------------------------------------------
# families: timm VisionTransformer, and DINO v1 files on it
# ------------------------------------------------------------------------------------------


class TimmViT(Backbone):
    """timm ``VisionTransformer`` (DINOv2, DINOv2 with registers, DeiT, …): learned absolute
    positions resampled by timm's ``dynamic_img_size`` rule, fused ``qkv`` attention."""

    family = "timm-vit"
    covers = "timm VisionTransformer (DINOv2, DINOv2 with registers, DeiT, …)"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        blocks: Any = getattr(model, "blocks", None)
        return (
            isinstance(model, VisionTransformer)
            and blocks is not None
            and len(blocks) > 0
            and getattr(blocks[-1].attn, "qkv", None) is not None
        )

    def __init__(self, vit: nn.Module, name: str) -> None:
        if not getattr(vit, "dynamic_img_size", False):
            raise HPSegError(f"backbone {name!r} must be created with dynamic_img_size=True")
        super().__init__(vit, name)

    def _grid_constants(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        vit = self.vit
        return vit._pos_embed(vit.cls_token.new_zeros(1, h, w, self.embed_dim)), None

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.patch_embed(images).flatten(1, 2)  # type: ignore[no-any-return]  # (B,h,w,F)→(B,h·w,F)

    def _queries_keys(
        self, x: torch.Tensor, extra: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        block = self.vit.blocks[-1]
        attn = block.attn
        b, t, _ = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        return attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), float(attn.scale)


class DinoViT(TimmViT):
    """DINO v1 files (official, training checkpoints, the authors' HP files, the demo ViT) on a
    timm ``VisionTransformer``: CLS only, and DINO's own position rule
    (:func:`dino_interpolate_pos_embed`), so features match the authors' at any resolution."""

    family = "dino"
    covers = "DINO v1 weight files (dino_vits8 …, the authors' HP checkpoints, hpseg_demo_vit)"
    dino_family = True

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        v: Any = model
        return (
            super().accepts(model)
            and int(getattr(v, "num_prefix_tokens", 1)) == 1
            and not getattr(v, "no_embed_class", False)
            and v.pos_embed is not None
        )

    def __init__(self, vit: nn.Module, name: str) -> None:
        if not DinoViT.accepts(vit):
            raise HPSegError(
                f"backbone {name!r}: DINO position embeddings need CLS-only, class-embedded positions"
            )
        super().__init__(vit, name)

    def _pos_grid(self) -> tuple[int, int]:
        side = math.isqrt(self.vit.pos_embed.shape[1] - 1)
        return side, side

    def _statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return IMAGENET_MEAN, IMAGENET_STD  # DINO trained on ImageNet-normalised images

    def _grid_constants(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        vit = self.vit
        zeros = vit.cls_token.new_zeros(1, h * w, self.embed_dim)
        return torch.cat((vit.cls_token, zeros), dim=1) + dino_interpolate_pos_embed(vit.pos_embed, h, w), None

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        pe = self.vit.patch_embed
        return pe.norm(pe.proj(images).flatten(2).transpose(1, 2))  # type: ignore[no-any-return]
