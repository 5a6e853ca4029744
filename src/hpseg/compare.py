"""``hpseg compare``: evaluated runs side by side, with protocol differences flagged.

Each argument is a ``results.json`` file or a folder holding one (``RUN/results.json`` for
multi-seed runs, ``RUN/eval/results.json`` for single runs). Figures of runs evaluated under
different protocols (dataset, split, resolution, CRF, K, matching…) are not comparable; the
table says so instead of letting the numbers stand side by side silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpseg.errors import HPSegError
from hpseg.io import atomic_write_text

#: protocol fields that must agree for figures to be comparable
PROTOCOL_KEYS = ("dataset", "split", "n_images", "eval_resolution", "crf", "n_clusters", "n_classes", "matching")


def find_results(path: Path) -> Path:
    """The ``results.json`` for a file or run folder.

    Raises:
        HPSegError: nothing evaluated there yet.
    """
    if path.is_file():
        return path
    for candidate in (path / "results.json", path / "eval" / "results.json"):
        if candidate.is_file():
            return candidate
    raise HPSegError(f"no results.json in {path}: run `hpseg evaluate {path}` first")


def load_rows(path: Path) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """(run name, protocol, {head: metrics}) of one evaluated run (aggregate for multi-seed)."""
    results = find_results(path)
    doc = json.loads(results.read_text())
    name = path.name if path.is_dir() else path.parent.name
    if name == "eval":
        name = path.parent.name
    metrics = doc.get("aggregate") or doc.get("metrics") or {}
    if "hp" in metrics:  # demo layout: {"hp": {...}, "baseline": {...}}
        metrics = {"unsupervised": metrics["hp"]["unsupervised"], "linear": metrics["hp"]["linear"],
                   "k-means baseline": metrics["baseline"]["unsupervised"]}
    if doc.get("baseline"):
        metrics = {**metrics, "k-means baseline": doc["baseline"]["unsupervised"]}
    return name, doc.get("protocol", {}), metrics


def protocol_differences(protocols: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Protocol fields whose values differ between runs: ``{field: [value per run]}``."""
    diffs = {}
    for key in PROTOCOL_KEYS:
        values = [p.get(key) for p in protocols]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            diffs[key] = values
    return diffs


def compare_runs(paths: list[Path], out: Path | None = None) -> str:
    """A text table of every run's accuracy/mIoU per head; writes compare.json/.png to ``out``."""
    runs = [load_rows(p) for p in paths]
    heads = []
    for _, _, metrics in runs:
        heads += [h for h in metrics if h not in heads]
    diffs = protocol_differences([p for _, p, _ in runs])

    def cell(m: dict[str, Any] | None, key: str) -> str:
        if not m:
            return "-"
        if f"{key}_std" in m:
            return f"{m[key]:.2f}±{m[key + '_std']:.2f}"
        return f"{m[key]:.2f}"

    width = max(12, *(len(n) for n, _, _ in runs))
    lines = [f"{'head':<22}" + "".join(f"{name:>{width + 2}}" for name, _, _ in runs)]
    for head in heads:
        for key, label in (("accuracy", "acc"), ("miou", "mIoU")):
            row = f"{head + ' ' + label:<22}"
            row += "".join(f"{cell(metrics.get(head), key):>{width + 2}}" for _, _, metrics in runs)
            lines.append(row)
    if diffs:
        lines.append("")
        lines.append("WARNING: protocols differ — these figures are not directly comparable:")
        for key, values in diffs.items():
            lines.append(f"  {key}: " + " | ".join(f"{n}={v}" for (n, _, _), v in zip(runs, values)))
    else:
        lines.append("")
        lines.append("protocols agree on: " + ", ".join(PROTOCOL_KEYS))
    text = "\n".join(lines)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        doc = {"runs": [{"name": n, "protocol": p, "metrics": m} for n, p, m in runs], "protocol_differences": diffs}
        atomic_write_text(out / "compare.json", json.dumps(doc, indent=2))
        _plot(runs, heads, out / "compare.png", bool(diffs))
    return text


def _plot(runs: list[tuple[str, dict[str, Any], dict[str, dict[str, Any]]]], heads: list[str], path: Path,
          flagged: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(runs), 3.6))
    width = 0.8 / max(1, len(heads))
    for ax, key, title in ((axes[0], "accuracy", "pixel accuracy %"), (axes[1], "miou", "mIoU %")):
        for i, head in enumerate(heads):
            vals = [m.get(head, {}).get(key, np.nan) for _, _, m in runs]
            errs = [m.get(head, {}).get(f"{key}_std", 0.0) for _, _, m in runs]
            ax.bar(np.arange(len(runs)) + i * width, vals, width, yerr=errs, label=head, capsize=2)
        ax.set_xticks(np.arange(len(runs)) + width * (len(heads) - 1) / 2, [n for n, _, _ in runs], fontsize=8)
        ax.set_title(title + ("  (protocols differ!)" if flagged else ""), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
