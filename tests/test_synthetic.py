"""Synthetic scenes: deterministic, exact labels, classes not separable by colour; the shipped demo ViT."""

from __future__ import annotations

import json
from functools import partial
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from hpseg.data import build_dataset
from hpseg.data.synthetic import CLASS_NAMES, SyntheticScenes, render_scene
from hpseg.errors import HPSegError


def test_same_seed_same_scene_and_splits_differ():
    a = SyntheticScenes("train", "eval", 48, n_images=3, seed=1)
    b = SyntheticScenes("train", "eval", 48, n_images=3, seed=1, cache=False)
    v = SyntheticScenes("val", "eval", 48, n_images=3, seed=1)
    ia, ib, iv = a[2], b[2], v[2]
    assert torch.equal(ia["img"], ib["img"]) and torch.equal(ia["label"], ib["label"])
    assert torch.equal(a[2]["img"], ia["img"])  # second read (from the cache) is the same
    assert not torch.equal(ia["img"], iv["img"])
    assert not torch.equal(a[0]["img"], a[1]["img"])
    assert not torch.equal(a[0]["img"], SyntheticScenes("train", "eval", 48, n_images=3, seed=2)[0]["img"])



def test_dev_split_is_its_own_stream():
    """``dev`` (for choosing settings) shares no scene with ``val`` (for reporting) or ``train``."""
    from hpseg.data.synthetic import SPLITS

    assert {"train", "val", "dev", "pretrain"} <= set(SPLITS)
    n = 6
    dev = SyntheticScenes("dev", "eval", 48, n_images=n, seed=0)
    others = [SyntheticScenes(split, "eval", 48, n_images=n, seed=0) for split in ("val", "train", "pretrain")]
    for i in range(n):
        for other in others:
            for j in range(n):
                assert not torch.equal(dev[i]["img"], other[j]["img"])
    again = SyntheticScenes("dev", "eval", 48, n_images=n, seed=0, cache=False)
    assert torch.equal(dev[3]["img"], again[3]["img"]) and torch.equal(dev[3]["label"], again[3]["label"])
    assert dev.name(2) == "dev-00002"
    ds = build_dataset("synthetic", None, "dev", mode="eval", resolution=24, n_images=2, n_classes=5)
    assert len(ds) == 2

def test_render_scene_is_a_function_of_the_generator():
    x1, y1 = render_scene(np.random.default_rng(7), 40, 6)
    x2, y2 = render_scene(np.random.default_rng(7), 40, 6)
    assert x1.shape == (40, 40, 3) and x1.dtype == np.uint8
    assert y1.shape == (40, 40) and y1.dtype == np.int64
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_item_contract_and_labels():
    ds = SyntheticScenes("train", "train", 32, n_images=4, n_classes=5)
    item = ds[1]
    assert item["img"].shape == (3, 32, 32) and item["img"].dtype == torch.float32
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
    assert item["img_aug"].shape == (3, 32, 32) and item["img_aug"].dtype == torch.float32
    assert not torch.equal(item["img_aug"], item["img"])
    assert item["index"] == 1 and item["name"] == "train-00001"
    assert "img_aug" not in SyntheticScenes("train", "eval", 32, n_images=4)[1]
    labels = torch.cat([ds[i]["label"].flatten() for i in range(4)])
    assert labels.min() >= 0 and labels.max() < 5  # exact labels: no ignore pixels
    assert all(len(ds[i]["label"].unique()) >= 3 for i in range(4))  # several classes per scene
    assert ds.n_classes == 5 and ds.class_names == CLASS_NAMES[:5]


@pytest.mark.parametrize("n_classes", [3, 8])
def test_class_count_is_configurable(n_classes: int):
    ds = SyntheticScenes("val", "eval", 48, n_images=24, n_classes=n_classes)
    seen = set()
    for i in range(len(ds)):
        _, label = ds.render(i)
        assert label.min() >= 0 and label.max() < n_classes
        seen.update(np.unique(label).tolist())
    assert seen == set(range(n_classes))  # every class occurs
    assert len(set(ds.class_names)) == n_classes


def test_image_size_differs_from_resolution():
    item = SyntheticScenes("val", "eval", 32, n_images=1, image_size=64)[0]
    assert item["img"].shape == (3, 32, 32) and item["label"].shape == (32, 32)


def _pixels(n_scenes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for _ in range(n_scenes):
        rgb, lab = render_scene(rng, 48, 5)
        xs.append(rgb.reshape(-1, 3) / 255.0)
        ys.append(lab.ravel())
    return np.concatenate(xs), np.concatenate(ys)


def test_colour_does_not_separate_classes():
    """Per-class mean colours over many scenes are nearly equal; within a class they vary widely."""
    rng = np.random.default_rng(0)
    sums = np.zeros((5, 3))
    counts = np.zeros(5)
    region_means: dict[int, list[np.ndarray]] = {k: [] for k in range(5)}
    for _ in range(60):
        rgb, lab = render_scene(rng, 48, 5)
        for k in np.unique(lab):
            px = rgb[lab == k].astype(float)
            sums[k] += px.sum(0)
            counts[k] += len(px)
            region_means[k].append(px.mean(0))
    class_means = sums / counts[:, None]
    spread_between = class_means.std(0).mean()
    spread_within = np.mean([np.std(region_means[k], axis=0).mean() for k in range(5)])
    assert spread_between < 0.35 * spread_within


def test_pixel_colour_classifier_is_near_chance():
    """A nearest-class-mean classifier on pixel colour, fitted on other scenes, scores a balanced
    accuracy close to chance (0.2 for 5 classes)."""
    rng = np.random.default_rng(1)
    x, y = _pixels(40, rng)
    xv, yv = _pixels(20, rng)
    means = np.stack([x[y == k].mean(0) for k in range(5)])
    pred = ((xv[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    balanced = np.mean([(pred[yv == k] == k).mean() for k in range(5)])
    assert balanced < 0.32


def test_build_dataset_dispatch_and_errors():
    ds = build_dataset("synthetic", None, "val", mode="eval", resolution=24, n_images=2, n_classes=4)
    assert len(ds) == 2 and ds.n_classes == 4
    with pytest.raises(HPSegError, match="3 to 8 classes"):
        SyntheticScenes(n_classes=12)
    with pytest.raises(HPSegError, match="3 to 8 classes"):
        render_scene(np.random.default_rng(0), 32, 2)
    with pytest.raises(HPSegError, match="split"):
        SyntheticScenes(split="test")
    with pytest.raises(HPSegError, match="at least 1"):
        SyntheticScenes(n_images=0)


# -- the shipped demo backbone -------------------------------------------------------------


def _asset(name: str) -> Path:
    path = Path(str(resources.files("hpseg") / "assets" / name))
    if not path.is_file():
        pytest.skip(
            f"hpseg/assets/{name} is absent: create it with `python scripts/pretrain_demo_backbone.py`"
        )
    return path


def test_demo_weights_load_into_the_fixed_architecture():
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    state = load_file(str(_asset("demo_vit.safetensors")))
    assert "cls_token" in state and "pos_embed" in state and "patch_embed.proj.weight" in state
    assert tuple(state["pos_embed"].shape) == (1, 1 + 12 * 12, 192)
    vit = VisionTransformer(
        img_size=96,
        patch_size=8,
        embed_dim=192,
        depth=4,
        num_heads=3,
        mlp_ratio=4,
        qkv_bias=True,
        num_classes=0,
        class_token=True,
        global_pool="token",
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
    )
    vit.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    vit.eval()
    images = torch.stack([SyntheticScenes("val", "eval", 96, n_images=2)[i]["img"] for i in range(2)])
    with torch.no_grad():
        tokens = vit.forward_features(images)
    assert tokens.shape == (2, 1 + 144, 192) and torch.isfinite(tokens).all()
    assert tokens[:, 1:].std(1).mean() > 0  # patch features vary across the image


def test_demo_weights_metadata_reports_the_probe():
    meta = json.loads(_asset("demo_vit.json").read_text(encoding="utf-8"))
    probe = meta["probe"]
    for key in ("pretrained_vit", "random_vit", "raw_colour"):
        assert 0 <= probe[key]["miou"] <= 100
    assert meta["recipe"]["seed"] == 0 and meta["seconds"] > 0
