"""Export backbone + head + probe as one network: ONNX or TorchScript (``hpseg export``).

The exported network maps an ImageNet-normalised image batch ``(B, 3, H, W)`` to per-pixel
scores ``(B, S, H, W)`` — exactly :meth:`hpseg.model.HPModel.scores` for one head: the cosine
similarity to each cluster centroid (S = K, ``head="cluster"``, the default, as for
``hpseg segment``; the argmax is the cluster probe's prediction) or the linear probe's logits
(S = C, ``head="linear"``).

Fixed image size: the position embeddings are resampled for ``image_size`` once (the backbone's
cached token base) and the graph holds them as a constant, because DINO's resampling (bicubic
by a scale factor computed from the input size) does not trace into a graph that generalises to
other sizes. The batch axis is dynamic (named ``batch``); height and width are fixed. To run
other sizes, export again with ``--size H W``, or tile with :class:`hpseg.segmenter.Segmenter`.

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(dynamo=False)``),
which needs only the ``onnx`` package. Metadata (head, label names, cluster → class assignment,
image size, normalisation) is stored in the ONNX model's ``metadata_props`` (key ``hpseg``) and
in the TorchScript archive's ``extra/hpseg.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpseg.errors import HPSegError
from hpseg.imaging import IMAGENET_MEAN, IMAGENET_STD
from hpseg.io import atomic_path
from hpseg.model import HPModel
from hpseg.runtime import eval_mode
from hpseg.segmenter import DEFAULT_HEAD, train_resolution

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_NAMES", "FORMATS", "ExportNet", "default_export_path", "default_image_size", "export_model",
           "format_from_suffix", "run_exported", "verify_export"]

FORMATS = ("onnx", "torchscript")


class ExportNet(nn.Module):
    """:meth:`HPModel.scores` for one head at a fixed image size, traceable.

    ``forward(images (B, 3, H, W) normalised) -> scores (B, S, H, W)``. It reuses the model's
    modules (no copies) and fills the backbone's token-base cache for the export size first, so
    the traced graph holds the resampled position embeddings as a constant.
    """

    def __init__(self, model: HPModel, image_size: tuple[int, int], head: str = DEFAULT_HEAD) -> None:
        super().__init__()
        if head not in ("linear", "cluster"):
            raise HPSegError(f"head must be 'linear' or 'cluster', not {head!r}")
        p = int(model.backbone.patch_size)
        hh, ww = int(image_size[0]), int(image_size[1])
        if hh < p or ww < p or hh % p or ww % p:
            raise HPSegError(
                f"export size {hh}×{ww} must be a multiple of the patch size {p}: e.g. --size "
                f"{max(p, hh // p * p)} {max(p, ww // p * p)}"
            )
        self.model, self.head_name, self.image_size = model, head, (hh, ww)
        model.backbone.token_base(hh // p, ww // p)  # cached before tracing: a constant of the graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.scores(images, self.image_size, heads=(self.head_name,))[self.head_name]


def _label_names(model: HPModel, head: str) -> list[str]:
    if head == "linear":
        return list(model.class_names)
    names = model.cluster_names or [f"cluster {k}" for k in range(model.n_clusters)]
    if model.cluster_names is None and model.assignment is not None:
        names = [f"{n} → {model.class_names[a]}" if a >= 0 else f"{n} (unmatched)"
                 for n, a in zip(names, model.assignment)]
    return names


def _metadata(model: HPModel, net: ExportNet) -> dict[str, Any]:
    from hpseg import __version__

    meaning = ("linear-probe logits per class (argmax = class id)" if net.head_name == "linear"
               else "cosine similarity to each cluster centroid (argmax = cluster id)")
    meta: dict[str, Any] = {
        "head": net.head_name,
        "scores": meaning,
        "output_names": _label_names(model, net.head_name),
        "class_names": list(model.class_names),
        "image_size": list(net.image_size),
        "axes": {"images": ["batch", 3, *net.image_size], "scores": ["batch", "S", *net.image_size]},
        "input": "RGB in [0, 1], normalised with the ImageNet mean/std, (B, 3, H, W) float32",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "backbone": model.spec.backbone,
        "hpseg_version": __version__,
    }
    if net.head_name == "cluster":
        meta["cluster_names"] = model.cluster_names
        meta["assignment"] = model.assignment
    return meta


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence tracer and exporter deprecation chatter (the exported graph is verified instead)."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


def _export_onnx(net: ExportNet, example: torch.Tensor, tmp: Path, opset: int, meta: dict[str, Any]) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise HPSegError("ONNX export needs the onnx package: pip install 'hpseg[export]'") from exc
    kwargs: dict[str, Any] = dict(input_names=["images"], output_names=["scores"], opset_version=opset,
                                  dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}},
                                  do_constant_folding=True)
    with _quiet_tracing():
        torch.onnx.export(net, (example,), str(tmp), dynamo=False, **kwargs)
    proto = onnx.load(str(tmp))
    # the exporter names traced output axes after the op that made them ("Einsumscores_dim_2"):
    # state the real shape, (batch, S, H, W), with H and W the fixed export size
    batch, *fixed = proto.graph.output[0].type.tensor_type.shape.dim
    batch.dim_param = "batch"
    for dim, value in zip(fixed, (len(meta["output_names"]), *net.image_size)):
        dim.dim_value = int(value)
    onnx.helper.set_model_props(proto, {"hpseg": json.dumps(meta)})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))


def _export_torchscript(net: ExportNet, example: torch.Tensor, tmp: Path, meta: dict[str, Any]) -> None:
    with _quiet_tracing():  # torch.jit is deprecated in recent torch, but still works
        traced = torch.jit.trace(net, (example,), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"hpseg.json": json.dumps(meta)})


def default_image_size(model: HPModel) -> tuple[int, int]:
    """The model's training resolution, square, rounded down to the patch size."""
    p = int(model.backbone.patch_size)
    res = train_resolution(model)
    res = max(p, res - res % p)
    return res, res


#: default file names of the exports: names that cannot be mistaken for a checkpoint (best.pt)
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts"}


def default_export_path(checkpoint: str | Path, format: str) -> Path:
    """Where ``hpseg export`` writes without ``--out``: ``model.onnx`` / ``model.ts`` next to
    ``checkpoint`` (in its run folder)."""
    if format not in FORMATS:
        raise HPSegError(f"export format must be onnx or torchscript, not {format!r}")
    return Path(checkpoint).parent / DEFAULT_NAMES[format]


def format_from_suffix(path: Path) -> str | None:
    """``onnx`` for ``.onnx``, ``torchscript`` for ``.pt``/``.pth``/``.ts``/…, else None."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth", ".ts", ".torchscript", ".jit"):
        return "torchscript"
    return None


@torch.no_grad()
def export_model(
    model: HPModel,
    path: str | Path,
    *,
    format: str = "onnx",
    image_size: tuple[int, int] | None = None,
    head: str = DEFAULT_HEAD,
    opset: int = 17,
) -> Path:
    """Export ``model`` (backbone + head + probe) to ``path`` atomically; returns ``path``.

    Args:
        model: an :class:`~hpseg.model.HPModel` (exported on its current device, in eval mode).
        path: output file (``.onnx`` for ONNX; ``.pt``/``.ts`` for TorchScript by convention).
        format: ``"onnx"`` or ``"torchscript"``.
        image_size: ``(H, W)``, multiples of the patch size (fixed in the exported graph);
            default: the model's training resolution.
        head: ``"cluster"`` (cluster cosine similarities, K channels; default) or ``"linear"``
            (class logits, C channels).
        opset: ONNX opset version.

    Raises:
        HPSegError: unknown format/head, bad size, or ``onnx`` not installed.
    """
    if format not in FORMATS:
        raise HPSegError(f"export format must be onnx or torchscript, not {format!r}")
    size = image_size if image_size is not None else default_image_size(model)
    with eval_mode(model):
        net = ExportNet(model, (int(size[0]), int(size[1])), head).eval()
        param = next(model.parameters())
        example = torch.zeros(1, 3, *net.image_size, device=param.device, dtype=param.dtype)
        meta = _metadata(model, net)
        with atomic_path(path) as tmp:
            if format == "onnx":
                _export_onnx(net, example, tmp, opset, meta)
            else:
                _export_torchscript(net, example, tmp, meta)
    log.info("exported %s (%s head, %d×%d) to %s", format, head, size[0], size[1], path)
    return Path(path)


def run_exported(path: str | Path, images: torch.Tensor, format: str | None = None) -> torch.Tensor:
    """Run an exported file on ``images`` ``(B, 3, H, W)`` normalised: onnxruntime for ONNX,
    ``torch.jit.load`` for TorchScript. Returns the scores on the CPU."""
    path = Path(path)
    fmt = format or format_from_suffix(path) or "onnx"
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
def verify_export(model: HPModel, path: str | Path, format: str, image_size: tuple[int, int], head: str,
                  batch: int = 2, seed: int = 0) -> float:
    """Max |exported − PyTorch| of the scores on a random batch (the PyTorch side is the
    model's own :meth:`~hpseg.model.HPModel.scores`)."""
    x = torch.randn(batch, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    param = next(model.parameters())
    with eval_mode(model):
        ref = model.scores(x.to(param.device), (int(image_size[0]), int(image_size[1])), heads=(head,))[head]
    return float((run_exported(path, x, format) - ref.float().cpu()).abs().max())
