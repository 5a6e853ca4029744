"""The commands that train, evaluate, prepare, configure, name, report, convert and compare.

Each reads its arguments, calls the library and prints the result; imports are local so that
``hpseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hpseg.errors import HPSegError

log = logging.getLogger("hpseg")


def overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` settings of a command (anything else is refused)."""
    values: Sequence[str] = getattr(args, "overrides", [])
    bad = [v for v in values if "=" not in v]
    if bad:
        raise HPSegError(f"unexpected argument {bad[0]!r}: settings are given as key=value (e.g. data.root=/data)")
    return list(values)


def cmd_train(args: argparse.Namespace) -> int:
    from hpseg.config import build_config, describe, run_dir
    from hpseg.pipeline import run_training

    cfg = build_config(args.preset, overrides(args))
    log.info("config: %s", describe(cfg))
    run = run_training(cfg)
    if run.is_main:
        several = len(run.folders) > 1
        for folder in run.folders:
            if folder in run.finished_before and several:  # one seed of several: the others may have trained
                print(f"{folder}: finished before this command, left as it was")
            elif folder in run.finished_before:
                print(f"{folder} already holds this finished run: nothing was changed (to train again, "
                      f"give a new folder: train.out_dir={folder}-2)")
            else:
                print(f"run folder: {folder}  (best checkpoint: {folder / 'best.pt'})")
            skipped = folder / "skipped.txt"
            if skipped.is_file():
                n = len(skipped.read_text(encoding="utf-8").splitlines())
                print(f"left out {n} unreadable image(s), listed in {skipped}")
        print(f"evaluate with: hpseg evaluate {run_dir(cfg)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hpseg.pipeline import evaluate_path

    results = evaluate_path(Path(args.path), overrides(args), preset=args.preset,
                            out_dir=Path(args.out) if args.out else None, backbone=args.backbone,
                            baseline=args.baseline)
    print(results.summary())
    if results.metrics.get("unsupervised") and results.metrics["unsupervised"].iou and not results.seeds:
        from hpseg.results import format_iou_table

        print("\nper-class IoU (unsupervised):")
        print(format_iou_table(results.metrics["unsupervised"].iou, results.class_names))
    if args.json:
        print(json.dumps(results.to_dict(), indent=2))
    reports = _reports_written(Path(args.path), Path(args.out) if args.out else None)
    for report in reports:
        print(f"report: {report}")
    if not reports:
        print("no report written for a checkpoint file: add --out DIR, or evaluate its run folder")
    return 0


def _reports_written(path: Path, out: Path | None) -> list[Path]:
    """The ``report.html`` files ``hpseg evaluate PATH [--out OUT]`` writes (one per seed for a
    multi-seed run; none for a checkpoint file without ``--out``)."""
    from hpseg.pipeline import find_seed_runs

    seeds = find_seed_runs(path) if path.is_dir() else []
    folders = [f / "eval" for f in seeds] if seeds else [out] if out else [path / "eval"] if path.is_dir() else []
    return [f / "report.html" for f in folders if (f / "report.html").is_file()]


def cmd_baseline(args: argparse.Namespace) -> int:
    from hpseg.pipeline import run_baseline

    print(run_baseline(args.preset, overrides(args)).summary())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from hpseg.config import PAPER_DATASETS, build_config, require_data_root
    from hpseg.data.prepare import prepare_five_crop

    cfg = build_config(args.preset, overrides(args))
    if cfg.data.dataset not in PAPER_DATASETS:
        raise HPSegError(f"prepare makes five-crop sets for {', '.join(PAPER_DATASETS)}, not {cfg.data.dataset}")
    require_data_root(cfg)
    splits = args.splits or list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split]))
    for split in splits:
        out = prepare_five_crop(cfg.data.dataset, cfg.data.root, split=split, crop_ratio=cfg.data.crop_ratio,
                                progress=cfg.train.progress)
        print(f"five-crop {split} set ready: {out}")
    if not cfg.data.five_crop:
        print(f"note: preset {args.preset} trains on full images (data.five_crop=false); "
              "add data.five_crop=true to train on these crops")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hpseg.demo import run_demo

    print(run_demo(Path(args.out), quick=args.quick, overrides=overrides(args)).text)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from hpseg.backbones.registry import available_backbones
    from hpseg.config import build_config

    print(build_config(args.preset, overrides(args)).to_yaml(), end="")
    print(f"# backbone= one of {', '.join(available_backbones())}, or a timm ViT name (e.g. "
          "vit_small_patch14_reg4_dinov2, vit_small_patch16_dinov3); README: Backbones")
    return 0


def _parse_names(values: list[str]) -> dict[int, str]:
    """``["0=sky", "1=road"]`` or ``["names.json"]`` → ``{0: "sky", 1: "road"}`` (an id given twice is refused)."""
    if len(values) == 1 and "=" not in values[0]:
        path = Path(values[0])
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HPSegError(f"cannot read cluster names from {path} ({exc}): give ID=NAME pairs or a JSON file") from exc
        items = enumerate(data) if isinstance(data, list) else data.items() if isinstance(data, dict) else None
        if items is None:
            raise HPSegError(f"{path} must hold a list of names or an object {{\"0\": \"sky\", …}}")
        pairs = [(str(k), str(v)) for k, v in items]
    else:
        pairs = []
        for value in values:
            key, sep, name = value.partition("=")
            if not sep or not name.strip():
                raise HPSegError(f"{value!r} is not ID=NAME (for example 0=sky)")
            pairs.append((key, name.strip()))
    out: dict[int, str] = {}
    for key, name in pairs:
        if not key.strip().lstrip("-").isdigit():
            raise HPSegError(f"cluster id {key!r} is not a number: give ID=NAME pairs like 0=sky")
        cluster = int(key)
        if cluster in out:
            raise HPSegError(f"cluster {cluster} is named twice ({out[cluster]!r} and {name!r}): give each id once")
        out[cluster] = name
    return out


def cmd_name(args: argparse.Namespace) -> int:
    from hpseg.pipeline import name_clusters

    if not args.names:
        raise HPSegError("no cluster names given: hpseg name RUN 0=sky 1=road … (or one JSON file)")
    names = _parse_names(args.names)
    for path in name_clusters(Path(args.run), names):
        print(f"named clusters in {path}")
    print("every later output (segment, export, report) uses these names; re-run `hpseg report` for the page")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpseg.report import write_report

    folder = Path(args.run_dir)
    if not (folder / "results.json").is_file() and (folder / "eval" / "results.json").is_file():
        folder = folder / "eval"  # a run folder: its evaluation, as `hpseg evaluate RUN` wrote it
    print(f"report written: {write_report(folder, out=Path(args.out) if args.out else None)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from hpseg.checkpoint import convert_authors_checkpoint

    out = convert_authors_checkpoint(Path(args.src), Path(args.dst), backbone=args.backbone, dataset=args.dataset)
    print(f"converted: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hpseg.compare import compare_runs

    print(compare_runs([Path(p) for p in args.runs], out=Path(args.out) if args.out else None))
    return 0
