"""Synthetic scenes: deterministic, exact labels, classes not separable by colour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpseg.data import build_dataset
from hpseg.data.synthetic import SyntheticScenes, render_scene
from hpseg.errors import HPSegError


def test_same_seed_same_scene_and_splits_differ():
    a = SyntheticScenes("train", "eval", 48, n_images=3, seed=1)
    b = SyntheticScenes("train", "eval", 48, n_images=3, seed=1)
    v = SyntheticScenes("val", "eval", 48, n_images=3, seed=1)
    ia, ib, iv = a[2], b[2], v[2]
    assert torch.equal(ia["img"], ib["img"]) and torch.equal(ia["label"], ib["label"])
    assert not torch.equal(ia["img"], iv["img"])
    assert not torch.equal(a[0]["img"], SyntheticScenes("train", "eval", 48, n_images=3, seed=2)[0]["img"])


def test_item_contract_and_labels():
    ds = SyntheticScenes("train", "train", 32, n_images=4, n_classes=5)
    item = ds[1]
    assert item["img"].shape == (3, 32, 32) and item["img"].dtype == torch.float32
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
    assert item["img_aug"].shape == (3, 32, 32) and not torch.equal(item["img_aug"], item["img"])
    assert item["index"] == 1 and item["name"] == "train-00001"
    labels = torch.cat([ds[i]["label"].flatten() for i in range(4)])
    assert labels.min() >= 0 and labels.max() < 5
    assert all(len(ds[i]["label"].unique()) >= 3 for i in range(4))  # several classes per scene
    assert ds.n_classes == 5 and len(ds.class_names) == 5


def test_colour_does_not_separate_classes():
    """Per-class mean colours over many scenes are nearly equal; within a class they vary widely."""
    rng = np.random.default_rng(0)
    sums = np.zeros((5, 3))
    counts = np.zeros(5)
    region_means = {k: [] for k in range(5)}
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


def test_build_dataset_dispatch_and_errors():
    ds = build_dataset("synthetic", None, "val", mode="eval", resolution=24, n_images=2, n_classes=4)
    assert len(ds) == 2 and ds.n_classes == 4
    with pytest.raises(HPSegError, match="3 to 8 classes"):
        SyntheticScenes(n_classes=12)
    with pytest.raises(HPSegError, match="split"):
        SyntheticScenes(split="test")
