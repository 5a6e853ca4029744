"""The embedded demo end to end (quick mode): results folder shaped as documented."""

from __future__ import annotations

import json

import pytest

from hpseg.backbones import build_backbone
from hpseg.cli import main
from hpseg.errors import HPSegError


@pytest.fixture(scope="module")
def demo_weights_present():
    try:
        build_backbone("hpseg_demo_vit")
    except HPSegError as exc:  # pragma: no cover - the asset ships with the package
        pytest.skip(f"demo backbone asset missing: {exc}")


def test_demo_quick(tmp_path, capsys, demo_weights_present):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "train.progress=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for head in ("unsupervised", "linear"):
        assert set(metrics["hp"][head]) == {"accuracy", "miou"}
        assert 0.0 <= metrics["hp"][head]["miou"] <= 100.0
    assert set(metrics["baseline"]["unsupervised"]) == {"accuracy", "miou"}
    assert metrics["margin_miou"] == pytest.approx(metrics["hp"]["unsupervised"]["miou"]
                                                   - metrics["baseline"]["unsupervised"]["miou"], abs=0.02)
    for name in ("predictions.png", "training_curve.png", "eval/results.json", "eval/report.html"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "unsupervised mIoU: HP" in printed and "k-means baseline" in printed
    last = printed.strip().splitlines()
    assert last[-2].startswith("diagnostics:") and last[-1].startswith("unsupervised mIoU")  # they end it
    results = json.loads((out / "eval" / "results.json").read_text())  # the one results schema
    assert results["protocol"]["dataset"] == "synthetic" and results["notes"]["quick"] is True
    assert results["baseline"]["unsupervised"]["miou"] == pytest.approx(metrics["baseline"]["unsupervised"]["miou"],
                                                                        abs=0.01)
