"""Frozen ViT backbones: golden parity, weight layouts, DINO position rule, registers, errors."""

from __future__ import annotations

import argparse
import math
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from hpseg import backbones
from hpseg.backbones import (
    Backbone,
    BackboneArch,
    BackboneContract,
    TimmViT,
    backbone_from_arch,
    build_backbone,
    dino_interpolate_pos_embed,
    infer_dino_arch,
)
from hpseg.errors import HPSegError
from hpseg.imaging import IMAGENET_MEAN, IMAGENET_STD

TINY = BackboneArch("dino_custom", patch_size=8, embed_dim=128, depth=2, num_heads=2, pos_grid=(4, 4))


@pytest.fixture(scope="module")
def golden_backbone(golden_file, load_golden) -> tuple[Backbone, dict]:
    g = load_golden("featurizer_small.pt")
    path = golden_file("hp_ckpt_small.pth")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return build_backbone("dino_custom", state_dict=ckpt), g


def tiny_backbone(seed: int = 0, arch: BackboneArch = TINY) -> Backbone:
    torch.manual_seed(seed)
    return backbone_from_arch(arch)


def tiny_register_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=56,
        patch_size=14,
        embed_dim=48,
        depth=2,
        num_heads=3,
        reg_tokens=4,
        no_embed_class=True,
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=True,
    )


# ------------------------------------------------------------------------------------------
# golden parity
# ------------------------------------------------------------------------------------------


def test_golden_features_and_attention_match_authors(golden_backbone) -> None:
    bb, g = golden_backbone
    with torch.no_grad():
        out = bb(g["images"])
    assert out.feats.shape == (2, 384, 8, 8)
    assert out.attn_logits is not None and out.attn_logits.shape == (2, 6, 65, 65)
    torch.testing.assert_close(out.feats, g["backbone_feats"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.attn_logits, g["attn_logits_last"], atol=1e-4, rtol=0)


def test_architecture_is_read_from_the_authors_checkpoint(golden_backbone) -> None:
    bb, _ = golden_backbone
    a = bb.arch
    assert (a.embed_dim, a.depth, a.num_heads, a.patch_size, a.pos_grid) == (384, 2, 6, 8, (8, 8))
    assert a.dino_family and a.num_registers == 0 and bb.num_prefix_tokens == 1


def test_weights_file_in_authors_layout_is_accepted(golden_dir: Path, golden_backbone) -> None:
    bb, g = golden_backbone
    other = build_backbone("dino_custom", golden_dir / "hp_ckpt_small.pth")
    with torch.no_grad():
        torch.testing.assert_close(other(g["images"][:1]).feats, bb(g["images"][:1]).feats)


# ------------------------------------------------------------------------------------------
# frozen / forward contract
# ------------------------------------------------------------------------------------------


def test_backbone_is_frozen_and_stays_in_eval_mode() -> None:
    bb = tiny_backbone()
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    wrapper = torch.nn.Sequential(bb)
    wrapper.train()
    assert not bb.training


def test_forward_shapes_and_attention_can_be_skipped() -> None:
    bb = tiny_backbone()
    x = torch.randn(2, 3, 32, 48)
    out = bb(x)
    assert out.feats.shape == (2, 128, 4, 6) and out.feats.is_contiguous()
    assert out.attn_logits is not None and out.attn_logits.shape == (2, 2, 25, 25)
    skipped = bb(x, with_attention=False)
    assert skipped.attn_logits is None
    torch.testing.assert_close(skipped.feats, out.feats)


def test_every_family_meets_the_contract() -> None:
    dino = tiny_backbone()
    reg = TimmViT(tiny_register_vit(), "tiny_reg")
    for bb, family in ((dino, "dino"), (reg, "timm-vit")):
        assert isinstance(bb, BackboneContract) and bb.family == family
        assert (bb.mean, bb.std) == (IMAGENET_MEAN, IMAGENET_STD)  # DINO and DINOv2: ImageNet statistics
    assert dino.dino_family and not reg.dino_family


def test_image_size_not_multiple_of_patch_is_a_clear_error() -> None:
    with pytest.raises(HPSegError, match="multiple of the patch size 8"):
        tiny_backbone()(torch.randn(1, 3, 30, 32))


# ------------------------------------------------------------------------------------------
# weight layouts
# ------------------------------------------------------------------------------------------


def _same_weights(a: Backbone, b: Backbone) -> None:
    sa, sb = a.vit.state_dict(), b.vit.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)


def test_dino_training_checkpoint_prefixes_are_stripped(tmp_path: Path) -> None:
    ref = tiny_backbone(seed=1)
    teacher = {f"module.backbone.{k}": v for k, v in ref.vit.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(4, 128)  # DINO projection head: ignored
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(arch="vit_small", patch_size=8, lr=5e-4, use_fp16=True)  # as DINO saves it
    torch.save({"teacher": teacher, "student": {}, "epoch": 3, "args": args}, path)
    _same_weights(build_backbone("dino_custom", path), ref)


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "safetensors"])
def test_plain_wrapped_and_safetensors_weights(tmp_path: Path, layout: str) -> None:
    ref = tiny_backbone(seed=2)
    sd = {k: v.contiguous() for k, v in ref.vit.state_dict().items()}
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save(sd if layout == "plain" else {layout: sd}, path)
    _same_weights(build_backbone("my_vit", path), ref)


def test_unreadable_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(HPSegError, match=r"cannot read .*bad\.pth: not a PyTorch file.*expected backbone weights") as info:
        build_backbone("dino_vits8", bad)
    assert "weights_only=False" not in str(info.value)  # never torch's unsafe advice
    with pytest.raises(HPSegError, match="does not exist"):
        build_backbone("dino_vits8", tmp_path / "missing.pth")


def test_weights_decide_the_architecture_over_the_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref = tiny_backbone()
    path = tmp_path / "tiny.pth"
    torch.save(ref.vit.state_dict(), path)
    with caplog.at_level("WARNING", logger="hpseg.backbones"):
        bb = build_backbone("dino_vits8", path)
    assert "128-wide" in caplog.text
    assert bb.name == "dino_custom" and bb.arch == ref.arch
    _same_weights(bb, ref)


def test_heads_from_width_or_given() -> None:
    sd = tiny_backbone().vit.state_dict()
    assert infer_dino_arch(sd).num_heads == 2  # head dim 64 when the width is not a DINO one
    assert infer_dino_arch(sd, num_heads=4).num_heads == 4
    odd = dict(sd, cls_token=torch.zeros(1, 1, 100))
    with pytest.raises(HPSegError, match="num_heads"):
        infer_dino_arch(odd)


# ------------------------------------------------------------------------------------------
# official download: cache and offline errors
# ------------------------------------------------------------------------------------------


def _offline(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_offline_without_weights_names_file_url_and_place(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _offline(monkeypatch, tmp_path)
    with pytest.raises(HPSegError) as info:
        build_backbone("dino_vits8")
    msg = str(info.value)
    assert "dino_deitsmall8_300ep_pretrain.pth" in msg
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/" in msg
    assert str(tmp_path / "checkpoints") in msg and "weights=" in msg


def test_torch_hub_cache_is_used_before_downloading(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    # a (wrong, tiny) file in the cache: reading it, not the download, must produce the error
    torch.save(tiny_backbone().vit.state_dict(), tmp_path / "checkpoints" / "dino_vitbase16_pretrain.pth")
    with pytest.raises(HPSegError, match="128-wide ViT with patch 8, but dino_vitb16.*download it again"):
        build_backbone("dino_vitb16")


def test_random_init_registry_backbone_needs_no_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _offline(monkeypatch, tmp_path)
    bb = build_backbone("dino_vits16", pretrained=False, img_size=64)
    assert (bb.embed_dim, bb.patch_size, bb.num_heads, bb.depth, bb.pos_grid) == (384, 16, 6, 12, (4, 4))


def test_unknown_backbone_name_is_a_clear_error() -> None:
    with pytest.raises(HPSegError, match="unknown backbone"):
        build_backbone("not_a_vit", pretrained=False)


# ------------------------------------------------------------------------------------------
# demo backbone
# ------------------------------------------------------------------------------------------


def test_missing_demo_weights_say_how_to_create_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones.weights, "DEMO_ASSET", "no_such_file.safetensors")
    with pytest.raises(HPSegError, match="scripts/pretrain_demo_backbone.py"):
        build_backbone("hpseg_demo_vit")


def test_demo_backbone_architecture() -> None:
    from importlib import resources

    if not (resources.files("hpseg") / "assets" / "demo_vit.safetensors").is_file():
        bb = build_backbone("hpseg_demo_vit", pretrained=False, img_size=96)
    else:
        bb = build_backbone("hpseg_demo_vit")
    assert (bb.embed_dim, bb.depth, bb.num_heads, bb.patch_size, bb.pos_grid) == (192, 4, 3, 8, (12, 12))
    assert bb.vit.norm.eps == 1e-6
    out = bb(torch.randn(1, 3, 96, 96))
    assert out.feats.shape == (1, 192, 12, 12)


# ------------------------------------------------------------------------------------------
# DINO position-embedding rule
# ------------------------------------------------------------------------------------------


def test_dino_pos_embed_rule_at_twice_the_grid() -> None:
    bb = tiny_backbone(seed=3)  # stored grid 4×4 (N = 16)
    vit = bb.vit
    x = torch.randn(2, 3, 64, 64)  # 8×8 patches
    pos = vit.pos_embed
    grid = pos[:, 1:].reshape(1, 4, 4, 128).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, scale_factor=(8.1 / 4, 8.1 / 4), mode="bicubic", align_corners=False)
    assert direct.shape[-2:] == (8, 8)
    expected_pos = torch.cat((pos[:, :1], direct.permute(0, 2, 3, 1).reshape(1, 64, 128)), dim=1)
    torch.testing.assert_close(dino_interpolate_pos_embed(pos, 8, 8), expected_pos, atol=0, rtol=0)
    # DINO's scale-factor rule differs from resampling by output size (timm's default)
    by_size = resample_abs_pos_embed(pos, new_size=(8, 8), old_size=(4, 4), num_prefix_tokens=1)
    assert not torch.allclose(by_size, expected_pos, atol=1e-4)
    # the features use it: a manual forward with the directly computed embeddings
    with torch.no_grad():
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((vit.cls_token.expand(2, -1, -1), tokens), dim=1) + expected_pos
        manual = vit.norm(vit.blocks(tokens))[:, 1:].reshape(2, 8, 8, 128).permute(0, 3, 1, 2)
        torch.testing.assert_close(bb(x, with_attention=False).feats, manual, atol=1e-5, rtol=0)


def test_dino_pos_embed_rule_non_square_grid_and_identity() -> None:
    pos = torch.randn(1, 1 + 16, 8)
    assert dino_interpolate_pos_embed(pos, 4, 4) is pos
    out = dino_interpolate_pos_embed(pos, 3, 7)
    assert out.shape == (1, 1 + 21, 8)
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    sf = ((3 + 0.1) / math.sqrt(16), (7 + 0.1) / math.sqrt(16))
    direct = F.interpolate(grid, scale_factor=sf, mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, 21, 8))
    torch.testing.assert_close(out[:, :1], pos[:, :1])


# ------------------------------------------------------------------------------------------
# timm ViT with registers
# ------------------------------------------------------------------------------------------


def test_register_tokens_are_removed_and_attention_matches_manual() -> None:
    vit = tiny_register_vit()
    bb = TimmViT(vit, "tiny_reg")
    assert bb.num_prefix_tokens == 5 and bb.num_registers == 4
    x = torch.randn(2, 3, 42, 70)  # 3×5 patches, stored grid 4×4: timm's dynamic resampling
    captured: dict[str, torch.Tensor] = {}
    handle = vit.blocks[-1].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        out = bb(x)
        tokens = vit.forward_features(x)  # timm's own forward (fused attention)
    handle.remove()
    assert out.feats.shape == (2, 48, 3, 5)
    assert out.attn_logits is not None and out.attn_logits.shape == (2, 3, 16, 16)
    torch.testing.assert_close(
        out.feats, tokens[:, 5:].reshape(2, 3, 5, 48).permute(0, 3, 1, 2), atol=1e-5, rtol=0
    )
    # manual attention logits of the last block on its (captured) input, 20 tokens
    last = vit.blocks[-1]
    with torch.no_grad():
        y = F.layer_norm(captured["x"], (48,), last.norm1.weight, last.norm1.bias, last.norm1.eps)
        q, k, _ = F.linear(y, last.attn.qkv.weight, last.attn.qkv.bias).split(48, dim=-1)
        q = q.reshape(2, 20, 3, 16).transpose(1, 2)
        k = k.reshape(2, 20, 3, 16).transpose(1, 2)
        full = q @ k.transpose(-2, -1) / math.sqrt(16)
    keep = [0, *range(5, 20)]
    torch.testing.assert_close(out.attn_logits, full[:, :, keep][:, :, :, keep], atol=1e-5, rtol=0)


def test_timm_name_with_registers_builds_and_rebuilds_from_arch() -> None:
    bb = build_backbone(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        timm_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 3},
    )
    assert not bb.dino_family and bb.num_registers == 4 and bb.patch_size == 14
    again = backbone_from_arch(bb.arch)
    assert again.arch == bb.arch
    again.vit.load_state_dict(bb.vit.state_dict())
    x = torch.randn(1, 3, 28, 42)
    torch.testing.assert_close(again(x).attn_logits, bb(x).attn_logits)
