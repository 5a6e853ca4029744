"""COCO-Stuff-27: COCO 2017 images with the 182 fine stuff+thing labels merged into 27 classes.

Layout (STEGO's; ``data.root`` may also point at the ``cocostuff`` folder itself, as the HP
authors' ``data_path`` does)::

    <root>/cocostuff/
        images/train2017/<id>.jpg          images/val2017/<id>.jpg
        annotations/train2017/<id>.png     annotations/val2017/<id>.png   (fine labels 0..181, 255 = unlabelled)
        curated/train2017/Coco164kFull_Stuff_Coarse.txt      (training ids, one per line)
        curated/val2017/Coco164kFull_Stuff_Coarse_7.txt      (evaluation ids)

Splits: ``train`` (train2017 with ``Coco164kFull_Stuff_Coarse.txt``), ``val`` (val2017 with
``Coco164kFull_Stuff_Coarse_7.txt``) and ``train+val`` (both folders, ``…_Coarse.txt``), as
in the authors' loader. Fine labels go to the 27 coarse classes through ``fine_to_coarse`` of
``label_maps.json``; 255 and any value outside the table become −1.
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
    read_list,
)
from hpseg.errors import HPSegError

FULL_LIST = "Coco164kFull_Stuff_Coarse.txt"
EVAL_LIST = "Coco164kFull_Stuff_Coarse_7.txt"

SPLITS: dict[str, tuple[list[str], str]] = {
    "train": (["train2017"], FULL_LIST),
    "val": (["val2017"], EVAL_LIST),
    "train+val": (["train2017", "val2017"], FULL_LIST),
}


def fine_to_coarse_table() -> np.ndarray:
    """``(256,)`` int64 table: fine COCO-Stuff label → coarse class in 0..26, else −1."""
    mapping = label_maps()["cocostuff27"]["fine_to_coarse"]
    return lookup_table({int(k): int(v) for k, v in mapping.items()})


class CocoStuff27(LabelledFilesDataset):
    """COCO-Stuff-27 full images (evaluation, and the source of the five-crop training set).

    Args:
        root: ``data.root`` (holding ``cocostuff/``) or the ``cocostuff`` folder itself.
        split: ``"train"``, ``"val"`` or ``"train+val"``.
        mode, resolution, interpolation, aug_on_normalized: see :class:`SegmentationDataset`.
        image_list: override the curated list file name (looked up in each split folder).
    """

    def __init__(
        self,
        root: str | Path | None,
        split: str = "val",
        mode: str = "eval",
        resolution: int = 320,
        *,
        image_list: str | None = None,
        interpolation: str = "bilinear",
        aug_on_normalized: bool = False,
    ) -> None:
        super().__init__(mode, resolution, interpolation=interpolation, aug_on_normalized=aug_on_normalized)
        if split not in SPLITS:
            raise HPSegError(f"cocostuff27 split {split!r} is unknown: use one of {', '.join(SPLITS)}")
        folders, default_list = SPLITS[split]
        list_name = image_list or default_list
        self.root = find_dataset_dir(root, "cocostuff", f"curated/{folders[0]}/{list_name}", "cocostuff27")
        self.split = split
        self.class_names = class_names_of("cocostuff27")
        self._table = fine_to_coarse_table()
        self.ids: list[str] = []
        self.image_files: list[Path] = []
        self.label_files: list[Path] = []
        for folder in folders:
            list_path = self.root / "curated" / folder / list_name
            if not list_path.is_file():
                raise HPSegError(f"cocostuff27 image list not found: expected {list_path}; {DOCS_HINT}")
            for image_id in read_list(list_path):
                image_id = Path(image_id).stem  # tolerate "<id>.jpg" entries
                self.ids.append(image_id)
                self.image_files.append(self.root / "images" / folder / f"{image_id}.jpg")
                self.label_files.append(self.root / "annotations" / folder / f"{image_id}.png")
        if not self.ids:
            raise HPSegError(f"cocostuff27 {split} image list is empty: check {self.root / 'curated'}")
        for path in (self.image_files[0], self.label_files[0]):
            if not path.is_file():
                raise HPSegError(
                    f"cocostuff27 layout mismatch: the list names {self.ids[0]} but {path} does not exist; "
                    f"{DOCS_HINT}"
                )
