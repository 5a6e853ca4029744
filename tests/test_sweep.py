"""``hpseg sweep-k``: one run per K on an unlabelled folder, label-free figures and galleries per K."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hpseg.cli import main
from hpseg.errors import HPSegError
from hpseg.sweep import recommend_k, sweep_clusters


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
    assert "recommendation: " in out and doc["recommendation"]["reason"] in out
    page = (tmp_path / "sweep" / "sweep.html").read_text()
    assert '<h3 id="k-2">K = 2' in page and '<h3 id="k-3">K = 3' in page and "missing:" not in page
    assert page.count('src="data:image/png;base64,') == 2 and doc["recommendation"]["reason"] in page
    assert "sweep.html" in out


def test_sweep_refuses_a_fixed_k() -> None:
    with pytest.raises(HPSegError, match="sets model.n_clusters itself"):
        sweep_clusters("folder", ["data.root=x", "model.n_clusters=4"], [2, 3])
    with pytest.raises(HPSegError, match="at least one"):
        sweep_clusters("folder", ["data.root=x"], [1])


def _row(score: float, low: float, high: float, empty: int = 0) -> dict:
    return {"methods": {"HP": {"stability_corrected": score, "empty_clusters": empty,
                               "intervals": {"stability_corrected": [low, high]}},
                        "k-means": {"stability_corrected": 0.0}}}


def test_recommendation_takes_the_largest_k_not_clearly_less_stable() -> None:
    rows = {4: _row(60, 55, 65), 6: _row(58, 53, 63), 8: _row(40, 35, 45)}
    rec = recommend_k(rows)
    assert rec["k"] == 6 and rec["separated"]
    assert rec["reason"].startswith("K=6: the largest K whose chance-corrected stability (58.0, 95 % interval "
                                    "53.0 … 63.0) is not clearly below the best (K=4: 60.0")
    assert rec["reason"].endswith("clearly less stable: K=8: 40.0, 95 % interval 35.0 … 45.0")
    rows[6] = _row(58, 53, 63, empty=1)  # as stable, but a cluster stays empty
    assert recommend_k(rows)["k"] == 4


def test_recommendation_says_so_when_the_figures_do_not_separate_k() -> None:
    rec = recommend_k({4: _row(60, 50, 70), 6: _row(57, 47, 66), 8: _row(55, 51, 62, empty=2)})
    assert rec["k"] is None and not rec["separated"]
    assert rec["reason"].startswith("the figures do not separate these K")
    assert rec["reason"].endswith("; K=8 leaves 2 of its clusters empty; choose from the galleries")
    few = {4: _row(60, 50, 70), 6: _row(57, 47, 66)}
    del few[6]["methods"]["HP"]["intervals"]
    assert recommend_k(few)["reason"].startswith("too few held-out images")


def test_chance_correction_makes_stability_comparable_across_k() -> None:
    """Independent random labels score S = p / (2 − p) per cluster of share p — 33 % at K = 2,
    7 % at K = 8 — but about 0 once corrected; a segmentation equal to its transform scores 100
    raw and corrected at every K."""
    import torch

    from hpseg.label_free import ImageCounts, pooled_figures

    g = torch.Generator().manual_seed(0)
    for k in (2, 8):
        a, b = torch.randint(0, k, (4, 64, 64), generator=g), torch.randint(0, k, (4, 64, 64), generator=g)
        counts = ImageCounts(k)
        counts.update(a, b, a, torch.zeros(4, 64, 64, dtype=torch.bool))
        figures = pooled_figures(counts.arrays())
        share = 1 / k
        assert figures["flip_stability"][0] == pytest.approx(100 * share / (2 - share), rel=0.03)
        assert figures["flip_stability_chance"][0] == pytest.approx(100 * share / (2 - share), rel=0.01)
        assert abs(figures["flip_stability_corrected"][0]) < 1.5
        assert figures["photometric_stability"][0] == pytest.approx(100.0)
        assert figures["photometric_stability_corrected"][0] == pytest.approx(100.0)
