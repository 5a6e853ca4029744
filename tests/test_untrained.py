"""Random backbone weights (``model.pretrained=false``) are visible everywhere: the training log,
``results.json``, the protocol line, the report and ``hpseg compare``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpseg.cli import main
from hpseg.config import build_config
from hpseg.pipeline import backbone_weights
from hpseg.results import Protocol


def test_backbone_weights_of_a_configuration() -> None:
    assert backbone_weights(build_config("folder", [])) == "pretrained"
    assert backbone_weights(build_config("folder", ["model.pretrained=false"])) == "random"
    assert backbone_weights(build_config("folder", ["weights=/somewhere/tiny.pth"])) == "file tiny.pth"


def test_protocol_line_marks_random_weights_and_old_files_read_as_unknown() -> None:
    base = {"dataset": "folder", "split": "val", "n_images": 3, "eval_resolution": 32, "crf": False, "n_clusters": 3,
            "n_classes": 3, "matching": "none", "backbone": "dino_vits8"}
    random = Protocol.from_dict({**base, "backbone_weights": "random"})
    assert random.untrained and "backbone dino_vits8 (RANDOM WEIGHTS (model.pretrained=false" in random.describe()
    old = Protocol.from_dict(base)
    assert not old.untrained and "backbone dino_vits8 (?)" in old.describe()


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("untrained")
    rng = np.random.default_rng(0)
    (work / "photos").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(work / "photos" / f"p{i}.png")
    return work


def test_untrained_backbone_in_log_results_protocol_and_report(untrained_run, capsys) -> None:
    work = untrained_run
    cwd = os.getcwd()
    try:
        os.chdir(work)
        argv = ["train", "--preset", "folder", "data.root=photos", "data.n_classes=3", "data.resolution=32",
                "data.eval_resolution=32", "data.num_workers=0", "backbone=hpseg_demo_vit", "model.pretrained=false",
                "model.dim=8", "train.batch_size=4", "train.epochs=1", "train.progress=false"]
        assert main(argv) == 0
        log = capsys.readouterr().err
        assert "WARNING hpseg.pipeline: the backbone hpseg_demo_vit has RANDOM weights (model.pretrained=false)" in log
        assert "(backbone hpseg_demo_vit, random weights)" in log
        assert main(["evaluate", "runs/photos", "--baseline"]) == 0
        out = capsys.readouterr().out
    finally:
        os.chdir(cwd)
    # the verdict's rule for too few images, end to end (6 photos, one held out)
    assert "overall: Too few held-out images (1) to tell HP from k-means: at least 6 are needed" in out
    assert "backbone hpseg_demo_vit (RANDOM WEIGHTS (model.pretrained=false: an untrained backbone))" in out
    doc = json.loads((work / "runs" / "photos" / "eval" / "results.json").read_text())
    assert doc["protocol"]["backbone_weights"] == "random"
    page = re.sub(r'src="data:[^"]*"', "", (work / "runs" / "photos" / "eval" / "report.html").read_text())
    assert "Untrained backbone." in page and "hpseg_demo_vit (RANDOM WEIGHTS" in page
