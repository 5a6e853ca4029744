"""Evaluation helpers: k-means baseline, seed aggregation, protocol and tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hpseg.evaluate import (
    EvalOutput,
    aggregate_seeds,
    colorize,
    format_protocol,
    format_table,
    kmeans,
    protocol_block,
    results_document,
    write_results,
)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3] * 5
    x = torch.cat([c + 0.05 * torch.randn(50, 4, generator=g) for c in centres])
    c = kmeans(x, 3, seed=1)
    assign = (torch.nn.functional.normalize(x, dim=1) @ c.T).argmax(1)
    # every true group maps to a single, distinct cluster
    groups = [set(assign[i * 50 : (i + 1) * 50].tolist()) for i in range(3)]
    assert all(len(gr) == 1 for gr in groups)
    assert len(set.union(*groups)) == 3


def test_kmeans_is_seeded():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(kmeans(x, 5, seed=7), kmeans(x, 5, seed=7))


def test_kmeans_needs_enough_samples():
    with pytest.raises(ValueError, match="at least k=5"):
        kmeans(torch.randn(3, 2), 5)


def test_aggregate_seeds_mean_and_sample_std():
    per_seed = {
        "seed-0": {"unsupervised": {"accuracy": 50.0, "miou": 20.0}},
        "seed-1": {"unsupervised": {"accuracy": 54.0, "miou": 24.0}},
        "seed-2": {"unsupervised": {"accuracy": 58.0, "miou": 22.0}},
    }
    agg = aggregate_seeds(per_seed)["unsupervised"]
    assert agg["accuracy"] == pytest.approx(54.0) and agg["accuracy_std"] == pytest.approx(4.0)
    assert agg["miou"] == pytest.approx(22.0) and agg["miou_std"] == pytest.approx(2.0)
    assert agg["n_seeds"] == 3
    text = format_table(aggregate_seeds(per_seed))
    assert "54.00 ± 4.00" in text and "22.00 ± 2.00" in text


def _protocol():
    return protocol_block(
        dataset="cocostuff27", split="val", n_images=10, eval_resolution=320, crf=True, n_clusters=30,
        n_classes=27, matching="hungarian", checkpoint=None, backbone="dino_vits8", device="cpu",
    )


def test_protocol_names_everything():
    p = _protocol()
    for key in ("dataset", "split", "n_images", "eval_resolution", "crop", "crf", "n_clusters", "n_classes",
                "matching", "checkpoint_sha256", "hpseg_version", "torch_version"):
        assert key in p
    text = format_protocol(p)
    assert "cocostuff27 / val (10 images)" in text and "CRF on" in text and "K=30" in text and "C=27" in text


def test_colorize_marks_ignore_black():
    lab = np.array([[0, 1], [-1, 5]])
    rgb = colorize(lab, 3)
    assert rgb.shape == (2, 2, 3)
    assert (rgb[1, 0] == 0).all() and (rgb[1, 1] == 0).all()  # ignore and out-of-range
    assert not (rgb[0, 0] == rgb[0, 1]).all()


def test_write_results_files(tmp_path):
    conf = torch.tensor([[5, 1], [0, 4]])
    out = EvalOutput(
        metrics={"unsupervised": {"accuracy": 90.0, "miou": 80.0, "iou": [83.3, 80.0], "assignment": [0, 1]},
                 "linear": {"accuracy": 90.0, "miou": 80.0, "iou": [83.3, 80.0]}},
        confusion={"unsupervised": conf, "linear": conf},
        n_images=1,
        gallery=[{"image": np.zeros((4, 4, 3), np.uint8), "label": np.zeros((4, 4), np.int64),
                  "unsupervised": np.ones((4, 4), np.int64), "linear": np.ones((4, 4), np.int64)}],
    )
    doc = results_document(out, _protocol(), ["a", "b"])
    write_results(tmp_path, doc, out, ["a", "b"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["unsupervised"]["miou"] == 80.0
    assert saved["confusion"]["unsupervised"] == [[5, 1], [0, 4]]
    assert (tmp_path / saved["gallery"][0]["label"]).is_file()
    assert (tmp_path / "confusion_unsupervised.png").is_file() and (tmp_path / "predictions.png").is_file()
