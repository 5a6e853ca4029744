"""``RUN/sweep.html``: the K sweep on one page — the table of every K's label-free figures (raw
and chance-corrected, with 95 % intervals), the recommendation with its reason, and each K's
gallery (image · HP · k-means) under a heading naming its K, with a link to its report.

Self-contained like the report (:mod:`hpseg.report`): inline CSS, images embedded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hpseg.io import atomic_write_text
from hpseg.report import _CSS, _e, _Images, _num

__all__ = ["render_sweep_page", "write_sweep_page"]

#: (figure key, column title, digits)
_COLUMNS = (("flip_stability", "flip stability %", 1), ("flip_stability_corrected", "flip, chance-corrected", 1),
            ("photometric_stability", "photometric stability %", 1),
            ("photometric_stability_corrected", "photometric, chance-corrected", 1),
            ("boundary_edge_precision", "boundaries on edges %", 1), ("cluster_entropy", "balance", 3),
            ("empty_clusters", "empty clusters", 0))


def _table(rows: dict[str, dict[str, Any]], recommended: Any) -> str:
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in _COLUMNS)
    body = []
    for k, row in rows.items():
        nmi = (row.get("agreement") or {}).get("nmi")
        for method, figures in (row.get("methods") or {}).items():
            cells = "".join(f'<td class="num">{_num(figures.get(key), digits)}</td>' for key, _, digits in _COLUMNS)
            span = (figures.get("intervals") or {}).get("stability_corrected")
            score = _num(figures.get("stability_corrected"), 1) + (
                f" [{span[0]:.1f}, {span[1]:.1f}]" if span else "")
            mark = ' style="background:#eaf6ea"' if str(k) == str(recommended) and method == "HP" else ""
            body.append(f"<tr{mark}><td>{_e(k)}</td><td>{_e(method)}</td>{cells}<td class=\"num\">{_e(score)}</td>"
                        f'<td class="num">{_num(nmi, 3) if method == "HP" and nmi is not None else ""}</td></tr>')
    return (f'<table class="sweep"><tr><th>K</th><th>method</th>{head}<th>stability, chance-corrected '
            f"[95 % interval]</th><th>NMI vs k-means</th></tr>{''.join(body)}</table>")


def render_sweep_page(doc: dict[str, Any], folder: Path, page_dir: Path) -> str:
    """The page of a sweep (``doc``: the content of ``sweep.json``) whose runs lie in ``folder``."""
    rows: dict[str, dict[str, Any]] = doc.get("k") or {}
    recommendation = doc.get("recommendation") or {}
    images = _Images(folder, page_dir, embed=True)
    verdict = (f"<strong>Recommended: K = {_e(recommendation['k'])}.</strong> " if recommendation.get("k") else
               "<strong>No recommendation.</strong> ")
    parts = [f"<h1>Choosing K — {_e(folder.name)}</h1>",
             f'<p class="sub">one HP run per K, each beside k-means with the same K on the same frozen backbone, '
             f"judged on the held-out images ({_e(', '.join(str(r.get('n_images', '?')) for r in rows.values()))} "
             "per K)</p>",
             f'<p class="note">{verdict}{_e(recommendation.get("reason", ""))}</p>',
             "<h2>Figures per K</h2>", _table(rows, recommendation.get("k")),
             '<p class="sub">chance-corrected: 100 · (S − S₀) / (100 − S₀), with S₀ the stability of a random '
             "segmentation with the same cluster sizes at that K — 0 = no more stable than chance, 100 = perfectly "
             "stable, comparable across K (the raw figures fall as K grows for any method). Intervals: paired "
             "bootstrap over the held-out images (README, \"Your own images\").</p>",
             "<h2>Galleries</h2>"]
    for k, row in rows.items():
        report, gallery = (Path(str(row.get(key, ""))).resolve() for key in ("report", "gallery"))
        link = (f' · <a href="{_e(os.path.relpath(report, page_dir.resolve()))}">its report</a>'
                if report.is_file() else "")
        rel = gallery.relative_to(folder) if folder in gallery.parents else gallery
        parts += [f'<h3 id="k-{_e(k)}">K = {_e(k)}{link}</h3>',
                  f'<div class="figure">{images.tag(rel, f"gallery of K={k}")}</div>']
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{_e(f'hpseg sweep — {folder.name}')}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{chr(10).join(parts)}\n</body></html>\n")


def write_sweep_page(doc: dict[str, Any], path: Path) -> Path:
    """Write :func:`render_sweep_page` of ``doc`` (``sweep.json``'s content) to ``path``."""
    folder = Path(doc.get("folder") or path.parent)
    atomic_write_text(path, render_sweep_page(doc, folder.resolve(), path.parent))
    return path
