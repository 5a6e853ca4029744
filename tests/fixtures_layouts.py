"""Tiny dataset trees in the official on-disk layouts, for tests (see docs/datasets.md).

Each ``make_*`` function writes a few small images (16–32 px) with known labels under
``root`` and returns a :class:`Tree` describing them, e.g.::

    tree = make_cocostuff_tree(tmp_path)
    ds = build_dataset("cocostuff27", tree.root, "val", mode="eval", resolution=16)
    assert ds.name(0) == tree.splits["val"][0]
    tree.expected[ds.name(0)]          # (H, W) int64 coarse labels, −1 = ignore

``tree.root`` is what to pass as ``data.root``. Label patterns are simple blocks of fine
values whose coarse mapping the docstrings spell out, so tests can check single pixels.
Images are seeded random noise (different per image), so photometric augmentation always
changes them. The functions only write files; they import nothing from ``hpseg``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Tree:
    """What a ``make_*`` function wrote.

    Attributes:
        root: the folder to pass as ``data.root``.
        dataset_dir: the dataset's own folder (``root/cocostuff`` ...; ``root`` for folders).
        splits: split name → item names in reading order.
        size: ``(H, W)`` of every image (folder trees: of the first image).
        raw: item name → ``(H, W)`` label values as written on disk.
        expected: item name → ``(H, W)`` int64 labels the reader must return (−1 = ignore).
        images: item name → image path.
    """

    root: Path
    dataset_dir: Path
    splits: dict[str, list[str]] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)


def noise_image(name: str, height: int, width: int, channels: int = 3) -> np.ndarray:
    """Deterministic random ``(H, W, C)`` uint8 image seeded by ``name``."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def quadrants(height: int, width: int, tl: int, tr: int, bl: int, br: int) -> np.ndarray:
    """``(H, W)`` uint8 array with one value per quadrant (H, W even)."""
    out = np.empty((height, width), dtype=np.uint8)
    h, w = height // 2, width // 2
    out[:h, :w], out[:h, w:], out[h:, :w], out[h:, w:] = tl, tr, bl, br
    return out


def stripes(height: int, width: int, values: list[int]) -> np.ndarray:
    """``(H, W)`` uint8 array of vertical stripes, ``width // len(values)`` columns each."""
    step = width // len(values)
    out = np.empty((height, width), dtype=np.uint8)
    for k, v in enumerate(values):
        out[:, k * step : (k + 1) * step] = v
    return out


# ---------------------------------------------------------------------------------------------
# COCO-Stuff-27
# ---------------------------------------------------------------------------------------------

COCO_SIZE = (24, 32)
COCO_FINE = (0, 91, 181, 255)  # quadrants tl, tr, bl, br
COCO_COARSE = (9, 17, 24, -1)  # person, textile (91 "banner"), solid (181 "wood"), ignore
COCO_TRAIN = ["000000000011", "000000000012", "000000000013"]
COCO_VAL = ["000000000101", "000000000102"]
COCO_VAL_EXTRA = "000000000103"  # in val2017's Coarse.txt only: must not be read for "val"


def make_cocostuff_tree(root: str | Path) -> Tree:
    """``root/cocostuff/{images,annotations,curated}/...``: 3 train and 2 val images, 24×32.

    Every label has quadrants of fine values 0, 91, 181, 255 (tl, tr, bl, br) → coarse
    9, 17, 24, −1, except that image k of a split has fine value 50 (→ coarse 5) at pixel
    (1, 1 + k). ``val2017/Coco164kFull_Stuff_Coarse.txt`` lists one more id (``COCO_VAL_EXTRA``)
    than ``…_Coarse_7.txt``, the list the val split must use.
    """
    root = Path(root)
    base = root / "cocostuff"
    h, w = COCO_SIZE
    tree = Tree(root=root, dataset_dir=base, size=COCO_SIZE)
    table = {0: 9, 91: 17, 181: 24, 50: 5}
    for folder, split, ids, lists in (
        ("train2017", "train", COCO_TRAIN, {"Coco164kFull_Stuff_Coarse.txt": COCO_TRAIN}),
        (
            "val2017",
            "val",
            COCO_VAL,
            {
                "Coco164kFull_Stuff_Coarse_7.txt": COCO_VAL,
                "Coco164kFull_Stuff_Coarse.txt": COCO_VAL + [COCO_VAL_EXTRA],
            },
        ),
    ):
        (base / "images" / folder).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
        (base / "curated" / folder).mkdir(parents=True, exist_ok=True)
        for list_name, listed in lists.items():
            (base / "curated" / folder / list_name).write_text("\n".join(listed) + "\n")
        all_ids = ids + ([COCO_VAL_EXTRA] if folder == "val2017" else [])
        for k, image_id in enumerate(all_ids):
            fine = quadrants(h, w, *COCO_FINE)
            fine[1, 1 + k] = 50
            img_path = base / "images" / folder / f"{image_id}.jpg"
            Image.fromarray(noise_image(image_id, h, w)).save(img_path, quality=95)
            Image.fromarray(fine).save(base / "annotations" / folder / f"{image_id}.png")
            expected = np.full((h, w), -1, dtype=np.int64)
            for f, c in table.items():
                expected[fine == f] = c
            tree.raw[image_id], tree.expected[image_id], tree.images[image_id] = fine, expected, img_path
        tree.splits[split] = list(ids)
    return tree


# ---------------------------------------------------------------------------------------------
# Cityscapes-27
# ---------------------------------------------------------------------------------------------

CITYSCAPES_SIZE = (16, 32)
CITYSCAPES_IDS = [0, 6, 7, 8, 26, 33, 34, 255]  # 8 stripes of 4 columns
CITYSCAPES_COARSE = [-1, -1, 0, 1, 19, 26, -1, -1]  # labelId − 7, void / out of range → −1
CITYSCAPES_FILES = {
    "train": [
        ("aachen", "aachen_000000_000019"),
        ("aachen", "aachen_000001_000019"),
        ("bochum", "bochum_000000_000313"),
    ],
    "val": [("frankfurt", "frankfurt_000000_000294")],
}


def make_cityscapes_tree(root: str | Path) -> Tree:
    """``root/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/...``: 3 train, 1 val, 16×32.

    labelIds are vertical stripes (4 columns each) of 0, 6, 7, 8, 26, 33, 34, 255 → coarse
    −1, −1, 0, 1, 19, 26, −1, −1 (``CITYSCAPES_COARSE``). Item names are the file prefixes
    (``aachen_000000_000019``), sorted by city then name.
    """
    root = Path(root)
    base = root / "cityscapes"
    h, w = CITYSCAPES_SIZE
    tree = Tree(root=root, dataset_dir=base, size=CITYSCAPES_SIZE)
    ids = stripes(h, w, CITYSCAPES_IDS)
    expected = stripes(h, w, list(range(len(CITYSCAPES_IDS)))).astype(np.int64)
    expected = np.asarray(CITYSCAPES_COARSE, dtype=np.int64)[expected]
    for split, files in CITYSCAPES_FILES.items():
        for city, prefix in files:
            img_dir = base / "leftImg8bit" / split / city
            gt_dir = base / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            img_path = img_dir / f"{prefix}_leftImg8bit.png"
            Image.fromarray(noise_image(prefix, h, w)).save(img_path)
            Image.fromarray(ids).save(gt_dir / f"{prefix}_gtFine_labelIds.png")
            # the official archives also hold colour / instance maps: the reader must ignore them
            Image.fromarray(noise_image(prefix + "c", h, w)).save(gt_dir / f"{prefix}_gtFine_color.png")
            tree.raw[prefix], tree.expected[prefix], tree.images[prefix] = ids, expected, img_path
        tree.splits[split] = sorted(p for _, p in files)
    return tree


# ---------------------------------------------------------------------------------------------
# Potsdam-3
# ---------------------------------------------------------------------------------------------

POTSDAM_SIZE = (16, 28)
POTSDAM_FINE = [0, 1, 2, 3, 4, 5, 255]  # 7 stripes of 4 columns
POTSDAM_COARSE = [0, 1, 2, 2, 0, 1, -1]
POTSDAM_LISTS = {
    "labelled_train.txt": ["0", "1"],
    "labelled_test.txt": ["2"],
    "unlabelled_train.txt": ["3"],
    "all.txt": ["0", "1", "2", "3"],
}


def make_potsdam_tree(root: str | Path) -> Tree:
    """``root/potsdam/{imgs,gt}/<id>.mat`` + split lists: tiles 0..3 of 16×28.

    Images are float32 (H, W, 4) in [0, 1] (RGB + a constant infra-red channel of 1.0);
    ``tree.images`` holds the ``.mat`` paths and ``tree.raw[id + "/rgb"]`` the uint8 RGB the
    reader must produce. gt: stripes of 0, 1, 2, 3, 4, 5, 255 → coarse 0, 1, 2, 2, 0, 1, −1.
    Tile "3" (``unlabelled_train.txt``) has no gt file: its labels are all −1.
    Splits: train = [0, 1], val = [2], unlabelled_train = [3], all = [0, 1, 2, 3].
    """
    from scipy.io import savemat

    root = Path(root)
    base = root / "potsdam"
    (base / "imgs").mkdir(parents=True, exist_ok=True)
    (base / "gt").mkdir(parents=True, exist_ok=True)
    h, w = POTSDAM_SIZE
    tree = Tree(root=root, dataset_dir=base, size=POTSDAM_SIZE)
    fine = stripes(h, w, POTSDAM_FINE)
    coarse = np.asarray(POTSDAM_COARSE, dtype=np.int64)[stripes(h, w, list(range(len(POTSDAM_FINE))))]
    for list_name, ids in POTSDAM_LISTS.items():
        (base / list_name).write_text("\n".join(ids) + "\n")
    for tile in POTSDAM_LISTS["all.txt"]:
        rgb = noise_image(f"potsdam{tile}", h, w)
        img = np.concatenate([rgb.astype(np.float32) / 255.0, np.ones((h, w, 1), np.float32)], axis=2)
        savemat(base / "imgs" / f"{tile}.mat", {"img": img})
        tree.images[tile] = base / "imgs" / f"{tile}.mat"
        tree.raw[f"{tile}/rgb"] = rgb
        if tile in POTSDAM_LISTS["unlabelled_train.txt"]:
            tree.expected[tile] = np.full((h, w), -1, dtype=np.int64)
            continue
        savemat(base / "gt" / f"{tile}.mat", {"gt": fine})
        tree.raw[tile], tree.expected[tile] = fine, coarse
    tree.splits = {"train": ["0", "1"], "val": ["2"], "unlabelled_train": ["3"], "all": ["0", "1", "2", "3"]}
    return tree


# ---------------------------------------------------------------------------------------------
# Custom folder
# ---------------------------------------------------------------------------------------------

FOLDER_ITEMS = {"a": ((24, 32), ".jpg"), "c": ((20, 20), ".jpeg"), "sub/b": ((16, 24), ".png")}


def make_folder_tree(root: str | Path, with_labels: bool = True) -> Tree:
    """Images ``root/a.jpg`` (24×32), ``root/c.jpeg`` (20×20), ``root/sub/b.png`` (16×24).

    With labels: ``root/labels/<name>.png`` with quadrants 0, 1, 2, 255 (→ 0, 1, 2, −1), so
    ``n_classes`` is inferred as 3. Also writes ``root/notes.txt`` (not an image: skipped).
    Item names, sorted: ``a``, ``c``, ``sub/b``.
    """
    root = Path(root)
    tree = Tree(root=root, dataset_dir=root, size=FOLDER_ITEMS["a"][0])
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text("not an image\n")
    for name, ((h, w), ext) in FOLDER_ITEMS.items():
        path = root / f"{name}{ext}"
        Image.fromarray(noise_image(name, h, w)).save(path)
        tree.images[name] = path
        if with_labels:
            lab = quadrants(h, w, 0, 1, 2, 255)
            (root / "labels" / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(lab).save(root / "labels" / f"{name}.png")
            tree.raw[name] = lab
            tree.expected[name] = np.where(lab == 255, -1, lab.astype(np.int64))
        else:
            tree.expected[name] = np.full((h, w), -1, dtype=np.int64)
    tree.splits = {"all": sorted(FOLDER_ITEMS)}
    return tree
