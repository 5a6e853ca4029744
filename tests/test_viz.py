"""Pictures: palette, label PNGs, overlays, legends and figures (written atomically, readable)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hpseg.viz import (
    PNG_IGNORE,
    colorize,
    gallery_figure,
    overlay,
    palette,
    read_label_png,
    save_figure,
    save_label_png,
    training_curve_figure,
)


def test_colorize_marks_ignore_black():
    lab = np.array([[0, 1], [-1, 5]])
    rgb = colorize(lab, 3)
    assert rgb.shape == (2, 2, 3)
    assert (rgb[1, 0] == 0).all() and (rgb[1, 1] == 0).all()  # ignore and out-of-range
    assert not (rgb[0, 0] == rgb[0, 1]).all()


def test_label_png_palette_and_ignore(tmp_path):
    labels = np.array([[0, 1], [2, -1]])
    path = save_label_png(labels, tmp_path / "l.png", 3)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.asarray(im).tolist() == [[0, 1], [2, PNG_IGNORE]]
        pal = np.asarray(im.getpalette()[:768]).reshape(256, 3)
    np.testing.assert_array_equal(pal[:3], palette(3))
    assert (pal[PNG_IGNORE] == 0).all()
    np.testing.assert_array_equal(read_label_png(path), labels)


def test_overlay_leaves_unlabelled_pixels_alone():
    rgb = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(rgb, np.array([[0, -1], [1, 1]]), 2, alpha=1.0)
    assert (out[0, 1] == 100).all() and (out[0, 0] == palette(2)[0]).all()


def test_figures_are_written(tmp_path):
    rows = [{"image": np.zeros((8, 8, 3), np.uint8), "label": np.zeros((8, 8), np.int64)}]
    save_figure(gallery_figure(rows, [("image", "image"), ("label", "truth")], ["a", "b"],
                               subtitles={"label": "mIoU 1.0"}), tmp_path / "g.png")
    records = [{"iteration": 0, "loss": 1.0}, {"iteration": 1, "val": {"unsupervised": {"miou": 10.0},
                                                                        "diagnostics": {"kept_anchor_fraction": 0.5}}}]
    save_figure(training_curve_figure(records), tmp_path / "c.png")
    for name in ("g.png", "c.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 100


@pytest.mark.parametrize("n_columns, names", [
    (2, [f"cluster {k} → a rather long class name" for k in range(6)]),  # wider than two columns
    (4, ["sky", "sea"]),
    (2, [f"c{k}" for k in range(27)]),
])
def test_gallery_legend_is_never_cut(n_columns, names) -> None:
    rng = np.random.default_rng(0)
    rows = [{f"k{c}": rng.integers(0, len(names), (8, 8)) for c in range(n_columns)} for _ in range(2)]
    fig = gallery_figure(rows, [(f"k{c}", f"column {c}") for c in range(n_columns)], names)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box, frame = legend.get_window_extent(renderer), fig.bbox
    assert box.x0 >= frame.x0 - 0.5 and box.x1 <= frame.x1 + 0.5 and box.y0 >= frame.y0 - 0.5
    lowest_axes = min(ax.get_window_extent(renderer).y0 for ax in fig.axes)
    assert box.y1 <= lowest_axes + 0.5  # the legend does not cover the pictures
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[: len(names)] == names


def test_training_curve_explains_an_empty_validation_panel() -> None:
    rows = [{"iteration": 0, "loss": 2.0}, {"iteration": 1, "loss": 1.5},
            {"iteration": 1, "val": {"labelled": False, "diagnostics": {"kept_anchor_fraction": 1.0}}}]
    fig = training_curve_figure(rows)
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert any("no labelled validation images" in t for t in texts) and not fig.axes[1].get_lines()
    labelled = rows[:2] + [{"iteration": 1, "val": {"unsupervised": {"miou": 30.0}, "linear": {"miou": 40.0}}}]
    assert not training_curve_figure(labelled).axes[1].texts
    rows[2]["val"]["diagnostics"].update(cluster_entropy=0.8, heldout_hp_loss=1.7)  # label-free curves are drawn
    fig = training_curve_figure(rows)
    assert [line.get_ydata()[0] for line in fig.axes[1].get_lines()] == [pytest.approx(80.0)]
    assert any(line.get_label().startswith("held-out HP loss") for line in fig.axes[0].get_lines())
