"""Custom image folders, with or without label maps.

Layout::

    <root>/                         images, found recursively and sorted by relative path:
        a.jpg                       .jpg .jpeg .png .bmp .tif .tiff .webp (any case)
        street/b.png
        labels/                     optional: one label per image at the same relative path,
            a.png                   with the image's suffix replaced by ``label_suffix`` (".png")
            street/b.png

* Labels are single-channel PNGs (mode L, P or I) of class indices 0..254 with 255 = ignore
  (→ −1), the same size as their image. ``label_dir`` points elsewhere if they live outside
  ``<root>/labels``. Everything under the label folder, and hidden files and folders, are never
  taken as images. When a label folder is used, every image must have its label.
* ``n_classes``: given, or the number of ``class_names``, or inferred from the labels as
  ``max label + 1`` (reads every label once). Without labels it must be given (the number of
  clusters wanted); all labels are then −1.
* Item names are relative paths without suffix (``street/b``).
* Every image is checked once when the dataset is built (:func:`hpseg.imaging.check_image_file`:
  a fast decode or checksum test, on a few threads): files that cannot be read (truncated, not an
  image) are left out, listed in :attr:`FolderDataset.skipped` and logged in one line; more than
  ``max_skipped_fraction`` of the images unreadable (or all of them) is an error: exactly that
  fraction is tolerated (10 of 100 at 0.1, 29 of 100 at 0.29). The remaining images keep their
  sorted order, so data order (and exact resume) is deterministic while the folder is unchanged.

:func:`hpseg.data.build_dataset` uses ``<root>/<split>`` as the folder when that sub-folder
exists (e.g. ``<root>/train`` and ``<root>/val``), and ``<root>`` otherwise.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from hpseg.config import DataConfig
from hpseg.data.common import (
    DOCS_HINT,
    SegmentationDataset,
    check_label_size,
    read_image,
    read_label_png,
)
from hpseg.errors import HPSegError
from hpseg.imaging import IMAGE_EXTENSIONS, check_image_file, find_images

log = logging.getLogger(__name__)

LABEL_IGNORE = 255
# verdicts of check_image_file by (path, size, mtime): a folder read as train and val set is checked once
_CHECKED: dict[tuple[str, int, int], str | None] = {}
_REPORTED: set[tuple[str, tuple[str, ...]]] = set()


def _check(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = check_image_file(path)
    return _CHECKED[key]


def unreadable_images(files: list[Path]) -> list[tuple[Path, str]]:
    """``(file, reason)`` for each of ``files`` that cannot be decoded, in the order given."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes without holding the GIL
        verdicts = list(pool.map(_check, files))
    return [(f, v) for f, v in zip(files, verdicts) if v is not None]


class FolderDataset(SegmentationDataset):
    """Every image under a folder, optionally with label maps (see the module docstring).

    Args:
        root: the image folder.
        mode: ``"train"`` or ``"eval"``.
        resolution: output side in pixels.
        n_classes: number of classes / clusters; inferred from labels when None.
        class_names: names of the classes (default ``"class 0"``, ``"class 1"``, ...).
        label_dir: folder of label maps (default ``<root>/labels`` when it exists).
        label_suffix: appended to the image's relative path without its extension to name its
            label (default ``".png"``; e.g. ``"_mask.png"``; a bare ``"png"`` means ``".png"``).
        max_skipped_fraction: the largest fraction of unreadable images left out before the
            folder is refused (``data.max_skipped_fraction``).
        interpolation, aug_on_normalized: see :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        root: str | Path | None,
        mode: str = "eval",
        resolution: int = 320,
        n_classes: int | None = None,
        class_names: list[str] | None = None,
        label_dir: str | Path | None = None,
        label_suffix: str = ".png",
        max_skipped_fraction: float = DataConfig.max_skipped_fraction,
        *,
        interpolation: str = "bilinear",
        aug_on_normalized: bool = False,
    ) -> None:
        super().__init__(mode, resolution, interpolation=interpolation, aug_on_normalized=aug_on_normalized)
        if root is None:
            raise HPSegError("no image folder given: set data.root=DIR (a folder of images)")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise HPSegError(
                f"image folder {self.root} does not exist: set data.root to a folder of images ({DOCS_HINT})"
            )
        if label_dir is not None:
            self.label_dir: Path | None = Path(label_dir).expanduser()
            if not self.label_dir.is_dir():
                raise HPSegError(
                    f"label folder {self.label_dir} does not exist: fix label_dir or leave it unset"
                )
        else:
            default = self.root / "labels"
            self.label_dir = default if default.is_dir() else None
        self.label_suffix = label_suffix if "." in label_suffix else f".{label_suffix}"

        self.image_files = find_images(self.root, exclude=self.label_dir)
        if not self.image_files:
            raise HPSegError(
                f"no images found under {self.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}): "
                "point data.root at a folder of images"
            )
        #: ``(file, reason)`` of the images left out because they cannot be read
        self.skipped: list[tuple[Path, str]] = self._leave_out_unreadable(max_skipped_fraction)
        self.ids = [p.relative_to(self.root).with_suffix("").as_posix() for p in self.image_files]
        self.label_files: list[Path] | None = None
        if self.label_dir is not None:
            label_dir_ = self.label_dir
            files = [label_dir_ / f"{i}{self.label_suffix}" for i in self.ids]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise HPSegError(
                    f"{len(missing)} of {len(files)} images have no label in {self.label_dir} "
                    f"(first missing: {missing[0]}): add them, or move the label folder away to use no labels"
                )
            self.label_files = files

        if n_classes is None and class_names is not None:
            n_classes = len(class_names)
        if n_classes is None:
            if self.label_files is None:
                raise HPSegError(
                    f"{self.root} has no labels, so the number of classes is unknown: set data.n_classes=K "
                    "(the number of clusters wanted)"
                )
            n_classes = self._infer_n_classes()
        if int(n_classes) < 1:
            raise HPSegError(f"n_classes must be at least 1, got {n_classes}")
        n_classes = int(n_classes)
        if class_names is None:
            class_names = [f"class {i}" for i in range(n_classes)]
        if len(class_names) != n_classes:
            raise HPSegError(
                f"{len(class_names)} class names given for {n_classes} classes: give exactly one name per class"
            )
        self.class_names = [str(c) for c in class_names]

    def _leave_out_unreadable(self, max_fraction: float) -> list[tuple[Path, str]]:
        """Drop unreadable images from ``image_files`` (module docstring); their list."""
        found = len(self.image_files)
        bad = unreadable_images(self.image_files)
        if not bad:
            return []
        first = f"{bad[0][0].relative_to(self.root)} ({bad[0][1]})"
        if len(bad) == found or len(bad) / found > max_fraction:  # k/n vs the fraction: exact at the boundary
            raise HPSegError(
                f"{len(bad)} of {found} images under {self.root} cannot be read (first: {first}), more than "
                f"data.max_skipped_fraction={max_fraction:g} allows: repair or remove them, or raise "
                "data.max_skipped_fraction"
            )
        names = ", ".join(str(p.relative_to(self.root)) for p, _ in bad[:3]) + (", …" if len(bad) > 3 else "")
        key = (str(self.root.resolve()), tuple(str(p) for p, _ in bad))
        if key not in _REPORTED:  # once, though a folder is read as training and validation set
            _REPORTED.add(key)
            log.warning("leaving out %d of %d images under %s that cannot be read: %s", len(bad), found, self.root,
                        names)
        left_out = {p for p, _ in bad}
        self.image_files = [p for p in self.image_files if p not in left_out]
        return bad

    @property
    def has_labels(self) -> bool:
        """Whether label maps accompany the images."""
        return self.label_files is not None

    def _infer_n_classes(self) -> int:
        assert self.label_files is not None
        top = -1
        for path in self.label_files:
            values = read_label_png(path)
            valid = values[values != LABEL_IGNORE]
            if valid.size:
                top = max(top, int(valid.max()))
        if top < 0:
            raise HPSegError(
                f"every label in {self.label_dir} is 255 (ignore): set data.n_classes=K or fix the labels"
            )
        return top + 1

    def __len__(self) -> int:
        return len(self.image_files)

    def name(self, index: int) -> str:
        return self.ids[index]

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        image = read_image(self.image_files[index])
        if self.label_files is None:
            return image, None
        path = self.label_files[index]
        raw = read_label_png(path)
        check_label_size(image, raw, path)
        label = np.where(raw == LABEL_IGNORE, -1, raw).astype(np.int64)
        bad = (label >= self.n_classes) | (label < -1)
        if bad.any():
            value = int(label[bad][0])
            raise HPSegError(
                f"label {path} contains class {value} but the dataset has {self.n_classes} classes: "
                "raise data.n_classes or fix the label (255 = ignore)"
            )
        return image, label
