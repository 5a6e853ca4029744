"""The timm ``Eva`` family: DINOv3 (RoPE, 4 storage tokens, patch 16) and the other rotary ViTs
timm builds on ``Eva`` (EVA-02, ``vit_*_rope_*``) — and Meta's official DINOv3 weight layout.

The last block's attention logits are formed exactly as ``EvaAttention.forward`` (and
``AttentionRope.forward``) form them: ``norm1``, the fused ``qkv`` projection with its separate
q/v biases (or the split q/k projections), ``q_norm``/``k_norm``, then the block's rotary table
applied to the patch tokens only (prefix tokens are not rotated), scaled by ``head_dim^-0.5``. The RoPE table follows the
input grid (``rope.get_embed(shape=(h, w))``, coordinates normalised per axis), so any
``H × W`` multiple of the patch works, square or not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.backbones.vit import Backbone
from hpseg.errors import HPSegError

log = logging.getLogger(__name__)

__all__ = ["TimmEva", "fill_absent_qv_biases", "prepare_dinov3_state_dict"]


class TimmEva(Backbone):
    """timm ``Eva`` (pre-norm ``EvaBlock`` with ``EvaAttention`` or ``AttentionRope``): DINOv3,
    EVA-02, RoPE ViTs (mixed RoPE included)."""

    family = "timm-eva"
    covers = "timm Eva (DINOv3, EVA-02 and the other RoPE ViTs)"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.layers import AttentionRope
        from timm.models.eva import Eva, EvaAttention, EvaBlock

        blocks: Any = getattr(model, "blocks", None)
        return (
            isinstance(model, Eva)
            and blocks is not None
            and len(blocks) > 0
            and all(type(b) is EvaBlock and isinstance(b.attn, (EvaAttention, AttentionRope)) for b in blocks)
        )

    def __init__(self, vit: nn.Module, name: str) -> None:
        if not getattr(vit, "dynamic_img_size", False):
            raise HPSegError(f"backbone {name!r} must be created with dynamic_img_size=True")
        super().__init__(vit, name)

    def _grid_constants(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token base (prefix tokens + absolute positions, if any) and the RoPE table
        (``(h·w, 2·d)``, or ``(depth, heads, h·w, 2·d)`` for mixed RoPE; None without RoPE)."""
        vit = self.vit
        base, rope = vit._pos_embed(vit.cls_token.new_zeros(1, h, w, self.embed_dim))
        return base, rope

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.patch_embed(images).flatten(1, 2)  # type: ignore[no-any-return]  # (B,h,w,F)→(B,h·w,F)

    def _rope(self, index: int, extra: torch.Tensor | None) -> torch.Tensor | None:
        if extra is None:
            return None
        return extra[index] if getattr(self.vit, "rope_mixed", False) else extra

    def _block(self, index: int, x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        return self.vit.blocks[index](x, rope=self._rope(index, extra))  # type: ignore[no-any-return]

    def _queries_keys(
        self, x: torch.Tensor, extra: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        from timm.layers import apply_rot_embed_cat

        block = self.vit.blocks[-1]
        attn = block.attn
        y = block.norm1(x)
        b, t, _ = y.shape
        if attn.qkv is not None:
            if getattr(attn, "q_bias", None) is not None:  # EvaAttention: q/v biases, k bias fixed at 0
                qkv = F.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
            else:
                qkv = attn.qkv(y)
            qkv = qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
        else:
            q = attn.q_proj(y).reshape(b, t, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(y).reshape(b, t, int(getattr(attn, "num_kv_heads", attn.num_heads)), -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = self._rope(self.depth - 1, extra)
        if rope is not None:
            n = attn.num_prefix_tokens
            half = bool(getattr(attn, "rotate_half", False))
            q = torch.cat((q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)), dim=2).type_as(q)
            k = torch.cat((k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)), dim=2).type_as(k)
        groups = int(getattr(attn, "num_kv_groups", 1))
        if groups > 1:  # grouped-query attention: each key head serves `groups` query heads
            k = k.repeat_interleave(groups, dim=1)
        return q, k, float(attn.scale)


def prepare_dinov3_state_dict(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta's official DINOv3 layout made ready for timm's ``checkpoint_filter_fn``.

    The official files store ``qkv.bias`` (q, k, v; k is masked to 0 in use). timm splits it
    into ``q_bias``/``v_bias`` when the model has them (the ``_qkvb`` variants, which the
    ``dinov3_*`` short names use). For a model without q/v biases the biases are dropped here —
    with a warning when they are not zero, because the features then differ from Meta's.
    Other layouts pass through unchanged.
    """
    if "storage_tokens" not in sd:
        return dict(sd)
    blocks: Any = getattr(model, "blocks", None)
    has_bias = blocks is not None and getattr(blocks[0].attn, "q_bias", None) is not None
    if has_bias:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    largest = 0.0
    for key, value in sd.items():
        if key.endswith("attn.qkv.bias"):
            q, _, v = value.chunk(3, dim=-1)
            largest = max(largest, float(q.abs().max()), float(v.abs().max()))
            continue
        out[key] = value
    if largest > 0:
        log.warning(
            "the DINOv3 weights have q/v biases (largest %.3g) but the model has none: they are dropped "
            "(use the model name with _qkvb, e.g. vit_small_patch16_dinov3_qkvb, to keep them)",
            largest,
        )
    return out


def fill_absent_qv_biases(sd: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``sd`` (in ``model``'s key naming) with zero q/v biases where ``model`` has them and ``sd``
    has none at all — weights of a bias-free variant (timm's ``vit_small_patch16_dinov3``) on
    a ``_qkvb`` model (the ``dinov3_*`` short names). Exact: a zero bias is no bias."""
    out = dict(sd)
    if any(k.endswith(("attn.q_bias", "attn.v_bias")) for k in out):
        return out
    filled = 0
    for key, value in model.state_dict().items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            out[key] = torch.zeros_like(value)
            filled += 1
    if filled:
        log.info("the weights have no q/v biases: using zero biases (%d tensors)", filled)
    return out
