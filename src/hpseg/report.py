"""A static, self-contained HTML report of an evaluation (``hpseg report``).

Reads the results folder written by ``hpseg evaluate`` (``results.json`` in the
:mod:`hpseg.results` schema, ``confusion_<head>.png``, ``gallery/*.png``, ``clusters/*.png``,
``predictions.png``, ``training_curve.png``) and writes one HTML file with inline CSS and, by
default, the images embedded as base64 data URIs, so the file can be moved, mailed or archived
on its own and opened without a server or network. Sections: protocol, metrics per head (and
the k-means baseline when scored), diagnostics, per-class IoU bars, confusion matrices, the
cluster gallery (example regions per cluster, with their names), the prediction gallery and the
training curve. Runs without labels say so and show what can be shown — the label-free verdict
first (its overall sentence under the title, then one sentence per figure with its 95 %
interval, the figures with HP − k-means, and the held-out images when the run folder lists them
in ``held_out.txt``); an untrained backbone is flagged at the top. Multi-seed results give a
per-seed table with mean ± std.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
import os
import urllib.parse
from pathlib import Path
from typing import Any

from hpseg.io import atomic_write_text
from hpseg.results import (
    AGREEMENT_FIGURES,
    LABEL_FREE_FIGURES,
    HeadScore,
    Results,
    difference_cell,
    find_results,
)
from hpseg.viz import hex_colour, palette

log = logging.getLogger(__name__)

__all__ = ["find_results", "render_report", "write_report"]

_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp"}
_COLUMN_TITLES = {
    "image": "image",
    "label": "ground truth",
    "unsupervised": "HP clusters",
    "linear": "HP linear probe",
    "kmeans": "k-means (frozen backbone)",
}
_HEAD_TITLES = {
    "unsupervised": "unsupervised (cluster probe)",
    "linear": "linear probe",
    "unsupervised_crf": "unsupervised + CRF",
    "linear_crf": "linear probe + CRF",
    "unsupervised_refit": "unsupervised, cluster probe refitted by k-means (not the authors' protocol)",
}

_CSS = """
:root { --fg:#1d2430; --muted:#5b6575; --line:#d9dee6; --accent:#2f6fde; --bg:#fff; --soft:#f4f6f9; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; padding: 24px 28px 48px; max-width: 1200px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 10px;
     border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 14px; margin: 14px 0 6px; }
.sub { color: var(--muted); margin: 0 0 12px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
.bar { display: inline-block; width: 160px; height: 12px; background: var(--soft); border: 1px solid var(--line);
       vertical-align: middle; margin-right: 6px; }
.bar > span { display: block; height: 100%; background: var(--accent); }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #777; vertical-align: middle;
          margin-right: 6px; }
.legend span.item { display: inline-block; margin: 2px 12px 2px 0; white-space: nowrap; }
.gallery img, .figure img { image-rendering: pixelated; max-width: 100%; }
.gallery td { padding: 3px; } .gallery img { width: 180px; height: auto; display: block; }
.figure { margin: 8px 0 16px; } .figure img { border: 1px solid var(--line); }
table.confusion td { width: 22px; height: 18px; padding: 0; font-size: 10px; text-align: center; }
table.confusion th { font-size: 10px; padding: 2px 4px; white-space: nowrap; }
.missing { color: #b00020; font-size: 12px; }
.note { background: #fff6e0; border: 1px solid #f0d590; padding: 8px 12px; }
p.verdict { font-size: 15px; margin: 6px 0; } ul.verdict { margin: 4px 0 8px; padding-left: 22px; }
.clusters img { height: 100px; image-rendering: auto; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""

# marks each image as rendered or not once the page has loaded (lets tests and readers see
# broken images); no network access, no external script
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute("data-rendered", good ? "1" : "0");
    if (good) { ok++; } else { imgs[i].classList.add("broken"); }
  }
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


class _Images:
    """Image references for the page: data URIs (embedded) or paths relative to the page."""

    def __init__(self, results_dir: Path, page_dir: Path, embed: bool) -> None:
        self.root = results_dir.resolve()
        self.page_dir = page_dir.resolve()
        self.embed = embed

    def tag(self, rel: str | Path, alt: str) -> str:
        path = (self.root / rel).resolve()
        if self.root != path and self.root not in path.parents:
            log.warning("report: %s lies outside %s; not included", rel, self.root)
            return f'<span class="missing">not included: {_e(rel)}</span>'
        mime = _IMAGE_TYPES.get(path.suffix.lower())
        if mime is None or not path.is_file():
            log.warning("report: image %s is missing", path)
            return f'<span class="missing">missing: {_e(rel)}</span>'
        if self.embed:
            src = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"
        else:
            src = urllib.parse.quote(Path(os.path.relpath(path, self.page_dir)).as_posix())
        return f'<img src="{_e(src)}" alt="{_e(alt)}" loading="eager">'


def _colours(n: int) -> list[str]:
    return [hex_colour(row) for row in palette(max(n, 1))][:n]


def _kv_table(data: dict[str, Any]) -> str:
    rows = []
    for key, value in data.items():
        text = str(value) if not isinstance(value, (dict, list)) else ", ".join(
            f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else ", ".join(map(str, value))
        rows.append(f"<tr><td>{_e(key)}</td><td>{_e('-' if value is None else text)}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _cell(s: HeadScore, key: str) -> str:
    text = _num(getattr(s, key))
    std = getattr(s, f"{key}_std")
    return text + (f" ± {_num(std)}" if std is not None else "")


def _metrics_table(rows: dict[str, HeadScore]) -> str:
    body = "".join(f'<tr><td>{_e(_HEAD_TITLES.get(name, name))}</td><td class="num">{_e(_cell(s, "accuracy"))}</td>'
                   f'<td class="num">{_e(_cell(s, "miou"))}</td></tr>' for name, s in rows.items())
    return f'<table class="metrics"><tr><th>head</th><th>pixel accuracy %</th><th>mIoU %</th></tr>{body}</table>'


def _iou_table(heads: list[tuple[str, list[float]]], class_names: list[str]) -> str:
    n = max(len(iou) for _, iou in heads)
    names = list(class_names) + [f"class {i}" for i in range(len(class_names), n)]
    colours = _colours(n)
    head_cells = "".join(f"<th>{_e(_HEAD_TITLES.get(h, h))}</th>" for h, _ in heads)
    rows = []
    for i in range(n):
        cells = []
        for _, iou in heads:
            value = iou[i] if i < len(iou) else None
            width = 0.0 if value is None or math.isnan(float(value)) else max(0.0, min(100.0, float(value)))
            cells.append(f'<td class="num"><span class="bar"><span style="width:{width:.1f}%"></span></span>'
                         f"{_e(_num(value))}</td>")
        rows.append(f'<tr><td><span class="swatch" style="background:{colours[i]}"></span>{_e(names[i])}</td>'
                    f"{''.join(cells)}</tr>")
    return f'<table class="iou"><tr><th>class</th>{head_cells}</tr>{"".join(rows)}</table>'


def _legend(names: list[str]) -> str:
    items = [f'<span class="item"><span class="swatch" style="background:{c}"></span>{_e(n)}</span>'
             for n, c in zip(names, _colours(len(names)))]
    items.append('<span class="item"><span class="swatch" style="background:#000"></span>ignore / unmatched</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def _diagnostics(diagnostics: dict[str, Any]) -> str:
    rows = {k: (f"{100 * v:.1f} %" if k.startswith(("positive_precision", "kept_anchor", "cluster_entropy"))
                else _num(v) if isinstance(v, float) else v)
            for k, v in diagnostics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return _kv_table(rows)


def _verdict(verdict: dict[str, Any]) -> list[str]:
    """The verdict in words: the overall sentence, one per figure, and how the intervals were made."""
    if not verdict:
        return []
    rows = verdict.get("figures") or {}
    items = "".join(f"<li>{_e(row['sentence'])}</li>" for row in rows.values() if row.get("sentence"))
    return [f'<p class="verdict"><strong>{_e(verdict.get("overall", ""))}</strong></p>',
            f'<ul class="verdict">{items}</ul>',
            f'<p class="sub">intervals: {_e(verdict.get("method", ""))}; a difference is clear when its interval '
            f"excludes 0; below {_e(verdict.get('min_images', '?'))} held-out images no verdict is given.</p>"]


def _label_free(label_free: dict[str, Any]) -> list[str]:
    """The label-free verdict: in words, then one row per figure, one column per method (and the
    difference with its interval), and what each means."""
    methods: dict[str, dict[str, Any]] = label_free.get("methods") or {}
    if not methods:
        return []
    names = list(methods)
    verdict: dict[str, Any] = label_free.get("verdict") or {}
    diffs: dict[str, dict[str, Any]] = verdict.get("figures") or {}
    diff_head = f"<th>{_e(names[0])} − {_e(names[1])} [95 % interval]</th>" if verdict and len(names) > 1 else ""
    head = "".join(f"<th>{_e(n)}</th>" for n in names) + diff_head
    rows = []
    for key, title, meaning in LABEL_FREE_FIGURES:
        values = [methods[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = "".join(f'<td class="num">{_e(_label_free_value(key, v))}</td>' for v in values)
        if diff_head:
            cells += f'<td class="num">{_e(difference_cell(key, diffs[key])) if key in diffs else ""}</td>'
        rows.append(f"<tr><td>{_e(title)}</td>{cells}<td class=\"sub\">{_e(meaning)}</td></tr>")
    parts = ['<h2 id="verdict">Label-free verdict</h2>',
             f'<p class="sub">on {_e(label_free.get("n_images", "?"))} held-out images (never trained on); '
             "figures compare between runs, between values of K and between methods.</p>",
             *_verdict(verdict),
             f'<table class="labelfree"><tr><th>figure</th>{head}<th>what it means</th></tr>{"".join(rows)}</table>']
    if "boundary_edge_chance" in label_free:
        parts.append(f'<p class="sub">chance level of "boundaries on image edges": '
                     f"{_num(label_free['boundary_edge_chance'], 1)} %</p>")
    pair = label_free.get("agreement") or {}
    if pair:
        a, b = (list(pair.get("methods") or []) + ["?", "?"])[:2]
        items = "".join(f"<tr><td>{_e(title)}</td><td class=\"num\">{_num(pair.get(key), 3)}</td>"
                        f"<td class=\"sub\">{_e(meaning)}</td></tr>"
                        for key, title, meaning in AGREEMENT_FIGURES if pair.get(key) is not None)
        parts += [f"<h3>{_e(a)} vs {_e(b)}</h3>", f'<table class="labelfree">{items}</table>']
    return parts


def _label_free_value(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "empty_clusters":
        return str(int(value))
    return _num(value, 3 if key == "cluster_entropy" else 1)


def _cluster_gallery(results: Results, images: _Images) -> list[str]:
    entries = [e for e in results.cluster_gallery if isinstance(e, dict)]
    if not entries:
        return []
    total = sum(int(e.get("pixels", 0)) for e in entries) or 1
    colours = _colours(len(entries))
    rows = []
    for e in entries:
        c = int(e.get("cluster", 0))
        strip = images.tag(e["strip"], f"examples of cluster {c}") if e.get("strip") else "<em>no pixels</em>"
        swatch = colours[c] if c < len(colours) else "#000"
        rows.append(f'<tr><td><span class="swatch" style="background:{swatch}"></span>{c}</td>'
                    f"<td>{_e(e.get('name', f'cluster {c}'))}</td>"
                    f'<td class="num">{100 * int(e.get("pixels", 0)) / total:.1f} %</td><td>{strip}</td></tr>')
    return [
        "<h2>Clusters</h2>",
        '<p class="sub">example regions of each cluster (pixels outside the cluster dimmed). Name them with '
        "<code>hpseg name RUN 0=sky 1=road …</code>; the names then appear in every output.</p>",
        f'<table class="clusters"><tr><th>cluster</th><th>name</th><th>pixels</th><th>examples</th></tr>'
        f"{''.join(rows)}</table>",
    ]


#: the file listing a folder run's held-out images, in the run folder
HELD_OUT_FILE = "held_out.txt"


def _held_out(results: Results, results_dir: Path) -> list[str]:
    """The held-out images, when the run folder lists them (``held_out.txt`` beside the
    evaluation folder, or beside the evaluated checkpoint)."""
    folders = [results_dir, results_dir.parent]
    if results.protocol.checkpoint:
        folders.append(Path(results.protocol.checkpoint).parent)
    found = next((f / HELD_OUT_FILE for f in folders if (f / HELD_OUT_FILE).is_file()), None)
    if found is None:
        return []
    names = [line for line in found.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    items = "".join(f"<li><code>{_e(n)}</code></li>" for n in names[:500])
    more = f"<li>… and {len(names) - 500} more (see {_e(found)})</li>" if len(names) > 500 else ""
    return [f"<details><summary>the {len(names)} held-out images (never trained on; listed in "
            f"<code>{_e(found)}</code>)</summary><ul>{items}{more}</ul></details>"]


def _single_run(results: Results, images: _Images, results_dir: Path) -> list[str]:
    parts: list[str] = []
    names = results.class_names
    if not results.protocol.labelled:
        parts.append('<p class="note">No labels to score against: this page shows the predictions, the '
                     "clusters and the label-free diagnostics.</p>")
    rows = results.rows()
    if rows:
        parts += ["<h2>Metrics</h2>", _metrics_table(rows)]
    parts += _label_free(results.label_free)
    if results.label_free:
        parts += _held_out(results, results_dir)
    if results.diagnostics:
        parts += ["<h2>Diagnostics</h2>", _diagnostics(results.diagnostics)]
        if not results.protocol.labelled:
            parts.append('<p class="sub">cluster_entropy: balance of the cluster sizes (entropy / log K; 1 = all '
                         "clusters equally large, 0 = one cluster takes everything); empty_clusters: clusters no "
                         "pixel takes.</p>")
    ious = [(h, s.iou) for h, s in results.metrics.items() if s.iou]
    if ious:
        parts += ["<h2>Per-class IoU %</h2>", _iou_table(ious, names)]
    blocks = [f'<h3>{_e(_HEAD_TITLES.get(h, h))}</h3><div class="figure">{images.tag(f"confusion_{h}.png", h)}</div>'
              for h in results.confusion if (results_dir / f"confusion_{h}.png").is_file()]
    if blocks:
        parts.append('<h2>Confusion matrices</h2><p class="sub">rows: prediction (clusters with their matched '
                     "class), columns: ground truth; each row normalised.</p>")
        parts += blocks
    parts += _cluster_gallery(results, images)
    gallery = [g for g in results.gallery if isinstance(g, dict)]
    if gallery:
        keys = list(dict.fromkeys(k for g in gallery for k in g))
        head = "".join(f"<th>{_e(_COLUMN_TITLES.get(k, k))}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{images.tag(g[k], f'{k} {i}') if k in g else ''}</td>" for k in keys)
                       + "</tr>" for i, g in enumerate(gallery))
        legend_names = names if results.protocol.labelled else (
            results.cluster_names or [f"cluster {k}" for k in range(results.protocol.n_clusters)])
        parts += ["<h2>Gallery</h2>", _legend(legend_names), f'<table class="gallery"><tr>{head}</tr>{body}</table>']
    elif (results_dir / "predictions.png").is_file():
        parts += ["<h2>Predictions</h2>", f'<div class="figure">{images.tag("predictions.png", "predictions")}</div>']
    if (results_dir / "training_curve.png").is_file():
        parts += ["<h2>Training</h2>",
                  f'<div class="figure">{images.tag("training_curve.png", "training curve")}</div>']
    return parts


def _multi_seed(results: Results) -> list[str]:
    seeds = results.seeds
    heads = list(dict.fromkeys([*results.metrics, *(h for m in seeds.values() for h in m)]))
    head_row = "".join(f"<th>{_e(s)}<br>acc / mIoU %</th>" for s in seeds)
    body = []
    for h in heads:
        cells = [f'<td class="num">{_num(m[h].accuracy)} / {_num(m[h].miou)}</td>' if h in m else "<td>-</td>"
                 for m in seeds.values()]
        agg = results.metrics.get(h)
        cells += [f'<td class="num">{_e(_cell(agg, "accuracy"))}</td><td class="num">{_e(_cell(agg, "miou"))}</td>'
                  if agg else "<td>-</td><td>-</td>"]
        body.append(f"<tr><td>{_e(_HEAD_TITLES.get(h, h))}</td>{''.join(cells)}</tr>")
    parts = [f"<h2>Metrics over {len(seeds)} seeds</h2>",
             f'<table class="metrics"><tr><th>head</th>{head_row}<th>accuracy mean ± std</th>'
             f"<th>mIoU mean ± std</th></tr>{''.join(body)}</table>",
             '<p class="sub">std: sample standard deviation over seeds (0 for one seed). Per-seed figures and '
             "galleries: <code>hpseg report SEED/eval</code>.</p>"]
    mean_iou = []
    for h in heads:
        lists = [m[h].iou for m in seeds.values() if h in m and m[h].iou]
        if lists and len(lists) == len(seeds) and len({len(x) for x in lists}) == 1:
            cols = []
            for values in zip(*lists):
                good = [float(v) for v in values if v is not None and not math.isnan(float(v))]
                cols.append(sum(good) / len(good) if good else float("nan"))
            mean_iou.append((h, cols))
    if mean_iou:
        parts += ["<h2>Per-class IoU %, mean over seeds</h2>", _iou_table(mean_iou, results.class_names)]
    return parts


def _protocol_fields(protocol: dict[str, Any]) -> dict[str, Any]:
    """The protocol's fields that apply: without labels there are no classes and no matching."""
    if protocol.get("labelled", True):
        return protocol
    return {k: v for k, v in protocol.items() if k not in ("n_classes", "matching", "cluster_probe")}


def render_report(results: Results, results_dir: Path, page_dir: Path, *, embed: bool = True,
                  source: str = "results.json") -> str:
    """The report page of ``results`` (read from ``results_dir``)."""
    from hpseg import __version__

    images = _Images(results_dir, page_dir, embed)
    p = results.protocol
    title = f"hpseg evaluation report — {p.dataset} / {p.split}"
    sub = [f"backbone {p.backbone} ({p.weights_text()})", f"{p.n_images} images", f"{p.eval_resolution} px", f"CRF {'on' if p.crf else 'off'}"]
    if results.seeds:
        sub.append(f"{len(results.seeds)} seeds")
    if not p.labelled:
        sub.append("no labels")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(" · ".join(sub))}</p>',
            "<h2>Protocol</h2>", _kv_table(_protocol_fields(p.to_dict()))]
    overall = (results.label_free.get("verdict") or {}).get("overall")
    if overall:  # the answer first; the figures, intervals and protocol follow
        body.insert(2, f'<p class="verdict">Label-free verdict: <strong>{_e(overall)}</strong> '
                       '<a href="#verdict">details</a></p>')
    if p.untrained:
        body.insert(2, '<p class="note"><strong>Untrained backbone.</strong> The backbone had random weights '
                       "(<code>model.pretrained=false</code>): these figures say nothing about what HP does "
                       "with a pretrained backbone.</p>")
    body += _multi_seed(results) if results.seeds else _single_run(results, images, results_dir)
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    body.append(f"<footer>generated by hpseg {_e(__version__)} from {_e(source)} on {_e(stamp)}; "
                "self-contained page (no network access).</footer>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>\n"
            f"<body>\n{chr(10).join(body)}\n</body></html>\n")


def write_report(run_dir: str | Path, out: str | Path | None = None, *, embed: bool = True) -> Path:
    """Write the HTML report of the evaluation in ``run_dir``; returns its path.

    Args:
        run_dir: the results folder of ``hpseg evaluate`` (or a run folder with
            ``eval/results.json``, or the ``results.json`` file itself).
        out: the HTML file (default: ``report.html`` beside ``results.json``).
        embed: embed images as base64 data URIs (a portable single file); False references
            them by paths relative to the page.

    Raises:
        HPSegError: no or unreadable ``results.json``.
    """
    results_file = find_results(Path(run_dir))
    results = Results.read(results_file)
    target = Path(out) if out is not None else results_file.parent / "report.html"
    if target.is_dir():
        target = target / "report.html"
    page = render_report(results, results_file.parent, target.parent, embed=embed, source=str(results_file))
    atomic_write_text(target, page)
    return target
