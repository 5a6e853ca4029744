"""Datasets: COCO-Stuff-27, Cityscapes-27, Potsdam-3, their five-crop sets, image folders, synthetic.

Every dataset returns dict items (the ``hpseg.data`` contract, ``docs/DEVELOPING.md``)::

    {"img": (3, R, R) float32 ImageNet-normalised, "label": (R, R) int64 (−1 = ignore),
     "img_aug": (3, R, R) float32 (mode="train" only), "index": int, "name": str}

and has ``class_names: list[str]``, ``n_classes: int`` and ``len()``. Layouts on disk are
described in each module's docstring and in ``docs/datasets.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from hpseg.config import DATASETS
from hpseg.data.cityscapes import Cityscapes27
from hpseg.data.cocostuff import CocoStuff27
from hpseg.data.common import (
    IGNORE_INDEX,
    SegmentationDataset,
    UnreadableFileError,
    class_names_of,
    label_maps,
)
from hpseg.data.folder import FolderDataset
from hpseg.data.potsdam import Potsdam3
from hpseg.data.prepare import CroppedDataset, cropped_dir, prepare_five_crop
from hpseg.data.sampler import EpochSampler, SeededItems
from hpseg.data.transforms import (
    SegmentationTransform,
    check_mode,
    normalize,
    photometric_augmentation,
)
from hpseg.errors import HPSegError
from hpseg.imaging import IMAGENET_MEAN, IMAGENET_STD, denormalize

#: every dataset hpseg reads (the one list, :data:`hpseg.config.DATASETS`)
DATASET_NAMES = DATASETS

_FIXED: dict[str, Callable[..., SegmentationDataset]] = {
    "cocostuff27": CocoStuff27,
    "cityscapes27": Cityscapes27,
    "potsdam3": Potsdam3,
}
# Options every real dataset understands (passed to the reader / transform).
_COMMON_OPTIONS = ("interpolation", "aug_on_normalized")
_FOLDER_OPTIONS = ("n_classes", "class_names", "label_dir", "label_suffix", "max_skipped_fraction")

__all__ = [
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Cityscapes27",
    "CocoStuff27",
    "CroppedDataset",
    "EpochSampler",
    "FolderDataset",
    "Potsdam3",
    "SegmentationDataset",
    "SeededItems",
    "SegmentationTransform",
    "UnreadableFileError",
    "build_dataset",
    "cropped_dir",
    "dataset_class_names",
    "denormalize",
    "label_maps",
    "normalize",
    "photometric_augmentation",
    "prepare_five_crop",
]


def _take_options(dataset: str, kwargs: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """Split ``kwargs`` into the options ``allowed`` for ``dataset``; unset (None/False) others are dropped."""
    taken = {k: v for k, v in kwargs.items() if k in allowed}
    unknown = sorted(k for k, v in kwargs.items() if k not in allowed and v is not None and v is not False)
    if unknown:
        raise HPSegError(
            f"option {unknown[0]}={kwargs[unknown[0]]!r} does not apply to dataset {dataset}: remove it"
        )
    return taken


def build_dataset(
    dataset: str,
    root: str | Path | None,
    split: str,
    *,
    mode: str,
    resolution: int,
    **kwargs: Any,
) -> Dataset:
    """Build one of :data:`DATASET_NAMES`.

    Args:
        dataset: ``"cocostuff27"``, ``"cityscapes27"``, ``"potsdam3"``, ``"folder"`` or
            ``"synthetic"``.
        root: ``data.root`` (ignored by ``"synthetic"``).
        split: dataset split (``"train"``, ``"val"``, ...). For ``"folder"``, ``<root>/<split>``
            is read when that sub-folder exists, else ``<root>``.
        mode: ``"train"`` (adds ``img_aug``) or ``"eval"``.
        resolution: side of the square crops.
        **kwargs: ``five_crop`` (bool) and ``crop_ratio`` (0.5): in train mode, the three real
            datasets read their prepared five-crop set (``hpseg prepare``) instead of the full
            images; ignored in eval mode and by ``"synthetic"``. ``interpolation``,
            ``aug_on_normalized``: see :class:`SegmentationDataset`. ``"folder"`` also takes
            ``n_classes``, ``class_names``, ``label_dir``, ``label_suffix``, ``max_skipped_fraction``. ``"synthetic"``
            receives every other option with a value (``hpseg.data.synthetic.SyntheticScenes``).
            Options set to None or False that a dataset does not use are ignored; others raise.
    Returns:
        a dataset of dict items (module docstring) with ``class_names`` and ``n_classes``.
    """
    check_mode(mode)
    five_crop = bool(kwargs.pop("five_crop", False))
    crop_ratio = kwargs.pop("crop_ratio", 0.5)
    if dataset == "synthetic":
        synthetic = importlib.import_module("hpseg.data.synthetic")
        options = {k: v for k, v in kwargs.items() if v is not None}
        built: Dataset = synthetic.SyntheticScenes(split=split, mode=mode, resolution=resolution, **options)
        return built
    if dataset == "folder":
        if five_crop and mode == "train":
            raise HPSegError(
                "five_crop applies to cocostuff27, cityscapes27 and potsdam3: set data.five_crop=false"
            )
        options = _take_options(dataset, kwargs, _COMMON_OPTIONS + _FOLDER_OPTIONS)
        if root is None:
            raise HPSegError("data.root is not set: add data.root=DIR (a folder of images)")
        folder = Path(root).expanduser()
        if (folder / split).is_dir():
            folder = folder / split
        if options.get("label_suffix") is None:
            options.pop("label_suffix", None)
        return FolderDataset(folder, mode, resolution, **options)
    if dataset not in _FIXED:
        raise HPSegError(f"dataset {dataset!r} is unknown: use one of {', '.join(DATASET_NAMES)}")

    n_classes = kwargs.pop("n_classes", None)
    class_names = kwargs.pop("class_names", None)
    options = _take_options(dataset, kwargs, _COMMON_OPTIONS)
    if five_crop and mode == "train":
        ds: SegmentationDataset = CroppedDataset(
            root, dataset, split, crop_ratio, mode, resolution, **options
        )
    else:
        ds = _FIXED[dataset](root, split, mode, resolution, **options)
    if n_classes is not None and int(n_classes) != ds.n_classes:
        raise HPSegError(f"{dataset} has {ds.n_classes} classes, not {n_classes}: unset data.n_classes")
    if class_names is not None:
        if len(class_names) != ds.n_classes:
            raise HPSegError(
                f"{len(class_names)} class names given for the {ds.n_classes} classes of {dataset}: "
                "give one per class or unset data.class_names"
            )
        ds.class_names = [str(c) for c in class_names]
    return ds


def dataset_class_names(name: str) -> list[str]:
    """Class names of a fixed-class dataset (``cocostuff27``, ``cityscapes27``, ``potsdam3``).

    Folder and synthetic datasets define theirs per instance (``dataset.class_names``).
    """
    if name in _FIXED:
        return class_names_of(name)
    if name in DATASET_NAMES:
        raise HPSegError(
            f"{name} datasets have no fixed class names: read them from the built dataset (dataset.class_names)"
        )
    raise HPSegError(f"dataset {name!r} is unknown: use one of {', '.join(DATASET_NAMES)}")
