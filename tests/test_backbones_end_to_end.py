"""Every backbone family through the commands, with random weights: DINO ViT-S/8 (DINO v1
files), DINOv2 ViT-S/14 with registers (timm VisionTransformer) and DINOv3 ViT-S/16 (timm Eva,
RoPE): one training step, evaluation, segmentation of a non-square image and ONNX export
agreeing with PyTorch — each from the checkpoint the training wrote (the backbone rebuilt
from its stored architecture). Narrow, shallow versions of each keep it fast: a DINO-layout
weights file for ``dino_vits8``, timm's own classes with fewer blocks for the timm names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hpseg import pipeline
from hpseg.backbones import build_backbone
from hpseg.checkpoint import load_model
from hpseg.config import build_config
from hpseg.export import export_model, verify_export
from hpseg.pipeline import evaluate_path, run_baseline, train_one
from hpseg.segmenter import Segmenter

# (backbone, resolution: a 3×3 patch grid, family, extra overrides)
CASES = [
    ("dino_vits8", 24, "dino", []),
    ("vit_small_patch14_reg4_dinov2", 42, "timm-vit", []),
    ("dinov3_vits16", 48, "timm-eva", ["train.cache_features=true"]),  # + the feature cache
]


TINY_TIMM = {"embed_dim": 48, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize(("backbone", "resolution", "family", "extra"), CASES, ids=[c[0] for c in CASES])
def test_train_evaluate_segment_export(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_backbone_file: Path,
    backbone: str,
    resolution: int,
    family: str,
    extra: list[str],
) -> None:
    if family == "dino":
        extra = [*extra, f"model.weights={tiny_backbone_file}"]  # the weights decide the shape
    else:
        monkeypatch.setattr(
            pipeline, "build_backbone", lambda name, *a, **k: build_backbone(name, *a, **k, timm_kwargs=TINY_TIMM)
        )
    settings = [
        f"model.backbone={backbone}",
        "model.pretrained=false",
        "model.dim=8",
        f"data.resolution={resolution}",
        f"data.eval_resolution={resolution}",
        "data.synthetic_train_images=4",
        "data.synthetic_val_images=2",
        "data.synthetic_classes=3",
        "train.batch_size=4",
        "train.epochs=1",
        "train.max_iters=1",
        "train.valid_freq=1",
        "train.progress=false",
        "loss.pool_size=4",
        "loss.warmup=0",
        "loss.renew_interval=1",
        "eval.batch_size=2",
        "eval.n_gallery=1",
        f"train.out_dir={tmp_path / 'run'}",
        *extra,
    ]
    summary = train_one(build_config("synthetic", settings), tmp_path / "run")
    assert summary["iterations"] == 1
    if "train.cache_features=true" in extra:
        assert any((tmp_path / "run" / "feature_cache").iterdir())
    best = tmp_path / "run" / "best.pt"
    model = load_model(best)
    assert model.backbone.family == family
    assert model.spec.backbone == (backbone if family != "dino" else "dino_custom")

    results = evaluate_path(best, out_dir=tmp_path / "eval")
    assert results.protocol.n_images == 2
    assert 0.0 <= results.metrics["unsupervised"].accuracy <= 100.0
    baseline = run_baseline("synthetic", settings)  # k-means on the same frozen backbone
    assert baseline.baseline and all(0.0 <= m.accuracy <= 100.0 for m in baseline.baseline.values())

    p = model.backbone.patch_size
    image = np.random.default_rng(0).integers(0, 256, (2 * p + 5, 4 * p + 3, 3), dtype=np.uint8)
    labels = Segmenter(model, device="cpu").predict(image)
    assert labels.shape == image.shape[:2] and labels.min() >= 0 and labels.max() < model.n_clusters

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("ONNX export needs onnx and onnxruntime: pip install 'hpseg[export]'")
    size = (2 * p, 3 * p)  # not square, not the training grid
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        path = export_model(model, tmp_path / f"m.{suffix}", format=fmt, image_size=size, head="cluster")
        with torch.no_grad():
            assert verify_export(model, path, fmt, size, "cluster") < 1e-4
