"""hpseg compare: side-by-side table, protocol differences flagged."""

from __future__ import annotations

import json

import pytest

from hpseg.cli import main
from hpseg.compare import compare_runs, protocol_differences
from hpseg.errors import HPSegError


def _write(folder, miou, crf=False, seeds=False):
    folder.mkdir(parents=True)
    protocol = {"dataset": "cocostuff27", "split": "val", "n_images": 5, "eval_resolution": 320, "crf": crf,
                "n_clusters": 27, "n_classes": 27, "matching": "hungarian"}
    if seeds:
        doc = {"protocol": protocol, "aggregate": {"unsupervised": {"accuracy": 50.0, "accuracy_std": 1.0,
                                                                    "miou": miou, "miou_std": 0.5}}}
    else:
        doc = {"protocol": protocol, "metrics": {"unsupervised": {"accuracy": 50.0, "miou": miou},
                                                 "linear": {"accuracy": 60.0, "miou": 30.0}}}
    (folder / "results.json").write_text(json.dumps(doc))


def test_compare_table_and_files(tmp_path):
    _write(tmp_path / "a", 20.0)
    _write(tmp_path / "b", 22.5, seeds=True)
    text = compare_runs([tmp_path / "a", tmp_path / "b"], out=tmp_path / "cmp")
    assert "20.00" in text and "22.50 ± 0.50" in text
    assert "protocols agree" in text
    assert (tmp_path / "cmp" / "compare.png").is_file()
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["a", "b"]


def test_protocol_difference_is_flagged(tmp_path, capsys):
    _write(tmp_path / "a", 20.0, crf=False)
    _write(tmp_path / "b", 21.0, crf=True)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "protocols differ" in out and "crf" in out
    assert protocol_differences([{"crf": True}, {"crf": True}]) == {}


def test_missing_results_is_a_clear_error(tmp_path):
    with pytest.raises(HPSegError, match="hpseg evaluate"):
        compare_runs([tmp_path])


def test_runs_without_labels_compare_by_their_label_free_figures(tmp_path):
    protocol = {"dataset": "folder", "split": "held-out 20% of the folder", "n_images": 9, "eval_resolution": 160,
                "crf": False, "n_clusters": 6, "n_classes": 6, "matching": "none (no labels)", "labelled": False}
    for name, flip in (("k6", 61.5), ("k8", 48.25)):
        (tmp_path / name).mkdir()
        doc = {"protocol": protocol, "label_free": {
            "methods": {"HP": {"flip_stability": flip, "empty_clusters": 0}, "k-means": {"flip_stability": 66.0}},
            "agreement": {"methods": ["HP", "k-means"], "nmi": 0.4}, "n_images": 9}}
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    text = compare_runs([tmp_path / "k6", tmp_path / "k8"], out=tmp_path / "cmp")
    row = next(line for line in text.splitlines() if line.startswith("HP flip stability"))
    assert row.split()[-2:] == ["61.5", "48.2"]
    assert any(line.startswith("HP vs k-means agreement, NMI") for line in text.splitlines())
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["label_free"]["k8"]["HP flip stability %"] == 48.25


def _unlabelled(folder, backbone="dino_vits8", weights="pretrained", flip=61.5):
    folder.mkdir(parents=True)
    protocol = {"dataset": "folder", "split": "held-out 20% of the folder", "n_images": 9, "eval_resolution": 160,
                "crf": False, "n_clusters": 6, "n_classes": 6, "matching": "none (no labels)", "labelled": False,
                "backbone": backbone, "backbone_weights": weights}
    doc = {"protocol": protocol, "label_free": {
        "methods": {"HP": {"flip_stability": flip, "photometric_stability": 70.0, "boundary_edge_precision": 40.0,
                           "flip_stability_corrected": flip / 2, "intervals": {"flip_stability": [flip - 5, flip + 4]}},
                    "k-means": {"flip_stability": 66.0, "photometric_stability": 80.0, "boundary_edge_precision": 50.0}},
        "n_images": 9, "verdict": {"overall": f"No clear difference between HP and k-means ({flip})."}}}
    (folder / "results.json").write_text(json.dumps(doc))


def test_differing_backbones_and_weights_are_flagged_and_random_weights_noted(tmp_path):
    _unlabelled(tmp_path / "dino", "dino_vits8", "pretrained")
    _unlabelled(tmp_path / "random", "dino_vits8", "random")
    _unlabelled(tmp_path / "demo", "hpseg_demo_vit", "pretrained")
    text = compare_runs([tmp_path / "dino", tmp_path / "random"])
    assert "protocols differ" in text and "backbone_weights: dino=pretrained | random=random" in text
    assert "NOTE: random was evaluated with an untrained backbone" in text
    text = compare_runs([tmp_path / "dino", tmp_path / "demo"])
    assert "backbone: dino=dino_vits8 | demo=hpseg_demo_vit" in text and "NOTE" not in text
    assert "protocols agree" in compare_runs([tmp_path / "dino", tmp_path / "dino"])


def test_unlabelled_runs_chart_their_label_free_figures_not_empty_accuracy(tmp_path, monkeypatch):
    import hpseg.compare as compare

    _unlabelled(tmp_path / "a", flip=61.5)
    _unlabelled(tmp_path / "b", flip=48.0)
    drawn = []
    monkeypatch.setattr(compare, "save_figure", lambda fig, path: drawn.append(fig))
    text = compare_runs([tmp_path / "a", tmp_path / "b"], out=tmp_path / "cmp")
    assert "verdict a: No clear difference between HP and k-means (61.5)." in text
    assert "acc" not in text.split()  # no accuracy rows
    corrected = next(line for line in text.splitlines() if line.startswith("HP flip stability, chance-corrected"))
    assert corrected.split()[-2:] == ["30.8", "24"]
    (fig,) = drawn
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["flip stability %", "photometric stability %", "boundaries on image edges %"]
    hp_bars = fig.axes[0].patches[:2]  # the first method's bars, one per run
    assert [bar.get_height() for bar in hp_bars] == [61.5, 48.0]
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert doc["verdicts"]["b"].endswith("(48.0).")
