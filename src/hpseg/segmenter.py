"""Apply a trained model to images of any size: :class:`Segmenter` and the batch writer.

Inference on one image:

1. the image (PIL, numpy ``(H,W,3)`` uint8 or float in [0, 1], tensor ``(3,H,W)`` in [0, 1], or
   a file path) is converted to RGB float and resized so that its shorter side is the working
   ``resolution`` (default ``"auto"``: the model's evaluation resolution, as in evaluation;
   ``None`` keeps the native size), ImageNet-normalised and padded (reflect) on the
   bottom/right to a multiple of the patch size;
2. if it fits in a ``window × window`` square it is predicted in one pass; otherwise windows of
   ``window`` pixels (default: the model's training resolution) slide over it with the given
   ``overlap``, and the windows' per-pixel scores are blended with a smooth (Hann) weight that
   is positive everywhere, so no pixel is left without a score;
3. scores are cropped to the (resized) image, upsampled back to the input size when resized,
   optionally refined by a dense CRF, and the argmax gives the label map at the input's size.

Scores come from :meth:`hpseg.model.HPModel.scores`, the model's one inference path:
``head="linear"``: softmax of the linear probe's logits over the C classes; ``head="cluster"``:
cosine similarity to each of the K centroids.

Label values (:attr:`Segmenter.label_names`):

* ``head="linear"``: class ids ``0..C-1`` (``model.class_names``);
* ``head="cluster"`` with cluster names (``hpseg name``): one label per distinct name, in the
  order the names first appear (clusters given the same name share a label);
* ``head="cluster"`` with a cluster → class assignment (stored by ``hpseg train`` in ``best.pt``,
  the Hungarian matching on the validation set): class ids ``0..C-1``, ``-1`` for clusters
  matched to no class;
* ``head="cluster"`` otherwise: raw cluster ids ``0..K-1``.

Label PNGs store the same values with ``-1`` written as 255 (black in the palette).

Memory follows the window, not the image: 8-bit inputs stay 8-bit until a window (or the
resized image) is taken from them, the resize to the working resolution runs by chunks of rows
(:func:`resize_rows`: the same numbers as one antialiased resize), and scores are upsampled back
and turned into labels (and overlays) a chunk of rows at a time. A 20,480×2,880 panorama needs
about its own size in bytes several times over (the decoded image, the ``int64`` label map), not
gigabytes of float copies. With ``crf=True`` and in :meth:`Segmenter.predict_proba` the full
score map is made (the CRF and the caller need it).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError, UnreadableFileError
from hpseg.imaging import as_rgb, normalize, open_rgb, pad_to_multiple, to_image_tensor
from hpseg.io import atomic_write_text
from hpseg.model import HPModel
from hpseg.runtime import Runtime
from hpseg.viz import (
    IGNORE,
    PNG_IGNORE,
    hex_colour,
    overlay,
    palette,
    save_image,
    save_label_png,
    save_legend,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_HEAD", "SegmentSummary", "Segmenter", "eval_resolution", "segment_files", "train_resolution"]

#: the head ``hpseg segment`` and ``hpseg export`` use unless told otherwise (unsupervised clusters)
DEFAULT_HEAD = "cluster"
#: temperature turning cluster cosine similarities into probabilities (as evaluation's CRF)
CLUSTER_ALPHA = 2.0
#: floor added to the Hann blending weight, so that every pixel of a window counts a little
_WEIGHT_FLOOR = 1e-3
#: images cut into more windows than this get a progress bar of their own
_WINDOW_BAR = 16
#: values (rows × width × channels) per chunk of full-resolution work (resizing, upsampling
#: scores, overlays): a few such float chunks are the working memory beyond the image itself
_CHUNK_VALUES = 1 << 20


def _chunk_rows(width: int, channels: int) -> int:
    """Rows per chunk of an image ``width`` pixels wide with ``channels`` values per pixel."""
    return max(1, _CHUNK_VALUES // max(1, width * channels))


def _config_int(model: HPModel, key: str) -> int | None:
    data = (model.config or {}).get("data")
    value = data.get(key) if isinstance(data, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def train_resolution(model: HPModel) -> int:
    """The model's training resolution: ``config.data.resolution``, else its position grid."""
    return _config_int(model, "resolution") or int(model.spec.arch.pos_grid[0]) * int(model.spec.arch.patch_size)


def eval_resolution(model: HPModel) -> int:
    """The model's evaluation resolution: ``config.data.eval_resolution``, else the training one."""
    return _config_int(model, "eval_resolution") or train_resolution(model)


def _window_positions(size: int, win: int, stride: int) -> list[int]:
    """Start offsets of windows of ``win`` covering ``[0, size)``; the last one ends at ``size``."""
    if size <= win:
        return [0]
    pos = list(range(0, size - win, stride))
    pos.append(size - win)
    return pos


def window_weight(h: int, w: int) -> torch.Tensor:
    """The blending weight of a ``h × w`` window: separable Hann plus a small floor, ``(h, w)``."""

    def hann(n: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float64)
        return (0.5 - 0.5 * torch.cos(2 * math.pi * (i + 0.5) / n)).float()

    return torch.outer(hann(h), hann(w)) + _WEIGHT_FLOOR


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 or float ``(..., 3, H, W)`` → float in [0, 1] (a new tensor for uint8)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def image_pixels(image: Any) -> torch.Tensor:
    """An image as ``(3, H, W)`` RGB: **uint8** for 8-bit sources (files, PIL images, uint8
    arrays and tensors), float in [0, 1] otherwise (:func:`hpseg.imaging.to_image_tensor`); a
    large photo is never copied to floats whole."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = open_rgb(image)
    if isinstance(image, Image.Image):
        image = np.array(as_rgb(image), dtype=np.uint8)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        with warnings.catch_warnings():  # shared, not copied, even when read-only: the pixels are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(image).permute(2, 0, 1)
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image.detach().cpu()
    return to_image_tensor(image)


def resize_rows(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of ``(3, H, W)`` (uint8 or float) to float ``(3, h, w)`` in
    [0, 1]: the width by chunks of rows, then the height of the narrowed image. The same numbers
    as ``F.interpolate(x, size, mode="bilinear", antialias=True)`` (which is separable), without
    a float copy of the full-size image."""
    rows, step = int(x.shape[1]), _chunk_rows(int(x.shape[2]), 3)
    narrow = torch.cat([
        F.interpolate(_unit(x[:, r : r + step]).unsqueeze(0), size=(min(step, rows - r), size[1]),
                      mode="bilinear", align_corners=False, antialias=True)[0]
        for r in range(0, rows, step)], dim=1)
    return F.interpolate(narrow.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


def upsample_rows(scores: torch.Tensor, size: tuple[int, int]) -> Iterator[tuple[int, torch.Tensor]]:
    """Bilinear upsampling (``align_corners=False``) of scores ``(S, h, w)`` to ``(S, H, W)`` by
    chunks of output rows: ``(first row, (S, rows, W))``. Equal, up to float rounding, to one
    ``F.interpolate`` of the whole map, which would hold ``S × H × W`` floats at once."""
    sh = int(scores.shape[1])
    height, width = size
    scale = torch.tensor(sh / height, dtype=torch.float32)
    step = _chunk_rows(width, int(scores.shape[0]))
    for y0 in range(0, height, step):
        ys = torch.arange(y0, min(height, y0 + step), dtype=torch.float32)
        src = ((ys + 0.5) * scale - 0.5).clamp_min(0.0)
        i0 = src.long().clamp_max(sh - 1)
        i1 = (i0 + 1).clamp_max(sh - 1)
        l1 = (src - i0.float()).view(1, -1, 1)
        lo, hi = int(i0.min()), int(i1.max()) + 1
        wide = F.interpolate(scores[None, :, lo:hi], size=(hi - lo, width), mode="bilinear",
                             align_corners=False)[0]  # the needed source rows, at full width
        yield y0, wide[:, i0 - lo] * (1.0 - l1) + wide[:, i1 - lo] * l1


@dataclass
class _Prepared:
    """One image ready for the network (8-bit inputs stay uint8 until a window is taken)."""

    rgb: torch.Tensor  # (3, H, W) uint8 or float in [0, 1], input size
    net: torch.Tensor  # (3, Hp, Wp) uint8 or float in [0, 1], resized, padded (normalised per window)
    size: tuple[int, int]  # input size (H, W)
    proc: tuple[int, int]  # resized size before padding


class Segmenter:
    """Image-level inference with an :class:`~hpseg.model.HPModel`.

    Args:
        model: the model (moved to the device, eval mode).
        head: ``"cluster"`` (unsupervised clusters; see the module docstring for their labels)
            or ``"linear"`` (the linear probe's classes).
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``… or a ``torch.device``.
        window: sliding-window size in pixels (rounded down to a multiple of the patch size);
            default: the model's training resolution. Images that fit are predicted whole.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows (or same-size images) per forward pass.
        resolution: working resolution of the shorter side: ``"auto"`` (the model's evaluation
            resolution), a number of pixels, or None (native size). Label maps always come back
            at the input's size.
        crf: refine the scores with a dense CRF (needs ``pip install 'hpseg[crf]'``).
        assignment: cluster → class ids (``-1``: no class) for ``head="cluster"``; ``"auto"``
            takes the model's (stored with the checkpoint); None gives raw cluster ids.
        amp: mixed precision on CUDA (off by default: results then match the CPU closely).
        progress: show a progress bar over the windows of large images.
    """

    source: str | None = None  #: the checkpoint path, when built by :meth:`from_checkpoint`

    def __init__(
        self,
        model: HPModel,
        *,
        head: str = DEFAULT_HEAD,
        device: str | torch.device = "auto",
        window: int | None = None,
        overlap: float = 0.5,
        batch_size: int = 8,
        resolution: int | str | None = "auto",
        crf: bool = False,
        assignment: Sequence[int] | str | None = "auto",
        amp: bool = False,
        progress: bool = False,
    ) -> None:
        if head not in ("cluster", "linear"):
            raise HPSegError(f"head must be 'cluster' or 'linear', not {head!r}")
        if not 0.0 <= overlap < 1.0:
            raise HPSegError(f"overlap must be in [0, 1), got {overlap}: e.g. 0.5 for half-window overlap")
        if batch_size < 1:
            raise HPSegError(f"batch size must be at least 1, got {batch_size}")
        if resolution == "auto":
            resolution = eval_resolution(model)
        if resolution is not None and (isinstance(resolution, str) or int(resolution) < 1):
            raise HPSegError(f"resolution must be a positive number of pixels, 'auto' or None, got {resolution!r}")
        self.runtime = Runtime.create(device, "auto" if amp else "fp32")
        self.model = model.to(self.runtime.device).eval()
        self.head = head
        self.patch_size = int(model.backbone.patch_size)
        win = train_resolution(model) if window is None else int(window)
        if win < self.patch_size:
            raise HPSegError(f"window {win} is smaller than the patch size {self.patch_size}: use a larger --window")
        self.window = win - win % self.patch_size
        self.overlap, self.batch_size = float(overlap), int(batch_size)
        self.resolution = None if resolution is None else int(resolution)
        self.crf, self.progress = bool(crf), bool(progress)
        if self.crf:
            from hpseg.crf import require_crf

            require_crf()
        self.class_names = list(model.class_names)
        self.n_clusters = model.n_clusters
        self.cluster_names = model.cluster_names if head == "cluster" else None
        if isinstance(assignment, str):
            if assignment != "auto":
                raise HPSegError(f"assignment must be 'auto', None or a list of class ids, not {assignment!r}")
            assignment = model.assignment
        self.assignment: list[int] | None = None
        if self.cluster_names is not None:
            unique = list(dict.fromkeys(self.cluster_names))
            self.assignment = [unique.index(n) for n in self.cluster_names]
        elif head == "cluster" and assignment is not None:
            self.assignment = self._check_assignment(assignment)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, backbone: str | None = None, **kwargs: Any) -> Segmenter:
        """A segmenter for an hpseg checkpoint or run folder, or the authors' ``ckpt.pth`` (keyword arguments as
        for the constructor). The checkpoint's cluster names or cluster → class assignment are
        used when present; the authors' files carry neither (raw cluster ids)."""
        from hpseg.checkpoint import load_model, resolve_checkpoint

        path = resolve_checkpoint(path)  # a run folder: its best.pt
        seg = cls(load_model(path, backbone=backbone), **kwargs)
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
    def label_names(self) -> list[str]:
        """The name of each label value ``0..n_labels-1``."""
        if self.cluster_names is not None:
            return list(dict.fromkeys(self.cluster_names))
        if self.head == "cluster" and self.assignment is None:
            return [f"cluster {k}" for k in range(self.n_clusters)]
        return list(self.class_names)

    @property
    def n_labels(self) -> int:
        """Number of label values (excluding :data:`~hpseg.viz.IGNORE`)."""
        return len(self.label_names)

    @property
    def has_no_class(self) -> bool:
        """Whether a pixel may get :data:`~hpseg.viz.IGNORE` (a cluster matched to no class)."""
        return (self.head == "cluster" and self.cluster_names is None and self.assignment is not None
                and IGNORE in self.assignment)

    @property
    def label_meaning(self) -> str:
        """One sentence on what the label values are."""
        if self.head == "linear":
            return "class ids of the linear probe (model.class_names)"
        if self.cluster_names is not None:
            return "named clusters of the cluster probe (hpseg name); clusters with one name share a label"
        if self.assignment is not None:
            return ("class ids: cluster-probe clusters mapped to classes by the stored assignment "
                    f"(Hungarian matching); {IGNORE} (PNG {PNG_IGNORE}) = cluster matched to no class")
        return "raw cluster ids of the cluster probe (no cluster → class assignment known)"

    # -- network --------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Per-pixel scores ``(B, S, h, w)`` float32 (CPU) of normalised images ``(B, 3, h, w)``."""
        x = batch.to(self.runtime.device)
        with self.runtime.autocast():
            scores = self.model.scores(x, heads=(self.head,))[self.head]
        return (torch.softmax(scores, dim=1) if self.head == "linear" else scores).float().cpu()

    def _prepare(self, image: Any) -> _Prepared:
        rgb = image_pixels(image)
        h, w = int(rgb.shape[1]), int(rgb.shape[2])
        if h < 1 or w < 1:
            raise HPSegError(f"empty image of size {h}×{w}")
        x = rgb
        if self.resolution is not None and min(h, w) != self.resolution:
            scale = self.resolution / min(h, w)
            x = resize_rows(rgb, (max(1, round(h * scale)), max(1, round(w * scale))))
        proc = (int(x.shape[1]), int(x.shape[2]))
        # reflect padding commutes with the per-channel normalisation done per window
        return _Prepared(rgb=rgb, net=pad_to_multiple(x, self.patch_size), size=(h, w), proc=proc)

    def _fits(self, item: _Prepared) -> bool:
        return item.net.shape[1] <= self.window and item.net.shape[2] <= self.window

    def _strips(self, item: _Prepared) -> Iterator[tuple[int, torch.Tensor]]:
        """Blended scores of the padded image by row strips: ``(y0, scores (S, rows, Wp))``,
        in order and covering all rows. Memory: one strip of window height, not the image."""
        img = item.net
        hp, wp = int(img.shape[1]), int(img.shape[2])
        if self._fits(item):
            yield 0, self._forward(normalize(_unit(img.unsqueeze(0))))[0]
            return
        p = self.patch_size
        wh, ww = min(self.window, hp), min(self.window, wp)
        stride = max(p, int(self.window * (1.0 - self.overlap)) // p * p)
        windows = [(y, x) for y in _window_positions(hp, wh, stride) for x in _window_positions(wp, ww, stride)]
        weight = window_weight(wh, ww)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc="windows", unit="win", leave=False,
                   disable=not self.progress or len(windows) <= _WINDOW_BAR)
        acc: torch.Tensor | None = None  # (S, wh, wp): scores of rows [base, base + wh)
        norm = torch.zeros(wh, wp)
        base = 0
        try:
            for start in range(0, len(windows), self.batch_size):
                chunk = windows[start : start + self.batch_size]
                scores = self._forward(normalize(_unit(torch.stack([img[:, y : y + wh, x : x + ww] for y, x in chunk]))))
                bar.update(len(chunk))
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
        finally:
            bar.close()
        assert acc is not None
        yield base, acc / norm

    def _full_scores(self, item: _Prepared, strips: Iterator[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Scores ``(S, H, W)`` at the input size (resized back when a working resolution was used)."""
        h, w = item.proc
        scores = torch.cat([s for _, s in strips], dim=1)[:, :h, :w]
        if (h, w) != item.size:
            scores = F.interpolate(scores.unsqueeze(0), size=item.size, mode="bilinear", align_corners=False)[0]
        return scores

    def _to_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """Blended scores → logits (log-probabilities for the linear head, α·cos for clusters)."""
        return scores.clamp_min(1e-8).log() if self.head == "linear" else scores * CLUSTER_ALPHA

    def _labels(self, item: _Prepared, strips: Iterator[tuple[int, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray | None]:
        """``(labels, crf_labels)`` at the input size; ``crf_labels`` is None without CRF. Without
        CRF the labels are made a chunk of rows at a time: the full-size score map never exists."""
        if self.crf:
            from hpseg.crf import dense_crf

            scores = self._full_scores(item, strips)
            crf_raw = dense_crf(normalize(_unit(item.rgb)), self._to_logits(scores)).argmax(0).numpy()
            return self._map(scores.argmax(0).numpy()), self._map(crf_raw)
        h, w = item.size
        labels = np.empty((h, w), dtype=np.int64)
        rows_of_scores: Iterator[tuple[int, torch.Tensor]] = strips
        if item.proc != item.size:  # scores at the working resolution, upsampled back by chunks
            ph, pw = item.proc
            rows_of_scores = upsample_rows(torch.cat([s for _, s in strips], dim=1)[:, :ph, :pw], item.size)
        for y0, s in rows_of_scores:
            if y0 >= h:
                break
            rows = min(s.shape[1], h - y0)
            labels[y0 : y0 + rows] = self._map(s[:, :rows, :w].argmax(0).numpy())
        return labels, None

    def _map(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.astype(np.int64, copy=False)
        return np.asarray(self.assignment, dtype=np.int64)[raw] if self.assignment is not None else raw

    def _grouped(self, items: list[_Prepared]) -> Iterator[tuple[int, Iterator[tuple[int, torch.Tensor]]]]:
        """``(index, strips)`` per item; images that fit in a window are batched by size (and dtype)."""
        singles: dict[tuple[int | str, ...], list[int]] = {}
        for i, item in enumerate(items):
            if self._fits(item):
                singles.setdefault((*item.net.shape[1:], str(item.net.dtype)), []).append(i)
        done: dict[int, torch.Tensor] = {}
        for idx in singles.values():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                done.update(zip(part, self._forward(normalize(_unit(torch.stack([items[i].net for i in part]))))))
        for i, item in enumerate(items):
            yield i, iter([(0, done.pop(i))]) if i in done else self._strips(item)

    # -- public ---------------------------------------------------------------------------------
    def predict(self, image: Any) -> np.ndarray:
        """Label map ``(H, W)`` int64 at the input's size (values: :attr:`label_meaning`).

        ``image``: a path, PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor of **raw RGB**
        (uint8, or float in [0, 1]; normalised here). ImageNet-normalised or 0–255 float input
        is refused (:class:`~hpseg.errors.HPSegError`); :meth:`HPModel.scores` takes normalised batches."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[Any]) -> list[np.ndarray]:
        """:meth:`predict` for several images (of any sizes); same-size small images share a pass."""
        return [crf if crf is not None else plain for plain, crf in self.predict_both(images)]

    def predict_both(self, images: Sequence[Any]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """``(labels without CRF, labels with CRF or None)`` per image."""
        items = [self._prepare(im) for im in images]
        out: list[tuple[np.ndarray, np.ndarray | None]] = [(np.empty(0), None)] * len(items)
        for i, strips in self._grouped(items):
            out[i] = self._labels(items[i], strips)
        return out

    def predict_proba(self, image: Any) -> np.ndarray:
        """Per-pixel probabilities ``(S, H, W)`` float32 at the input's size: the blended softmax
        (linear head) or ``softmax(2·cos)`` over the K clusters (cluster head; clusters are not
        merged into classes); with ``crf=True`` the CRF's output probabilities."""
        item = self._prepare(image)
        _, strips = next(self._grouped([item]))
        scores = self._full_scores(item, strips)
        if self.crf:
            from hpseg.crf import dense_crf

            probs = dense_crf(normalize(_unit(item.rgb)), self._to_logits(scores))
        else:
            probs = scores if self.head == "linear" else torch.softmax(scores * CLUSTER_ALPHA, dim=0)
        return probs.numpy().astype(np.float32, copy=False)

    def legend(self) -> dict[str, Any]:
        """Label values, names and palette colours (what ``legend.json`` holds)."""
        pal = palette(max(1, self.n_labels))
        doc: dict[str, Any] = {
            "head": self.head,
            "label_meaning": self.label_meaning,
            "labels": [{"value": i, "name": name, "color": [int(c) for c in pal[i]], "hex": hex_colour(pal[i])}
                       for i, name in enumerate(self.label_names)],
            "window": self.window, "overlap": self.overlap, "resolution": self.resolution, "crf": self.crf,
        }
        if self.has_no_class:  # only then can a pixel carry it
            doc["ignore"] = {"value": IGNORE, "png_value": PNG_IGNORE, "color": [0, 0, 0],
                             "meaning": "cluster matched to no class"}
        if self.assignment is not None:
            doc["assignment"] = list(self.assignment)
        if self.source:
            doc["model"] = self.source
        return doc


# ------------------------------------------------------------------------------------------
# many files
# ------------------------------------------------------------------------------------------


#: pixels of the images read ahead into one batch of :func:`segment_files`
_BATCH_PIXELS = 1 << 24


def _write_overlay(rgb: np.ndarray, labels: np.ndarray, n_labels: int, alpha: float, path: Path) -> None:
    """The overlay JPEG of ``(H, W, 3)`` uint8 and ``(H, W)`` labels, blended by chunks of rows
    (no float copy of a large image)."""
    blended, step = np.empty_like(rgb), _chunk_rows(rgb.shape[1], 3)
    for r in range(0, rgb.shape[0], step):
        blended[r : r + step] = overlay(rgb[r : r + step], labels[r : r + step], n_labels, alpha)
    save_image(blended, path, quality=90)


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
    """Segment ``(input, relative output path)`` pairs (from :func:`hpseg.imaging.collect_inputs`)
    into ``out_dir``: ``<rel>.png`` labels (palette PNG), ``<rel>_crf.png`` the CRF-refined labels
    when the segmenter uses a CRF, ``<rel>_overlay.jpg`` (of the refined labels with a CRF), plus
    ``legend.json`` / ``legend.png`` and ``skipped.txt`` (inputs that could not be read, one
    ``path<TAB>reason`` per line; removed when none was skipped). Every file is written atomically.
    """
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    save_legend(segmenter.legend(), out_dir)
    n = segmenter.n_labels
    written: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    bar = tqdm(total=len(files), desc="segment", unit="img", dynamic_ncols=True, disable=not progress)

    def write(batch: list[tuple[Path, np.ndarray]]) -> None:
        results = segmenter.predict_both([t for _, t in batch])
        for i, (rel, rgb) in enumerate(batch):
            lab, lab_crf = results[i]
            results[i] = (np.empty(0), None)  # only this image's maps stay alive
            folder = out_dir / rel.parent
            written.append(save_label_png(lab, folder / f"{rel.name}.png", n))
            if lab_crf is not None:
                save_label_png(lab_crf, folder / f"{rel.name}_crf.png", n)
                lab = lab_crf  # the overlay shows the refined map
            del lab_crf
            if write_overlay:  # labels as int16 from here: the int64 map is let go
                lab = lab.astype(np.int16) if n < 2**15 else lab
                _write_overlay(rgb, lab, n, alpha, folder / f"{rel.name}_overlay.jpg")
            bar.update(1)

    try:
        batch: list[tuple[Path, np.ndarray]] = []
        for path, rel in files:
            try:
                batch.append((rel, np.asarray(open_rgb(path), dtype=np.uint8)))  # read-only, not copied
            except UnreadableFileError as exc:
                log.warning("skipping %s (%s)", path, exc)
                skipped.append((path, str(exc)))
                bar.update(1)
                continue
            # a batch shares forward passes of small images; large ones go (nearly) alone
            if len(batch) >= segmenter.batch_size or sum(im.shape[0] * im.shape[1] for _, im in batch) >= _BATCH_PIXELS:
                write(batch)
                batch = []
        write(batch)
    finally:
        bar.close()
    skipped_file = out_dir / "skipped.txt"
    if skipped:
        atomic_write_text(skipped_file, "".join(f"{p}\t{r}\n" for p, r in skipped))
    elif skipped_file.exists():
        skipped_file.unlink()
    return SegmentSummary(written=written, skipped=skipped)
