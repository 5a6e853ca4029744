"""``hpseg demo``: HP on embedded synthetic scenes versus its own k-means baseline.

No download and no GPU: the scenes are generated from a seed (:mod:`hpseg.data.synthetic`) and
the backbone is ``hpseg_demo_vit``, a tiny ViT pretrained without labels on other synthetic
scenes (``scripts/pretrain_demo_backbone.py``; weights shipped in the package).

The results folder holds ``metrics.json`` (``{"hp": {"unsupervised", "linear"}, "baseline":
{"unsupervised"}, "margin_miou"}``, percentages), ``predictions.png`` (image | ground truth | HP
| baseline, scores in the column titles), ``training_curve.png``, the standard evaluation
folder ``eval/`` (``hpseg report OUT/eval``) and the training run ``run/``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpseg.checkpoint import load_model
from hpseg.config import build_config
from hpseg.diagnostics import cluster_usage
from hpseg.evaluate import evaluate_model, write_results
from hpseg.io import atomic_write_text
from hpseg.pipeline import baseline_for, build_runtime, build_val_set, eval_loader, protocol_for, train_one
from hpseg.report import write_report
from hpseg.results import HeadScore, Results, format_diagnostics, format_table
from hpseg.viz import gallery_figure, save_figure

log = logging.getLogger(__name__)

__all__ = ["DemoResult", "run_demo"]

QUICK = [
    "data.synthetic_train_images=64",
    "data.synthetic_val_images=16",
    "train.epochs=1",
    "train.valid_freq=1000",
    "loss.pool_size=64",
    "loss.warmup=2",
]


@dataclass
class DemoResult:
    """The demo's ``metrics.json`` document and the text it prints."""

    metrics: dict[str, Any]
    text: str


def run_demo(out: Path, *, quick: bool = False, overrides: list[str] | None = None) -> DemoResult:
    """Train HP on synthetic scenes, evaluate it and the k-means baseline, write the results folder."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    cfg = build_config("synthetic", [*(QUICK if quick else []), *(overrides or []), f"train.out_dir={run_dir}"])
    runtime = build_runtime(cfg, progress=False)
    log.info("demo: training HP on %d synthetic scenes (%s)", cfg.data.synthetic_train_images, runtime.describe())
    summary = train_one(cfg, run_dir, runtime)

    model = load_model(run_dir / "best.pt").to(runtime.device).eval()
    val_set = build_val_set(cfg)
    class_names = list(val_set.class_names)  # type: ignore[attr-defined]
    n_gallery = cfg.eval.n_gallery
    hp = evaluate_model(model, eval_loader(val_set, cfg), runtime, matching=cfg.eval.matching, n_gallery=n_gallery,
                        per_cluster=cfg.eval.gallery_per_cluster)
    base = baseline_for(cfg, model.backbone, model.n_clusters, runtime, n_gallery=n_gallery)
    hp_u, hp_lin, base_u = hp.metrics["unsupervised"], hp.metrics["linear"], base.metrics["unsupervised"]
    margin = hp_u.miou - base_u.miou
    diagnostics = {**((summary.get("best_metrics") or {}).get("diagnostics") or {}), **cluster_usage(hp.cluster_pixels)}

    rows = [{**h, "baseline": b["unsupervised"]} for h, b in zip(hp.gallery, base.gallery)]
    columns = [("image", "image"), ("label", "ground truth"), ("unsupervised", "HP (cluster probe)"),
               ("baseline", "k-means baseline")]
    subtitles = {"unsupervised": f"mIoU {hp_u.miou:.1f} ({margin:+.1f})", "baseline": f"mIoU {base_u.miou:.1f}"}
    save_figure(gallery_figure(rows, columns, class_names, subtitles=subtitles), out / "predictions.png", dpi=100)

    protocol = protocol_for(cfg, runtime, hp, n_clusters=model.n_clusters, n_classes=len(class_names),
                            backbone=cfg.model.backbone, checkpoint=run_dir / "best.pt")
    protocol.split = f"{cfg.data.val_split} (scene seed {cfg.data.synthetic_seed})"
    seconds = round(time.perf_counter() - start, 1)
    results = Results(protocol, class_names, metrics=hp.metrics, baseline=base.metrics, diagnostics=diagnostics,
                      confusion={h: c.tolist() for h, c in hp.confusion.items()},
                      notes={"seconds": seconds, "quick": quick, "margin_miou": round(margin, 2)})
    (out / "eval").mkdir(parents=True, exist_ok=True)
    if (run_dir / "training_curve.png").is_file():
        shutil.copyfile(run_dir / "training_curve.png", out / "training_curve.png")
        shutil.copyfile(run_dir / "training_curve.png", out / "eval" / "training_curve.png")
    write_results(out / "eval", results, hp)
    write_report(out / "eval")
    metrics = {
        "hp": {"unsupervised": _pick(hp_u), "linear": _pick(hp_lin)},
        "baseline": {"unsupervised": _pick(base_u)},
        "margin_miou": round(margin, 2),
        "diagnostics": diagnostics,
        "seconds": seconds,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    text = "\n".join([
        protocol.describe(),
        "",
        format_table({"HP (cluster probe)": hp_u, "k-means baseline": base_u, "HP (linear probe)": hp_lin}),
        "",
        f"results: {out}/ (metrics.json, predictions.png, training_curve.png); report: {out / 'eval' / 'report.html'}",
        format_diagnostics(diagnostics),
        f"unsupervised mIoU: HP {hp_u.miou:.2f}  vs  k-means baseline {base_u.miou:.2f}  ({margin:+.2f})   "
        f"[{seconds:.0f} s]",
    ])
    return DemoResult(metrics, text)


def _pick(m: HeadScore) -> dict[str, float]:
    return {"accuracy": round(float(m.accuracy), 2), "miou": round(float(m.miou), 2)}
