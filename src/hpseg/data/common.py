"""Shared pieces of the dataset readers: file reading, label look-up tables, the base class.

Every reader in :mod:`hpseg.data` derives from :class:`SegmentationDataset`. A subclass only says
how many images it has, what each one is called and how to *load* image ``i`` at full size
(:meth:`SegmentationDataset.load`: a PIL RGB image plus an ``int64`` label array whose
ignore value is −1, or ``None`` when the dataset has no labels). The base class applies the
train/eval transforms of :mod:`hpseg.data.transforms` and returns the item dictionary of the
``hpseg.data`` contract (``img``, ``label``, ``img_aug`` in training, ``index``, ``name``).
:func:`hpseg.data.prepare.prepare_five_crop` reads the same full-size :meth:`load` output.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from hpseg.data.transforms import SegmentationTransform
from hpseg.errors import HPSegError, UnreadableFileError
from hpseg.imaging import open_rgb as read_image

IGNORE_INDEX = -1
"""Label value of pixels that count for no class (in memory; on disk the datasets differ)."""

DOCS_HINT = "see docs/datasets.md"

# Decoding errors PIL and numpy raise for damaged files (truncated data, bad headers, ...).
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError)


@functools.lru_cache(maxsize=1)
def label_maps() -> dict[str, Any]:
    """The label conversions and class names shipped as ``hpseg/data/label_maps.json``.

    Keys ``"cocostuff27"``, ``"cityscapes27"``, ``"potsdam3"``; each holds ``class_names`` and
    either ``fine_to_coarse`` (string keys) + ``ignore_fine`` or ``label_id_offset``.
    """
    text = resources.files("hpseg.data").joinpath("label_maps.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def class_names_of(dataset: str) -> list[str]:
    """Class names of one of the fixed-class datasets (a fresh list)."""
    return list(label_maps()[dataset]["class_names"])


def lookup_table(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A ``(size,)`` int64 table sending each key of ``mapping`` to its value, all else to −1."""
    table = np.full(size, IGNORE_INDEX, dtype=np.int64)
    for fine, coarse in mapping.items():
        if 0 <= int(fine) < size:
            table[int(fine)] = int(coarse)
    return table


def apply_lookup(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Map an integer label array through ``table``; values outside the table become −1."""
    values = values.astype(np.int64, copy=False)
    inside = (values >= 0) & (values < len(table))
    out = np.full(values.shape, IGNORE_INDEX, dtype=np.int64)
    out[inside] = table[values[inside]]
    return out


def read_label_png(path: str | Path) -> np.ndarray:
    """Decode a single-channel label image into an ``(H, W)`` int64 array of its raw values.

    Palette (``P``) images give their palette indices, as the official annotations intend.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError.for_file(path, "label file not found")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except _READ_ERRORS as err:
        raise UnreadableFileError.for_file(path, f"{type(err).__name__}: {err}",
                                          "replace it with a readable copy of the label") from err
    if arr.ndim != 2:
        raise HPSegError(
            f"label file {path} has mode {mode} with {arr.shape[-1]} channels: labels must be "
            "single-channel PNGs of class indices (mode L, P or I), one value per pixel"
        )
    return arr.astype(np.int64)


def check_label_size(image: Image.Image, label: np.ndarray, label_path: str | Path) -> None:
    """Raise :class:`HPSegError` if the ``(H, W)`` label does not match the image's size."""
    h, w = label.shape
    if (w, h) != image.size:
        raise HPSegError(
            f"label {label_path} is {w}x{h} (WxH) but its image is {image.size[0]}x{image.size[1]}: "
            "labels must have their image's size; re-export the label or fix the pairing"
        )


def find_dataset_dir(root: str | Path | None, folder: str, marker: str, dataset: str) -> Path:
    """Locate a dataset's folder under ``root``.

    ``root/<folder>`` is STEGO's layout (one root holding several datasets); ``root`` itself
    is accepted too when it already is the dataset's folder (the HP authors' ``data_path``).
    ``marker`` is a path relative to the dataset folder whose presence identifies it.
    """
    if root is None:
        raise HPSegError(
            f"no data root given for {dataset}: set data.root=DIR (the folder that holds '{folder}/')"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HPSegError(
            f"data root {root} does not exist: set data.root to the folder that holds '{folder}/' ({DOCS_HINT})"
        )
    for candidate in (root / folder, root):
        if (candidate / marker).exists():
            return candidate
    raise HPSegError(
        f"{dataset} not found: expected {root / folder / marker} (the official layout under data.root); "
        f"{DOCS_HINT}"
    )


def read_list(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file (an image-id list)."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


class SegmentationDataset(Dataset):
    """Base class: full-size loading by the subclass, transforms and the item dict here.

    Args:
        mode: ``"train"`` (adds ``img_aug``) or ``"eval"``.
        resolution: side of the square output crop (pixels).
        interpolation: image resampling, ``"bilinear"`` (default), ``"bicubic"`` or
            ``"nearest"`` (the authors' loaders resize images with nearest neighbour).
        aug_on_normalized: apply the photometric augmentation after normalisation, as the
            authors' code does (see :class:`hpseg.data.transforms.SegmentationTransform`).

    Subclasses set ``class_names`` and implement ``__len__``, :meth:`name` and :meth:`load`.
    """

    class_names: list[str]

    def __init__(
        self,
        mode: str = "eval",
        resolution: int = 320,
        *,
        interpolation: str = "bilinear",
        aug_on_normalized: bool = False,
    ) -> None:
        self.mode = mode
        self.resolution = resolution
        self.transform = SegmentationTransform(
            mode, resolution, interpolation=interpolation, aug_on_normalized=aug_on_normalized
        )

    @property
    def n_classes(self) -> int:
        """Number of classes (labels are in ``[0, n_classes)`` or −1)."""
        return len(self.class_names)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def name(self, index: int) -> str:  # pragma: no cover - abstract
        """A short identifier of image ``index`` (its id or relative path without suffix)."""
        raise NotImplementedError

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:  # pragma: no cover - abstract
        """Image ``index`` at full size: (RGB image, ``(H, W)`` int64 labels with −1 = ignore, or None)."""
        raise NotImplementedError

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return index

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        image, label = self.load(index)
        item: dict[str, Any] = self.transform(image, label)
        item["index"] = index
        item["name"] = self.name(index)
        return item

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={len(self)}, n_classes={self.n_classes}, mode={self.mode!r}, "
            f"resolution={self.resolution})"
        )


class LabelledFilesDataset(SegmentationDataset):
    """A dataset of image files with label PNGs beside them, labels mapped through a lookup table.

    Subclasses fill ``ids``, ``image_files``, ``label_files`` (same order) and ``_table``
    (a ``(256,)`` int64 table from on-disk label values to classes, −1 = ignore).
    """

    ids: list[str]
    image_files: list[Path]
    label_files: list[Path]
    _table: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, index: int) -> str:
        return self.ids[index]

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        image = read_image(self.image_files[index])
        raw = read_label_png(self.label_files[index])
        check_label_size(image, raw, self.label_files[index])
        return image, apply_lookup(self._table, raw)

