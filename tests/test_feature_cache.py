"""Feature cache: cached training equals uncached training, reuse, and rebuild on any mismatch."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from hpseg.backbones import build_backbone
from hpseg.errors import HPSegError
from hpseg.feature_cache import ATTN_FILE, FEATS_FILE, MANIFEST, CachedFeatures, cache_bytes_per_image
from hpseg.hidden_positives import HiddenPositiveLoss
from hpseg.model import HPModel
from hpseg.runtime import Runtime
from hpseg.train import HPObjective, ReferencePools, backbone_outputs

RES = 32  # 4×4 patches of 8 px


class TinyScenes(Dataset):
    """Deterministic ``img``/``label`` per index, random ``img_aug`` (like a training dataset)."""

    class_names = ["a", "b", "c"]
    n_classes = 3

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def name(self, i: int) -> str:
        return f"scene{i:03d}"

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        img = torch.randn(3, RES, RES, generator=g)
        return {
            "img": img,
            "img_aug": img + 0.1 * torch.randn(3, RES, RES),
            "label": torch.randint(0, 3, (RES, RES), generator=g),
            "index": i,
            "name": self.name(i),
        }


class CountingBackbone(torch.nn.Module):
    """Counts the images the wrapped backbone sees."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.inner = backbone
        self.images = 0
        for attr in ("name", "patch_size", "embed_dim", "num_heads", "arch"):
            setattr(self, attr, getattr(backbone, attr))

    def forward(self, images, with_attention=True):
        self.images += images.shape[0]
        return self.inner(images, with_attention=with_attention)


@pytest.fixture
def backbone(tiny_backbone_file):
    return CountingBackbone(build_backbone("dino_vits8", tiny_backbone_file))


def wrap(dataset, backbone, cache_dir, **kw):
    return CachedFeatures.wrap(dataset, backbone, cache_dir, "cpu", batch_size=4, **kw)


def test_items_carry_backbone_outputs(backbone, tmp_path):
    ds = TinyScenes()
    cached = wrap(ds, backbone, tmp_path / "c")
    assert backbone.images == len(ds) and len(cached) == len(ds)
    item = cached[2]
    assert set(item) >= {"img", "img_aug", "label", "index", "name", "feats", "attn_logits"}
    assert item["feats"].shape == (64, 4, 4) and item["feats"].dtype == torch.float16
    assert item["attn_logits"].shape == (1, 17, 17)
    with torch.no_grad():
        ref = backbone.inner(ds[2]["img"][None])
    torch.testing.assert_close(item["feats"].float(), ref.feats[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(item["attn_logits"].float(), ref.attn_logits[0], atol=5e-3, rtol=2e-3)
    assert cached.class_names == ds.class_names and cached.n_classes == 3  # delegated attributes
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["length"] == 6 and manifest["dtype"] == "float16"
    assert manifest["feats_shape"] == [6, 64, 4, 4] and manifest["attn_shape"] == [6, 1, 17, 17]
    # memory maps are reopened lazily, never pickled (DataLoader workers)
    clone = pickle.loads(pickle.dumps(cached))
    assert clone._feats is None and torch.equal(clone[2]["feats"], item["feats"])


def test_cached_step_matches_uncached(backbone, tiny_backbone_file, tmp_path):
    torch.manual_seed(0)
    model = HPModel.create(build_backbone("dino_vits8", tiny_backbone_file), dim=8, n_classes=3)
    ds = TinyScenes(n=4)
    cached = wrap(ds, backbone, tmp_path / "c")
    items = [ds[i] for i in range(4)]
    plain = default_collate(items)
    with_cache = default_collate(
        [{**it, **{k: cached[i][k] for k in ("feats", "attn_logits")}} for i, it in enumerate(items)]
    )  # same img_aug draw in both
    cpu = Runtime.create("cpu", "fp32")
    outs = [backbone_outputs(model, b, cpu, need_aug=True) for b in (plain, with_cache)]
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=2e-3)

    objective = HPObjective(model, HiddenPositiveLoss(0.8, 1.0), alpha=0.05, sigma=28.0).train()
    pools = []
    for batch in (plain, with_cache):  # pools from a loader of either kind
        torch.manual_seed(1)
        ref = ReferencePools(4, 0.1, torch.Generator().manual_seed(2))
        pa = ref.collect(model, [batch], cpu, "agnostic")
        ps = ref.collect(model, [batch], cpu, "specific")
        pools.append((pa, ps))
    for a, b in zip(*pools):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    losses = []
    for (feats, attn, feats_aug), (pa, ps) in zip(outs, pools):
        torch.manual_seed(3)
        loss, parts = objective(feats, attn, feats_aug, plain["label"], pa, ps, 0.5)
        losses.append((loss, parts))
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=2e-3, rtol=1e-3)
    for key in losses[0][1]:
        torch.testing.assert_close(losses[0][1][key], losses[1][1][key], atol=2e-3, rtol=1e-3, msg=key)


def test_second_wrap_reuses_the_cache(backbone, tmp_path):
    ds = TinyScenes()
    first = wrap(ds, backbone, tmp_path / "c")
    backbone.images = 0
    again = wrap(ds, backbone, tmp_path / "c")
    assert backbone.images == 0
    assert torch.equal(again[5]["feats"], first[5]["feats"])


@pytest.mark.parametrize(
    "change",
    ["manifest_fingerprint", "weights", "dataset", "dtype", "no_attention", "interrupted", "truncated_file"],
)
def test_mismatching_cache_is_rebuilt(backbone, tmp_path, change):
    ds = TinyScenes()
    cache = tmp_path / "c"
    wrap(ds, backbone, cache)
    backbone.images = 0
    kwargs: dict = {}
    if change == "manifest_fingerprint":
        m = json.loads((cache / MANIFEST).read_text())
        m["backbone_sha256"] = "0" * 64
        (cache / MANIFEST).write_text(json.dumps(m))
    elif change == "weights":
        with torch.no_grad():
            backbone.inner.vit.blocks[0].attn.qkv.bias.add_(0.01)
    elif change == "dataset":
        ds = TinyScenes(seed=1)  # same length and names, other images
    elif change == "dtype":
        kwargs["dtype"] = torch.float32
    elif change == "no_attention":
        kwargs["store_attention"] = False
    elif change == "interrupted":  # build died after writing the arrays, before the manifest
        (cache / MANIFEST).unlink()
    elif change == "truncated_file":
        np.save(cache / FEATS_FILE, np.zeros((2, 64, 4, 4), np.float16))
    rebuilt = wrap(ds, backbone, cache, **kwargs)
    assert backbone.images == len(ds), "the cache was not rebuilt"
    with torch.no_grad():
        ref = backbone.inner(ds[1]["img"][None]).feats[0]
    torch.testing.assert_close(rebuilt[1]["feats"].float(), ref, atol=2e-3, rtol=2e-3)
    if change == "no_attention":
        assert "attn_logits" not in rebuilt[1] and not (cache / ATTN_FILE).exists()
    assert not list(cache.glob(".*.tmp.npy"))  # no temporary files left behind


def test_failed_build_leaves_no_valid_cache(backbone, tmp_path, monkeypatch):
    ds = TinyScenes()
    calls = {"n": 0}
    inner_forward = backbone.forward

    def failing(images, with_attention=True):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # interrupted mid-build
        return inner_forward(images, with_attention)

    monkeypatch.setattr(backbone, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        wrap(ds, backbone, tmp_path / "c")
    assert not (tmp_path / "c" / MANIFEST).exists() and not list((tmp_path / "c").glob("*.npy"))
    assert not list((tmp_path / "c").glob(".*.tmp.npy"))
    monkeypatch.undo()
    backbone.images = 0
    wrap(ds, backbone, tmp_path / "c")
    assert backbone.images == len(ds)


def test_a_full_disk_during_the_build_is_one_line_naming_the_cache(backbone, tmp_path, monkeypatch):
    import errno

    ds = TinyScenes()
    real = np.lib.format.open_memmap

    def full_disk(*args, **kwargs):  # the disk fills up while the cache file is being laid out
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "open_memmap", full_disk)
    with pytest.raises(HPSegError) as info:
        wrap(ds, backbone, tmp_path / "c")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "c" / FEATS_FILE) in message
    assert "No space left on device" in message
    assert not list((tmp_path / "c").glob("*.npy")) and not list((tmp_path / "c").glob(".*.tmp.npy"))
    monkeypatch.setattr(np.lib.format, "open_memmap", real)


def test_float16_overflow_and_bad_dtype_are_refused(backbone, tmp_path):
    with pytest.raises(HPSegError, match="dtype"):
        wrap(TinyScenes(), backbone, tmp_path / "c", dtype=torch.bfloat16)
    with torch.no_grad():
        backbone.inner.vit.blocks[0].attn.qkv.weight.mul_(1e4)  # attention logits beyond float16
    with pytest.raises(HPSegError, match="float32"):
        wrap(TinyScenes(), backbone, tmp_path / "c")
    assert not (tmp_path / "c" / MANIFEST).exists()


def test_disk_cost_formula():
    # ViT-S/8 at 224 px: 0.60 MB of features + 7.4 MB of attention per image in float16
    feats_only = cache_bytes_per_image(384, 6, (28, 28), store_attention=False)
    full = cache_bytes_per_image(384, 6, (28, 28))
    assert feats_only == 2 * 384 * 784 and round((full - feats_only) / 1e6, 1) == 7.4
