"""One schema for every ``results.json``: evaluations, multi-seed runs, the demo, the baseline.

:class:`Results` is what ``hpseg evaluate`` writes and what ``hpseg report``, ``hpseg compare``
and the demo read; :class:`Protocol` travels with every figure so that a number is never shown
without the conditions that produced it (printed above every table by :meth:`Protocol.describe`).

Layout of ``results.json`` (``format: "hpseg-results"``, ``format_version: 1``)::

    protocol      Protocol fields (dataset, split, n_images, resolution, CRF, K, C, matching, …)
    class_names   the C class names
    metrics       {head: HeadScore}: "unsupervised" (cluster probe), "linear", their "_crf" rows,
                  "unsupervised_refit" (optional); for multi-seed runs the mean ± std over seeds
    baseline      {head: HeadScore} of the k-means baseline (optional)
    seeds         {"seed-N": {head: HeadScore}} for multi-seed runs
    confusion     {head: (K, C) counts}
    gallery       [{"image": "gallery/0_image.png", "label": …, "unsupervised": …}, …]
    diagnostics   hidden-positive diagnostics and label-free numbers of the evaluated model
    label_free    label-free figures on held-out images per method ("HP", "k-means"; with their
                  chance levels, chance-corrected forms and 95 % intervals), their agreement and
                  the verdict in words with intervals (``verdict``: ``hpseg.verdict``)
                  (``hpseg.evaluate.label_free_evaluation``; runs without labels)
    cluster_names names given to the clusters (``hpseg name``), when any
    cluster_gallery [{"cluster": k, "name": …, "strip": "clusters/k.png", "pixels": n}, …]
    notes         anything else (e.g. the demo's wall time)
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hpseg.errors import HPSegError
from hpseg.io import atomic_write_text, finite

__all__ = [
    "AGREEMENT_FIGURES",
    "CORRECTED_FIGURES",
    "FORMAT",
    "LABEL_FREE_FIGURES",
    "HeadScore",
    "Protocol",
    "RANDOM_WEIGHTS",
    "Results",
    "aggregate_seeds",
    "find_results",
    "format_iou_table",
    "difference_cell",
    "format_label_free",
    "format_table",
]

FORMAT = "hpseg-results"
FORMAT_VERSION = 1
#: :attr:`Protocol.backbone_weights` of an untrained backbone
RANDOM_WEIGHTS = "random"
CROP = "resize shorter side to {r}, centre crop {r}x{r}; labels nearest; code upsampled bilinearly to label size"


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class Protocol:
    """How a figure was produced: data, resolution, post-processing, matching, model, software."""

    dataset: str
    split: str
    n_images: int
    eval_resolution: int
    crf: bool
    n_clusters: int
    n_classes: int
    matching: str
    backbone: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    precision: str = "fp32"
    cluster_probe: str = "online"
    labelled: bool = True
    crop: str = ""
    device: str = "cpu"
    hpseg_version: str = ""
    torch_version: str = ""
    python: str = field(default_factory=platform.python_version)
    seeds: list[str] | None = None
    checkpoints: dict[str, str] | None = None
    #: the backbone's weights: "pretrained" (official or shipped), "file NAME" (``model.weights``),
    #: "random" (``model.pretrained=false``: an untrained backbone); "" in files older than this field
    backbone_weights: str = ""

    def __post_init__(self) -> None:
        if not self.crop:
            self.crop = CROP.format(r=self.eval_resolution)
        if not self.hpseg_version or not self.torch_version:
            import torch

            import hpseg

            self.hpseg_version = self.hpseg_version or hpseg.__version__
            self.torch_version = self.torch_version or str(torch.__version__)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Protocol:
        """Tolerant of files that lack fields (older versions): those read as unknown."""
        missing = {"dataset": "?", "split": "?", "n_images": 0, "eval_resolution": 0, "crf": False,
                   "n_clusters": 0, "n_classes": 0, "matching": "?", "backbone": "?"}
        return cls(**{**missing, **_known(cls, data)})

    @property
    def untrained(self) -> bool:
        """Whether the backbone had random weights (``model.pretrained=false``)."""
        return self.backbone_weights == RANDOM_WEIGHTS

    def weights_text(self) -> str:
        """The backbone's weights in words (``"?"`` for files that did not record them)."""
        if self.untrained:
            return "RANDOM WEIGHTS (model.pretrained=false: an untrained backbone)"
        return self.backbone_weights or "?"

    def describe(self) -> str:
        """Two lines printed above every table."""
        crf = "on" if self.crf else "off"
        probe = "" if self.cluster_probe == "online" else f" · cluster probe {self.cluster_probe}"
        checkpoint = f"{len(self.seeds)} seeds" if self.seeds else (self.checkpoint_sha256 or "-")
        scoring = (f"K={self.n_clusters} clusters, C={self.n_classes} classes · {self.matching} matching{probe}"
                   if self.labelled else f"K={self.n_clusters} clusters · NO LABELS (nothing matched or scored)")
        return "\n".join([
            f"protocol: {self.dataset} / {self.split} ({self.n_images} images) · eval {self.eval_resolution}px "
            f"centre crop · CRF {crf} · {scoring}",
            f"          backbone {self.backbone} ({self.weights_text()}) · checkpoint {checkpoint} · {self.precision} · "
            f"hpseg {self.hpseg_version} · torch {self.torch_version} · {self.device}",
        ])


@dataclass
class HeadScore:
    """Pixel accuracy and mIoU in percent (means over seeds when ``n_seeds`` is set)."""

    accuracy: float
    miou: float
    iou: list[float] = field(default_factory=list)
    assignment: list[int] | None = None
    accuracy_std: float | None = None
    miou_std: float | None = None
    n_seeds: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; a class absent from predictions and labels has IoU ``null`` (valid JSON)."""
        return finite({k: v for k, v in asdict(self).items() if v is not None and not (k == "iou" and not v)})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadScore:
        known = _known(cls, data)
        known["iou"] = [math.nan if v is None else float(v) for v in known.get("iou") or []]
        return cls(**known)

    def cell(self, key: str) -> str:
        """``"57.20"`` or ``"57.20 ± 1.30"``."""
        value, std = getattr(self, key), getattr(self, f"{key}_std")
        text = "n/a" if value is None or not math.isfinite(value) else f"{value:6.2f}"
        return text if std is None else f"{text} ± {std:.2f}"


def _scores(data: Any) -> dict[str, HeadScore]:
    return {str(k): HeadScore.from_dict(v) for k, v in (data or {}).items() if isinstance(v, dict)}


@dataclass
class Results:
    """The content of a ``results.json`` (see the module docstring)."""

    protocol: Protocol
    class_names: list[str]
    metrics: dict[str, HeadScore] = field(default_factory=dict)
    baseline: dict[str, HeadScore] = field(default_factory=dict)
    seeds: dict[str, dict[str, HeadScore]] = field(default_factory=dict)
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    gallery: list[dict[str, str]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    cluster_names: list[str] | None = None
    cluster_gallery: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    label_free: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document; ``baseline`` and ``label_free`` only when scored."""
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "protocol": self.protocol.to_dict(),
            "class_names": list(self.class_names),
            "metrics": {h: s.to_dict() for h, s in self.metrics.items()},
            "baseline": {h: s.to_dict() for h, s in self.baseline.items()},
            "seeds": {n: {h: s.to_dict() for h, s in m.items()} for n, m in self.seeds.items()},
            "confusion": self.confusion,
            "gallery": self.gallery,
            "diagnostics": self.diagnostics,
            "cluster_names": self.cluster_names,
            "cluster_gallery": self.cluster_gallery,
            "notes": self.notes,
            "label_free": self.label_free,
        }
        return {k: v for k, v in doc.items() if v or k not in ("baseline", "label_free")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        if not isinstance(data, dict) or not isinstance(data.get("protocol"), dict):
            raise HPSegError("not an hpseg results file (no protocol): re-run `hpseg evaluate`")
        seeds = {str(n): _scores(m) for n, m in (data.get("seeds") or {}).items() if isinstance(m, dict)}
        metrics = _scores(data.get("metrics") or data.get("aggregate"))
        return cls(
            protocol=Protocol.from_dict(data["protocol"]),
            class_names=[str(n) for n in data.get("class_names") or []],
            metrics=metrics,
            baseline=_scores(data.get("baseline")),
            seeds=seeds,
            confusion=dict(data.get("confusion") or {}),
            gallery=list(data.get("gallery") or []),
            diagnostics=dict(data.get("diagnostics") or {}),
            cluster_names=data.get("cluster_names"),
            cluster_gallery=list(data.get("cluster_gallery") or []),
            notes=dict(data.get("notes") or {}),
            label_free=dict(data.get("label_free") or {}),
        )

    def write(self, path: str | Path) -> Path:
        """Write ``results.json`` atomically."""
        atomic_write_text(path, json.dumps(finite(self.to_dict()), indent=2, allow_nan=False))
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> Results:
        """Read a ``results.json``.

        Raises:
            HPSegError: unreadable, or not an hpseg results file.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HPSegError(f"cannot read {path} ({exc}): re-run `hpseg evaluate`") from exc
        return cls.from_dict(data)

    def rows(self) -> dict[str, HeadScore]:
        """Table rows: every head, then the baseline's heads."""
        rows = dict(self.metrics)
        rows.update({f"k-means baseline{'' if h == 'unsupervised' else f' ({h})'}": s for h, s in self.baseline.items()})
        return rows

    def summary(self) -> str:
        """The protocol block and the table (what ``hpseg evaluate`` prints)."""
        lines = [self.protocol.describe(), ""]
        if not self.protocol.labelled:
            lines.append("no labels to score against: predictions, cluster gallery, label-free figures and diagnostics")
            if self.label_free:
                lines += ["", format_label_free(self.label_free)]
        elif self.seeds:
            per_seed = {f"{h} [{n}]": s for n, m in self.seeds.items() for h, s in m.items()}
            lines.append(format_table({**per_seed, **{f"{h} [mean ± std]": s for h, s in self.rows().items()}}))
        else:
            lines.append(format_table(self.rows()))
        if self.diagnostics:
            lines += ["", format_diagnostics(self.diagnostics)]
            if "cluster_entropy" in self.diagnostics:
                lines.append("  (cluster_entropy: balance of the cluster sizes, entropy / log K: 100% = all K clusters "
                             "equally large, 0% = one cluster takes everything)")
        return "\n".join(lines)


def format_table(rows: dict[str, HeadScore]) -> str:
    """A plain-text table: one row per head, accuracy and mIoU (mean ± std when aggregated)."""
    width = max([20, *(len(name) for name in rows)])
    lines = [f"{'head':<{width}} {'pixel acc %':>14} {'mIoU %':>14}", "-" * (width + 30)]
    for name, s in rows.items():
        lines.append(f"{name:<{width}} {s.cell('accuracy'):>14} {s.cell('miou'):>14}")
    return "\n".join(lines)


def format_iou_table(iou: list[float], class_names: list[str]) -> str:
    """Per-class IoU, one line per class."""
    lines = [f"{'class':<24} {'IoU %':>7}"]
    for name, v in zip(class_names, iou):
        lines.append(f"{name:<24} {'   n/a' if v != v else f'{v:7.2f}'}")
    return "\n".join(lines)


def format_diagnostics(diagnostics: dict[str, Any]) -> str:
    """One line of hidden-positive diagnostics (precision and fractions as percentages)."""
    parts = []
    for key, value in diagnostics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if key.startswith(("positive_precision", "kept_anchor", "cluster_entropy")):
            parts.append(f"{key} {100 * value:.1f}%")
        elif isinstance(value, int):
            parts.append(f"{key} {value}")
        else:
            parts.append(f"{key} {value:.2f}")
    return "diagnostics: " + (" · ".join(parts) if parts else "none")


#: label-free figures: (key, title, what it means and which direction is better), in display order
LABEL_FREE_FIGURES = (
    ("flip_stability", "flip stability %",
     "mean IoU over clusters between the segmentation of an image and that of its mirror image flipped back; "
     "higher is better (segments follow the content, not the position)"),
    ("photometric_stability", "photometric stability %",
     "the same under a fixed change of brightness, contrast and saturation; higher is better (segments follow "
     "objects, not lighting)"),
    ("boundary_edge_precision", "boundaries on image edges %",
     "share of segment boundary pixels within one pixel of the image's strongest edges; higher is better "
     "(boundaries drawn at random score the chance level given below)"),
    ("cluster_entropy", "cluster balance",
     "entropy of the cluster sizes divided by log K: 1 = all K clusters equally large, 0 = one cluster covers "
     "everything; not a goal in itself, but far below k-means' value signals clusters collapsing"),
    ("empty_clusters", "empty clusters",
     "clusters that no pixel of these images takes; lower is better (more than 0: fewer segments than K)"),
)
#: chance-corrected forms (comparable across K): (key, title, meaning)
CORRECTED_FIGURES = (
    ("flip_stability_corrected", "flip stability, chance-corrected",
     "100 · (S − S₀) / (100 − S₀), S₀ the flip stability of a random segmentation with the same cluster sizes "
     "at that K: 0 = chance, 100 = perfectly stable; comparable across K"),
    ("photometric_stability_corrected", "photometric stability, chance-corrected",
     "the same for photometric stability"),
)
#: the agreement of two methods: (key, title, meaning)
AGREEMENT_FIGURES = (
    ("nmi", "agreement, NMI",
     "normalised mutual information between the two segmentations (0-1; ids need not match): neither direction "
     "is better — near 1 the method kept k-means' clusters, lower means it reorganised them"),
    ("ari", "agreement, ARI",
     "adjusted Rand index of the same pair (1 identical, about 0 unrelated); read like the NMI"),
)


def format_label_free(label_free: dict[str, Any]) -> str:
    """The label-free figures as a plain-text table (one row per figure, one column per method,
    and with two methods the difference with its 95 % interval), then the verdict in words."""
    methods: dict[str, dict[str, Any]] = label_free.get("methods") or {}
    names = list(methods)
    verdict: dict[str, Any] = label_free.get("verdict") or {}
    rows: dict[str, dict[str, Any]] = verdict.get("figures") or {}
    diff_title = f"{names[0]} − {names[1]} [95 % interval]" if verdict and len(names) > 1 else ""
    lines = [f"label-free figures on {label_free.get('n_images', '?')} held-out images (higher is better "
             "unless noted; see the report for what each means)",
             f"{'figure':<30}" + "".join(f"{n:>14}" for n in names) + (f"   {diff_title}" if diff_title else ""),
             "-" * (30 + 14 * len(names) + (3 + len(diff_title) if diff_title else 0))]
    for key, title, _ in LABEL_FREE_FIGURES:
        cells = [methods[n].get(key) for n in names]
        if all(c is None for c in cells):
            continue
        line = f"{title:<30}" + "".join(f"{'n/a' if c is None else _figure(key, c):>14}" for c in cells)
        lines.append(line + (f"   {difference_cell(key, rows[key])}" if key in rows else ""))
    if "boundary_edge_chance" in label_free:
        lines.append(f"{'  (chance level of boundaries)':<30}{label_free['boundary_edge_chance']:>14.1f}")
    pair = label_free.get("agreement") or {}
    if pair:
        a, b = (pair.get("methods") or ["?", "?"])[:2]
        lines.append(f"{a} vs {b}: " + " · ".join(f"{title} {pair[key]:.3f}" for key, title, _ in AGREEMENT_FIGURES
                                                   if isinstance(pair.get(key), (int, float))))
    if names == ["HP"]:
        lines.append("(no verdict: `hpseg evaluate RUN --baseline` scores k-means beside HP and says which is better)")
    if verdict:
        lines += ["", f"verdict ({verdict.get('method', 'paired bootstrap over images')}):"]
        lines += [f"  - {row['sentence']}" for row in rows.values() if row.get("sentence")]
        lines.append(f"  overall: {verdict.get('overall', '')}")
    return "\n".join(lines)


def difference_cell(key: str, row: dict[str, Any]) -> str:
    """``"+9.1 [+4.0, +14.0]"``: a verdict row's difference and interval (``"+9.1 (too few images)"``
    without an interval)."""
    digits = 3 if key == "cluster_entropy" else 1
    diff = row.get("difference")
    text = "n/a" if not isinstance(diff, (int, float)) else f"{diff:+.{digits}f}"
    low, high = row.get("low"), row.get("high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return f"{text} [{low:+.{digits}f}, {high:+.{digits}f}]"
    return f"{text} ({row.get('call', 'no interval')})"


def _figure(key: str, value: Any) -> str:
    if isinstance(value, int) or key == "empty_clusters":
        return str(int(value))
    return f"{value:.3f}" if key == "cluster_entropy" else f"{value:.1f}"


def aggregate_seeds(per_seed: dict[str, dict[str, HeadScore]]) -> dict[str, HeadScore]:
    """Mean ± sample std (ddof = 1; 0 for one seed) of accuracy and mIoU per head over seeds,
    heads in the order the first seed lists them."""
    import numpy as np

    heads: list[str] = []
    for m in per_seed.values():
        heads += [h for h in m if h not in heads]
    out: dict[str, HeadScore] = {}
    for h in heads:
        rows = [m[h] for m in per_seed.values() if h in m]
        acc = np.array([r.accuracy for r in rows], dtype=float)
        miou = np.array([r.miou for r in rows], dtype=float)
        std = (lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)  # noqa: E731
        out[h] = HeadScore(float(acc.mean()), float(miou.mean()), accuracy_std=std(acc), miou_std=std(miou),
                           n_seeds=len(rows))
    return out


def find_results(path: Path) -> Path:
    """The ``results.json`` of ``path``: the file itself, ``path/results.json`` or
    ``path/eval/results.json``.

    Raises:
        HPSegError: nothing evaluated there yet.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return path
    for candidate in (path / "results.json", path / "eval" / "results.json"):
        if candidate.is_file():
            return candidate
    raise HPSegError(f"{path} holds no results.json: run `hpseg evaluate {path}` first, then `hpseg report`")
