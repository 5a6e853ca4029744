"""The ``hpseg`` parser, logging and error policy.

Every problem a user can fix is an :class:`~hpseg.errors.HPSegError`: it is printed as one line
(``error: <message>``, exit status 2) without a traceback; ``--verbose`` shows debug logs and
full tracebacks. Ctrl-C exits 130; a training stopped by a signal (after ``last.pt`` is written)
exits ``128 + signum``: 130 for SIGINT, 143 for SIGTERM — one line saying how to resume.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from collections.abc import Sequence

from hpseg.cli import commands
from hpseg.cli.export import add_export_arguments, cmd_export
from hpseg.cli.segment import add_segment_arguments, cmd_segment
from hpseg.cli.sweep import add_sweep_arguments, cmd_sweep
from hpseg.errors import HPSegError

PRESET_HELP = "preset: cocostuff27, cityscapes27, potsdam3, folder, synthetic, or a YAML file"
_NEGATIVE_NAME = re.compile(r"-\d+=.*")
OVERRIDE_HELP = "config overrides key=value, e.g. data.root=/data train.batch_size=32 backbone=dino_vitb8"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("hpseg").setLevel(logging.DEBUG if verbose else logging.INFO)


def _with_overrides(s: argparse.ArgumentParser, preset: str | None = "optional") -> None:
    if preset == "required":
        s.add_argument("--preset", required=True, help=PRESET_HELP)
    elif preset == "optional":
        s.add_argument("--preset", default=None, help=PRESET_HELP)
    s.add_argument("overrides", nargs="*", help=OVERRIDE_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The ``hpseg`` argument parser."""
    p = argparse.ArgumentParser(prog="hpseg",
                                description="Unsupervised semantic segmentation with Hidden Positives (CVPR 2023).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("train", help="train HP (one run per seed with seeds=[…])")
    _with_overrides(s)
    s.set_defaults(func=commands.cmd_train)

    s = sub.add_parser("evaluate", help="evaluate a checkpoint or a run folder (mean ± std over seeds)")
    s.add_argument("path", help="checkpoint (ours or the authors' ckpt.pth) or run folder")
    s.add_argument("--backbone", default=None, help="backbone name for the authors' checkpoints")
    s.add_argument("--out", default=None, help="folder for results.json and figures (default RUN/eval)")
    s.add_argument("--baseline", action="store_true", help="also score k-means on the frozen backbone")
    s.add_argument("--json", action="store_true", help="print results.json too")
    _with_overrides(s)
    s.set_defaults(func=commands.cmd_evaluate)

    s = sub.add_parser("baseline", help="k-means on frozen backbone features, evaluated like HP")
    _with_overrides(s)
    s.set_defaults(func=commands.cmd_baseline)

    s = sub.add_parser("sweep-k", help="choose K without labels: one run per K, label-free figures and galleries")
    add_sweep_arguments(s)
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("prepare", help="write the five-crop sets (train and val) of a dataset")
    s.add_argument("--splits", nargs="*", default=None, help="splits to prepare (default: the train and val splits)")
    _with_overrides(s, "required")
    s.set_defaults(func=commands.cmd_prepare)

    s = sub.add_parser("demo", help="train + evaluate HP on embedded synthetic scenes (CPU, no download)")
    s.add_argument("--out", default="hpseg-demo", help="results folder (default: ./hpseg-demo)")
    s.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    _with_overrides(s, None)
    s.set_defaults(func=commands.cmd_demo)

    s = sub.add_parser("config", help="print the resolved configuration")
    _with_overrides(s)
    s.set_defaults(func=commands.cmd_config)

    s = sub.add_parser("segment", help="segment images with a trained model")
    add_segment_arguments(s)
    s.set_defaults(func=cmd_segment)

    s = sub.add_parser("name", help="name the clusters of a trained model: hpseg name RUN 0=sky 1=road …")
    s.add_argument("run", help="run folder (best.pt, final.pt) or checkpoint file")
    s.add_argument("names", nargs="*", help="ID=NAME pairs, or one JSON file ({\"0\": \"sky\", …} or a list)")
    s.set_defaults(func=commands.cmd_name)

    s = sub.add_parser("report", help="static HTML report of an evaluated run")
    s.add_argument("run_dir", help="folder holding results.json (RUN/eval), or the run folder RUN")
    s.add_argument("--out", default=None, help="output HTML file (default: RUN_DIR/report.html)")
    s.set_defaults(func=commands.cmd_report)

    s = sub.add_parser("export", help="export backbone + head to ONNX or TorchScript")
    add_export_arguments(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("convert", help="convert the authors' released ckpt.pth to an hpseg checkpoint")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--backbone", default=None, help="backbone name (inferred from the weights if omitted)")
    s.add_argument("--dataset", default=None, help="cocostuff27 | cityscapes27 | potsdam3 (class names)")
    s.set_defaults(func=commands.cmd_convert)

    s = sub.add_parser("compare", help="compare runs side by side (a table; with --out also compare.png and compare.json)")
    s.add_argument("runs", nargs="+", help="run folders or results.json files")
    s.add_argument("--out", default=None, help="folder for compare.png / compare.json")
    s.set_defaults(func=commands.cmd_compare)
    return p


def _one_line(exc: HPSegError) -> str:
    """The error's message; one re-raised from a DataLoader worker carries the worker's traceback
    before it (``Caught … in DataLoader worker …``): its last line, without the exception's name."""
    lines = str(exc).strip().splitlines()
    if len(lines) < 2:
        return str(exc)
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])


def _setting_hint(extra: list[str]) -> str:
    """For an option that is a setting (``--epochs 5``, ``--batch-size=8``): ``; settings are
    key=value: train.epochs=5``; else nothing."""
    import difflib
    from dataclasses import fields

    from hpseg.config import Config

    cfg = Config()
    keys: dict[str, str] = {}  # short name → the first section's key (train.batch_size before eval.batch_size)
    for section in (s.name for s in fields(cfg) if s.name != "preset"):
        for f in fields(getattr(cfg, section)):
            keys.setdefault(f.name, f"{section}.{f.name}")
    for i, item in enumerate(extra):
        name, sep, value = item[2:].partition("=")
        name = name.replace("-", "_")
        close = difflib.get_close_matches(name, list(keys), n=1) if item.startswith("--") else []
        if close:
            following = extra[i + 1] if i + 1 < len(extra) else ""
            if not sep:
                value = following if following and not following.startswith("-") and "=" not in following else "VALUE"
            return f"; settings are key=value: {keys[close[0]]}={value}"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hpseg`` command. Returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "name":  # ``-1=void`` looks like an option to argparse: it is a (refused) cluster id
        args.names = [*args.names, *(e for e in extra if _NEGATIVE_NAME.fullmatch(e))]
        extra = [e for e in extra if not _NEGATIVE_NAME.fullmatch(e)]
    # key=value settings may come after options (``evaluate RUN --out DIR data.root=…``)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_setting_hint(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except HPSegError as exc:
        if args.verbose:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # hpseg.preemption.Stopped carries the signal that stopped training
        print(f"interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
