"""Pictures: the palette, label PNGs, overlays, legends and every figure hpseg draws.

Figures are built on :class:`matplotlib.figure.Figure` objects with the Agg canvas (no pyplot,
no global backend switch, safe in threads and in notebooks) and written atomically with the
process umask's permissions (:func:`save_figure`, :func:`save_image`). Label maps use one fixed
palette everywhere (tab20, then a seeded tail): the same class has the same colour in segment
outputs, evaluation galleries, the HTML report and the legends.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpseg.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE",
    "PNG_IGNORE",
    "colorize",
    "confusion_figure",
    "gallery_figure",
    "hex_colour",
    "legend_image",
    "new_figure",
    "overlay",
    "palette",
    "read_label_png",
    "save_figure",
    "save_image",
    "save_label_png",
    "save_legend",
    "training_curve_figure",
]

#: label value of pixels without a class (ignored in labels, unmatched clusters in predictions)
IGNORE = -1
#: how :data:`IGNORE` is stored in palette label PNGs
PNG_IGNORE = 255


# ------------------------------------------------------------------------------------------
# colours
# ------------------------------------------------------------------------------------------


def palette(n: int) -> np.ndarray:
    """A fixed, distinguishable RGB palette ``(n, 3)`` uint8 (tab20 then a seeded tail)."""
    import matplotlib

    base = (np.array(matplotlib.colormaps["tab20"](np.arange(20))[:, :3]) * 255).round().astype(np.uint8)
    if n <= len(base):
        return base[:n]
    rng = np.random.default_rng(0)
    return np.concatenate([base, rng.integers(0, 256, (n - len(base), 3), dtype=np.uint8)])


def hex_colour(rgb: Sequence[int]) -> str:
    """``(r, g, b)`` → ``"#rrggbb"``."""
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def colorize(labels: np.ndarray, n_labels: int) -> np.ndarray:
    """Label map ``(H, W)`` → RGB ``(H, W, 3)`` uint8; ignore (−1) and out-of-range are black."""
    pal = np.concatenate([palette(n_labels), np.zeros((1, 3), np.uint8)])
    idx = np.where((labels < 0) | (labels >= n_labels), n_labels, labels)
    return pal[idx]


def overlay(rgb: np.ndarray, labels: np.ndarray, n_labels: int, alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend the label colours over an image: ``(H, W, 3)`` uint8; pixels without a label
    (:data:`IGNORE`) show the image unchanged."""
    colours = colorize(labels, n_labels).astype(np.float32)
    img = rgb.astype(np.float32)
    blend = (1.0 - alpha) * img + alpha * colours
    valid = ((labels >= 0) & (labels < n_labels))[..., None]
    return np.where(valid, blend, img).round().clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# image files
# ------------------------------------------------------------------------------------------


def save_image(img: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write a PIL image (or an ``(H, W, 3)`` uint8 array) atomically; format from the suffix."""
    from PIL import Image

    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.ascontiguousarray(img))
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    with atomic_write(path, "wb") as fh:
        img.save(fh, format=fmt, **kwargs)
    return path


def save_label_png(labels: np.ndarray, path: str | Path, n_labels: int) -> Path:
    """Write a label map as a palette PNG (mode "P", :func:`palette` colours).

    Pixel values are the labels; :data:`IGNORE` (and anything outside ``[0, n_labels)``) is
    stored as 255 and drawn black. More than 255 labels: a 16-bit grey PNG (ignore = 65535).
    """
    from PIL import Image

    lab = np.asarray(labels)
    bad = (lab < 0) | (lab >= n_labels)
    if n_labels <= PNG_IGNORE:
        small = lab.astype(np.uint8)  # (no int64 copy of a large map)
        small[bad] = PNG_IGNORE
        img = Image.fromarray(small).convert("P")
        pal = np.zeros((256, 3), np.uint8)
        pal[:n_labels] = palette(n_labels)
        img.putpalette(pal.reshape(-1).tolist())
        return save_image(img, path)
    log.warning("%d labels do not fit a palette PNG: writing 16-bit grey %s", n_labels, path)
    return save_image(Image.fromarray(np.where(bad, 65535, lab).astype(np.uint16)), path)


def read_label_png(path: str | Path) -> np.ndarray:
    """Labels of a PNG written by :func:`save_label_png` (255 / 65535 → :data:`IGNORE`)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im).astype(np.int64)
        ignore = PNG_IGNORE if im.mode == "P" else 65535
    arr[arr == ignore] = IGNORE
    return arr


def legend_image(names: Sequence[str], ignore_name: str | None = "no class (unmatched / ignore)") -> Any:
    """A PIL image listing a colour swatch, the label value and the name of each label, and a
    last row for :data:`PNG_IGNORE` named ``ignore_name`` (none when None: labels that never
    take that value, e.g. the raw clusters of an unlabelled run)."""
    from PIL import Image, ImageDraw

    pal = palette(max(1, len(names)))
    rows = [(i, name, tuple(int(c) for c in pal[i])) for i, name in enumerate(names)]
    if ignore_name is not None:
        rows.append((PNG_IGNORE, ignore_name, (0, 0, 0)))
    row_h, width = 22, 420
    img = Image.new("RGB", (width, row_h * len(rows) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (value, name, colour) in enumerate(rows):
        y = 4 + i * row_h
        draw.rectangle((6, y + 2, 30, y + row_h - 4), fill=colour, outline=(80, 80, 80))
        draw.text((38, y + 4), f"{value:>3}  {name}", fill=(0, 0, 0))
    return img


def save_legend(legend: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """``legend.json`` (the document as given) and ``legend.png`` (swatches and names of its
    ``labels``, and of its ``ignore`` value when it has one) in ``folder``."""
    json_path = folder / "legend.json"
    atomic_write_text(json_path, json.dumps(legend, indent=2))
    names = [str(row["name"]) for row in legend["labels"]]
    png_path = save_image(legend_image(names, "no class (unmatched cluster)" if legend.get("ignore") else None),
                          folder / "legend.png")
    return json_path, png_path


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Any:
    """A :class:`matplotlib.figure.Figure` with an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure as PNG, atomically."""
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return Path(path)


def _legend_handles(names: Sequence[str], ignore_name: str = "ignore / unmatched") -> list[Any]:
    from matplotlib.patches import Patch

    pal = palette(max(1, len(names))) / 255.0
    handles = [Patch(color=pal[i], label=name) for i, name in enumerate(names)]
    handles.append(Patch(color=(0, 0, 0), label=ignore_name))
    return handles


def gallery_figure(
    rows: Sequence[dict[str, np.ndarray]],
    columns: Sequence[tuple[str, str]],
    names: Sequence[str],
    *,
    subtitles: dict[str, str] | None = None,
) -> Any:
    """A grid of images and label maps with a colour legend of ``names``.

    ``columns`` are ``(key in each row, column title)`` pairs, e.g. ``("image", "image")``,
    ``("label", "ground truth")``; 3-D values are drawn as images, 2-D as label maps.
    ``subtitles`` adds a second title line per column (e.g. a score).
    """
    n = len(names)
    width, height = 2.2 * len(columns), 2.2 * len(rows) + 0.4
    fig = new_figure(width, height)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, (key, title) in enumerate(columns):
            ax = axes[r][c]
            value = row[key]
            ax.imshow(value if value.ndim == 3 else colorize(value, n), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                sub = (subtitles or {}).get(key)
                ax.set_title(title + (f"\n{sub}" if sub else ""), fontsize=9)
    _legend_below(fig, _legend_handles(names), width, height)
    return fig


def _legend_below(fig: Any, handles: list[Any], width: float, height: float) -> None:
    """A legend under the axes, never cut: as many columns as fit the figure's width (the figure
    widens when even one column does not), the figure grown by the legend's height."""
    renderer = fig.canvas.get_renderer()
    ncol = min(6, len(handles))
    while True:
        legend = fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False,
                            bbox_to_anchor=(0.5, 0.0))
        box = legend.get_window_extent(renderer)
        w_in, h_in = box.width / fig.dpi, box.height / fig.dpi
        if w_in <= width - 0.2 or ncol == 1:
            break
        legend.remove()
        ncol -= 1
    width = max(width, w_in + 0.3)
    total = height + h_in + 0.1
    fig.set_size_inches(width, total)
    fig.tight_layout(rect=(0, (h_in + 0.1) / total, 1, 1))


def confusion_figure(
    confusion: np.ndarray, class_names: Sequence[str], title: str, assignment: Sequence[int] | None = None
) -> Any:
    """Row-normalised confusion matrix (rows: predicted cluster/class, columns: true class);
    with an ``assignment`` the rows are clusters sorted by their matched class."""
    conf = np.asarray(confusion, dtype=np.float64)
    if assignment is not None:
        order = np.argsort([a if a >= 0 else 10**6 for a in assignment], kind="stable")
        conf = conf[order]
        row_names = [f"c{k}→{class_names[assignment[k]] if assignment[k] >= 0 else '∅'}" for k in order]
    else:
        row_names = list(class_names[: conf.shape[0]])
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    size = max(4.0, 0.32 * max(conf.shape) + 2)
    fig = new_figure(size + 1, size)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(conf.shape[1]), list(class_names[: conf.shape[1]]), rotation=90, fontsize=7)
    ax.set_yticks(range(conf.shape[0]), row_names, fontsize=7)
    ax.set_xlabel("ground-truth class")
    ax.set_ylabel("prediction")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


#: training-curve panels: (title, y label, keys of metrics.jsonl rows)
_LOSS_KEYS = ("loss", "loss_hp", "loss_consistency", "loss_linear", "loss_cluster")
_DIAGNOSTIC_KEYS = (
    "positive_precision_agnostic",
    "positive_precision_specific",
    "kept_anchor_fraction",
)


def _val_value(row: dict[str, Any], path: str) -> float | None:
    value: Any = row.get("val", {})
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def training_curve_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """Losses, validation mIoU (cluster probe, linear probe, k-means on the code) and the
    hidden-positive diagnostics against iterations, from ``metrics.jsonl`` rows."""
    train_rows = [r for r in rows if "val" not in r]
    val_rows = [r for r in rows if "val" in r]
    fig = new_figure(14, 3.6)
    axes = fig.subplots(1, 3)
    for key in _LOSS_KEYS:
        pts = [(r["iteration"], r[key]) for r in train_rows if isinstance(r.get(key), (int, float))]
        if pts:
            axes[0].plot(*zip(*pts), label=key)
    axes[0].set_title("training losses")
    curves = (
        ("unsupervised.miou", "cluster probe mIoU"),
        ("linear.miou", "linear probe mIoU"),
        ("diagnostics.kmeans_code_miou", "k-means on code mIoU"),
    )
    for path, label in curves:
        pts = [(r["iteration"], v) for r in val_rows if (v := _val_value(r, path)) is not None]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=label)
    axes[1].set_ylabel("%")
    axes[1].set_title("validation")
    if not axes[1].get_lines():  # nothing scored: the label-free curves, and say why there is no mIoU
        balance = [(r["iteration"], 100 * v) for r in val_rows
                   if (v := _val_value(r, "diagnostics.cluster_entropy")) is not None]
        if balance:
            axes[1].plot(*zip(*balance), marker="o", label="cluster balance (entropy / log K)")
            axes[1].set_ylim(0, 105)
        axes[1].text(0.5, 0.5 if not balance else 0.25, "no labelled validation images: no mIoU to plot.\n"
                     "Label-free figures (stability, balance,\nHP vs k-means): hpseg evaluate RUN --baseline",
                     ha="center", va="center", transform=axes[1].transAxes, fontsize=8, color="0.35")
    held_out = [(r["iteration"], v) for r in val_rows if (v := _val_value(r, "diagnostics.heldout_hp_loss")) is not None]
    if held_out:
        axes[0].plot(*zip(*held_out), marker="o", linestyle="--", label="held-out HP loss (λ=0, ρ=1)")
    for key in _DIAGNOSTIC_KEYS:
        pts = [(r["iteration"], v) for r in val_rows if (v := _val_value(r, f"diagnostics.{key}")) is not None]
        if pts:
            axes[2].plot(*zip(*pts), marker=".", label=key)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("hidden positives (validation)")
    for ax in axes:
        ax.set_xlabel("iteration")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
