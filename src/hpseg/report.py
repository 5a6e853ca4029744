"""A static, self-contained HTML report of an evaluation (``hpseg report``).

Reads the results folder written by ``hpseg evaluate RUN --out DIR`` (``results.json``,
``confusion_<head>.png``, ``gallery/*.png``, ``predictions.png``) and writes one HTML file with
inline CSS and, by default, the images embedded as base64 data URIs, so the file can be moved,
mailed or archived on its own and opened without a server or network. Sections: protocol,
metrics per head (and the k-means baseline when scored), per-class IoU bars, confusion
matrices, gallery (image / ground truth / predictions). Multi-seed ``results.json`` files
(``seeds`` + ``aggregate``) give a per-seed table with mean ± std.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import os
import urllib.parse
from pathlib import Path
from typing import Any

from hpseg.errors import HPSegError
from hpseg.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["find_results", "render_report", "write_report"]

_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}
_COLUMN_TITLES = {
    "image": "image",
    "label": "ground truth",
    "unsupervised": "HP clusters (matched)",
    "linear": "HP linear probe",
    "unsupervised_crf": "HP clusters + CRF",
    "linear_crf": "HP linear + CRF",
}
_HEAD_TITLES = {
    "unsupervised": "unsupervised (cluster probe)",
    "linear": "linear probe",
    "unsupervised_crf": "unsupervised + CRF",
    "linear_crf": "linear probe + CRF",
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


def find_results(run_dir: str | Path) -> Path:
    """The ``results.json`` of ``run_dir`` (the file itself, ``run_dir/results.json``, or
    ``run_dir/eval/results.json``).

    Raises:
        HPSegError: none found.
    """
    path = Path(run_dir)
    if path.is_file() and path.suffix == ".json":
        return path
    for candidate in (path / "results.json", path / "eval" / "results.json"):
        if candidate.is_file():
            return candidate
    raise HPSegError(
        f"{path} holds no results.json: run `hpseg evaluate RUN --out DIR` first, then `hpseg report DIR`"
    )


class _Images:
    """Image references for the page: data URIs (embedded) or paths relative to the page."""

    def __init__(self, results_dir: Path, page_dir: Path, embed: bool) -> None:
        self.root = results_dir.resolve()
        self.page_dir = page_dir.resolve()
        self.embed = embed
        self.count = 0

    def tag(self, rel: str | Path, alt: str, css_class: str = "") -> str:
        cls = f' class="{_e(css_class)}"' if css_class else ""
        path = (self.root / rel).resolve()
        if self.root != path and self.root not in path.parents:
            log.warning("report: %s lies outside %s; not included", rel, self.root)
            return f'<span class="missing">not included: {_e(rel)}</span>'
        mime = _IMAGE_TYPES.get(path.suffix.lower())
        if mime is None or not path.is_file():
            log.warning("report: image %s is missing", path)
            return f'<span class="missing">missing: {_e(rel)}</span>'
        if self.embed:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            src = f"data:{mime};base64,{data}"
        else:
            src = urllib.parse.quote(Path(os.path.relpath(path, self.page_dir)).as_posix())
        self.count += 1
        return f'<img src="{_e(src)}" alt="{_e(alt)}"{cls} loading="eager">'


def _palette_hex(n: int) -> list[str]:
    from hpseg.evaluate import palette

    return ["#{:02x}{:02x}{:02x}".format(*(int(c) for c in row)) for row in palette(max(n, 1))][:n]


def _kv_table(data: dict[str, Any]) -> str:
    rows = []
    for key, value in data.items():
        text = (
            json.dumps(value) if isinstance(value, (dict, list)) else ("-" if value is None else str(value))
        )
        rows.append(f"<tr><td>{_e(key)}</td><td>{_e(text)}</td></tr>")
    return f'<table class="kv">{"".join(rows)}</table>'


def _metrics_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    body = []
    for name, m in rows:
        cells = []
        for key in ("accuracy", "miou"):
            text = _num(m.get(key))
            if f"{key}_std" in m:
                text += f" ± {_num(m.get(key + '_std'))}"
            cells.append(f'<td class="num">{_e(text)}</td>')
        body.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    return (
        '<table class="metrics"><tr><th>head</th><th>pixel accuracy %</th><th>mIoU %</th></tr>'
        f"{''.join(body)}</table>"
    )


def _iou_table(heads: list[tuple[str, list[Any]]], class_names: list[str]) -> str:
    n = max(len(iou) for _, iou in heads)
    names = list(class_names) + [f"class {i}" for i in range(len(class_names), n)]
    colours = _palette_hex(n)
    head_cells = "".join(f"<th>{_e(_HEAD_TITLES.get(h, h))}</th>" for h, _ in heads)
    rows = []
    for i in range(n):
        cells = []
        for _, iou in heads:
            value = iou[i] if i < len(iou) else None
            try:
                width = float(value) if value is not None else 0.0
            except (TypeError, ValueError):
                width = 0.0
            width = 0.0 if math.isnan(width) else max(0.0, min(100.0, width))
            cells.append(
                f'<td class="num"><span class="bar"><span style="width:{width:.1f}%"></span></span>'
                f"{_e(_num(value))}</td>"
            )
        rows.append(
            f'<tr><td><span class="swatch" style="background:{colours[i]}"></span>{_e(names[i])}</td>'
            f"{''.join(cells)}</tr>"
        )
    return f'<table class="iou"><tr><th>class</th>{head_cells}</tr>{"".join(rows)}</table>'


def _confusion_table(conf: list[list[float]], class_names: list[str], assignment: list[int] | None) -> str:
    """Row-normalised confusion as a shaded table (rows: prediction, columns: true class)."""
    n_cols = len(conf[0]) if conf else 0
    cols = list(class_names) + [f"class {i}" for i in range(len(class_names), n_cols)]
    head = "".join(f"<th>{_e(c)}</th>" for c in cols[:n_cols])
    rows = []
    for k, row in enumerate(conf):
        total = sum(float(v) for v in row) or 1.0
        if assignment is not None and k < len(assignment):
            a = assignment[k]
            name = f"c{k} → {cols[a] if 0 <= a < len(cols) else '∅'}"
        else:
            name = cols[k] if k < len(cols) else f"row {k}"
        cells = []
        for v in row:
            frac = float(v) / total
            colour = "#fff" if frac > 0.55 else "#1d2430"
            cells.append(
                f'<td style="background:rgba(47,111,222,{frac:.3f});color:{colour}" '
                f'title="{_e(f"{frac:.3f}")}">{int(round(frac * 100))}</td>'
            )
        rows.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    return f'<table class="confusion"><tr><th>prediction \\ truth</th>{head}</tr>{"".join(rows)}</table>'


def _legend(class_names: list[str]) -> str:
    colours = _palette_hex(len(class_names))
    items = [
        f'<span class="item"><span class="swatch" style="background:{c}"></span>{_e(n)}</span>'
        for n, c in zip(class_names, colours)
    ]
    items.append(
        '<span class="item"><span class="swatch" style="background:#000"></span>ignore / unmatched</span>'
    )
    return f'<div class="legend">{"".join(items)}</div>'


def _single_run(doc: dict[str, Any], images: _Images, results_dir: Path) -> list[str]:
    parts: list[str] = []
    metrics: dict[str, Any] = doc.get("metrics") or {}
    class_names = [str(n) for n in doc.get("class_names") or []]
    rows = [(_HEAD_TITLES.get(h, h), m) for h, m in metrics.items() if isinstance(m, dict)]
    for h, m in (doc.get("baseline") or {}).items():
        if isinstance(m, dict):
            rows.append((f"k-means baseline ({_HEAD_TITLES.get(h, h)})", m))
    parts.append("<h2>Metrics</h2>")
    parts.append(_metrics_table(rows) if rows else '<p class="sub">no metrics in results.json</p>')
    ious = [(h, m["iou"]) for h, m in metrics.items() if isinstance(m, dict) and m.get("iou")]
    if ious:
        parts.append("<h2>Per-class IoU %</h2>")
        parts.append(_iou_table(ious, class_names))
    confusion: dict[str, Any] = doc.get("confusion") or {}
    conf_heads = list(dict.fromkeys([*confusion, *metrics]))
    blocks = []
    for h in conf_heads:
        png = results_dir / f"confusion_{h}.png"
        if png.is_file():
            blocks.append(
                f'<h3>{_e(_HEAD_TITLES.get(h, h))}</h3><div class="figure">'
                f"{images.tag(png.name, f'confusion matrix, {h}')}</div>"
            )
        elif confusion.get(h):
            assignment = metrics.get(h, {}).get("assignment") if isinstance(metrics.get(h), dict) else None
            blocks.append(
                f"<h3>{_e(_HEAD_TITLES.get(h, h))} (row-normalised %)</h3>"
                f"{_confusion_table(confusion[h], class_names, assignment)}"
            )
    if blocks:
        parts.append(
            '<h2>Confusion matrices</h2><p class="sub">rows: prediction (clusters with their '
            "matched class), columns: ground truth; each row normalised.</p>"
        )
        parts.extend(blocks)
    gallery = [g for g in doc.get("gallery") or [] if isinstance(g, dict)]
    if gallery:
        keys = list(dict.fromkeys(k for g in gallery for k in g))
        head = "".join(f"<th>{_e(_COLUMN_TITLES.get(k, k))}</th>" for k in keys)
        body = []
        for i, g in enumerate(gallery):
            cells = "".join(f"<td>{images.tag(g[k], f'{k} {i}') if k in g else ''}</td>" for k in keys)
            body.append(f"<tr>{cells}</tr>")
        parts.append("<h2>Gallery</h2>")
        parts.append(_legend(class_names))
        parts.append(f'<table class="gallery"><tr>{head}</tr>{"".join(body)}</table>')
    elif (results_dir / "predictions.png").is_file():
        parts.append("<h2>Predictions</h2>")
        parts.append(f'<div class="figure">{images.tag("predictions.png", "predictions")}</div>')
    return parts


def _seed_class_names(results_dir: Path, seeds: list[str]) -> list[str]:
    for seed in seeds:
        path = results_dir / seed / "eval" / "results.json"
        try:
            names = json.loads(path.read_text()).get("class_names")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(names, list):
            return [str(n) for n in names]
    return []


def _multi_seed(doc: dict[str, Any], results_dir: Path) -> list[str]:
    seeds: dict[str, Any] = {k: v for k, v in (doc.get("seeds") or {}).items() if isinstance(v, dict)}
    aggregate: dict[str, Any] = doc.get("aggregate") or {}
    heads = list(dict.fromkeys([*aggregate, *(h for m in seeds.values() for h in m)]))
    parts = [f"<h2>Metrics over {len(seeds)} seeds</h2>"]
    head_row = "".join(f"<th>{_e(s)}<br>acc / mIoU %</th>" for s in seeds)
    body = []
    for h in heads:
        cells = []
        for m in seeds.values():
            hm = m.get(h) if isinstance(m.get(h), dict) else {}
            cells.append(f'<td class="num">{_num(hm.get("accuracy"))} / {_num(hm.get("miou"))}</td>')
        agg = aggregate.get(h) or {}
        cells.append(f'<td class="num">{_num(agg.get("accuracy"))} ± {_num(agg.get("accuracy_std"))}</td>')
        cells.append(f'<td class="num">{_num(agg.get("miou"))} ± {_num(agg.get("miou_std"))}</td>')
        body.append(f"<tr><td>{_e(_HEAD_TITLES.get(h, h))}</td>{''.join(cells)}</tr>")
    parts.append(
        f'<table class="metrics"><tr><th>head</th>{head_row}<th>accuracy mean ± std</th>'
        f"<th>mIoU mean ± std</th></tr>{''.join(body)}</table>"
    )
    parts.append(
        '<p class="sub">std: sample standard deviation over seeds (0 for one seed). Per-seed '
        "figures and galleries: <code>hpseg report SEED/eval</code>.</p>"
    )
    # per-class IoU averaged over seeds, where every seed has it
    mean_iou = []
    for h in heads:
        lists = [m[h]["iou"] for m in seeds.values() if isinstance(m.get(h), dict) and m[h].get("iou")]
        if lists and len(lists) == len(seeds) and len({len(x) for x in lists}) == 1:
            cols = []
            for values in zip(*lists):
                good = [float(v) for v in values if v is not None and not math.isnan(float(v))]
                cols.append(sum(good) / len(good) if good else float("nan"))
            mean_iou.append((h, cols))
    if mean_iou:
        parts.append("<h2>Per-class IoU %, mean over seeds</h2>")
        parts.append(_iou_table(mean_iou, _seed_class_names(results_dir, list(seeds))))
    return parts


def render_report(
    doc: dict[str, Any],
    results_dir: Path,
    page_dir: Path,
    *,
    embed: bool = True,
    source: str = "results.json",
) -> str:
    """The report page for a loaded ``results.json`` (``doc``) of ``results_dir``."""
    from hpseg import __version__

    images = _Images(results_dir, page_dir, embed)
    protocol = doc.get("protocol") if isinstance(doc.get("protocol"), dict) else {}
    assert isinstance(protocol, dict)
    multi = isinstance(doc.get("seeds"), dict)
    title = "hpseg evaluation report"
    if protocol.get("dataset"):
        title += f" — {protocol.get('dataset')} / {protocol.get('split', '?')}"
    sub = []
    if protocol.get("backbone"):
        sub.append(f"backbone {protocol['backbone']}")
    if protocol.get("n_images") is not None:
        sub.append(f"{protocol['n_images']} images")
    if protocol.get("eval_resolution"):
        sub.append(f"{protocol['eval_resolution']} px")
    if "crf" in protocol:
        sub.append(f"CRF {'on' if protocol.get('crf') else 'off'}")
    if multi:
        sub.append(f"{len(doc['seeds'])} seeds")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(" · ".join(sub))}</p>']
    if protocol:  # every figure below was produced under this protocol
        body.append("<h2>Protocol</h2>")
        body.append(_kv_table(protocol))
    body.extend(_multi_seed(doc, results_dir) if multi else _single_run(doc, images, results_dir))
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    body.append(
        f"<footer>generated by hpseg {_e(__version__)} from {_e(source)} on {_e(stamp)}; "
        "self-contained page (no network access).</footer>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>\n"
        f"<body>\n{chr(10).join(body)}\n</body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None, *, embed: bool = True) -> Path:
    """Write the HTML report of the evaluation in ``run_dir``; returns its path.

    Args:
        run_dir: the results folder of ``hpseg evaluate --out DIR`` (or a run folder with
            ``eval/results.json``, or the ``results.json`` file itself).
        out: the HTML file (default: ``report.html`` beside ``results.json``).
        embed: embed images as base64 data URIs (a portable single file); False references
            them by paths relative to the page.

    Raises:
        HPSegError: no or unreadable ``results.json``.
    """
    results = find_results(run_dir)
    try:
        doc = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HPSegError(f"cannot read {results} ({exc}): re-run `hpseg evaluate RUN --out DIR`") from exc
    if not isinstance(doc, dict) or not ({"metrics", "seeds"} & set(doc)):
        raise HPSegError(f"{results} is not an hpseg results file (no metrics): re-run `hpseg evaluate`")
    target = Path(out) if out is not None else results.parent / "report.html"
    if target.is_dir():
        target = target / "report.html"
    page = render_report(doc, results.parent, target.parent, embed=embed, source=str(results))
    atomic_write_text(target, page)
    return target
