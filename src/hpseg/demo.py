"""``hpseg demo``: HP on embedded synthetic scenes versus its own k-means baseline.

No download and no GPU: the scenes are generated from a seed (:mod:`hpseg.data.synthetic`) and
the backbone is ``hpseg_demo_vit``, a tiny ViT pretrained by a short DINO-style run on other
synthetic scenes (``scripts/pretrain_demo_backbone.py``; weights shipped in the package).

The results folder holds ``metrics.json`` (``{"hp": {"unsupervised", "linear"},
"baseline": {"unsupervised"}}``, percentages), ``results.json`` (with the protocol),
``predictions.png`` (image | ground truth | HP | baseline), ``training_curve.png`` and the run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from hpseg.config import build_config
from hpseg.evaluate import (
    evaluate_model,
    format_protocol,
    format_table,
    protocol_block,
    results_document,
    save_gallery_png,
    write_results,
)
from hpseg.io import atomic_write_text
from hpseg.model import load_model
from hpseg.pipeline import baseline_for, build_val_set, eval_loader, train_one
from hpseg.runtime import resolve_device

log = logging.getLogger(__name__)

QUICK = [
    "data.synthetic_train_images=64",
    "data.synthetic_val_images=16",
    "train.epochs=1",
    "train.valid_freq=1000",
    "loss.pool_size=64",
    "loss.warmup=2",
]


def run_demo(out: Path, *, quick: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train HP on synthetic scenes, evaluate it and the k-means baseline, write the results folder.

    Returns the ``metrics.json`` document.
    """
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    cfg = build_config("synthetic", [*(QUICK if quick else []), *(overrides or []), f"train.out_dir={run_dir}"])
    device = resolve_device(cfg.train.device)
    log.info("demo: training HP on %d synthetic scenes (%s)", cfg.data.synthetic_train_images, device)
    train_one(cfg, run_dir)

    model = load_model(run_dir / "best.pt").to(device).eval()
    val_set = build_val_set(cfg)
    class_names = list(val_set.class_names)  # type: ignore[attr-defined]
    loader = eval_loader(val_set, cfg)
    n_gallery = cfg.eval.n_gallery
    hp = evaluate_model(model, loader, device, crf=False, matching=cfg.eval.matching, n_gallery=n_gallery,
                        amp=cfg.train.amp)
    k = int(model.cluster_probe.clusters.shape[0])
    base = baseline_for(cfg, model.backbone, k, device, n_gallery=n_gallery)

    metrics = {
        "hp": {
            "unsupervised": _pick(hp.metrics["unsupervised"]),
            "linear": _pick(hp.metrics["linear"]),
        },
        "baseline": {"unsupervised": _pick(base.metrics["unsupervised"])},
    }
    protocol = protocol_block(
        dataset="synthetic", split=f"val (seed {cfg.data.synthetic_seed})", n_images=hp.n_images,
        eval_resolution=cfg.data.eval_resolution, crf=False, n_clusters=k, n_classes=len(class_names),
        matching=cfg.eval.matching, checkpoint=run_dir / "best.pt", backbone=cfg.model.backbone, device=device,
    )
    rows = [{**h, "baseline": b["unsupervised"]} for h, b in zip(hp.gallery, base.gallery)]
    save_gallery_png(
        rows,
        [("image", "image"), ("label", "ground truth"), ("unsupervised", "HP (clusters)"),
         ("baseline", "k-means baseline")],
        class_names,
        out / "predictions.png",
    )
    # the standard evaluation folder too, so `hpseg report OUT/eval` works on the demo
    doc = results_document(hp, protocol, class_names, extra={"baseline": base.metrics})
    write_results(out / "eval", doc, hp, class_names)
    if (run_dir / "training_curve.png").is_file():
        shutil.copyfile(run_dir / "training_curve.png", out / "training_curve.png")
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    seconds = round(time.perf_counter() - start, 1)
    atomic_write_text(
        out / "results.json",
        json.dumps({"protocol": protocol, "class_names": class_names, "metrics": metrics,
                    "hp_iou": hp.metrics["unsupervised"]["iou"], "baseline_iou": base.metrics["unsupervised"]["iou"],
                    "seconds": seconds, "quick": quick}, indent=2),
    )
    print(format_protocol(protocol))
    print()
    print(format_table({
        "HP (cluster probe)": metrics["hp"]["unsupervised"],
        "k-means baseline": metrics["baseline"]["unsupervised"],
        "HP (linear probe)": metrics["hp"]["linear"],
    }))
    hp_miou, base_miou = metrics["hp"]["unsupervised"]["miou"], metrics["baseline"]["unsupervised"]["miou"]
    print()
    print(f"unsupervised mIoU: HP {hp_miou:.2f}  vs  k-means baseline {base_miou:.2f}  "
          f"({hp_miou - base_miou:+.2f})   [{seconds:.0f} s]")
    print(f"results: {out}/ (metrics.json, predictions.png, training_curve.png); "
          f"HTML report: hpseg report {out / 'eval'}")
    return metrics


def _pick(m: dict[str, Any]) -> dict[str, float]:
    return {"accuracy": round(float(m["accuracy"]), 2), "miou": round(float(m["miou"]), 2)}
