"""``hpseg sweep-k``: one run per K on an unlabelled folder, label-free figures and galleries per K."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hpseg.cli import main
from hpseg.errors import HPSegError
from hpseg.sweep import sweep_clusters


def test_sweep_trains_and_judges_one_run_per_k(tmp_path, tiny_backbone_file, capsys) -> None:
    rng = np.random.default_rng(2)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    argv = ["sweep-k", "--k", "3", "2", "--preset", "folder", f"data.root={photos}", "data.n_classes=3",
            "data.resolution=32", "data.eval_resolution=32", "data.num_workers=0", "backbone=dino_vits8",
            f"weights={tiny_backbone_file}", "model.dim=8", "train.batch_size=4", "train.epochs=2",
            "train.progress=false", f"train.out_dir={tmp_path / 'sweep'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert list(doc["k"]) == ["2", "3"]
    for k, row in doc["k"].items():
        assert set(row["methods"]) == {"HP", "k-means"} and "nmi" in row["agreement"]
        assert (tmp_path / "sweep" / f"k-{k}" / "eval" / "predictions.png").is_file()
        assert json.loads((tmp_path / "sweep" / f"k-{k}" / "config.yaml").read_text().split("n_clusters: ")[1]
                          .split("\n")[0]) == int(k)
    table = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(t[0], t[1]) for t in table] == [("2", "HP"), ("2", "k-means"), ("3", "HP"), ("3", "k-means")]
    assert "K=2:" in out and "K=3:" in out


def test_sweep_refuses_a_fixed_k() -> None:
    with pytest.raises(HPSegError, match="sets model.n_clusters itself"):
        sweep_clusters("folder", ["data.root=x", "model.n_clusters=4"], [2, 3])
    with pytest.raises(HPSegError, match="at least one"):
        sweep_clusters("folder", ["data.root=x"], [1])
