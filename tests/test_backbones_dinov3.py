"""DINOv3 and the other timm ``Eva`` ViTs: RoPE attention logits against timm's own attention,
storage tokens, the grid at any size, the model's own image statistics, Meta's official weight
layout, short names, offline errors and the families' error."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import timm
import torch
from timm.models.eva import Eva

from hpseg import backbones
from hpseg.backbones import (
    DINOV3_WEIGHTS,
    BackboneContract,
    TimmEva,
    available_backbones,
    backbone_from_arch,
    build_backbone,
)
from hpseg.errors import HPSegError
from hpseg.export import export_model, verify_export
from hpseg.imaging import IMAGENET_MEAN, IMAGENET_STD
from hpseg.model import HPModel

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (zero-initialised biases and layer scales included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # small: attention far from one-hot


def tiny_timm(name: str = "vit_small_patch16_dinov3_qkvb", seed: int = 0, **kwargs) -> Eva:
    model = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **{**TINY, **kwargs})
    _randomise(model, seed)
    return model.eval()


def meta_layout(model: Eva) -> dict[str, torch.Tensor]:
    """``model``'s weights laid out like Meta's official DINOv3 files: timm's
    ``checkpoint_filter_fn`` (``timm.models.eva``) run backwards, plus the entries it discards."""
    sd: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(99)
    for key, value in model.state_dict().items():
        if key.endswith("attn.q_bias"):
            v_bias = model.state_dict()[key.replace("q_bias", "v_bias")]
            k_junk = torch.randn(value.shape, generator=g)  # masked in Meta's model: must be ignored
            sd[key.replace("q_bias", "qkv.bias")] = torch.cat((value, k_junk, v_bias))
            sd[key.replace("q_bias", "qkv.bias_mask")] = torch.cat(
                (torch.ones_like(value), torch.zeros_like(value), torch.ones_like(value))
            )
            continue
        if key.endswith("attn.v_bias"):
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        sd[key] = value.clone()
    dim = model.embed_dim
    sd["mask_token"] = torch.zeros(1, dim)
    sd["rope_embed.periods"] = torch.ones(dim // model.blocks[0].attn.num_heads // 4)
    return sd


def _captured_attention(model: Eva, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's own forward: its output tokens and the last block's softmax attention, read from
    the unfused path (the input of ``attn_drop``)."""
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    seen: list[torch.Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            tokens = model.forward_features(x)
    finally:
        handle.remove()
        attn.fused_attn = True
    return tokens, seen[0]


def _own_statistics(bb: TimmEva, x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``x`` normalised with the backbone's own statistics instead (EVA-02: CLIP's)."""
    mean, std = torch.tensor(bb.mean).view(1, 3, 1, 1), torch.tensor(bb.std).view(1, 3, 1, 1)
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (rgb - mean) / std


# ------------------------------------------------------------------------------------------
# attention logits, storage tokens, grid
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["vit_small_patch16_dinov3_qkvb", "vit_small_patch16_dinov3", "eva02_tiny_patch14_224",
     "vit_small_patch16_rope_mixed_224"],
)
def test_features_and_attention_equal_timms_own_forward(name: str) -> None:
    model = tiny_timm(name)
    bb = TimmEva(model, name)
    assert isinstance(bb, BackboneContract)
    p, n_prefix = bb.patch_size, bb.num_prefix_tokens
    x = torch.randn(2, 3, 3 * p, 5 * p)  # a 3×5 grid: not square
    tokens, probs = _captured_attention(model, _own_statistics(bb, x))
    with torch.no_grad():
        out = bb(x)
    assert out.feats.shape == (2, 64, 3, 5) and out.attn_logits is not None
    torch.testing.assert_close(
        out.feats, tokens[:, n_prefix:].reshape(2, 3, 5, 64).permute(0, 3, 1, 2), atol=1e-5, rtol=0
    )
    # softmax over CLS + patches of our logits = timm's probabilities renormalised over them
    keep = [0, *range(n_prefix, n_prefix + 15)]
    timm_kept = probs[:, :, keep][:, :, :, keep]
    timm_kept = timm_kept / timm_kept.sum(-1, keepdim=True)
    assert timm_kept.max() < 0.9  # not one-hot: the comparison sees the logits
    torch.testing.assert_close(out.attn_logits.log_softmax(-1), timm_kept.log(), atol=1e-4, rtol=0)


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary encoding in the "rotate half" layout, written out: (x1, x2) → (x1·c − x2·s, x2·c + x1·s)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def test_dinov3_logits_equal_q_k_after_the_blocks_own_rope() -> None:
    model = tiny_timm()
    bb = TimmEva(model, "vit_small_patch16_dinov3_qkvb")
    last = model.blocks[-1]
    seen: dict[str, torch.Tensor] = {}
    handle = last.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], rope=kwargs["rope"]),
                                            with_kwargs=True)
    x = torch.randn(1, 3, 32, 64)  # 2×4 grid
    with torch.no_grad():
        out = bb(x)
        handle.remove()
        y = last.norm1(seen["x"])
        attn = last.attn
        qkv = y @ attn.qkv.weight.T + torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
        q, k, _ = qkv.reshape(1, 13, 3, 2, 32).permute(2, 0, 3, 1, 4)
    sin, cos = seen["rope"].chunk(2, dim=-1)  # the block's own table: (2·4, 32) each
    assert sin.shape == (8, 32)
    torch.testing.assert_close(seen["rope"], model.rope.get_embed(shape=(2, 4)))  # grid follows the input
    q = torch.cat((q[:, :, :5], _rotate(q[:, :, 5:], sin, cos)), dim=2)  # CLS + 4 storage tokens: no RoPE
    k = torch.cat((k[:, :, :5], _rotate(k[:, :, 5:], sin, cos)), dim=2)
    direct = q @ k.transpose(-2, -1) / math.sqrt(32)
    keep = [0, *range(5, 13)]  # CLS and the 8 patches; storage tokens dropped
    assert out.attn_logits is not None and out.attn_logits.shape == (1, 2, 9, 9)
    torch.testing.assert_close(out.attn_logits, direct[:, :, keep][:, :, :, keep], atol=1e-5, rtol=0)


def test_storage_tokens_and_grid_at_any_size() -> None:
    bb = build_backbone("vit_small_patch16_dinov3", pretrained=False, img_size=224, timm_kwargs=TINY)
    assert (bb.family, bb.patch_size, bb.num_prefix_tokens, bb.num_registers) == ("timm-eva", 16, 5, 4)
    for hh, ww in ((16, 16), (48, 80), (96, 32)):
        out = bb(torch.randn(1, 3, hh, ww))
        grid = (hh // 16, ww // 16)
        tokens = 1 + grid[0] * grid[1]  # CLS + patches: the 4 storage tokens are not in the grid
        assert out.feats.shape == (1, 64, *grid)
        assert out.attn_logits is not None and out.attn_logits.shape == (1, 2, tokens, tokens)
    with pytest.raises(HPSegError, match="multiple of the patch size 16"):
        bb(torch.randn(1, 3, 40, 48))


def test_rebuilt_from_its_arch_gives_the_same_outputs() -> None:
    bb = build_backbone("dinov3_vits16", pretrained=False, timm_kwargs=TINY)
    _randomise(bb.vit)
    again = backbone_from_arch(bb.arch)
    again.vit.load_state_dict(bb.vit.state_dict())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        a, b = bb(x), again(x)
    assert again.name == "dinov3_vits16" and again.family == "timm-eva"
    torch.testing.assert_close(a.feats, b.feats)
    torch.testing.assert_close(a.attn_logits, b.attn_logits)


# ------------------------------------------------------------------------------------------
# image statistics
# ------------------------------------------------------------------------------------------


def test_image_statistics_are_the_models_own() -> None:
    web = build_backbone("dinov3_vits16", pretrained=False, timm_kwargs=TINY)
    assert (web.mean, web.std) == (IMAGENET_MEAN, IMAGENET_STD) and web.input_scale is None
    sat = build_backbone("dinov3_vitl16_sat493m", pretrained=False, timm_kwargs=TINY)
    assert (sat.mean, sat.std) == (SAT_MEAN, SAT_STD)
    _randomise(sat.vit)
    rgb = torch.rand(2, 3, 32, 48)
    imagenet = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    own = (rgb - torch.tensor(SAT_MEAN).view(1, 3, 1, 1)) / torch.tensor(SAT_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = sat.features(imagenet)  # hpseg's inputs are ImageNet-normalised
        timm_tokens = sat.vit.forward_features(own)  # timm fed with the satellite statistics
    torch.testing.assert_close(ours, timm_tokens[:, 5:].reshape(2, 2, 3, 64).permute(0, 3, 1, 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_keeps_the_satellite_statistics(tmp_path: Path, fmt: str) -> None:
    if fmt == "onnx" and (importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None):
        pytest.skip("ONNX export needs onnx and onnxruntime: pip install 'hpseg[export]'")
    sat = build_backbone("dinov3_vitl16_sat493m", pretrained=False, timm_kwargs=TINY)
    _randomise(sat.vit)
    model = HPModel.create(sat, dim=8, n_classes=3, n_clusters=4).eval()
    path = export_model(model, tmp_path / f"sat.{fmt}", format=fmt, image_size=(32, 48), head="linear")
    assert verify_export(model, path, fmt, (32, 48), "linear") < 1e-4


# ------------------------------------------------------------------------------------------
# Meta's official layout, the hub cache, offline
# ------------------------------------------------------------------------------------------


def test_meta_layout_loads_through_weights_and_gives_timms_features(tmp_path: Path) -> None:
    model = tiny_timm(seed=3)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-00000000.pth"
    official = meta_layout(model)
    assert "storage_tokens" in official and "blocks.0.attn.qkv.bias" in official and "blocks.0.ls1.gamma" in official
    torch.save(official, path)
    bb = build_backbone("dinov3_vits16", path, timm_kwargs=TINY)
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        expected = model.forward_features(x)[:, 5:].reshape(2, 3, 2, 64).permute(0, 3, 1, 2)
        torch.testing.assert_close(bb.features(x), expected, atol=1e-5, rtol=0)


def test_meta_biases_on_a_model_without_biases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_timm(seed=4)
    path = tmp_path / "official.pth"
    torch.save(meta_layout(model), path)
    with caplog.at_level("WARNING", logger="hpseg.backbones"):
        build_backbone("vit_small_patch16_dinov3", path, timm_kwargs=TINY)
    assert "q/v biases" in caplog.text and "_qkvb" in caplog.text
    with torch.no_grad():  # all-zero biases (the distilled B/L/H+ files): dropped silently, exactly
        for blk in model.blocks:
            blk.attn.q_bias.zero_()
            blk.attn.v_bias.zero_()
    torch.save(meta_layout(model), path)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpseg.backbones"):
        bb = build_backbone("vit_small_patch16_dinov3", path, timm_kwargs=TINY)
    assert "q/v biases" not in caplog.text
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.features(x), model.forward_features(x)[:, 5:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2),
            atol=1e-5, rtol=0,
        )


def test_bias_free_weights_on_a_short_name_get_zero_biases(tmp_path: Path) -> None:
    model = tiny_timm("vit_small_patch16_dinov3", seed=6)  # timm's variant without q/v biases
    path = tmp_path / "timm_layout.pth"
    torch.save(model.state_dict(), path)
    bb = build_backbone("dinov3_vits16", path, timm_kwargs=TINY)  # the _qkvb variant
    assert all(not blk.attn.q_bias.any() and not blk.attn.v_bias.any() for blk in bb.vit.blocks)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.features(x), model.forward_features(x)[:, 5:].reshape(1, 2, 3, 64).permute(0, 3, 1, 2),
            atol=1e-5, rtol=0,
        )


def _offline(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(backbones.weights, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)


def test_offline_without_weights_says_which_file_to_put_where(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _offline(monkeypatch, tmp_path)
    with pytest.raises(HPSegError) as info:
        build_backbone("dinov3_vits16", timm_kwargs=TINY)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("the weights of dinov3_vits16 are not cached")
    assert "dinov3_vits16_pretrain_lvd1689m-*.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert "https://huggingface.co/timm/vit_small_patch16_dinov3_qkvb.lvd1689m/" in msg and "weights=PATH" in msg


def test_metas_file_in_the_hub_cache_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    model = tiny_timm(seed=5)
    (tmp_path / "checkpoints").mkdir()
    torch.save(meta_layout(model), tmp_path / "checkpoints" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    bb = build_backbone("dinov3_vits16", timm_kwargs=TINY)  # offline: only the cached file can serve
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            bb.features(x), model.forward_features(x)[:, 5:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2),
            atol=1e-5, rtol=0,
        )


# ------------------------------------------------------------------------------------------
# names and families
# ------------------------------------------------------------------------------------------


def test_short_names_resolve_to_timm_dinov3_models() -> None:
    expected = {"dinov3_vits16", "dinov3_vitsp16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16p",
                "dinov3_vit7b16", "dinov3_vitl16_sat493m", "dinov3_vit7b16_sat493m"}
    assert set(DINOV3_WEIGHTS) == expected and expected <= set(available_backbones())
    for name, release in DINOV3_WEIGHTS.items():
        arch, tag = release.timm_name.split(".")
        assert timm.is_model(release.timm_name) and "dinov3" in arch
        assert tag == ("sat493m" if name.endswith("sat493m") else "lvd1689m")
        assert release.meta_file.startswith(name.split("_sat")[0].replace("sp16", "s16plus").replace("h16p", "h16plus"))


@pytest.mark.parametrize("name", ["not_a_vit", "resnet18"])
def test_unknown_or_unsupported_backbone_lists_the_families(name: str) -> None:
    with pytest.raises(HPSegError) as info:
        build_backbone(name, pretrained=False)  # resnet18: a timm model, but no ViT
    msg = str(info.value)
    assert "\n" not in msg and name in msg
    assert "timm VisionTransformer" in msg and "timm Eva (DINOv3" in msg and "DINO v1" in msg


def test_unusable_timm_models_fail_before_any_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)  # a weights check would fail differently: the family check comes first
    with pytest.raises(HPSegError, match="resnet18.*supported families"):
        build_backbone("resnet18")
    with pytest.raises(HPSegError, match="no CLS token"):
        build_backbone("vit_base_patch16_siglip_224")


def test_hpseg_config_lists_the_short_names(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from hpseg.cli import main

    assert main(["config", "backbone=dinov3_vits16"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["model"]["backbone"] == "dinov3_vits16"  # still valid YAML
    assert all(name in text for name in available_backbones())
