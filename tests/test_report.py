"""HTML report: content, escaping, multi-seed files, errors, and a real render in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpseg.cli import main
from hpseg.errors import HPSegError
from hpseg.evaluate import EvalOutput, write_results
from hpseg.report import write_report
from hpseg.results import HeadScore, Protocol, Results

CLASSES = ["sky", "<b>tree & bush</b>", "road"]  # markup in a name must come out as text
N_GALLERY = 2


def _results_folder(folder: Path) -> Path:
    """A results folder as ``hpseg evaluate --out`` writes it, from a hand-made EvalOutput."""
    rng = np.random.default_rng(0)
    gallery = [
        {
            "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "label": rng.integers(-1, 3, (16, 16)),
            "unsupervised": rng.integers(-1, 3, (16, 16)),
            "linear": rng.integers(0, 3, (16, 16)),
        }
        for _ in range(N_GALLERY)
    ]
    output = EvalOutput(
        metrics={
            "unsupervised": HeadScore(61.25, 30.5, [50.0, 10.0, float("nan")], [0, 2, 1, -1]),
            "linear": HeadScore(70.0, 40.0, [60.0, 35.0, 25.0]),
        },
        confusion={
            "unsupervised": torch.tensor([[5, 1, 0], [0, 0, 4], [1, 3, 0], [2, 2, 2]]),
            "linear": torch.tensor([[5, 1, 0], [0, 3, 1], [1, 0, 4]]),
        },
        n_images=4,
        gallery=gallery,
        cluster_pixels=[10, 5, 0, 1],
        cluster_examples=[[rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)], [], [], []],
    )
    protocol = Protocol(dataset="synthetic", split="val", n_images=4, eval_resolution=16, crf=False, n_clusters=4,
                        n_classes=3, matching="hungarian", backbone="dino_custom")
    results = Results(protocol, CLASSES, metrics=output.metrics,
                      confusion={h: c.tolist() for h, c in output.confusion.items()},
                      diagnostics={"positive_precision_agnostic": 0.8, "kmeans_code_miou": 33.0})
    write_results(folder, results, output)
    return folder


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return _results_folder(tmp_path_factory.mktemp("eval"))


def _unlabelled_folder(folder: Path) -> Path:
    """A results folder of an evaluation without labels (an own-images run)."""
    rng = np.random.default_rng(1)
    gallery = [{"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "unsupervised": rng.integers(0, 4, (16, 16))}
               for _ in range(N_GALLERY)]
    strips = [[rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)] for _ in range(4)]
    output = EvalOutput(metrics={}, confusion={}, n_images=4, labelled=False, gallery=gallery,
                        cluster_pixels=[9, 4, 2, 1], cluster_examples=strips)
    protocol = Protocol(dataset="folder", split="val", n_images=4, eval_resolution=16, crf=False, n_clusters=4,
                        n_classes=4, matching="hungarian", backbone="dino_custom", labelled=False)
    results = Results(protocol, [f"class {i}" for i in range(4)], cluster_names=["sky", "sea", "sand", "sky"],
                      diagnostics={"cluster_entropy": 0.8, "empty_clusters": 0})
    write_results(folder, results, output)
    return folder


@pytest.fixture(scope="module")
def unlabelled_dir(tmp_path_factory) -> Path:
    return _unlabelled_folder(tmp_path_factory.mktemp("unlabelled"))


def test_unlabelled_report_says_so_and_shows_named_clusters(unlabelled_dir: Path) -> None:
    page = write_report(unlabelled_dir).read_text()
    assert "No labels to score against" in page and 'class="clusters"' in page
    assert "sky" in page and "sand" in page and 'class="metrics"' not in page


N_IMAGES = 2 + 1 + 4 * N_GALLERY  # two confusion PNGs + one cluster strip + four pictures per gallery row


def test_report_is_self_contained_and_escaped(results_dir: Path) -> None:
    path = write_report(results_dir)
    assert path == results_dir / "report.html"
    page = path.read_text()
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == N_IMAGES and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in page and "https://" not in page  # no network assets
    assert "&lt;b&gt;tree &amp; bush&lt;/b&gt;" in page and "<b>tree" not in page
    assert 'style="width:0.0%"' in page  # NaN IoU: empty bar
    for fragment in (
        "61.25",
        "30.50",
        "70.00",
        "n/a",
        'class="metrics"',
        'class="iou"',
        'class="gallery"',
        "synthetic / val",
        "hungarian",
    ):
        assert fragment in page


def test_report_can_reference_images_by_relative_path(results_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pages" / "r.html"
    write_report(results_dir, out, embed=False)
    srcs = re.findall(r'<img src="([^"]*)"', out.read_text())
    assert len(srcs) == N_IMAGES
    assert all((out.parent / s).resolve().is_file() for s in srcs)


def test_report_cli_and_missing_results(results_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(results_dir), "--out", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").is_file()
    with pytest.raises(HPSegError, match="hpseg evaluate"):
        write_report(tmp_path / "nothing-here")
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_multi_seed_report(tmp_path: Path) -> None:
    doc = {
        "protocol": {"dataset": "synthetic", "split": "val", "seeds": ["seed-0", "seed-1"]},
        "seeds": {
            "seed-0": {"unsupervised": {"accuracy": 50.0, "miou": 20.0, "iou": [10.0, 30.0]}},
            "seed-1": {"unsupervised": {"accuracy": 54.0, "miou": 24.0, "iou": [20.0, float("nan")]}},
        },
        "metrics": {
            "unsupervised": {
                "accuracy": 52.0,
                "accuracy_std": 2.83,
                "miou": 22.0,
                "miou_std": 2.83,
                "n_seeds": 2,
            }
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(doc))
    page = write_report(tmp_path).read_text()
    for fragment in ("2 seeds", "seed-0", "seed-1", "52.00 ± 2.83", "22.00 ± 2.83", "50.00 / 20.00", "15.00"):
        assert fragment in page
    assert "<img" not in page


# ------------------------------------------------------------------------------------------
# a real browser
# ------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    env = {**os.environ, "HOME": str(profile)}
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("labelled", [True, False])
def test_report_renders_in_headless_chromium(results_dir: Path, unlabelled_dir: Path, tmp_path: Path,
                                             labelled: bool) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not found: install Debian's chromium package: apt-get install chromium")
    if not labelled:
        _render_unlabelled(exe, unlabelled_dir, tmp_path)
        return
    page = write_report(results_dir, tmp_path / "report.html")
    url = page.resolve().as_uri()

    dom = _run_chromium(exe, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    # the page's load handler marks every image it could decode
    assert f'data-images="{N_IMAGES}/{N_IMAGES}"' in html, html[:500]
    imgs = re.findall(r"<img [^>]*>", html)
    assert len(imgs) == N_IMAGES and all('data-rendered="1"' in tag for tag in imgs)
    for table in ("metrics", "iou", "gallery", "kv"):
        assert f'<table class="{table}"' in html
    assert "<b>tree" not in html  # markup in class names stayed text

    shot = tmp_path / "report.png"
    res = _run_chromium(
        exe,
        tmp_path / "profile-shot",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        url,
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1200, 1600)
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.std() > 10 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # not blank


def _render_unlabelled(exe: str, folder: Path, tmp_path: Path) -> None:
    page = write_report(folder, tmp_path / "report.html")
    dom = _run_chromium(exe, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    n = 4 + 2 * N_GALLERY  # four cluster strips + two pictures per gallery row
    assert f'data-images="{n}/{n}"' in html, html[:500]
    assert "No labels to score against" in html and '<table class="clusters"' in html
