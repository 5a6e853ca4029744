"""Your own images, no labels: train, evaluate, name the clusters, segment — with no NaN anywhere,
outputs named after the data and readable by others."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpseg.cli import main

N_IMAGES = 8


def _photos(root: Path) -> Path:
    """A folder of unlabelled 'photos' (textured halves), in a subfolder structure."""
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        top = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
        bottom = np.tile(rng.integers(0, 256, (1, 40, 3), dtype=np.uint8), (20, 1, 1))
        folder = root / ("beach" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([top, bottom])).save(folder / f"p{i}.jpg")
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone_file) -> tuple[Path, Path, Path]:
    """``hpseg train --preset folder`` on the photos, run from a fresh working directory
    (the run folder is named after the data) under umask 022."""
    work = tmp_path_factory.mktemp("work")
    photos = _photos(work / "holiday")
    cwd, umask = os.getcwd(), os.umask(0o022)
    try:
        os.chdir(work)
        argv = ["train", "--preset", "folder", f"data.root={photos}", "data.n_classes=3", "data.resolution=32",
                "data.eval_resolution=32", "data.num_workers=0", "backbone=dino_vits8",
                f"weights={tiny_backbone_file}", "model.dim=8", "train.batch_size=4", "train.epochs=2",
                "train.valid_freq=1", "train.log_freq=1", "train.progress=false", "loss.warmup=1"]
        assert main(argv) == 0
        assert main(["evaluate", "runs/holiday"]) == 0
    finally:
        os.chdir(cwd)
        os.umask(umask)
    return work, photos, work / "runs" / "holiday"


def test_training_without_labels_is_clean(trained) -> None:
    _, _, run = trained
    assert run.is_dir()  # runs/<folder name>
    for name in ("best.pt", "final.pt", "metrics.jsonl", "train_summary.json", "training_curve.png"):
        assert (run / name).is_file(), name
    log = (run / "metrics.jsonl").read_text()
    assert "NaN" not in log and "Infinity" not in log
    vals = [json.loads(line)["val"] for line in log.splitlines() if '"val"' in line]
    assert vals and all(v["labelled"] is False and "cluster_entropy" in v["diagnostics"] for v in vals)
    summary = json.loads((run / "train_summary.json").read_text())
    assert "final model" in summary["selection"] and "NaN" not in json.dumps(summary)


def test_evaluate_says_no_labels_and_writes_gallery_and_report(trained, capsys) -> None:
    _, _, run = trained
    results = (run / "eval" / "results.json").read_text()
    assert "NaN" not in results
    doc = json.loads(results)
    assert doc["protocol"]["labelled"] is False and doc["metrics"] == {}
    strips = [e for e in doc["cluster_gallery"] if "strip" in e]
    assert strips and all((run / "eval" / e["strip"]).is_file() for e in strips)
    assert (run / "eval" / "predictions.png").is_file() and (run / "eval" / "report.html").is_file()
    page = re.sub(r'src="data:[^"]*"', "", (run / "eval" / "report.html").read_text())  # drop embedded images
    assert "No labels to score against" in page and "Clusters" in page and "nan" not in page.lower()


def test_names_reach_segment_legends_and_the_report(trained, tmp_path, capsys) -> None:
    _, photos, run = trained
    assert main(["name", str(run), "0=sky", "1=sea", "2=sky"]) == 0  # two clusters, one name
    assert main(["segment", str(run / "best.pt"), str(photos), "--out", str(tmp_path / "seg")]) == 0
    legend = json.loads((tmp_path / "seg" / "legend.json").read_text())
    assert [row["name"] for row in legend["labels"]] == ["sky", "sea"]
    assert legend["assignment"] == [0, 1, 0]
    labels = np.asarray(Image.open(tmp_path / "seg" / "p0.png"))
    assert set(np.unique(labels)) <= {0, 1}
    assert (tmp_path / "seg" / "beach" / "p1_overlay.jpg").is_file()  # subfolders mirrored
    assert main(["report", str(run / "eval")]) == 0
    page = (run / "eval" / "report.html").read_text()
    assert "sky" in page and "sea" in page
    doc = json.loads((run / "eval" / "results.json").read_text())
    assert [e["name"] for e in doc["cluster_gallery"]] == ["sky", "sea", "sky"]
    assert main(["name", str(run), "7=moon"]) == 2 and "does not exist" in _err(capsys)


def test_outputs_are_readable_by_others(trained) -> None:
    work, _, run = trained
    written = [p for p in run.rglob("*") if p.is_file()]
    assert len(written) > 10
    private = [str(p.relative_to(work)) for p in written if not p.stat().st_mode & stat.S_IROTH]
    assert not private, private  # 0644 under umask 022, also for files renamed into place


def test_folder_preset_trains_hp_on_a_small_folder(tmp_path, tiny_backbone_file, capsys) -> None:
    """The folder preset's own schedule (no warm-up / renewal / validation overrides) on 12
    unlabelled images: the schedule is fitted and logged, λ switches on for most of the run, the
    held-out images are never trained on, and validation does not follow every short epoch."""
    import time

    rng = np.random.default_rng(1)
    photos = tmp_path / "few"
    photos.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photos / f"im{i:02d}.png")
    argv = ["train", "--preset", "folder", f"data.root={photos}", "data.n_classes=3", "data.resolution=32",
            "data.eval_resolution=32", "data.num_workers=0", "backbone=dino_vits8", f"weights={tiny_backbone_file}",
            "model.dim=8", "train.batch_size=4", "train.epochs=5", "train.log_freq=1", "train.progress=false",
            f"train.out_dir={tmp_path / 'run'}"]
    start = time.perf_counter()
    assert main(argv) == 0
    assert time.perf_counter() - start < 60
    fitted = [line for line in _err(capsys).splitlines() if "schedule fitted" in line]
    assert len(fitted) == 1 and "loss.warmup 50 →" in fitted[0]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lam = [r["lambda"] for r in rows if "lambda" in r]
    assert len(lam) == 10 and sum(v > 0 for v in lam) > len(lam) / 2  # 10 images train: 2 iterations per epoch
    validations = [r for r in rows if "val" in r]
    assert 2 <= len(validations) < 5  # not after each of the five epochs
    assert all(0 < v["val"]["diagnostics"]["positives_per_anchor"] for v in validations)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "counting: global" in saved and "holdout: 0.2" in saved


def test_evaluate_baseline_without_labels_gives_a_label_free_verdict(trained, tmp_path, capsys) -> None:
    """HP beside k-means on the held-out images: figures in results.json, the printed summary
    and the report, HP-vs-k-means pictures, no empty baseline, no internal warning."""
    _, _, run = trained
    out = tmp_path / "verdict"
    assert main(["evaluate", str(run), "--baseline", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "labelled pixel" not in captured.err
    assert "C=3 classes" not in captured.out and "hungarian" not in captured.out  # protocol: only what applies
    assert "flip stability" in captured.out and "HP vs k-means" in captured.out
    assert "cluster_entropy: balance of the cluster sizes" in captured.out  # explained where printed
    doc = json.loads((out / "results.json").read_text())
    assert "baseline" not in doc and doc["protocol"]["split"].startswith("held-out")
    held_out = doc["protocol"]["n_images"]
    assert 1 <= held_out < N_IMAGES  # evaluated on images not trained on
    figures = doc["label_free"]
    assert set(figures["methods"]) == {"HP", "k-means"} and figures["n_images"] == held_out
    for method in figures["methods"].values():
        assert 0 <= method["flip_stability"] <= 100 and 0 <= method["photometric_stability"] <= 100
        assert 0 <= method["cluster_entropy"] <= 1 and method["empty_clusters"] >= 0
    assert 0 <= figures["agreement"]["nmi"] <= 1 and figures["agreement"]["methods"] == ["HP", "k-means"]
    assert doc["gallery"] and all((out / row["kmeans"]).is_file() for row in doc["gallery"])
    assert (out / "predictions.png").is_file()
    page = re.sub(r'src="data:[^"]*"', "", (out / "report.html").read_text())
    assert "Label-free verdict" in page and "k-means (frozen backbone)" in page and "higher is better" in page
    assert "<td>matching</td>" not in page and "<td>n_classes</td>" not in page


def test_baseline_without_labels_prints_the_label_free_figures_of_kmeans(trained, tiny_backbone_file, capsys) -> None:
    _, photos, _ = trained
    assert main(["baseline", "--preset", "folder", f"data.root={photos}", "data.n_classes=3", "data.resolution=32",
                 "data.eval_resolution=32", "data.num_workers=0", "backbone=dino_vits8",
                 f"weights={tiny_backbone_file}", "train.progress=false"]) == 0
    captured = capsys.readouterr()
    assert "labelled pixel" not in captured.err and "Traceback" not in captured.err
    assert "n/a" not in captured.out and "k-means" in captured.out and "flip stability" in captured.out
    assert "NO LABELS" in captured.out and "C=3" not in captured.out


def test_label_free_report_renders_in_headless_chromium(trained, tmp_path, capsys) -> None:
    from test_report import _chromium, _run_chromium

    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not found: install Debian's chromium package: apt-get install chromium")
    _, _, run = trained
    out = tmp_path / "verdict"
    assert main(["evaluate", str(run), "--baseline", "--out", str(out)]) == 0
    page = out / "report.html"
    dom = _run_chromium(exe, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert loaded and loaded.group(1) == loaded.group(2) and int(loaded.group(2)) > 0
    assert '<table class="labelfree"' in dom.stdout
