"""``hpseg segment``: label maps, overlays and a legend for files, folders and globs."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hpseg.errors import HPSegError

log = logging.getLogger("hpseg")


def _resolution(value: str) -> int | str | None:
    if value == "native":
        return None
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of pixels, 'auto' or 'native'") from None


def _images(n: int) -> str:
    """``1 image``, ``3 images``."""
    return f"{n} image{'' if n == 1 else 's'}"


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hpseg segment``."""
    parser.add_argument("model", help="run folder (its best.pt), checkpoint (best.pt) or the authors' ckpt.pth")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively) or quoted globs ('imgs/**/*.jpg')")
    parser.add_argument("--out", required=True, help="output folder (subfolders of folder inputs are mirrored)")
    parser.add_argument("--head", choices=("cluster", "linear"), default="cluster",
                        help="cluster: unsupervised clusters, named (hpseg name) or mapped to classes when the "
                        "checkpoint knows how (default); linear: the linear probe's classes")
    parser.add_argument("--crf", action="store_true", help="refine with a dense CRF (pip install 'hpseg[crf]')")
    parser.add_argument("--resolution", type=_resolution, default="auto",
                        help="working resolution of the shorter side: auto (the model's evaluation resolution, "
                        "default), a number of pixels, or native (no resizing); outputs keep the input size")
    parser.add_argument("--window", type=int, default=None,
                        help="sliding-window size in pixels (default: the model's training resolution)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap fraction in [0, 1) (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows / images per forward pass (default 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--backbone", default=None,
                        help="backbone of the authors' ckpt.pth (default: inferred from its weights)")
    parser.add_argument("--no-overlay", action="store_true", help="do not write <name>_overlay.jpg")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the labels (default 0.5)")


def cmd_segment(args: argparse.Namespace) -> int:
    """0 when at least one image was segmented, 1 when none could be read; HPSegError (exit 2)
    when no input matched."""
    from hpseg.imaging import IMAGE_EXTENSIONS, collect_inputs
    from hpseg.segmenter import Segmenter, segment_files

    out_dir = Path(args.out)
    files = collect_inputs(args.inputs, exclude=out_dir)
    if not files:
        raise HPSegError(f"no input images matched {' '.join(args.inputs)}: give image files, folders or globs "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    progress = sys.stderr.isatty()
    segmenter = Segmenter.from_checkpoint(
        args.model, head=args.head, device=args.device, window=args.window, overlap=args.overlap,
        batch_size=args.batch_size, resolution=args.resolution, crf=args.crf, backbone=args.backbone,
        progress=progress,
    )
    working = "native size" if segmenter.resolution is None else f"shorter side {segmenter.resolution} px"
    log.info("segmenting %s (%s head, %s, window %d px, overlap %.2f); labels: %s", _images(len(files)),
             segmenter.head, working, segmenter.window, segmenter.overlap, segmenter.label_meaning)
    summary = segment_files(segmenter, files, out_dir, write_overlay=not args.no_overlay, alpha=args.alpha,
                            progress=progress)
    done = len(files) - len(summary.skipped)
    print(f"segmented {_images(done)} into {out_dir} at {working} (labels: {segmenter.label_meaning}; legend.json)")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} unreadable file{'' if len(summary.skipped) == 1 else 's'}, listed in {out_dir / 'skipped.txt'}:",
              file=sys.stderr)
        for path, reason in summary.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    if done == 0:
        print("error: none of the inputs could be read as an image", file=sys.stderr)
        return 1
    return 0
