"""Choosing the number of clusters K without labels: one HP run per K, each judged label-free.

:func:`sweep_clusters` trains (or finds already trained) one run per K in ``RUN/k-<K>/`` with
``model.n_clusters=K`` and otherwise the same configuration, evaluates each on the held-out
images beside k-means with the same K (``hpseg evaluate RUN/k-<K> --baseline``: the label-free
figures of :mod:`hpseg.label_free` and a gallery of both segmentations), and writes
``RUN/sweep.json`` with every K's figures. :func:`format_sweep` prints them as one table.
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
from hpseg.results import LABEL_FREE_FIGURES

log = logging.getLogger(__name__)

__all__ = ["SweepResult", "format_sweep", "sweep_clusters"]


@dataclass
class SweepResult:
    """Where the sweep wrote its runs and, per K, the label-free figures and the gallery."""

    folder: Path
    rows: dict[int, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "k": {str(k): row for k, row in self.rows.items()}}


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
    result = SweepResult(base, rows)
    atomic_write_text(base / "sweep.json", json.dumps(result.to_dict(), indent=2, allow_nan=False))
    return result


def format_sweep(result: SweepResult) -> str:
    """One line per K and method: the label-free figures, then HP's agreement with k-means."""
    keys = [(key, title) for key, title, _ in LABEL_FREE_FIGURES]
    header = f"{'K':>3} {'method':<8}" + "".join(f"{title:>{max(12, len(title) + 1)}}" for _, title in keys)
    lines = [header + f"{'NMI vs k-means':>16}", "-" * (len(header) + 16)]
    for k, row in result.rows.items():
        nmi = (row.get("agreement") or {}).get("nmi")
        for method, figures in (row.get("methods") or {}).items():
            cells = []
            for key, title in keys:
                value = figures.get(key)
                text = "n/a" if value is None else str(int(value)) if key == "empty_clusters" else (
                    f"{value:.3f}" if key == "cluster_entropy" else f"{value:.1f}")
                cells.append(f"{text:>{max(12, len(title) + 1)}}")
            last = f"{nmi:>16.3f}" if method == "HP" and nmi is not None else f"{'':>16}"
            lines.append(f"{k:>3} {method:<8}" + "".join(cells) + last)
    lines += ["", "galleries (image · HP · k-means, colours matched):"]
    lines += [f"  K={k}: {row['gallery']}" for k, row in result.rows.items()]
    return "\n".join(lines)
