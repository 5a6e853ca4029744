"""Cityscapes-27: the 27 non-void Cityscapes classes (labelIds 7..33), fine annotations.

Layout (the official archives ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``
unpacked under ``<root>/cityscapes``; ``data.root`` may also point at that folder itself)::

    <root>/cityscapes/
        leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Labels: ``labelId − 7``; negative results (void classes 0..6) and results ≥ 27 (e.g. the
license plate's id stored as 255) become −1. Images are sorted by city then file name (the
authors' loader lists folders in file-system order, which is not reproducible).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hpseg.data.common import (
    DOCS_HINT,
    LabelledFilesDataset,
    class_names_of,
    find_dataset_dir,
    label_maps,
    lookup_table,
)
from hpseg.errors import HPSegError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
N_CLASSES = 27


def label_id_table() -> np.ndarray:
    """``(256,)`` int64 table: Cityscapes labelId → ``labelId − 7`` in 0..26, else −1."""
    offset = int(label_maps()["cityscapes27"]["label_id_offset"])
    return lookup_table({i: i - offset for i in range(offset, offset + N_CLASSES)})


class Cityscapes27(LabelledFilesDataset):
    """Cityscapes-27 full images (2048×1024).

    Args:
        root: ``data.root`` (holding ``cityscapes/``) or the ``cityscapes`` folder itself.
        split: ``"train"``, ``"val"`` or ``"test"``.
        mode, resolution, interpolation, aug_on_normalized: see :class:`SegmentationDataset`.
    """

    def __init__(
        self,
        root: str | Path | None,
        split: str = "val",
        mode: str = "eval",
        resolution: int = 320,
        *,
        interpolation: str = "bilinear",
        aug_on_normalized: bool = False,
    ) -> None:
        super().__init__(mode, resolution, interpolation=interpolation, aug_on_normalized=aug_on_normalized)
        if split not in SPLITS:
            raise HPSegError(f"cityscapes27 split {split!r} is unknown: use one of {', '.join(SPLITS)}")
        self.root = find_dataset_dir(root, "cityscapes", f"leftImg8bit/{split}", "cityscapes27")
        self.split = split
        self.class_names = class_names_of("cityscapes27")
        self._table = label_id_table()
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        if not label_dir.is_dir():
            raise HPSegError(
                f"cityscapes27 labels not found: expected {label_dir} (unpack gtFine_trainvaltest.zip next to "
                f"leftImg8bit); {DOCS_HINT}"
            )
        self.image_files = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
        if not self.image_files:
            raise HPSegError(
                f"no Cityscapes images found: expected {image_dir}/<city>/<name>{IMAGE_SUFFIX}; {DOCS_HINT}"
            )
        self.ids = [p.name[: -len(IMAGE_SUFFIX)] for p in self.image_files]
        self.label_files = [
            label_dir / p.parent.name / f"{i}{LABEL_SUFFIX}" for p, i in zip(self.image_files, self.ids)
        ]
        missing = [p for p in self.label_files if not p.is_file()]
        if missing:
            raise HPSegError(
                f"{len(missing)} of {len(self.label_files)} Cityscapes images have no label file "
                f"(first: {missing[0]}): unpack gtFine_trainvaltest.zip completely; {DOCS_HINT}"
            )
