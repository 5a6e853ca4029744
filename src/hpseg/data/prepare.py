"""Five-crop training sets (docs/method.md §8): writing them, and :class:`CroppedDataset` reading them.

Each full-size source image ``i`` (H×W) is cut into five crops of ``int(r·H) × int(r·W)``
(``r = crop_ratio``, 0.5 in the paper): top-left, top-right, bottom-left, bottom-right, centre
(``torchvision``'s ``five_crop`` geometry, the authors' ``crop_datasets.py``). Crop ``c`` of
image ``i`` is file number ``5·i + c``. The tree is the authors', so sets prepared with their
scripts are read as they are::

    <root>/cropped/<name>_five_crop_<r>/
        img/<split>/<n>.jpg       RGB, JPEG (PIL's default quality 75, as the authors')
        label/<split>/<n>.png     8-bit, coarse label + 1 (0 = ignore → −1 when read)

with ``<name>`` = ``cocostuff27``, ``cityscapes`` or ``potsdam`` and ``<r>`` written as Python
prints the float (``0.5``). ``<root>`` is the ``data.root`` given to
:func:`prepare_five_crop` (both STEGO's root-of-datasets and the HP authors' dataset folder
work, as long as training is given the same root).

        hpseg_prepare_<split>.json  our record: {"complete": false} while writing, then true
                                    with the counts (sets made by the authors' scripts lack it)

Preparation is resumable: every file is written atomically (temporary file + rename), an image
whose ten outputs all exist is skipped, and leftovers of interrupted writes are removed.
:class:`CroppedDataset` refuses a set whose record says it is incomplete.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from hpseg.data.cityscapes import Cityscapes27
from hpseg.data.cocostuff import CocoStuff27
from hpseg.data.common import (
    DOCS_HINT,
    SegmentationDataset,
    check_label_size,
    class_names_of,
    read_image,
    read_label_png,
)
from hpseg.data.potsdam import Potsdam3
from hpseg.errors import HPSegError
from hpseg.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

CROPPED_NAMES = {"cocostuff27": "cocostuff27", "cityscapes27": "cityscapes", "potsdam3": "potsdam"}
"""Our dataset names → the folder names in the authors' cropped tree."""

SOURCES: dict[str, Callable[..., SegmentationDataset]] = {
    "cocostuff27": CocoStuff27,
    "cityscapes27": Cityscapes27,
    "potsdam3": Potsdam3,
}
N_CROPS = 5
JPEG_QUALITY = 75
_NUMBERED = re.compile(r"^(\d+)\.(jpg|png)$")
_TEMPORARY = re.compile(r"^\.\d+\.(jpg|png)\..*\.tmp$")  # hpseg.io.atomic_write's temporary names


def record_path(out_dir: Path, split: str) -> Path:
    """The preparation record of one split of a five-crop set."""
    return out_dir / f"hpseg_prepare_{split}.json"


def _write_record(out_dir: Path, fields: dict[str, object]) -> None:
    atomic_write_text(record_path(out_dir, str(fields["split"])), json.dumps(fields, indent=2) + "\n")


def _read_record(out_dir: Path, split: str) -> dict[str, object] | None:
    try:
        data = json.loads(record_path(out_dir, split).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_dataset(dataset: str) -> None:
    if dataset not in CROPPED_NAMES:
        raise HPSegError(
            f"five-crop sets exist for {', '.join(CROPPED_NAMES)}, not {dataset!r}: "
            "train other datasets with data.five_crop=false"
        )


def _check_ratio(crop_ratio: float) -> float:
    ratio = float(crop_ratio)
    if not 0.0 < ratio <= 1.0:
        raise HPSegError(f"crop_ratio must be in (0, 1], got {crop_ratio}: use e.g. data.crop_ratio=0.5")
    return ratio


def cropped_dir(root: str | Path, dataset: str, crop_ratio: float = 0.5) -> Path:
    """``<root>/cropped/<name>_five_crop_<ratio>`` for one of our dataset names."""
    _check_dataset(dataset)
    ratio = _check_ratio(crop_ratio)
    return Path(root).expanduser() / "cropped" / f"{CROPPED_NAMES[dataset]}_five_crop_{ratio}"


def five_crop_arrays(
    image: Image.Image, label: np.ndarray | None, crop_ratio: float = 0.5
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The five crops (tl, tr, bl, br, centre) of an image and its label.

    Args:
        image: RGB image, H×W.
        label: ``(H, W)`` int labels or None.
    Returns:
        five ``((h, w, 3) uint8, (h, w) int64 | None)`` pairs, ``h = int(r·H)``, ``w = int(r·W)``.
    """
    ratio = _check_ratio(crop_ratio)
    width, height = image.size
    size = [int(height * ratio), int(width * ratio)]
    if min(size) < 1:
        raise HPSegError(f"a {width}x{height} image is too small for crop_ratio {ratio}")
    img = F.to_image(image)
    img_crops = F.five_crop(img, size)
    lab_crops: list[torch.Tensor | None] = [None] * N_CROPS
    if label is not None:
        lab_crops = list(F.five_crop(torch.from_numpy(np.asarray(label, dtype=np.int64))[None], size))
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for ic, lc in zip(img_crops, lab_crops):
        arr = ic.as_subclass(torch.Tensor).permute(1, 2, 0).contiguous().numpy()
        out.append((arr, None if lc is None else lc[0].numpy()))
    return out


def _remove_stale_temporaries(folder: Path) -> int:
    removed = 0
    for path in folder.glob(".*.tmp"):
        if _TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def prepare_five_crop(
    dataset: str,
    root: str | Path | None,
    split: str = "train",
    crop_ratio: float = 0.5,
    progress: bool = True,
    *,
    num_workers: int = 0,
) -> Path:
    """Write the five-crop set of ``dataset``'s ``split`` under ``root`` (see the module docstring).

    Args:
        dataset: ``"cocostuff27"``, ``"cityscapes27"`` or ``"potsdam3"``.
        root: ``data.root``: the folder holding the dataset (the cropped tree goes beside it).
        split: source split (``"train"`` for training; any split of the dataset).
        crop_ratio: crop side as a fraction of the image side.
        progress: show a tqdm progress bar.
        num_workers: threads decoding and encoding images in parallel (0 = in this thread).
    Returns:
        the output folder ``<root>/cropped/<name>_five_crop_<ratio>``.
    """
    _check_dataset(dataset)
    ratio = _check_ratio(crop_ratio)
    source = SOURCES[dataset](root, split)  # validates root and layout
    assert root is not None
    out_dir = cropped_dir(root, dataset, ratio)
    img_dir, label_dir = out_dir / "img" / split, out_dir / "label" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    stale = _remove_stale_temporaries(img_dir) + _remove_stale_temporaries(label_dir)
    if stale:
        log.info("removed %d unfinished temporary files from an interrupted run", stale)

    def outputs(i: int) -> list[tuple[Path, Path]]:
        return [
            (img_dir / f"{N_CROPS * i + c}.jpg", label_dir / f"{N_CROPS * i + c}.png") for c in range(N_CROPS)
        ]

    record: dict[str, object] = {
        "dataset": dataset,
        "split": split,
        "crop_ratio": ratio,
        "n_images": len(source),
    }
    final = {**record, "complete": True, "n_crops": N_CROPS * len(source)}
    started = threading.Event()
    lock = threading.Lock()

    def mark_incomplete() -> None:
        # before the first write: an interruption from here on leaves a record saying "incomplete"
        with lock:
            if not started.is_set():
                _write_record(out_dir, {**record, "complete": False})
                started.set()

    def process(i: int) -> int:
        targets = outputs(i)
        if all(a.is_file() and b.is_file() for a, b in targets):
            return 0
        mark_incomplete()
        image, label = source.load(i)
        if label is None:
            label = np.full((image.size[1], image.size[0]), -1, dtype=np.int64)
        if label.max(initial=-1) >= 255:
            raise HPSegError(f"{source.name(i)} has label {int(label.max())}: too large for 8-bit storage")
        written = 0
        for (img_path, lab_path), (img_arr, lab_arr) in zip(targets, five_crop_arrays(image, label, ratio)):
            assert lab_arr is not None
            with atomic_write(img_path, "wb") as fh:
                Image.fromarray(img_arr).save(fh, format="JPEG", quality=JPEG_QUALITY)
            with atomic_write(lab_path, "wb") as fh:
                Image.fromarray((lab_arr + 1).astype(np.uint8)).save(fh, format="PNG")
            written += 2
        return written

    total = 0
    bar = tqdm(total=len(source), desc=f"five-crop {dataset} {split}", unit="img", disable=not progress)
    try:
        if num_workers > 0:
            with ThreadPoolExecutor(max_workers=num_workers) as pool:
                for n in pool.map(process, range(len(source))):
                    total += n
                    bar.update(1)
        else:
            for i in range(len(source)):
                total += process(i)
                bar.update(1)
    finally:
        bar.close()
    if started.is_set() or _read_record(out_dir, split) != final:
        _write_record(out_dir, final)
    log.info("five-crop %s %s: %d files written, %d images → %s", dataset, split, total, len(source), out_dir)
    return out_dir


class CroppedDataset(SegmentationDataset):
    """A prepared five-crop set: ``<root>/cropped/<name>_five_crop_<ratio>/{img,label}/<split>/``.

    Args:
        root: the ``data.root`` given to :func:`prepare_five_crop`.
        dataset: ``"cocostuff27"``, ``"cityscapes27"`` or ``"potsdam3"`` (class names).
        split: prepared split (``"train"``).
        crop_ratio: the ratio the set was prepared with.
        mode, resolution, interpolation, aug_on_normalized: see :class:`SegmentationDataset`.

    Labels are stored +1 on disk (0 = ignore) and returned with −1 = ignore.
    """

    def __init__(
        self,
        root: str | Path | None,
        dataset: str,
        split: str = "train",
        crop_ratio: float = 0.5,
        mode: str = "train",
        resolution: int = 224,
        *,
        interpolation: str = "bilinear",
        aug_on_normalized: bool = False,
    ) -> None:
        super().__init__(mode, resolution, interpolation=interpolation, aug_on_normalized=aug_on_normalized)
        _check_dataset(dataset)
        if root is None:
            raise HPSegError(f"no data root given for {dataset}: set data.root=DIR")
        self.dataset = dataset
        self.split = split
        self.dir = cropped_dir(root, dataset, crop_ratio)
        self.class_names = class_names_of(dataset)
        self.img_dir, self.label_dir = self.dir / "img" / split, self.dir / "label" / split
        hint = f"run `hpseg prepare --preset {dataset} data.root={root}` first ({DOCS_HINT})"
        if not self.img_dir.is_dir() or not self.label_dir.is_dir():
            raise HPSegError(f"five-crop set not found: expected {self.img_dir}; {hint}")
        images = self._numbers(self.img_dir, "jpg")
        labels = self._numbers(self.label_dir, "png")
        n = len(images)
        if n == 0:
            raise HPSegError(f"five-crop set {self.img_dir} is empty; {hint}")
        if images != set(range(n)) or labels != images:
            raise HPSegError(
                f"five-crop set {self.dir} is incomplete ({len(images)} images, {len(labels)} labels, "
                f"numbers not 0..N-1): rerun `hpseg prepare --preset {dataset} data.root={root}` (it resumes)"
            )
        record_file = record_path(self.dir, split)
        if record_file.is_file():
            try:
                record = json.loads(record_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise HPSegError(f"{record_file} is unreadable ({err}): delete it and {hint}") from err
            if not record.get("complete") or record.get("n_crops", n) != n:
                raise HPSegError(
                    f"five-crop set {self.dir} is incomplete ({n} crops written, an interrupted preparation): "
                    f"rerun `hpseg prepare --preset {dataset} data.root={root}` (it resumes)"
                )
        self._n = n

    @staticmethod
    def _numbers(folder: Path, ext: str) -> set[int]:
        found = set()
        for path in folder.iterdir():
            m = _NUMBERED.match(path.name)
            if m and m.group(2) == ext:
                found.add(int(m.group(1)))
        return found

    def __len__(self) -> int:
        return self._n

    def name(self, index: int) -> str:
        return str(index)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        image = read_image(self.img_dir / f"{index}.jpg")
        label_path = self.label_dir / f"{index}.png"
        stored = read_label_png(label_path)
        check_label_size(image, stored, label_path)
        return image, stored - 1
