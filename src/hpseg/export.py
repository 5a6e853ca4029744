"""Export backbone + head + probe as one network: ONNX or TorchScript (``hpseg export``).

The exported network maps an ImageNet-normalised image batch ``(B, 3, H, W)`` to per-pixel
class scores ``(B, S, H, W)``: the linear probe's logits (S = C classes, ``head="linear"``) or
the cosine similarity to each cluster centroid (S = K clusters, ``head="cluster"``; the argmax is
the cluster probe's prediction). Scores are computed as :meth:`HPModel.predict` does (code
upsampled bilinearly to the input size, then the probe per pixel).

Fixed image size: the image size is fixed at export time (``image_size``, default the model's
training resolution). The position embeddings are resampled for that size once, in PyTorch,
and stored in the exported network as a constant, because DINO's resampling (bicubic by a
scale factor computed from the input size) cannot be traced into a graph that generalises to
other sizes. The batch axis is dynamic. To run other sizes, export again with ``--size H W``
(or resize / tile the images; :class:`hpseg.predict.Segmenter` does the tiling in PyTorch).

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``),
which needs only the ``onnx`` package; the dynamo-based exporter would also need
``onnxscript``. Metadata (head, class names, image size, normalisation) is stored in the ONNX
model's ``metadata_props`` and in the TorchScript archive's ``extra/hpseg.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpseg.errors import HPSegError

log = logging.getLogger(__name__)

__all__ = ["ExportNet", "add_export_arguments", "export_command", "export_model", "run_exported"]

FORMATS = ("onnx", "torchscript")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExportNet(nn.Module):
    """Backbone + segmentation head + one probe at a fixed image size, traceable.

    ``forward(images (B, 3, H, W) normalised) -> scores (B, S, H, W)``. It reuses the model's
    modules (no copies); the input-independent part of the token sequence (prefix tokens and
    position embeddings resampled for ``image_size``) is precomputed into the buffer ``base``:
    tokens = ``base + [0 for prefix tokens; patch embeddings]``, which equals the backbone's own
    sequence for DINO-family and timm ViTs (both add position embeddings linearly).
    """

    def __init__(self, model: Any, image_size: tuple[int, int], head: str = "linear") -> None:
        super().__init__()
        if head not in ("linear", "cluster"):
            raise HPSegError(f"head must be 'linear' or 'cluster', not {head!r}")
        bb = model.backbone
        p = int(bb.patch_size)
        hh, ww = int(image_size[0]), int(image_size[1])
        if hh < p or ww < p or hh % p or ww % p:
            raise HPSegError(
                f"export size {hh}×{ww} must be a multiple of the patch size {p}: e.g. --size "
                f"{max(p, hh // p * p)} {max(p, ww // p * p)}"
            )
        self.image_size = (hh, ww)
        self.grid = (hh // p, ww // p)
        self.head_name = head
        self.backbone = bb
        self.seg_head = model.head
        self.probe = model.linear_probe if head == "linear" else model.cluster_probe
        self.num_prefix = int(bb.num_prefix_tokens)
        self.embed_dim = int(bb.embed_dim)
        self.base: torch.Tensor
        self.register_buffer("base", self._token_base(), persistent=False)

    @torch.no_grad()
    def _token_base(self) -> torch.Tensor:
        """``(1, prefix + h·w, F)``: the token sequence of an image whose patch embeddings are 0."""
        bb = self.backbone
        vit = bb.vit
        h, w = self.grid
        device = vit.cls_token.device
        if bb.dino_family:
            from hpseg.backbones import dino_interpolate_pos_embed

            zeros = torch.zeros(1, h * w, self.embed_dim, device=device)
            x = torch.cat((vit.cls_token, zeros), dim=1)
            return (x + dino_interpolate_pos_embed(vit.pos_embed, h, w)).detach().clone()
        zeros = torch.zeros(1, h, w, self.embed_dim, device=device)
        return vit._pos_embed(zeros).detach().clone()

    def _patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, h·w, F)`` patch embeddings (no position)."""
        vit = self.backbone.vit
        pe = vit.patch_embed
        if self.backbone.dino_family:
            return pe.norm(pe.proj(images).flatten(2).transpose(1, 2))
        x = pe(images)  # dynamic_img_size: (B, h, w, F)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.backbone.vit
        h, w = self.grid
        x = self._patch_tokens(images)
        prefix = torch.zeros_like(x[:, :1]).expand(-1, self.num_prefix, -1)
        x = torch.cat((prefix, x), dim=1) + self.base
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        for blk in vit.blocks:
            x = blk(x)
        x = vit.norm(x)
        feats = x[:, self.num_prefix :].reshape(-1, h, w, self.embed_dim).permute(0, 3, 1, 2)
        code = self.seg_head(feats)
        code = F.interpolate(code, size=self.image_size, mode="bilinear", align_corners=False)
        if self.head_name == "linear":
            return self.probe(code)
        clusters = F.normalize(self.probe.clusters, dim=1)
        return torch.einsum("bdhw,kd->bkhw", F.normalize(code, dim=1), clusters)


def _metadata(model: Any, net: ExportNet) -> dict[str, Any]:
    from hpseg import __version__

    if net.head_name == "linear":
        names = [str(n) for n in model.class_names]
        meaning = "linear-probe logits per class (argmax = class id)"
    else:
        names = [f"cluster {k}" for k in range(int(model.cluster_probe.clusters.shape[0]))]
        meaning = "cosine similarity to each cluster centroid (argmax = cluster id)"
    return {
        "head": net.head_name,
        "scores": meaning,
        "output_names": names,
        "class_names": [str(n) for n in model.class_names],
        "image_size": list(net.image_size),
        "input": "RGB in [0, 1], normalised with the ImageNet mean/std, (B, 3, H, W) float32",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "backbone": str(getattr(model.spec, "backbone", "")),
        "hpseg_version": __version__,
    }


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence tracer and exporter deprecation chatter (the traced graph is checked instead)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*dynamo.*")
        yield


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _export_onnx(net: ExportNet, example: torch.Tensor, tmp: Path, opset: int, meta: dict[str, Any]) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise HPSegError("ONNX export needs the onnx package: pip install 'hpseg[export]'") from exc
    kwargs: dict[str, Any] = dict(
        input_names=["images"],
        output_names=["scores"],
        dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
    )
    with _quiet_tracing():
        try:
            torch.onnx.export(net, (example,), str(tmp), dynamo=False, **kwargs)
        except TypeError:  # a torch without the ``dynamo`` switch exports by tracing anyway
            torch.onnx.export(net, (example,), str(tmp), **kwargs)
    proto = onnx.load(str(tmp))
    onnx.helper.set_model_props(proto, {"hpseg": json.dumps(meta)})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))


def _export_torchscript(net: ExportNet, example: torch.Tensor, tmp: Path, meta: dict[str, Any]) -> None:
    with _quiet_tracing():  # torch.jit is deprecated in recent torch, but still works
        traced = torch.jit.trace(net, (example,), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"hpseg.json": json.dumps(meta)})


def default_image_size(model: Any) -> tuple[int, int]:
    """The model's training resolution, square (``config.data.resolution`` or its position grid)."""
    from hpseg.predict import _training_resolution

    res = _training_resolution(model)
    p = int(model.backbone.patch_size)
    res = max(p, res - res % p)
    return res, res


@torch.no_grad()
def export_model(
    model: Any,
    path: str | Path,
    *,
    format: str = "onnx",
    image_size: tuple[int, int] | None = None,
    head: str = "linear",
    opset: int = 17,
) -> Path:
    """Export ``model`` (backbone + head + probe) to ``path`` atomically; returns ``path``.

    Args:
        model: an :class:`~hpseg.model.HPModel` (exported on its current device, in eval mode).
        path: output file (``.onnx`` for ONNX; ``.pt``/``.ts`` for TorchScript by convention).
        format: ``"onnx"`` or ``"torchscript"``.
        image_size: ``(H, W)``, multiples of the patch size (fixed in the exported graph);
            default: the model's training resolution.
        head: ``"linear"`` (class logits, C channels) or ``"cluster"`` (cluster cosine
            similarities, K channels).
        opset: ONNX opset version.

    Input ``images`` ``(B, 3, H, W)`` float32 ImageNet-normalised (B dynamic); output ``scores``
    ``(B, S, H, W)``.

    Raises:
        HPSegError: unknown format/head, bad size, or ``onnx`` not installed.
    """
    if format not in FORMATS:
        raise HPSegError(f"export format must be onnx or torchscript, not {format!r}")
    path = Path(path)
    size = image_size if image_size is not None else default_image_size(model)
    was_training = model.training
    model.eval()
    try:
        net = ExportNet(model, (int(size[0]), int(size[1])), head).eval()
        param = next(model.parameters())
        example = torch.zeros(1, 3, *net.image_size, device=param.device, dtype=param.dtype)
        meta = _metadata(model, net)
        tmp = _temp_beside(path)
        try:
            if format == "onnx":
                _export_onnx(net, example, tmp, opset, meta)
            else:
                _export_torchscript(net, example, tmp, meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        model.train(was_training)
    log.info("exported %s (%s head, %d×%d) to %s", format, head, size[0], size[1], path)
    return path


def run_exported(path: str | Path, images: torch.Tensor, format: str | None = None) -> torch.Tensor:
    """Run an exported file on ``images`` ``(B, 3, H, W)`` normalised: onnxruntime for ONNX,
    ``torch.jit.load`` for TorchScript. Returns the scores on the CPU."""
    path = Path(path)
    fmt = format or _format_from_suffix(path) or "onnx"
    x = images.detach().cpu().float()
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise HPSegError("running ONNX models needs onnxruntime: pip install 'hpseg[export]'") from exc
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["scores"], {"images": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(x)


@torch.no_grad()
def verify_export(
    model: Any,
    path: str | Path,
    format: str,
    image_size: tuple[int, int],
    head: str,
    batch: int = 2,
    seed: int = 0,
) -> float:
    """Max |exported − PyTorch| of the scores on a random batch (the PyTorch side runs the
    model's own backbone forward, so the traced token assembly is checked too)."""
    from hpseg.runtime import eval_mode

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *image_size, generator=g)
    param = next(model.parameters())
    with eval_mode(model):
        code = model.head(model.backbone(x.to(param.device), with_attention=False).feats)
        code = F.interpolate(code, size=tuple(image_size), mode="bilinear", align_corners=False)
        ref = model.linear_probe(code) if head == "linear" else model.cluster_probe.cosine(code)
    out = run_exported(path, x, format)
    return float((out - ref.float().cpu()).abs().max())


def _format_from_suffix(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
        return "torchscript"
    return None


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hpseg export``."""
    parser.add_argument("model", help="checkpoint: ours (best.pt) or the authors' ckpt.pth")
    parser.add_argument("--out", required=True, help="output file (.onnx, or .pt/.ts for TorchScript)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="onnx or torchscript (default: from --out's extension, else onnx)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="fixed input size, multiples of the patch size (default: training resolution)",
    )
    parser.add_argument(
        "--head",
        choices=("linear", "cluster"),
        default="linear",
        help="linear: class logits (default); cluster: cluster cosine similarities",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--backbone",
        default=None,
        help="backbone of the authors' ckpt.pth (default: inferred from its weights)",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip running the exported file once against PyTorch"
    )


def export_command(args: argparse.Namespace) -> int:
    """``hpseg export``."""
    from hpseg.model import load_model

    out = Path(args.out)
    fmt = args.format or _format_from_suffix(out) or "onnx"
    model = load_model(args.model, backbone=args.backbone)
    size = tuple(args.size) if args.size else default_image_size(model)
    export_model(model, out, format=fmt, image_size=size, head=args.head, opset=args.opset)  # type: ignore[arg-type]
    channels = len(model.class_names) if args.head == "linear" else int(model.cluster_probe.clusters.shape[0])
    print(
        f"exported {fmt}: {out}  (input images (B,3,{size[0]},{size[1]}) ImageNet-normalised → "
        f"scores (B,{channels},{size[0]},{size[1]}), {args.head} head)"
    )
    if not args.no_verify:
        try:
            diff = verify_export(model, out, fmt, size, args.head)  # type: ignore[arg-type]
        except HPSegError as exc:
            print(f"not verified: {exc}")
        else:
            print(f"verified against PyTorch: max |difference| {diff:.2e}")
    return 0
