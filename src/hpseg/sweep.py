"""Choosing the number of clusters K without labels: one HP run per K, each judged label-free.

:func:`sweep_clusters` trains (or finds already trained) one run per K in ``RUN/k-<K>/`` with
``model.n_clusters=K`` and otherwise the same configuration, evaluates each on the held-out
images beside k-means with the same K (``hpseg evaluate RUN/k-<K> --baseline``: the label-free
figures of :mod:`hpseg.label_free` and a gallery of both segmentations), and writes
``RUN/sweep.json`` with every K's figures and ``RUN/sweep.html`` (:mod:`hpseg.sweep_page`): one
page with the table, each K's gallery labelled by K, and the recommendation.
:func:`format_sweep` prints the table.

**Comparable across K.** The raw stability figures fall as K grows for any method (more
clusters, more pixels near a boundary, and less agreement by chance), so the sweep compares
their **chance-corrected** form ``100 · (S − S₀) / (100 − S₀)``, where ``S₀`` is the stability a
random segmentation with the same cluster sizes (per image) would have at that K
(:func:`hpseg.label_free.pooled_figures`): 0 = no more stable than chance, 100 = perfectly
stable, whatever K — the correction of Cohen's kappa and of the adjusted Rand index.

**The recommendation** (:func:`recommend_k`) uses HP's mean chance-corrected stability (flip and
photometric) and its 95 % bootstrap interval over the held-out images: a K is *clearly less
stable* than the best K when its interval lies entirely below the best's. The sweep recommends
the largest K that is not clearly less stable than the best and leaves no cluster empty (finer
segments at no measurable cost in stability); when no K is clearly less stable, it says the
figures do not separate these K and leaves the choice to the galleries.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpseg.config import build_config, run_dir
from hpseg.errors import HPSegError
from hpseg.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["SweepResult", "format_sweep", "recommend_k", "sweep_clusters"]

#: the figure the recommendation compares (HP's, with its interval)
SCORE = "stability_corrected"


@dataclass
class SweepResult:
    """Where the sweep wrote its runs and, per K, the label-free figures and the gallery."""

    folder: Path
    rows: dict[int, dict[str, Any]]
    recommendation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "k": {str(k): row for k, row in self.rows.items()},
                "recommendation": self.recommendation or recommend_k(self.rows)}


def sweep_clusters(preset: str | None, overrides: list[str], ks: list[int]) -> SweepResult:
    """Train and evaluate one run per K in ``ks`` (see the module docstring).

    Raises:
        HPSegError: no K, a K below 2, or ``model.n_clusters`` among the overrides.
    """
    from hpseg.pipeline import evaluate_path, run_training

    if not ks or min(ks) < 2:
        raise HPSegError("give at least one number of clusters of 2 or more: hpseg sweep-k --k 4 6 8 …")
    if any(o.split("=", 1)[0].strip() == "model.n_clusters" for o in overrides):
        raise HPSegError("the sweep sets model.n_clusters itself: drop it and list the values with --k")
    base = run_dir(build_config(preset, overrides))
    rows: dict[int, dict[str, Any]] = {}
    for k in sorted(set(ks)):
        cfg = build_config(preset, [*overrides, f"model.n_clusters={k}", f"train.out_dir={base / f'k-{k}'}"])
        log.info("sweep: K=%d → %s", k, cfg.train.out_dir)
        run = run_training(cfg)
        results = evaluate_path(run.folders[0], baseline=True)
        if not results.label_free:
            raise HPSegError(f"{run.folders[0]} was evaluated with labels: compare its mIoU (hpseg compare) "
                             "instead of the label-free sweep")
        rows[k] = {**results.label_free, "gallery": str(run.folders[0] / "eval" / "predictions.png"),
                   "report": str(run.folders[0] / "eval" / "report.html")}
    result = SweepResult(base, rows, recommend_k(rows))
    atomic_write_text(base / "sweep.json", json.dumps(result.to_dict(), indent=2, allow_nan=False))
    from hpseg.sweep_page import write_sweep_page

    write_sweep_page(result.to_dict(), base / "sweep.html")
    return result


def _score(row: dict[str, Any], method: str = "HP") -> tuple[float, list[float] | None, int] | None:
    """(value, interval, empty clusters) of ``method``'s :data:`SCORE` in one K's figures."""
    figures = (row.get("methods") or {}).get(method) or {}
    if not isinstance(figures.get(SCORE), (int, float)):
        return None
    interval = (figures.get("intervals") or {}).get(SCORE)
    return float(figures[SCORE]), interval, int(figures.get("empty_clusters", 0))


def _said(k: int | None, score: tuple[float, list[float] | None, int]) -> str:
    """``"K=6: 54.1, 95 % interval 49.0 … 58.2"`` (without ``K=…`` when ``k`` is None)."""
    value, interval, _ = score
    span = f", 95 % interval {interval[0]:.1f} … {interval[1]:.1f}" if interval else ""
    return ("" if k is None else f"K={k}: ") + f"{value:.1f}{span}"


def recommend_k(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Which K to take, and why, from each K's label-free figures (``{K: label_free}``; see the
    module docstring for the rule).

    Returns:
        ``{"k": K or None, "reason": one sentence, "separated": whether the figures separate
        the K}``.
    """
    scores = {k: sc for k, row in sorted(rows.items()) if (sc := _score(row)) is not None}
    if len(scores) < 2:
        return {"k": None, "separated": False, "reason": "fewer than two K with figures: nothing to compare"}
    if any(sc[1] is None for sc in scores.values()):
        return {"k": None, "separated": False,
                "reason": "too few held-out images for intervals (at least 6 needed): the figures cannot separate "
                          "these K; choose from the galleries"}
    best = max(scores, key=lambda k: scores[k][0])
    floor = scores[best][1][0]  # type: ignore[index]
    below = [k for k, sc in scores.items() if sc[1][1] < floor]  # type: ignore[index]
    empty = "".join(f"; K={k} leaves {sc[2]} of its clusters empty" for k, sc in scores.items() if sc[2])
    if not below:
        return {"k": None, "separated": False,
                "reason": "the figures do not separate these K: no K's chance-corrected stability is clearly below "
                          "the best one's (every 95 % interval reaches the best's: "
                          f"{'; '.join(_said(k, sc) for k, sc in scores.items())}){empty}; choose from the galleries"}
    fine = [k for k, sc in scores.items() if k not in below and sc[2] == 0]
    if not fine:
        return {"k": None, "separated": True,
                "reason": "every K as stable as the best leaves some cluster empty: try smaller K"}
    k = max(fine)
    lower = "; ".join(_said(b, scores[b]) for b in below)
    reason = (f"K={k}: the largest K whose chance-corrected stability ({_said(None, scores[k])}) is "
              f"not clearly below the best ({_said(best, scores[best])}) and that leaves no cluster empty; "
              f"clearly less stable: {lower}")
    return {"k": k, "separated": True, "reason": reason}


#: the sweep table's columns: (figure key, title, digits)
_COLUMNS = (("flip_stability", "flip %", 1), ("flip_stability_corrected", "flip cc", 1),
            ("photometric_stability", "photo %", 1), ("photometric_stability_corrected", "photo cc", 1),
            ("boundary_edge_precision", "edges %", 1), ("cluster_entropy", "balance", 3), ("empty_clusters", "empty", 0))


def format_sweep(result: SweepResult) -> str:
    """One line per K and method: raw and chance-corrected ("cc") figures, the mean chance-corrected
    stability with its 95 % interval, HP's agreement with k-means; then the recommendation."""
    header = f"{'K':>3} {'method':<8}" + "".join(f"{title:>9}" for _, title, _ in _COLUMNS)
    header += f"  {'stability cc [95 % interval]':<29}{'NMI vs k-means':>15}"
    lines = [header, "-" * len(header)]
    for k, row in result.rows.items():
        nmi = (row.get("agreement") or {}).get("nmi")
        for method, figures in (row.get("methods") or {}).items():
            cells = []
            for key, _, digits in _COLUMNS:
                value = figures.get(key)
                cells.append(f"{'n/a' if value is None else f'{value:.{digits}f}':>9}")
            score, span = figures.get(SCORE), (figures.get("intervals") or {}).get(SCORE)
            text = "n/a" if score is None else f"{score:.1f}" + (f" [{span[0]:.1f}, {span[1]:.1f}]" if span else "")
            last = f"{nmi:>15.3f}" if method == "HP" and nmi is not None else f"{'':>15}"
            lines.append(f"{k:>3} {method:<8}" + "".join(cells) + f"  {text:<29}" + last)
    lines += ["", "cc: chance-corrected, 100 · (S − S₀) / (100 − S₀) with S₀ the stability of a random segmentation "
              "with the same cluster sizes at that K (0 = chance, 100 = perfectly stable): comparable across K",
              "", "galleries (image · HP · k-means, colours matched):"]
    lines += [f"  K={k}: {row['gallery']}" for k, row in result.rows.items()]
    recommendation = result.recommendation or recommend_k(result.rows)
    lines += ["", f"recommendation: {recommendation['reason']}"]
    return "\n".join(lines)
