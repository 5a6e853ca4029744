"""``hpseg export``: backbone + head + probe as one ONNX or TorchScript file, verified."""

from __future__ import annotations

import argparse
from pathlib import Path

from hpseg.errors import HPSegError


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hpseg export``."""
    parser.add_argument("model", help="run folder (its best.pt), checkpoint (best.pt) or the authors' ckpt.pth")
    parser.add_argument("--out", default=None,
                        help="output file (.onnx, or .ts/.pt for TorchScript; default: model.onnx or model.ts "
                        "next to the checkpoint, names no command takes for a checkpoint)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default=None,
                        help="onnx or torchscript (default: from --out's extension, else onnx)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="fixed input size, multiples of the patch size (default: training resolution)")
    parser.add_argument("--head", choices=("cluster", "linear"), default="cluster",
                        help="cluster: cluster cosine similarities (default, as hpseg segment); linear: class logits")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--backbone", default=None,
                        help="backbone of the authors' ckpt.pth (default: inferred from its weights)")
    parser.add_argument("--no-verify", action="store_true", help="skip running the exported file once against PyTorch")


def cmd_export(args: argparse.Namespace) -> int:
    from hpseg.checkpoint import load_model, resolve_checkpoint
    from hpseg.export import (
        default_export_path,
        default_image_size,
        export_model,
        format_from_suffix,
        verify_export,
    )

    checkpoint = resolve_checkpoint(args.model)  # a run folder: its best.pt
    fmt = args.format or (format_from_suffix(Path(args.out)) if args.out else None) or "onnx"
    out = Path(args.out) if args.out else default_export_path(checkpoint, fmt)
    model = load_model(checkpoint, backbone=args.backbone)
    size = (int(args.size[0]), int(args.size[1])) if args.size else default_image_size(model)
    export_model(model, out, format=fmt, image_size=size, head=args.head, opset=args.opset)
    channels = model.n_classes if args.head == "linear" else model.n_clusters
    print(f"exported {fmt}: {out}  (input images (B,3,{size[0]},{size[1]}) ImageNet-normalised → "
          f"scores (B,{channels},{size[0]},{size[1]}), {args.head} head)")
    if not args.no_verify:
        try:
            diff = verify_export(model, out, fmt, size, args.head)
        except HPSegError as exc:
            print(f"not verified: {exc}")
        else:
            print(f"verified against PyTorch: max |difference| {diff:.2e}")
    return 0
