"""The results schema: protocol blocks, tables, seed aggregation, round trips."""

from __future__ import annotations

import json

import pytest

from hpseg.errors import HPSegError
from hpseg.results import HeadScore, Protocol, Results, aggregate_seeds, find_results, format_table


def _protocol(**kw) -> Protocol:
    return Protocol(dataset="cocostuff27", split="val", n_images=10, eval_resolution=320, crf=True, n_clusters=30,
                    n_classes=27, matching="hungarian", backbone="dino_vits8", **kw)


def test_protocol_names_everything():
    p = _protocol()
    d = p.to_dict()
    for key in ("dataset", "split", "n_images", "eval_resolution", "crop", "crf", "n_clusters", "n_classes",
                "matching", "checkpoint_sha256", "precision", "hpseg_version", "torch_version", "labelled"):
        assert key in d
    text = p.describe()
    assert "cocostuff27 / val (10 images)" in text and "CRF on" in text and "K=30" in text and "C=27" in text
    assert "NO LABELS" in _protocol(labelled=False).describe()


def test_aggregate_seeds_mean_and_sample_std():
    per_seed = {
        "seed-0": {"unsupervised": HeadScore(50.0, 20.0)},
        "seed-1": {"unsupervised": HeadScore(54.0, 24.0)},
        "seed-2": {"unsupervised": HeadScore(58.0, 22.0)},
    }
    agg = aggregate_seeds(per_seed)["unsupervised"]
    assert agg.accuracy == pytest.approx(54.0) and agg.accuracy_std == pytest.approx(4.0)
    assert agg.miou == pytest.approx(22.0) and agg.miou_std == pytest.approx(2.0)
    assert agg.n_seeds == 3
    text = format_table(aggregate_seeds(per_seed))
    assert "54.00 ± 4.00" in text and "22.00 ± 2.00" in text


def test_round_trip_and_summary(tmp_path):
    res = Results(_protocol(), ["a", "b"], metrics={"unsupervised": HeadScore(60.0, 30.0, [20.0, 40.0], [1, 0])},
                  baseline={"unsupervised": HeadScore(50.0, 25.0)}, diagnostics={"positive_precision_agnostic": 0.8})
    path = res.write(tmp_path / "results.json")
    back = Results.read(path)
    assert back.to_dict() == res.to_dict()
    text = back.summary()
    assert "protocol:" in text and "k-means baseline" in text and "positive_precision_agnostic 80.0%" in text
    assert find_results(tmp_path) == path


def test_unlabelled_summary_says_so():
    res = Results(_protocol(labelled=False), ["a"], diagnostics={"cluster_entropy": 0.5, "empty_clusters": 2})
    text = res.summary()
    assert "no labels to score against" in text and "empty_clusters 2" in text and "nan" not in text.lower()


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(HPSegError, match="no results.json"):
        find_results(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(HPSegError, match="not an hpseg results file"):
        Results.read(tmp_path / "results.json")
