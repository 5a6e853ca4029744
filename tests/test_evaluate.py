"""Evaluation: the evaluation loop with and without labels, cluster usage, the results folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpseg.backbones import BackboneArch, backbone_from_arch
from hpseg.diagnostics import cluster_usage
from hpseg.evaluate import evaluate_model, write_results
from hpseg.model import HPModel
from hpseg.results import Protocol, Results
from hpseg.runtime import Runtime

CPU = Runtime.create("cpu", "fp32")


def test_cluster_usage():
    assert cluster_usage([10, 10, 10, 10]) == {"cluster_entropy": pytest.approx(1.0), "empty_clusters": 0}
    used = cluster_usage([40, 0, 0, 0])
    assert used["cluster_entropy"] == 0.0 and used["empty_clusters"] == 3


def _model() -> HPModel:
    torch.manual_seed(0)
    bb = backbone_from_arch(BackboneArch("dino_custom", 8, 32, 1, 1, (4, 4)))
    return HPModel.create(bb, dim=8, n_classes=3, n_clusters=4).eval()


def _loader(labelled: bool) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    items = [{"img": torch.randn(3, 32, 32, generator=g),
              "label": torch.randint(0, 3, (32, 32), generator=g) if labelled else torch.full((32, 32), -1)}
             for _ in range(4)]
    return DataLoader(items, batch_size=2)


def test_evaluation_with_labels_scores_and_writes(tmp_path):
    model = _model()
    out = evaluate_model(model, _loader(True), CPU, n_gallery=2, per_cluster=2)
    assert out.labelled and set(out.metrics) == {"unsupervised", "linear"}
    assert len(out.metrics["unsupervised"].assignment) == 4 and sum(out.cluster_pixels) == 4 * 32 * 32
    protocol = Protocol(dataset="synthetic", split="val", n_images=out.n_images, eval_resolution=32, crf=False,
                        n_clusters=4, n_classes=3, matching="hungarian", backbone="dino_custom")
    results = Results(protocol, ["a", "b", "c"], metrics=out.metrics,
                      confusion={h: c.tolist() for h, c in out.confusion.items()})
    write_results(tmp_path, results, out)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["unsupervised"]["miou"] == pytest.approx(out.metrics["unsupervised"].miou)
    assert (tmp_path / saved["gallery"][0]["label"]).is_file()
    assert (tmp_path / "confusion_unsupervised.png").is_file() and (tmp_path / "predictions.png").is_file()
    strips = [e for e in saved["cluster_gallery"] if "strip" in e]
    assert strips and all((tmp_path / e["strip"]).is_file() for e in strips)


def test_evaluation_without_labels_reports_no_nan(tmp_path):
    model = _model()
    out = evaluate_model(model, _loader(False), CPU, n_gallery=2, per_cluster=2)
    assert not out.labelled and out.metrics == {} and out.confusion == {}
    assert set(out.gallery[0]) == {"image", "unsupervised"}
    protocol = Protocol(dataset="folder", split="val", n_images=out.n_images, eval_resolution=32, crf=False,
                        n_clusters=4, n_classes=3, matching="hungarian", backbone="dino_custom", labelled=False)
    write_results(tmp_path, Results(protocol, ["a", "b", "c"], diagnostics=cluster_usage(out.cluster_pixels)), out)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["cluster_gallery"]


def test_gallery_maps_clusters_through_the_assignment():
    out = evaluate_model(_model(), _loader(True), CPU, n_gallery=1)
    assignment = np.asarray(out.metrics["unsupervised"].assignment)
    assert set(np.unique(out.gallery[0]["unsupervised"])) <= set(assignment.tolist())
