"""``hpseg compare``: evaluated runs side by side, with protocol differences flagged.

Each argument is a ``results.json`` file or a folder holding one (``RUN/results.json`` for
multi-seed runs, ``RUN/eval/results.json`` for single runs). Figures of runs evaluated under
different protocols (dataset, split, resolution, CRF, K, matching, backbone and its weights…)
are not comparable; the table says so instead of letting the numbers stand side by side
silently. Runs without labels are compared by their label-free figures and verdicts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hpseg.io import atomic_write_text
from hpseg.results import (
    AGREEMENT_FIGURES,
    CORRECTED_FIGURES,
    LABEL_FREE_FIGURES,
    RANDOM_WEIGHTS,
    HeadScore,
    Results,
    find_results,
)
from hpseg.viz import new_figure, save_figure

__all__ = ["PROTOCOL_KEYS", "compare_runs", "label_free_rows", "load_rows", "protocol_differences"]

#: protocol fields that must agree for figures to be comparable
PROTOCOL_KEYS = ("dataset", "split", "n_images", "eval_resolution", "crf", "n_clusters", "n_classes", "matching",
                 "cluster_probe", "backbone", "backbone_weights", "labelled")
#: the label-free figures drawn for runs without labels
_DRAWN = ("flip_stability", "photometric_stability", "boundary_edge_precision")


def load_rows(path: Path) -> tuple[str, dict[str, Any], dict[str, HeadScore]]:
    """(run name, protocol, {head: score}) of one evaluated run (mean ± std for multi-seed)."""
    results_file = find_results(path)
    results = Results.read(results_file)
    name = path.name if path.is_dir() else path.parent.name
    if name == "eval":
        name = path.parent.name if path.is_dir() else path.parent.parent.name
    return name, results.protocol.to_dict(), results.rows()


def label_free_rows(path: Path) -> dict[str, float]:
    """``{"HP flip stability %": 61.2, …, "HP vs k-means agreement, NMI": 0.41}``: the label-free
    figures of an evaluated run without labels (empty for runs evaluated with labels)."""
    label_free = Results.read(find_results(path)).label_free
    rows: dict[str, float] = {}
    for method, figures in (label_free.get("methods") or {}).items():
        rows.update({f"{method} {title}": float(figures[key]) for key, title, _ in
                     (*LABEL_FREE_FIGURES, *CORRECTED_FIGURES) if isinstance(figures.get(key), (int, float))})
    pair = label_free.get("agreement") or {}
    names = " vs ".join(pair.get("methods") or [])
    rows.update({f"{names} {title}": float(pair[key]) for key, title, _ in AGREEMENT_FIGURES
                 if isinstance(pair.get(key), (int, float))})
    return rows


def protocol_differences(protocols: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Protocol fields whose values differ between runs: ``{field: [value per run]}`` (a field a
    file did not record reads ``"?"``, and differs from any recorded value)."""
    diffs = {}
    for key in PROTOCOL_KEYS:
        values = [p.get(key) if p.get(key) not in (None, "") else "?" for p in protocols]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            diffs[key] = values
    return diffs


def compare_runs(paths: list[Path], out: Path | None = None) -> str:
    """A text table of every run's accuracy/mIoU per head and, for runs without labels, their
    label-free figures and verdicts; protocol differences (the backbone and its weights
    included) flagged. With ``out``, writes ``compare.json`` and ``compare.png`` there (bars of
    accuracy and mIoU, or of the label-free figures when no run has labels)."""
    runs = [load_rows(p) for p in paths]
    heads: list[str] = []
    for _, _, rows in runs:
        heads += [h for h in rows if h not in heads]
    diffs = protocol_differences([p for _, p, _ in runs])
    free = [label_free_rows(p) for p in paths]
    width = max(12, *(len(n) for n, _, _ in runs))
    first = max(22, *(len(k) + 1 for rows in free for k in rows), *(len(h) + 6 for h in heads))
    lines = [f"{'head':<{first}}" + "".join(f"{name:>{width + 2}}" for name, _, _ in runs)]
    for head in heads:
        for key, label in (("accuracy", "acc"), ("miou", "mIoU")):
            cells = [rows[head].cell(key).strip() if head in rows else "-" for _, _, rows in runs]
            lines.append(f"{head + ' ' + label:<{first}}" + "".join(f"{c:>{width + 2}}" for c in cells))
    for key in dict.fromkeys(k for rows in free for k in rows):
        cells = [f"{rows[key]:.3g}" if key in rows else "-" for rows in free]
        lines.append(f"{key:<{first}}" + "".join(f"{c:>{width + 2}}" for c in cells))
    label_free = [Results.read(find_results(p)).label_free for p in paths]
    verdicts = [(name, (lf.get("verdict") or {}).get("overall")) for (name, _, _), lf in zip(runs, label_free)]
    lines += [f"verdict {name}: {text}" for name, text in verdicts if text]
    lines.append("")
    lines += [f"NOTE: {name} was evaluated with an untrained backbone (random weights, model.pretrained=false)"
              for name, protocol, _ in runs if protocol.get("backbone_weights") == RANDOM_WEIGHTS]
    if diffs:
        lines.append("WARNING: protocols differ — these figures are not directly comparable:")
        for key, values in diffs.items():
            lines.append(f"  {key}: " + " | ".join(f"{n}={v}" for (n, _, _), v in zip(runs, values)))
        if "n_clusters" in diffs and any(free):
            lines.append("  (across K, compare the chance-corrected stability rows: the raw ones fall as K grows)")
    else:
        lines.append("protocols agree on: " + ", ".join(PROTOCOL_KEYS))
    text = "\n".join(lines)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        doc = {"runs": [{"name": n, "protocol": p, "metrics": {h: s.to_dict() for h, s in rows.items()}}
                        for n, p, rows in runs], "protocol_differences": diffs,
               "label_free": {n: rows for (n, _, _), rows in zip(runs, free) if rows},
               "verdicts": {n: v for n, v in verdicts if v}}
        atomic_write_text(out / "compare.json", json.dumps(doc, indent=2))
        names = [n for n, _, _ in runs]
        figure = (_figure(runs, heads, bool(diffs)) if heads
                  else _label_free_figure(names, label_free, bool(diffs)))
        save_figure(figure, out / "compare.png")
    return text


def _label_free_figure(names: list[str], label_free: list[dict[str, Any]], flagged: bool) -> Any:
    """Bars of each method's flip / photometric stability and boundaries on edges per run, with
    their 95 % bootstrap intervals where recorded."""
    methods = list(dict.fromkeys(m for lf in label_free for m in (lf.get("methods") or {})))
    titles = {key: title for key, title, _ in LABEL_FREE_FIGURES}
    fig = new_figure(3 + 2.4 * len(_DRAWN) + 0.4 * len(names), 3.6)
    axes = fig.subplots(1, len(_DRAWN))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(names))
    for ax, key in zip(axes, _DRAWN):
        for i, method in enumerate(methods):
            rows = [(lf.get("methods") or {}).get(method) or {} for lf in label_free]
            vals = [float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan for r in rows]
            spans = [(r.get("intervals") or {}).get(key) for r in rows]
            errs = np.array([[v - s[0], s[1] - v] if s and np.isfinite(v) else [0.0, 0.0]
                             for v, s in zip(vals, spans)]).T.clip(min=0)
            ax.bar(x + i * width, vals, width, yerr=errs, label=method, capsize=2)
        ax.set_xticks(x + width * (len(methods) - 1) / 2, names, fontsize=8)
        ax.set_title(titles[key] + ("  (protocols differ!)" if flagged else ""), fontsize=9)
        ax.set_ylim(0, 100)
    if methods:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _figure(runs: list[tuple[str, dict[str, Any], dict[str, HeadScore]]], heads: list[str], flagged: bool) -> Any:
    fig = new_figure(4 + 1.6 * len(runs), 3.6)
    axes = fig.subplots(1, 2)
    width = 0.8 / max(1, len(heads))
    x = np.arange(len(runs))
    for ax, key, title in ((axes[0], "accuracy", "pixel accuracy %"), (axes[1], "miou", "mIoU %")):
        for i, head in enumerate(heads):
            vals = [getattr(rows[head], key) if head in rows else np.nan for _, _, rows in runs]
            errs = [(getattr(rows[head], f"{key}_std") or 0.0) if head in rows else 0.0 for _, _, rows in runs]
            ax.bar(x + i * width, vals, width, yerr=errs, label=head, capsize=2)
        ax.set_xticks(x + width * (len(heads) - 1) / 2, [n for n, _, _ in runs], fontsize=8)
        ax.set_title(title + ("  (protocols differ!)" if flagged else ""), fontsize=9)
    if heads:  # runs without labels have no scored head
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
