"""Apply a trained model to new images: :class:`Segmenter` and ``hpseg segment``.

Inference on one image (any size):

1. the image (PIL, numpy ``(H,W,3)`` uint8 or float in [0, 1], tensor ``(3,H,W)`` in [0, 1], or
   a file path) is converted to RGB float, optionally resized so that its shorter side is
   ``resolution`` pixels, ImageNet-normalised and padded (reflect) on the bottom/right to a
   multiple of the patch size;
2. if the padded image fits in a ``window × window`` square it is predicted in one pass;
   otherwise windows of ``window`` pixels (default: the model's training resolution) slide
   over it with the given ``overlap``, and the per-pixel scores of the windows are blended with
   a smooth (Hann) weight that is positive everywhere, so no pixel is left without a score;
3. scores are cropped to the (resized) image, upsampled back to the input size when resized,
   optionally refined by a dense CRF, and the argmax gives the label map at the input's size.

Scores per pixel: ``head="linear"``: softmax of the linear probe's logits over the C classes;
``head="cluster"``: cosine similarity of the code to each of the K cluster centroids (the
argmax is the cluster probe's prediction). Both are computed as :meth:`HPModel.predict` does:
the head's code is upsampled bilinearly to the window size, then the probe is applied per pixel.

Label values (see :attr:`Segmenter.label_names`):

* ``head="linear"``: class ids ``0..C-1`` (``model.class_names``);
* ``head="cluster"`` with a cluster → class assignment (stored by ``hpseg train`` in ``best.pt``
  as ``metrics["unsupervised"]["assignment"]``, the Hungarian matching on the validation set,
  or given explicitly): class ids ``0..C-1``, and ``-1`` for clusters matched to no class;
* ``head="cluster"`` without an assignment: raw cluster ids ``0..K-1`` (no class meaning).

Label PNGs store the same values with ``-1`` written as 255 (black in the palette).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError
from hpseg.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "IGNORE",
    "IMAGE_EXTENSIONS",
    "PNG_IGNORE",
    "Segmenter",
    "add_segment_arguments",
    "collect_inputs",
    "overlay",
    "save_label_png",
    "segment_command",
    "segment_files",
    "to_image_tensor",
]

#: file extensions read from folders (lower case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: label value of pixels without a class (clusters matched to no class)
IGNORE = -1
#: how :data:`IGNORE` is stored in label PNGs
PNG_IGNORE = 255
#: temperature turning cluster cosine similarities into probabilities (as in evaluation's CRF)
CLUSTER_ALPHA = 2.0
#: floor added to the Hann blending weight, so that every pixel of a window counts a little
_WEIGHT_FLOOR = 1e-3

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# ------------------------------------------------------------------------------------------
# images in
# ------------------------------------------------------------------------------------------


def _read_image_file(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def _unit_range(t: torch.Tensor) -> torch.Tensor:
    if t.numel() and float(t.max()) > 1.5:
        raise HPSegError(
            f"float images must be in [0, 1], got values up to {float(t.max()):.1f}: divide by 255 "
            "(or pass uint8)"
        )
    return t.clamp(0.0, 1.0)


def to_image_tensor(image: Any) -> torch.Tensor:
    """Any supported image as an RGB float tensor ``(3, H, W)`` in [0, 1] on the CPU.

    Accepts a PIL image (any mode; converted to RGB), a numpy array ``(H, W, 3)`` / ``(H, W, 4)``
    (alpha dropped) / ``(H, W)`` (grey) of uint8 or floats in [0, 1], a tensor ``(3, H, W)``
    (float in [0, 1] or uint8), or a path to an image file.

    Raises:
        HPSegError: unsupported type or shape.
    """
    if isinstance(image, (str, os.PathLike)):
        return _read_image_file(Path(image))
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    except ImportError:  # pragma: no cover - pillow is a dependency
        pass
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise HPSegError(
                f"numpy images must be (H, W, 3) RGB, got shape {arr.shape}: convert to RGB first"
            )
        arr = np.array(arr[..., :3], copy=True)  # also makes read-only arrays (np.asarray(pil)) safe
        t = torch.from_numpy(arr).permute(2, 0, 1)
        return t.float().div_(255.0) if arr.dtype == np.uint8 else _unit_range(t.float())
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise HPSegError(f"image tensors must be (3, H, W) RGB in [0, 1], got shape {tuple(t.shape)}")
        return t.float().div(255.0) if t.dtype == torch.uint8 else _unit_range(t.float())
    raise HPSegError(
        f"cannot segment a {type(image).__name__}: pass a PIL image, an (H, W, 3) numpy array, "
        "a (3, H, W) tensor in [0, 1] or an image path"
    )


def _normalize(rgb: torch.Tensor) -> torch.Tensor:
    return (rgb - _MEAN.to(rgb.device)) / _STD.to(rgb.device)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``(3, H, W)`` at the bottom/right to multiples of ``multiple`` (reflect; replicate
    where the image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x.unsqueeze(0), (0, pw, 0, ph), mode=mode).squeeze(0)


def _window_positions(size: int, win: int, stride: int) -> list[int]:
    """Start offsets of windows of ``win`` covering ``[0, size)``; the last one ends at ``size``."""
    if size <= win:
        return [0]
    pos = list(range(0, size - win, stride))
    pos.append(size - win)
    return pos


def _hann(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * (i + 0.5) / n)).float()


def window_weight(h: int, w: int) -> torch.Tensor:
    """The blending weight of a ``h × w`` window: separable Hann plus a small floor, ``(h, w)``.

    Largest in the centre, small but positive at the border (a pixel seen by one window only
    takes that window's scores unchanged).
    """
    return torch.outer(_hann(h), _hann(w)) + _WEIGHT_FLOOR


# ------------------------------------------------------------------------------------------
# the segmenter
# ------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """One image ready for the network."""

    rgb: torch.Tensor  # (3, H, W) in [0, 1], input size
    net: torch.Tensor  # (3, Hp, Wp) normalised, resized, padded
    size: tuple[int, int]  # input size (H, W)
    proc: tuple[int, int]  # resized size before padding


def _training_resolution(model: Any) -> int:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):
        data = cfg.get("data")
        if isinstance(data, dict) and isinstance(data.get("resolution"), int) and data["resolution"] > 0:
            return int(data["resolution"])
    spec = getattr(model, "spec", None)
    if spec is not None:
        return int(spec.pos_grid[0]) * int(spec.patch_size)
    return 224


def _checkpoint_assignment(path: Path) -> list[int] | None:
    """``metrics["unsupervised"]["assignment"]`` stored in an hpseg checkpoint, if any."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: mmap unsupported
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # load_model already read it; do not fail twice
        log.debug("cannot re-read %s for its cluster assignment: %s", path, exc)
        return None
    if not isinstance(ckpt, dict):
        return None
    for key in ("assignment", "cluster_assignment"):
        if isinstance(ckpt.get(key), list):
            return [int(a) for a in ckpt[key]]
    metrics = ckpt.get("metrics")
    if isinstance(metrics, dict):
        unsup = metrics.get("unsupervised")
        if isinstance(unsup, dict) and isinstance(unsup.get("assignment"), list):
            return [int(a) for a in unsup["assignment"]]
    return None


def _resolve_device(name: str | torch.device) -> torch.device:
    from hpseg.runtime import resolve_device

    if isinstance(name, torch.device):
        return name
    try:
        return resolve_device(name)
    except HPSegError as exc:
        raise HPSegError(f"device {name!r} is not available here: use --device cpu (or auto)") from exc


class Segmenter:
    """Image-level inference with an :class:`~hpseg.model.HPModel`.

    Args:
        model: the model (put in eval mode and moved to ``device``).
        head: ``"cluster"`` (unsupervised clusters, mapped to classes when an assignment is
            known) or ``"linear"`` (the linear probe's classes).
        device: ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda:0"``… or a ``torch.device``.
        window: sliding-window size in pixels (rounded down to a multiple of the patch size);
            default: the model's training resolution (``config.data.resolution``, else the
            backbone's position grid, e.g. 224). Images that fit in one window are predicted
            whole.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows (or same-size images) per forward pass.
        resolution: if given, resize each image so that its shorter side has this many pixels
            before predicting (the label map is still returned at the input size).
        crf: refine the scores with a dense CRF (needs ``pip install 'hpseg[crf]'``).
        assignment: cluster → class ids (``-1``: no class) for ``head="cluster"``; ``"auto"``
            takes ``model.assignment`` when the model has one; None returns raw cluster ids.
        amp: mixed precision on CUDA (off by default: results then match the CPU closely).

    The model is moved to ``device`` and put in eval mode.
    """

    source: str | None = None  #: the checkpoint path, when built by :meth:`from_checkpoint`

    def __init__(
        self,
        model: Any,
        *,
        head: str = "cluster",
        device: str | torch.device = "auto",
        window: int | None = None,
        overlap: float = 0.5,
        batch_size: int = 8,
        resolution: int | None = None,
        crf: bool = False,
        assignment: Sequence[int] | str | None = "auto",
        amp: bool = False,
    ) -> None:
        if head not in ("cluster", "linear"):
            raise HPSegError(f"head must be 'cluster' or 'linear', not {head!r}")
        if not 0.0 <= overlap < 1.0:
            raise HPSegError(f"overlap must be in [0, 1), got {overlap}: e.g. 0.5 for half-window overlap")
        if batch_size < 1:
            raise HPSegError(f"batch size must be at least 1, got {batch_size}")
        if resolution is not None and resolution < 1:
            raise HPSegError(f"resolution must be a positive number of pixels, got {resolution}")
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.head = head
        self.patch_size = int(model.backbone.patch_size)
        win = _training_resolution(model) if window is None else int(window)
        if win < self.patch_size:
            raise HPSegError(
                f"window {win} is smaller than the patch size {self.patch_size}: use a larger --window"
            )
        self.window = win - win % self.patch_size
        self.overlap = float(overlap)
        self.batch_size = int(batch_size)
        self.resolution = resolution
        self.crf = bool(crf)
        self.amp = bool(amp)
        if self.crf:
            from hpseg.crf import _import_densecrf

            try:
                _import_densecrf()
            except HPSegError as exc:
                raise HPSegError(
                    "--crf needs pydensecrf2: pip install 'hpseg[crf]' (or run without --crf)"
                ) from exc
        self.class_names = [str(n) for n in model.class_names]
        self.n_clusters = int(model.cluster_probe.clusters.shape[0])
        if isinstance(assignment, str):
            if assignment != "auto":
                raise HPSegError(
                    f"assignment must be 'auto', None or a list of class ids, not {assignment!r}"
                )
            assignment = getattr(model, "assignment", None)
        self.assignment: list[int] | None = None
        if head == "cluster" and assignment is not None:
            self.assignment = self._check_assignment(assignment)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        head: str = "cluster",
        device: str | torch.device = "auto",
        window: int | None = None,
        overlap: float = 0.5,
        batch_size: int = 8,
        resolution: int | None = None,
        crf: bool = False,
        backbone: str | None = None,
        assignment: Sequence[int] | str | None = "auto",
        amp: bool = False,
    ) -> Segmenter:
        """A segmenter for an hpseg checkpoint or the authors' ``ckpt.pth``.

        With ``assignment="auto"`` the cluster → class matching saved with the checkpoint
        (``metrics["unsupervised"]["assignment"]`` in ``best.pt``) is used when present; the
        authors' files carry none, so their clusters come out as raw cluster ids.
        """
        from hpseg.model import load_model

        path = Path(path)
        model = load_model(path, backbone=backbone)
        if isinstance(assignment, str) and assignment == "auto":
            stored = _checkpoint_assignment(path)
            assignment = stored if stored is not None else getattr(model, "assignment", None)
        seg = cls(
            model,
            head=head,
            device=device,
            window=window,
            overlap=overlap,
            batch_size=batch_size,
            resolution=resolution,
            crf=crf,
            assignment=assignment,
            amp=amp,
        )
        seg.source = str(path)
        return seg

    def _check_assignment(self, assignment: Sequence[int]) -> list[int]:
        values = [int(a) for a in assignment]
        c = len(self.class_names)
        if len(values) != self.n_clusters or any(a < -1 or a >= c for a in values):
            raise HPSegError(
                f"the cluster assignment must give one class id in [-1, {c}) per cluster ({self.n_clusters}), "
                f"got {values[:8]}…: pass assignment=None for raw cluster ids"
            )
        return values

    # -- what the labels mean -------------------------------------------------------------------
    @property
    def n_labels(self) -> int:
        """Number of label values (excluding :data:`IGNORE`)."""
        if self.head == "cluster" and self.assignment is None:
            return self.n_clusters
        return len(self.class_names)

    @property
    def label_names(self) -> list[str]:
        """The name of each label value ``0..n_labels-1``."""
        if self.head == "cluster" and self.assignment is None:
            return [f"cluster {k}" for k in range(self.n_clusters)]
        return list(self.class_names)

    @property
    def label_meaning(self) -> str:
        """One sentence on what the label values are."""
        if self.head == "linear":
            return "class ids of the linear probe (model.class_names)"
        if self.assignment is not None:
            return (
                "class ids: cluster-probe clusters mapped to classes by the stored assignment "
                f"(Hungarian matching); {IGNORE} (PNG {PNG_IGNORE}) = cluster matched to no class"
            )
        return "raw cluster ids of the cluster probe (no cluster → class assignment known)"

    # -- network --------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-pixel scores ``(B, S, h, w)`` float32 (CPU) of normalised images ``(B, 3, h, w)``."""
        from hpseg.runtime import autocast

        x = batch.to(self.device)
        with autocast(self.device, self.amp):
            feats = self.model.backbone(x, with_attention=False).feats
            code = self.model.head(feats)
        code = F.interpolate(code.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        if self.head == "linear":
            scores = torch.softmax(self.model.linear_probe(code).float(), dim=1)
        else:
            scores = self.model.cluster_probe.cosine(code).float()
        return scores.cpu()

    def _prepare(self, image: Any) -> _Prepared:
        rgb = to_image_tensor(image)
        h, w = int(rgb.shape[1]), int(rgb.shape[2])
        if h < 1 or w < 1:
            raise HPSegError(f"empty image of size {h}×{w}")
        x = rgb
        if self.resolution is not None and min(h, w) != self.resolution:
            scale = self.resolution / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            x = (
                F.interpolate(
                    rgb.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
                )
                .squeeze(0)
                .clamp_(0, 1)
            )
        proc = (int(x.shape[1]), int(x.shape[2]))
        net = _pad_to_multiple(_normalize(x), self.patch_size)
        return _Prepared(rgb=rgb, net=net, size=(h, w), proc=proc)

    def _fits(self, item: _Prepared) -> bool:
        return item.net.shape[1] <= self.window and item.net.shape[2] <= self.window

    def _strips(self, item: _Prepared) -> Iterator[tuple[int, torch.Tensor]]:
        """Blended scores of the padded image by row strips: ``(y0, scores (S, rows, Wp))``,
        in order and covering all rows. Memory: one strip of window height, not the image."""
        img = item.net
        hp, wp = int(img.shape[1]), int(img.shape[2])
        if self._fits(item):
            yield 0, self._forward(img.unsqueeze(0))[0]
            return
        p = self.patch_size
        wh, ww = min(self.window, hp), min(self.window, wp)
        stride = max(p, int(self.window * (1.0 - self.overlap)) // p * p)
        ys, xs = _window_positions(hp, wh, stride), _window_positions(wp, ww, stride)
        windows = [(y, x) for y in ys for x in xs]
        weight = window_weight(wh, ww)
        # every window of a row starts at that row's y: a buffer of window height suffices
        acc: torch.Tensor | None = None  # (S, wh, wp): scores of rows [base, base + wh)
        norm = torch.zeros(wh, wp)
        base = 0
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start : start + self.batch_size]
            scores = self._forward(torch.stack([img[:, y : y + wh, x : x + ww] for y, x in chunk]))
            if acc is None:
                acc = torch.zeros(scores.shape[1], wh, wp)
            for (y, x), s in zip(chunk, scores):
                if y > base:  # rows above y are final: no later window reaches them
                    done = y - base
                    yield base, acc[:, :done] / norm[:done]
                    acc = torch.cat((acc[:, done:], torch.zeros_like(acc[:, :done])), dim=1)
                    norm = torch.cat((norm[done:], torch.zeros_like(norm[:done])), dim=0)
                    base = y
                acc[:, :, x : x + ww] += s * weight
                norm[:, x : x + ww] += weight
        assert acc is not None
        yield base, acc / norm

    def _full_scores(self, item: _Prepared, strips: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Scores ``(S, H, W)`` at the input size (resized back when ``resolution`` was used)."""
        h, w = item.proc
        scores = torch.cat([s for _, s in strips], dim=1)[:, :h, :w]
        if (h, w) != item.size:
            scores = F.interpolate(
                scores.unsqueeze(0), size=item.size, mode="bilinear", align_corners=False
            ).squeeze(0)
        return scores

    def _to_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """Blended scores → logits (log-probabilities for the linear head, α·cos for clusters)."""
        if self.head == "linear":
            return scores.clamp_min(1e-8).log()
        return scores * CLUSTER_ALPHA

    def _labels(
        self, item: _Prepared, strips: Iterator[tuple[int, torch.Tensor]]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(labels, crf_labels)`` at the input size; ``crf_labels`` is None without CRF."""
        crf_raw: np.ndarray | None = None
        if self.crf or item.proc != item.size:
            scores = self._full_scores(item, strips)
            raw = scores.argmax(0).numpy()
            if self.crf:
                from hpseg.crf import dense_crf

                crf_raw = dense_crf(_normalize(item.rgb), self._to_logits(scores)).argmax(0).numpy()
        else:  # argmax strip by strip: never holds the whole score map
            h, w = item.size
            raw = np.empty((h, w), dtype=np.int64)
            for y0, s in strips:
                if y0 >= h:
                    break
                rows = min(s.shape[1], h - y0)
                raw[y0 : y0 + rows] = s[:, :rows, :w].argmax(0).numpy()
        return self._map(raw), None if crf_raw is None else self._map(crf_raw)

    def _map(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.astype(np.int64, copy=False)
        if self.assignment is not None:
            return np.asarray(self.assignment, dtype=np.int64)[raw]
        return raw

    def _grouped(self, items: list[_Prepared]) -> Iterator[tuple[int, Iterator[tuple[int, torch.Tensor]]]]:
        """``(index, strips)`` per item; images that fit in a window are batched by size."""
        singles: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            if self._fits(item):
                singles.setdefault(tuple(item.net.shape[1:]), []).append(i)  # type: ignore[arg-type]
        done: dict[int, torch.Tensor] = {}
        for idx in singles.values():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                out = self._forward(torch.stack([items[i].net for i in part]))
                done.update(zip(part, out))
        for i, item in enumerate(items):
            yield i, iter([(0, done.pop(i))]) if i in done else self._strips(item)

    # -- public ---------------------------------------------------------------------------------
    def predict(self, image: Any) -> np.ndarray:
        """Label map ``(H, W)`` int64 at the input's size (values: :attr:`label_meaning`)."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[Any]) -> list[np.ndarray]:
        """:meth:`predict` for several images (of any sizes); same-size small images share a
        forward pass."""
        return [crf if crf is not None else plain for plain, crf in self._predict_both(images)]

    def _predict_both(self, images: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """``(labels without CRF, labels with CRF or None)`` per image."""
        items = [self._prepare(im) for im in images]
        out: list[tuple[np.ndarray, np.ndarray | None]] = [(np.empty(0), None)] * len(items)
        for i, strips in self._grouped(items):
            out[i] = self._labels(items[i], strips)
        return out

    def predict_proba(self, image: Any) -> np.ndarray:
        """Per-pixel probabilities ``(S, H, W)`` float32 at the input's size.

        ``S = C`` classes for the linear head (blended softmax), ``S = K`` clusters for the
        cluster head (``softmax(2·cos)`` of the blended cosine similarities; clusters are not
        merged into classes). With ``crf=True``, the CRF's output probabilities.
        """
        item = self._prepare(image)
        _, strips = next(self._grouped([item]))
        scores = self._full_scores(item, strips)
        if self.crf:
            from hpseg.crf import dense_crf

            probs = dense_crf(_normalize(item.rgb), self._to_logits(scores))
        elif self.head == "linear":
            probs = scores
        else:
            probs = torch.softmax(scores * CLUSTER_ALPHA, dim=0)
        return probs.numpy().astype(np.float32, copy=False)

    def legend(self) -> dict[str, Any]:
        """Label values, names and palette colours (what ``legend.json`` holds)."""
        from hpseg.evaluate import palette

        pal = palette(max(1, self.n_labels))
        labels = [
            {
                "value": i,
                "name": name,
                "color": [int(c) for c in pal[i]],
                "hex": "#{:02x}{:02x}{:02x}".format(*(int(c) for c in pal[i])),
            }
            for i, name in enumerate(self.label_names)
        ]
        doc: dict[str, Any] = {
            "head": self.head,
            "label_meaning": self.label_meaning,
            "labels": labels,
            "ignore": {
                "value": IGNORE,
                "png_value": PNG_IGNORE,
                "color": [0, 0, 0],
                "meaning": "cluster matched to no class",
            },
            "window": self.window,
            "overlap": self.overlap,
            "resolution": self.resolution,
            "crf": self.crf,
        }
        if self.assignment is not None:
            doc["assignment"] = list(self.assignment)
        if self.source:
            doc["model"] = self.source
        return doc


# ------------------------------------------------------------------------------------------
# files out
# ------------------------------------------------------------------------------------------


def _save_pil(img: Any, path: Path, **kwargs: Any) -> None:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    with atomic_write(path, "wb") as fh:
        img.save(fh, format=fmt, **kwargs)


def save_label_png(labels: np.ndarray, path: str | Path, n_labels: int) -> Path:
    """Write a label map as a palette PNG (mode "P", :func:`hpseg.evaluate.palette` colours).

    Pixel values are the labels, :data:`IGNORE` (and anything outside ``[0, n_labels)``) is
    stored as 255 and drawn black. More than 255 labels: a 16-bit grey PNG (ignore = 65535).
    """
    from PIL import Image

    from hpseg.evaluate import palette

    path = Path(path)
    lab = np.asarray(labels)
    bad = (lab < 0) | (lab >= n_labels)
    if n_labels <= PNG_IGNORE:
        arr = np.where(bad, PNG_IGNORE, lab).astype(np.uint8)
        img = Image.fromarray(arr, mode="P") if _pil_accepts_mode() else Image.fromarray(arr).convert("P")
        pal = np.zeros((256, 3), np.uint8)
        pal[:n_labels] = palette(n_labels)
        img.putpalette(pal.reshape(-1).tolist())
        _save_pil(img, path)
    else:
        log.warning("%d labels do not fit a palette PNG: writing 16-bit grey %s", n_labels, path)
        arr16 = np.where(bad, 65535, lab).astype(np.uint16)
        _save_pil(Image.fromarray(arr16), path)
    return path


def _pil_accepts_mode() -> bool:
    """Pillow ≥ 11.3 deprecates ``Image.fromarray(..., mode=)``; only pass it to older ones."""
    import PIL

    try:
        major, minor = (int(v) for v in PIL.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover
        return False
    return (major, minor) < (11, 3)


def read_label_png(path: str | Path) -> np.ndarray:
    """Labels of a PNG written by :func:`save_label_png` (255 / 65535 → :data:`IGNORE`)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im).astype(np.int64)
        ignore = PNG_IGNORE if im.mode == "P" else 65535
    arr[arr == ignore] = IGNORE
    return arr


def overlay(rgb: np.ndarray, labels: np.ndarray, n_labels: int, alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend the label colours over an image: ``(H,W,3)`` uint8; pixels without a label
    (:data:`IGNORE`) show the image unchanged."""
    from hpseg.evaluate import colorize

    colours = colorize(labels, n_labels).astype(np.float32)
    img = rgb.astype(np.float32)
    blend = (1.0 - alpha) * img + alpha * colours
    valid = ((labels >= 0) & (labels < n_labels))[..., None]
    return np.where(valid, blend, img).round().clip(0, 255).astype(np.uint8)


def save_legend(legend: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """``legend.json`` and ``legend.png`` (a colour swatch and name per label) in ``folder``."""
    from PIL import Image, ImageDraw

    json_path = folder / "legend.json"
    atomic_write_text(json_path, json.dumps(legend, indent=2))
    rows = [*legend["labels"], {"value": IGNORE, "name": "no class (unmatched / ignore)", "color": [0, 0, 0]}]
    row_h, width = 22, 360
    img = Image.new("RGB", (width, row_h * len(rows) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, row in enumerate(rows):
        y = 4 + i * row_h
        draw.rectangle((6, y + 2, 30, y + row_h - 4), fill=tuple(row["color"]), outline=(80, 80, 80))
        value = PNG_IGNORE if row["value"] == IGNORE else row["value"]
        draw.text((38, y + 4), f"{value:>3}  {row['name']}", fill=(0, 0, 0))
    png_path = folder / "legend.png"
    _save_pil(img, png_path)
    return json_path, png_path


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def collect_inputs(inputs: Sequence[str], exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """Image files named by ``inputs`` (files, folders searched recursively, globs), in order.

    Returns ``(file, relative output path without extension)`` pairs: a file's stem, or its
    path below the folder it was found in (subfolders mirrored). Files under ``exclude`` (the
    output folder) are left out; duplicates are listed once.
    """
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    excl = exclude.resolve() if exclude is not None else None

    def add(path: Path, rel: Path) -> None:
        real = path.resolve()
        if real in seen or (excl is not None and excl in real.parents):
            return
        seen.add(real)
        found.append((path, rel.with_suffix("")))

    def add_folder(folder: Path) -> None:
        for f in sorted(p for p in folder.rglob("*") if p.is_file() and _is_image_name(p)):
            add(f, f.relative_to(folder))

    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            add(path, Path(path.name))
        elif glob.has_magic(spec):
            for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    add_folder(mp)
                elif mp.is_file() and _is_image_name(mp):
                    add(mp, Path(mp.name))
        else:
            log.warning("input %s does not exist", spec)
    # two inputs with the same output name (a.jpg + a.png, or the same name in two inputs)
    names: dict[Path, int] = {}
    out: list[tuple[Path, Path]] = []
    for path, rel in found:
        key = rel
        if key in names:
            key = rel.with_name(f"{rel.name}_{path.suffix.lstrip('.').lower()}")
            n = 2
            while key in names:
                key = rel.with_name(f"{rel.name}_{n}")
                n += 1
            log.warning("%s: output name %s is taken, writing %s instead", path, rel, key)
        names[key] = 1
        out.append((path, key))
    return out


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------


@dataclass
class SegmentSummary:
    """What :func:`segment_files` did."""

    written: list[Path]  # label PNGs
    skipped: list[tuple[Path, str]]  # (input, reason)


def segment_files(
    segmenter: Segmenter,
    files: Sequence[tuple[Path, Path]],
    out_dir: Path,
    *,
    write_overlay: bool = True,
    alpha: float = 0.5,
    progress: bool = True,
) -> SegmentSummary:
    """Segment ``(input, relative output path)`` pairs (from :func:`collect_inputs`) into
    ``out_dir``: ``<rel>.png`` labels (palette PNG), ``<rel>_crf.png`` the CRF-refined labels
    when the segmenter uses a CRF, ``<rel>_overlay.jpg`` (of the refined labels with a CRF),
    plus ``legend.json`` / ``legend.png`` and ``skipped.txt`` (inputs that could not be read,
    one ``path<TAB>reason`` per line; removed when none was skipped). Unreadable inputs are
    logged and skipped; every file is written atomically.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    save_legend(segmenter.legend(), out_dir)
    n = segmenter.n_labels
    written: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    bar = tqdm(total=len(files), desc="segment", unit="img", dynamic_ncols=True, disable=not progress)
    try:
        for start in range(0, len(files), segmenter.batch_size):
            batch: list[tuple[Path, Path, torch.Tensor]] = []
            for path, rel in files[start : start + segmenter.batch_size]:
                try:
                    batch.append((path, rel, _read_image_file(path)))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    log.warning("skipping %s (%s)", path, reason)
                    skipped.append((path, reason))
                    bar.update(1)
            if not batch:
                continue
            results = segmenter._predict_both([t for _, _, t in batch])
            for (_, rel, rgb), (lab, lab_crf) in zip(batch, results):
                folder = out_dir / rel.parent
                written.append(save_label_png(lab, folder / f"{rel.name}.png", n))
                if lab_crf is not None:
                    save_label_png(lab_crf, folder / f"{rel.name}_crf.png", n)
                    lab = lab_crf  # the overlay shows the refined map
                if write_overlay:
                    image = (rgb.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
                    _save_pil(
                        Image.fromarray(overlay(image, lab, n, alpha)),
                        folder / f"{rel.name}_overlay.jpg",
                        quality=90,
                    )
                bar.update(1)
    finally:
        bar.close()
    skipped_file = out_dir / "skipped.txt"
    if skipped:
        atomic_write_text(skipped_file, "".join(f"{p}\t{r}\n" for p, r in skipped))
    elif skipped_file.exists():
        skipped_file.unlink()
    return SegmentSummary(written=written, skipped=skipped)


def add_segment_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hpseg segment``."""
    parser.add_argument("model", help="checkpoint: ours (best.pt) or the authors' ckpt.pth")
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders (searched recursively) or quoted globs ('imgs/**/*.jpg')",
    )
    parser.add_argument(
        "--out", required=True, help="output folder (subfolders of folder inputs are mirrored)"
    )
    parser.add_argument(
        "--head",
        choices=("cluster", "linear"),
        default="cluster",
        help="cluster: unsupervised clusters (mapped to classes when the checkpoint stores "
        "the matching); linear: the linear probe's classes (default: cluster)",
    )
    parser.add_argument(
        "--crf", action="store_true", help="refine with a dense CRF (pip install 'hpseg[crf]')"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window size in pixels (default: the model's training resolution)",
    )
    parser.add_argument(
        "--overlap", type=float, default=0.5, help="window overlap fraction in [0, 1) (default 0.5)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="resize the shorter side to this many pixels before predicting (default: as is)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="windows / images per forward pass (default 8)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument(
        "--backbone",
        default=None,
        help="backbone of the authors' ckpt.pth (default: inferred from its weights)",
    )
    parser.add_argument("--no-overlay", action="store_true", help="do not write <name>_overlay.jpg")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="overlay opacity of the labels (default 0.5)"
    )


def segment_command(args: argparse.Namespace) -> int:
    """``hpseg segment``: 0 when at least one image was segmented, 1 when none could be read;
    raises HPSegError (exit 2) when no input matched."""
    out_dir = Path(args.out)
    files = collect_inputs(args.inputs, exclude=out_dir)
    if not files:
        raise HPSegError(
            f"no input images matched {' '.join(args.inputs)}: give image files, folders or globs "
            f"({', '.join(IMAGE_EXTENSIONS)})"
        )
    segmenter = Segmenter.from_checkpoint(
        args.model,
        head=args.head,
        device=args.device,
        window=args.window,
        overlap=args.overlap,
        batch_size=args.batch_size,
        resolution=args.resolution,
        crf=args.crf,
        backbone=args.backbone,
    )
    log.info(
        "segmenting %d images (%s head, window %d px, overlap %.2f); labels: %s",
        len(files),
        segmenter.head,
        segmenter.window,
        segmenter.overlap,
        segmenter.label_meaning,
    )
    summary = segment_files(
        segmenter,
        files,
        out_dir,
        write_overlay=not args.no_overlay,
        alpha=args.alpha,
        progress=sys.stderr.isatty(),
    )
    done = len(files) - len(summary.skipped)
    print(f"segmented {done} image(s) into {out_dir} (labels: {segmenter.label_meaning}; legend.json)")
    if summary.skipped:
        print(
            f"skipped {len(summary.skipped)} unreadable file(s), listed in {out_dir / 'skipped.txt'}:",
            file=sys.stderr,
        )
        for path, reason in summary.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    if done == 0:
        print("error: none of the inputs could be read as an image", file=sys.stderr)
        return 1
    return 0
