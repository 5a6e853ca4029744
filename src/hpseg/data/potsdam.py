"""Potsdam-3: ISPRS Potsdam aerial tiles with 6 classes merged into 3.

Layout (the ``potsdam`` archive prepared by the IIC / STEGO authors; ``data.root`` may also
point at the ``potsdam`` folder itself)::

    <root>/potsdam/
        imgs/<id>.mat      key "img": (H, W, C) array, C = 3 or 4 (RGB + infra-red; RGB used)
        gt/<id>.mat        key "gt":  (H, W) fine labels 0..5, 255 = unlabelled
        labelled_train.txt  labelled_test.txt  unlabelled_train.txt  all.txt   (one id per line)

Splits (the authors' names): ``train`` → ``labelled_train.txt``, ``val`` → ``labelled_test.txt``,
``train+val`` → both, ``unlabelled_train`` → ``unlabelled_train.txt``, ``all`` → ``all.txt``.
Labels: {0 roads, 4 cars} → 0, {1 buildings, 5 clutter} → 1, {2 low vegetation, 3 trees} → 2,
anything else (255) → −1; a tile without a ``gt`` file (the unlabelled ones) is all −1.
Float images are taken as values in [0, 1] (scaled by 255, as ``to_pil_image`` does) unless
their maximum exceeds 1, in which case they are read as 0..255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hpseg.data.common import (
    DOCS_HINT,
    SegmentationDataset,
    UnreadableFileError,
    apply_lookup,
    check_label_size,
    class_names_of,
    find_dataset_dir,
    label_maps,
    lookup_table,
    read_list,
)
from hpseg.errors import HPSegError

SPLITS: dict[str, list[str]] = {
    "train": ["labelled_train.txt"],
    "val": ["labelled_test.txt"],
    "train+val": ["labelled_train.txt", "labelled_test.txt"],
    "unlabelled_train": ["unlabelled_train.txt"],
    "all": ["all.txt"],
}


def fine_to_coarse_table() -> np.ndarray:
    """``(256,)`` int64 table: Potsdam fine label → coarse class in 0..2, else −1."""
    mapping = label_maps()["potsdam3"]["fine_to_coarse"]
    return lookup_table({int(k): int(v) for k, v in mapping.items()})


def _load_mat(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content: dict[str, Any] = loadmat(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # scipy raises several unrelated types for damaged files
        raise UnreadableFileError.for_file(path, f"{type(err).__name__}: {err}") from err
    if key not in content:
        found = ", ".join(k for k in content if not k.startswith("__")) or "none"
        raise HPSegError(
            f"{path} has no variable {key!r} (found: {found}): Potsdam tiles store it under {key!r}"
        )
    return np.asarray(content[key])


def mat_to_rgb(array: np.ndarray, path: Path) -> Image.Image:
    """``(H, W, C)`` tile array (uint8 or float) → RGB PIL image of its first three channels."""
    if array.ndim != 3 or array.shape[2] < 3:
        raise HPSegError(f"{path} holds an array of shape {array.shape}: expected (H, W, C) with C >= 3")
    rgb = array[:, :, :3]
    if np.issubdtype(rgb.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(rgb)) <= 1.0 else 1.0
        rgb = np.clip(np.nan_to_num(rgb) * scale, 0, 255)
    return Image.fromarray(np.ascontiguousarray(rgb.astype(np.uint8)))


class Potsdam3(SegmentationDataset):
    """Potsdam-3 tiles (200×200 in the prepared archive).

    Args:
        root: ``data.root`` (holding ``potsdam/``) or the ``potsdam`` folder itself.
        split: one of ``train``, ``val``, ``train+val``, ``unlabelled_train``, ``all``.
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
            raise HPSegError(f"potsdam3 split {split!r} is unknown: use one of {', '.join(SPLITS)}")
        self.root = find_dataset_dir(root, "potsdam", SPLITS[split][0], "potsdam3")
        self.split = split
        self.class_names = class_names_of("potsdam3")
        self._table = fine_to_coarse_table()
        self.ids: list[str] = []
        for list_name in SPLITS[split]:
            list_path = self.root / list_name
            if not list_path.is_file():
                raise HPSegError(f"potsdam3 split list not found: expected {list_path}; {DOCS_HINT}")
            self.ids.extend(Path(i).stem if i.endswith(".mat") else i for i in read_list(list_path))
        if not self.ids:
            raise HPSegError(f"potsdam3 {split} list is empty: check {self.root / SPLITS[split][0]}")
        first = self.image_path(0)
        if not first.is_file():
            raise HPSegError(
                f"potsdam3 layout mismatch: the list names {self.ids[0]} but {first} does not exist; {DOCS_HINT}"
            )

    def image_path(self, index: int) -> Path:
        return self.root / "imgs" / f"{self.ids[index]}.mat"

    def label_path(self, index: int) -> Path:
        return self.root / "gt" / f"{self.ids[index]}.mat"

    def __len__(self) -> int:
        return len(self.ids)

    def name(self, index: int) -> str:
        return self.ids[index]

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        img_path = self.image_path(index)
        if not img_path.is_file():
            raise UnreadableFileError.for_file(img_path, "file not found")
        image = mat_to_rgb(_load_mat(img_path, "img"), img_path)
        gt_path = self.label_path(index)
        if not gt_path.is_file():
            return image, None
        fine = _load_mat(gt_path, "gt")
        if fine.ndim == 3 and fine.shape[2] == 1:
            fine = fine[:, :, 0]
        if fine.ndim != 2:
            raise HPSegError(f"{gt_path} holds labels of shape {fine.shape}: expected (H, W)")
        check_label_size(image, fine, gt_path)
        return image, apply_lookup(self._table, fine.astype(np.int64))
