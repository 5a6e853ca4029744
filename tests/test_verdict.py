"""The verdict in words: paired bootstrap over images, the too-few-images rule, the sentences."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hpseg.evaluate import label_free_evaluation
from hpseg.imaging import denormalize, normalize
from hpseg.results import format_label_free
from hpseg.runtime import Runtime
from hpseg.verdict import MIN_IMAGES, bootstrap_weights, compare_methods, overall_sentence

CPU = Runtime.create("cpu", "fp32")


def _scenes(n: int, seed: int = 0) -> DataLoader:
    """``n`` 16 × 16 images of random blobs (smooth colours, so segments have extent)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    rgb = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    return DataLoader([{"img": img} for img in normalize(rgb)], batch_size=4)


def _threshold_per_image(salt: str):  # noqa: ANN202
    """Colour only, with a threshold in 0.3-0.7 drawn per image from a hash of its pixel values and
    ``salt``: two salts give two methods that differ image by image but are equally good."""
    def predict(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        rgb = denormalize(images)
        out = []
        for img in rgb:
            values = np.sort(img.flatten().round(decimals=2).numpy())  # the same for the mirror image
            digest = hashlib.sha256(salt.encode() + values.tobytes()).digest()
            threshold = 0.3 + 0.4 * digest[0] / 255
            out.append((img.mean(0) > threshold).long())
        return torch.stack(out)
    return predict


def _position(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Position only: cluster 1 on the left third."""
    out = torch.zeros(images.shape[0], *size, dtype=torch.long)
    out[..., : size[1] // 3] = 1
    return out


def test_two_equivalent_methods_get_no_clear_difference() -> None:
    out = label_free_evaluation({"A": (_threshold_per_image("a"), 2), "B": (_threshold_per_image("b"), 2)},
                                _scenes(12), CPU)
    verdict = out.figures["verdict"]
    calls = {key: row["call"] for key, row in verdict["figures"].items()}
    assert set(calls.values()) == {"no clear difference"}, calls
    # the methods do differ image by image (else the test would say nothing about the intervals)
    photo = verdict["figures"]["photometric_stability"]
    assert photo["high"] - photo["low"] > 1.0 and photo["low"] < 0 < photo["high"]
    assert verdict["overall"] == "No clear difference between A and B on these 12 held-out images."
    assert verdict["n_images"] == 12


def test_clearly_different_methods_get_a_clear_verdict_both_ways() -> None:
    out = label_free_evaluation({"HP": (_threshold_per_image("a"), 2), "k-means": (_position, 2)}, _scenes(12), CPU)
    rows = out.figures["verdict"]["figures"]
    flip = rows["flip_stability"]
    assert flip["call"] == "higher" and flip["low"] > 0 and flip["difference"] > 50
    assert flip["sentence"].startswith("HP is more stable under flips than k-means (+")
    assert flip["sentence"].endswith(", 12 images)") and "95 % interval" in flip["sentence"]
    photo = rows["photometric_stability"]  # position only: k-means is perfectly stable under lighting
    assert photo["call"] == "lower" and photo["high"] < 0
    assert photo["sentence"].startswith("HP is less stable under a change of lighting than k-means (")
    overall = out.figures["verdict"]["overall"]
    assert rows["boundary_edge_precision"]["call"] == "higher"  # a fixed vertical line misses the blobs' edges
    assert overall == ("HP is better than k-means on flip stability and boundaries on image edges, worse on "
                       "photometric stability (12 held-out images).")
    # the CLI table gives the difference with its interval and the sentences
    text = format_label_free(out.figures)
    assert "HP − k-means [95 % interval]" in text and f"{flip['difference']:+.1f} [" in text
    assert f"overall: {overall}" in text and flip["sentence"] in text


def test_the_verdict_is_seeded() -> None:
    first = label_free_evaluation({"A": (_threshold_per_image("a"), 2), "B": (_position, 2)}, _scenes(8), CPU)
    second = label_free_evaluation({"A": (_threshold_per_image("a"), 2), "B": (_position, 2)}, _scenes(8), CPU)
    assert first.figures["verdict"] == second.figures["verdict"]


@pytest.mark.parametrize("n", [MIN_IMAGES - 1, MIN_IMAGES])
def test_too_few_images_give_no_verdict_and_say_so(n: int) -> None:
    out = label_free_evaluation({"HP": (_threshold_per_image("a"), 2), "k-means": (_position, 2)}, _scenes(n), CPU)
    verdict = out.figures["verdict"]
    flip = verdict["figures"]["flip_stability"]
    if n < MIN_IMAGES:
        assert flip["call"] == "too few images" and flip["low"] is None
        assert flip["sentence"].startswith("too few held-out images to tell flip stability apart (HP 100.0 vs")
        assert verdict["overall"].startswith(f"Too few held-out images ({n}) to tell HP from k-means: at least 6")
        assert "intervals" not in out.figures["methods"]["HP"]
    else:
        assert flip["call"] == "higher"
        assert "flip_stability_corrected" in out.figures["methods"]["HP"]["intervals"]


def test_bootstrap_weights_are_resamples_with_replacement() -> None:
    w = bootstrap_weights(7, resamples=2000, seed=3)
    assert w.shape == (2000, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    assert np.array_equal(w, bootstrap_weights(7, resamples=2000, seed=3))
    assert 0.9 < w.mean(0).min() and w.mean(0).max() < 1.1  # every image equally likely
    assert (w == 0).any(1).mean() > 0.9  # most resamples leave some image out


def test_paired_resampling_cancels_a_shared_image_effect() -> None:
    """Two methods whose figures swing together from image to image (a hard and an easy image)
    but differ by a constant: paired, the interval is tight around the difference."""
    def counts(inter_hard: float) -> dict[str, np.ndarray]:
        n = 8
        inter = np.array([[inter_hard, inter_hard]] * 4 + [[inter_hard + 40, inter_hard + 40]] * 4)
        union = np.full((n, 2), 100.0)
        zeros = np.zeros(n)
        return {"flip_inter": inter, "flip_union": union, "flip_chance": inter / 4, "photo_inter": inter,
                "photo_union": union, "photo_chance": inter / 4, "on_edge": zeros + 5, "boundary": zeros + 10,
                "edge": zeros + 20, "total": zeros + 100, "pixels": np.full((n, 2), 50.0)}

    verdict = compare_methods(counts(40.0), counts(35.0), ("A", "B"))
    flip = verdict["figures"]["flip_stability"]
    assert flip["difference"] == pytest.approx(5.0)
    assert flip["low"] == pytest.approx(5.0) and flip["high"] == pytest.approx(5.0)
    assert verdict["figures"]["boundary_edge_precision"]["call"] == "no clear difference"


def test_overall_sentence_lists_each_group() -> None:
    rows = {"flip_stability": {"call": "lower"}, "photometric_stability": {"call": "lower"},
            "boundary_edge_precision": {"call": "no clear difference"}, "cluster_entropy": {"call": "higher"}}
    assert overall_sentence(rows, 9, ("HP", "k-means")) == (
        "HP is worse than k-means on flip stability and photometric stability; no clear difference on "
        "boundaries on image edges (9 held-out images).")


def test_verdict_travels_through_results_json_the_summary_and_the_report(tmp_path) -> None:  # noqa: ANN001
    from hpseg.report import write_report
    from hpseg.results import Protocol, Results

    out = label_free_evaluation({"HP": (_threshold_per_image("a"), 2), "k-means": (_position, 2)}, _scenes(8), CPU)
    protocol = Protocol(dataset="folder", split="held-out 20% of the folder", n_images=8, eval_resolution=16,
                        crf=False, n_clusters=2, n_classes=2, matching="none (no labels)", backbone="dino_custom",
                        labelled=False)
    Results(protocol, ["a", "b"], label_free=out.figures).write(tmp_path / "results.json")
    results = Results.read(tmp_path / "results.json")
    verdict = out.figures["verdict"]
    assert results.label_free["verdict"] == verdict
    summary = results.summary()
    assert f"overall: {verdict['overall']}" in summary
    assert "paired bootstrap over the 8 held-out images, 2000 resamples (seed 0)" in summary
    page = write_report(tmp_path).read_text()
    assert verdict["overall"] in page and "HP − k-means [95 % interval]" in page
    flip = verdict["figures"]["flip_stability"]
    assert f"{flip['difference']:+.1f} [{flip['low']:+.1f}, {flip['high']:+.1f}]" in page
    assert flip["sentence"] in page


def test_report_lists_the_held_out_images_when_the_run_folder_does(tmp_path) -> None:  # noqa: ANN001
    from hpseg.report import write_report
    from hpseg.results import Protocol, Results

    out = label_free_evaluation({"HP": (_position, 2)}, _scenes(2), CPU)
    run = tmp_path / "run"
    protocol = Protocol(dataset="folder", split="held-out", n_images=2, eval_resolution=16, crf=False, n_clusters=2,
                        n_classes=2, matching="none", backbone="dino_custom", labelled=False)
    Results(protocol, ["a", "b"], label_free=out.figures).write((run / "eval").mkdir(parents=True) or
                                                                 run / "eval" / "results.json")
    assert "held-out images (never trained on; listed in" not in write_report(run / "eval").read_text()
    (run / "held_out.txt").write_text("beach/p1.jpg\np7.jpg\n")
    page = write_report(run / "eval").read_text()
    assert "the 2 held-out images (never trained on" in page and "<code>beach/p1.jpg</code>" in page


def test_hp_alone_points_to_the_baseline_for_a_verdict() -> None:
    alone = label_free_evaluation({"HP": (_position, 2)}, _scenes(6), CPU)
    assert "verdict" not in alone.figures and "--baseline" in format_label_free(alone.figures)
    kmeans_only = label_free_evaluation({"k-means": (_position, 2)}, _scenes(6), CPU)
    assert "--baseline" not in format_label_free(kmeans_only.figures)


def test_the_verdict_renders_in_headless_chromium(tmp_path) -> None:  # noqa: ANN001
    from hpseg.report import write_report
    from hpseg.results import Protocol, Results
    from test_report import _chromium, _run_chromium

    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium not found: install Debian's chromium package: apt-get install chromium")
    out = label_free_evaluation({"HP": (_threshold_per_image("a"), 2), "k-means": (_position, 2)}, _scenes(8), CPU)
    protocol = Protocol(dataset="folder", split="held-out", n_images=8, eval_resolution=16, crf=False, n_clusters=2,
                        n_classes=2, matching="none", backbone="dino_custom", labelled=False)
    Results(protocol, ["a", "b"], label_free=out.figures).write(tmp_path / "results.json")
    page = write_report(tmp_path)
    dom = _run_chromium(exe, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    overall = out.figures["verdict"]["overall"]
    assert dom.stdout.count(overall) == 2  # at the top of the page and in its section
    assert dom.stdout.count("95 % interval") >= 4 and '<ul class="verdict">' in dom.stdout


def test_a_figure_undefined_on_resamples_is_said_so_and_counts_as_unclear() -> None:
    """Boundaries only in one of eight images: most resamples leave it out, the boundary figure
    is then undefined, and the overall sentence rests on the other figures."""
    n = 8
    inter = np.full((n, 2), 50.0)
    base = {"flip_inter": inter, "flip_union": np.full((n, 2), 100.0), "flip_chance": inter / 4,
            "photo_inter": inter, "photo_union": np.full((n, 2), 100.0), "photo_chance": inter / 4,
            "on_edge": np.zeros(n), "boundary": np.eye(1, n, 0)[0] * 10, "edge": np.full(n, 20.0),
            "total": np.full(n, 100.0), "pixels": np.full((n, 2), 50.0)}
    better = {**base, "flip_inter": inter + 20}
    verdict = compare_methods(better, base, ("A", "B"))
    edges = verdict["figures"]["boundary_edge_precision"]
    assert edges["call"] == "undefined" and edges["sentence"].startswith("boundaries on image edges cannot be told")
    assert verdict["overall"] == ("A is better than B on flip stability; no clear difference on photometric "
                                  "stability and boundaries on image edges (8 held-out images).")


def test_older_results_without_a_verdict_still_read_and_print(tmp_path) -> None:  # noqa: ANN001
    import json

    from hpseg.report import write_report
    from hpseg.results import Results

    old = {"protocol": {"dataset": "folder", "split": "val", "n_images": 9, "eval_resolution": 32, "crf": False,
                        "n_clusters": 4, "n_classes": 4, "matching": "none", "backbone": "dino_vits8",
                        "labelled": False},
           "label_free": {"methods": {"HP": {"flip_stability": 47.5}, "k-means": {"flip_stability": 66.3}},
                          "n_images": 9}}
    (tmp_path / "results.json").write_text(json.dumps(old))
    results = Results.read(tmp_path / "results.json")
    text = results.summary()
    assert "47.5" in text and "interval" not in text and "overall:" not in text
    assert "backbone dino_vits8 (?)" in text
    page = write_report(tmp_path).read_text()
    assert "47.5" in page and '<p class="verdict">' not in page
