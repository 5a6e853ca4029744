"""Command-line interface: ``hpseg <command> …`` (also ``python -m hpseg``).

Every command reads its configuration here and hands explicit arguments to the library.
User errors (:class:`~hpseg.errors.HPSegError`) are printed as one line, without a traceback;
``--verbose`` shows debug logs and full tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hpseg.errors import HPSegError

log = logging.getLogger("hpseg")

PRESET_HELP = "dataset preset: cocostuff27, cityscapes27, potsdam3, synthetic, or a YAML file"
OVERRIDE_HELP = "config overrides key=value, e.g. data.root=/data train.batch_size=32 backbone=dino_vitb8"


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("hpseg").setLevel(level)


def _split_overrides(values: Sequence[str]) -> list[str]:
    bad = [v for v in values if "=" not in v]
    if bad:
        raise HPSegError(f"unexpected argument {bad[0]!r}: settings are given as key=value (e.g. data.root=/data)")
    return list(values)


# ------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from hpseg.config import build_config, describe
    from hpseg.pipeline import run_training

    cfg = build_config(args.preset, _split_overrides(args.overrides))
    log.info("config: %s", describe(cfg))
    folders = run_training(cfg)
    from hpseg import distributed as dist

    if dist.is_main():
        for folder in folders:
            print(f"run folder: {folder}  (best checkpoint: {folder / 'best.pt'})")
        print(f"evaluate with: hpseg evaluate {cfg.train.out_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hpseg.pipeline import evaluate_path

    report = evaluate_path(
        Path(args.path),
        _split_overrides(args.overrides),
        preset=args.preset,
        out_dir=Path(args.out) if args.out else None,
        backbone=args.backbone,
        baseline=args.baseline,
    )
    print(report.text)
    if args.json:
        print(json.dumps(report.document, indent=2))
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from hpseg.pipeline import run_baseline

    print(run_baseline(args.preset, _split_overrides(args.overrides)).text)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from hpseg.config import build_config
    from hpseg.data.prepare import prepare_five_crop

    cfg = build_config(args.preset, _split_overrides(args.overrides))
    if cfg.data.dataset not in ("cocostuff27", "cityscapes27", "potsdam3"):
        raise HPSegError(f"prepare makes five-crop sets for cocostuff27, cityscapes27, potsdam3, not {cfg.data.dataset}")
    for split in args.splits or [cfg.data.train_split]:
        out = prepare_five_crop(cfg.data.dataset, cfg.data.root, split=split, crop_ratio=cfg.data.crop_ratio,
                                progress=cfg.train.progress)
        print(f"five-crop {split} set ready: {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hpseg.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, overrides=_split_overrides(args.overrides))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from hpseg.config import build_config

    cfg = build_config(args.preset, _split_overrides(args.overrides))
    print(cfg.to_yaml(), end="")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from hpseg.predict import segment_command

    return segment_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from hpseg.report import write_report

    path = write_report(Path(args.run_dir), out=Path(args.out) if args.out else None)
    print(f"report written: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hpseg.export import export_command

    return export_command(args)


def cmd_convert(args: argparse.Namespace) -> int:
    from hpseg.model import convert_authors_checkpoint

    out = convert_authors_checkpoint(Path(args.src), Path(args.dst), backbone=args.backbone,
                                     dataset=args.dataset)
    print(f"converted: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hpseg.compare import compare_runs

    text = compare_runs([Path(p) for p in args.runs], out=Path(args.out) if args.out else None)
    print(text)
    return 0


# ------------------------------------------------------------------------------------------
# parser
# ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``hpseg`` argument parser."""
    p = argparse.ArgumentParser(
        prog="hpseg",
        description="Unsupervised semantic segmentation with Hidden Positives (CVPR 2023).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("train", help="train HP (one run per seed with seeds=[…])")
    s.add_argument("--preset", default=None, help=PRESET_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="evaluate a checkpoint or a run folder (mean ± std over seeds)")
    s.add_argument("path", help="checkpoint (ours or the authors' ckpt.pth) or run folder")
    s.add_argument("--preset", default=None, help="dataset preset, for checkpoints that carry no config")
    s.add_argument("--backbone", default=None, help="backbone name for the authors' checkpoints")
    s.add_argument("--out", default=None, help="folder for results.json and figures")
    s.add_argument("--baseline", action="store_true", help="also score k-means on the frozen backbone")
    s.add_argument("--json", action="store_true", help="print results.json too")
    s.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("baseline", help="k-means on frozen backbone features, evaluated like HP")
    s.add_argument("--preset", default=None, help=PRESET_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("prepare", help="write the five-crop training set of a dataset")
    s.add_argument("--preset", required=True, help=PRESET_HELP)
    s.add_argument("--splits", nargs="*", default=None, help="splits to prepare (default: the training split)")
    s.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("demo", help="train + evaluate HP on embedded synthetic scenes (CPU, no download)")
    s.add_argument("--out", default="hpseg-demo", help="results folder (default: ./hpseg-demo)")
    s.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    s.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("config", help="print the resolved configuration")
    s.add_argument("--preset", default=None, help=PRESET_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("segment", help="segment images with a trained model")
    _add_segment_args(s)
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("report", help="static HTML report of an evaluated run")
    s.add_argument("run_dir", help="folder holding results.json (e.g. RUN/eval)")
    s.add_argument("--out", default=None, help="output HTML file (default: RUN_DIR/report.html)")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("export", help="export backbone + head to ONNX or TorchScript")
    _add_export_args(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("convert", help="convert the authors' released ckpt.pth to an hpseg checkpoint")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--backbone", default=None, help="backbone name (inferred from the weights if omitted)")
    s.add_argument("--dataset", default=None, help="cocostuff27 | cityscapes27 | potsdam3 (class names)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("compare", help="compare runs side by side (table + PNG)")
    s.add_argument("runs", nargs="+", help="run folders or results.json files")
    s.add_argument("--out", default=None, help="folder for compare.png / compare.json")
    s.set_defaults(func=cmd_compare)
    return p


def _add_segment_args(s: argparse.ArgumentParser) -> None:
    try:
        from hpseg.predict import add_segment_arguments
    except ImportError:  # pragma: no cover - module optional during development
        s.add_argument("rest", nargs="*")
        return
    add_segment_arguments(s)


def _add_export_args(s: argparse.ArgumentParser) -> None:
    try:
        from hpseg.export import add_export_arguments
    except ImportError:  # pragma: no cover
        s.add_argument("rest", nargs="*")
        return
    add_export_arguments(s)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hpseg`` command. Returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value settings may come after options (``evaluate RUN --out DIR data.root=…``)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except HPSegError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
