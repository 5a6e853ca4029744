"""Five-crop preparation: the authors' tree, label +1 encoding, read-back, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import hpseg.data.prepare as prepare_mod
from fixtures_layouts import COCO_TRAIN, make_cityscapes_tree, make_cocostuff_tree, make_potsdam_tree
from hpseg.data import CroppedDataset, build_dataset, cropped_dir, prepare_five_crop
from hpseg.data.prepare import five_crop_arrays
from hpseg.errors import HPSegError


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def numbered(folder: Path, ext: str) -> list[int]:
    return sorted(int(p.stem) for p in folder.glob(f"*.{ext}"))


@pytest.fixture
def coco(tmp_path: Path):
    return make_cocostuff_tree(tmp_path)


def test_prepare_writes_authors_tree(coco) -> None:
    out = prepare_five_crop("cocostuff27", coco.root, "train", 0.5, progress=False)
    assert out == coco.root / "cropped" / "cocostuff27_five_crop_0.5" == cropped_dir(coco.root, "cocostuff27")
    n = 5 * len(COCO_TRAIN)
    assert numbered(out / "img" / "train", "jpg") == list(range(n))
    assert numbered(out / "label" / "train", "png") == list(range(n))
    for i, image_id in enumerate(COCO_TRAIN):
        labels = [read_png(out / "label" / "train" / f"{5 * i + c}.png") for c in range(5)]
        assert all(lab.dtype == np.uint8 and lab.shape == (12, 16) for lab in labels)
        # quadrants fine 0, 91, 181, 255 → coarse 9, 17, 24, −1 → stored +1: 10, 18, 25, 0
        tl = labels[0].copy()
        assert tl[1, 1 + i] == 5 + 1  # fine 50 → coarse 5
        tl[1, 1 + i] = 10
        assert (
            (tl == 10).all()
            and (labels[1] == 18).all()
            and (labels[2] == 25).all()
            and (labels[3] == 0).all()
        )
        np.testing.assert_array_equal(labels[4], coco.expected[image_id][6:18, 8:24] + 1)  # centre crop
        source = np.asarray(Image.open(coco.images[image_id]).convert("RGB"), dtype=np.float32)
        with Image.open(out / "img" / "train" / f"{5 * i + 3}.jpg") as im:
            assert im.mode == "RGB" and im.size == (16, 12)
            crop = np.asarray(im, dtype=np.float32)
        assert np.abs(crop - source[12:, 16:]).mean() < 40  # bottom-right crop (JPEG noise aside)
    assert not list(out.rglob("*.tmp"))


def test_crop_geometry_matches_torchvision_five_crop() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8))
    label = rng.integers(-1, 27, (23, 31))
    ours = five_crop_arrays(image, label, 0.5)
    size = [int(23 * 0.5), int(31 * 0.5)]
    theirs = TF.five_crop(TF.to_tensor(image), size)  # the authors' path: ToTensor, then five_crop
    their_labels = TF.five_crop(torch.from_numpy(label)[None], size)
    for (img, lab), t_img, t_lab in zip(ours, theirs, their_labels):
        back = t_img.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(img, back)
        np.testing.assert_array_equal(lab, t_lab[0].numpy())


def test_cropped_dataset_reads_back(coco) -> None:
    prepare_five_crop("cocostuff27", coco.root, "train", progress=False)
    ds = build_dataset(
        "cocostuff27", coco.root, "train", mode="train", resolution=8, five_crop=True, crop_ratio=0.5
    )
    assert isinstance(ds, CroppedDataset) and len(ds) == 15 and ds.n_classes == 27
    image, label = ds.load(3)  # bottom-right crop of image 0: all ignore
    assert image.size == (16, 12) and (label == -1).all()
    _, label = ds.load(5 + 1)  # top-right crop of image 1
    assert (label == 17).all()
    item = ds[4]
    assert item["img"].shape == (3, 8, 8) and item["img_aug"].shape == (3, 8, 8) and item["name"] == "4"
    assert set(item["label"].unique().tolist()) <= {9, 17, 24, 5, -1}
    # the eval split still reads full images
    assert not isinstance(
        build_dataset("cocostuff27", coco.root, "val", mode="eval", resolution=8, five_crop=True),
        CroppedDataset,
    )


def test_prepare_is_resumable(coco, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[Path] = []
    real = prepare_mod.atomic_write

    def counting(path, mode="wb"):
        written.append(Path(path))
        return real(path, mode)

    monkeypatch.setattr(prepare_mod, "atomic_write", counting)
    out = prepare_five_crop("cocostuff27", coco.root, progress=False)
    assert len(written) == 30
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    written.clear()
    prepare_five_crop("cocostuff27", coco.root, progress=False)
    assert written == [] and {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # a lost file: only its image's five crops are redone; stale temporaries are cleared
    (out / "label" / "train" / "7.png").unlink()
    stale = out / "img" / "train" / ".3.jpg.abc123.tmp"
    stale.write_bytes(b"half")
    keep = out / "img" / "train" / "user-notes.tmp"
    keep.write_text("not ours")
    prepare_five_crop("cocostuff27", coco.root, progress=False)
    assert sorted(p.name for p in written) == sorted(
        [f"{n}.jpg" for n in range(5, 10)] + [f"{n}.png" for n in range(5, 10)]
    )
    assert not stale.exists() and keep.exists()


def test_interrupted_prepare_leaves_no_partial_files(coco, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # in the middle of the second image
            fp.write(b"partial")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_five_crop("cocostuff27", coco.root, progress=False)
    out = cropped_dir(coco.root, "cocostuff27")
    assert not list(out.rglob("*.tmp"))
    assert json.loads((out / "hpseg_prepare_train.json").read_text())["complete"] is False
    for path in [*out.rglob("*.jpg"), *out.rglob("*.png")]:
        with Image.open(path) as im:
            im.load()  # every file present is complete
    with pytest.raises(HPSegError, match="incomplete.*hpseg prepare"):
        CroppedDataset(coco.root, "cocostuff27")
    monkeypatch.setattr(Image.Image, "save", real_save)
    prepare_five_crop("cocostuff27", coco.root, progress=False)
    assert len(CroppedDataset(coco.root, "cocostuff27")) == 15


def test_prepare_cityscapes_and_potsdam_names(tmp_path: Path) -> None:
    city = make_cityscapes_tree(tmp_path / "c")
    out = prepare_five_crop("cityscapes27", city.root, "train", progress=False, num_workers=2)
    assert out.name == "cityscapes_five_crop_0.5"
    assert len(list((out / "img" / "train").glob("*.jpg"))) == 15
    lab = read_png(out / "label" / "train" / "0.png")  # top-left 8×16: stripes 0..3 of 2 columns each
    assert lab.shape == (8, 16) and lab[0, ::4].tolist() == [0, 0, 1, 2]  # (−1, −1, 0, 1) + 1
    pots = make_potsdam_tree(tmp_path / "p")
    out = prepare_five_crop("potsdam3", pots.root, "unlabelled_train", progress=False)
    assert out.name == "potsdam_five_crop_0.5"
    assert all((read_png(p) == 0).all() for p in (out / "label" / "unlabelled_train").glob("*.png"))
    ds = CroppedDataset(pots.root, "potsdam3", "unlabelled_train", mode="eval", resolution=4)
    assert len(ds) == 5 and (ds[0]["label"] == -1).all()


def test_other_ratio_and_bad_arguments(coco) -> None:
    out = prepare_five_crop("cocostuff27", coco.root, "val", crop_ratio=0.7, progress=False)
    assert out.name == "cocostuff27_five_crop_0.7"
    assert read_png(out / "label" / "val" / "0.png").shape == (int(24 * 0.7), int(32 * 0.7))
    with pytest.raises(HPSegError, match="crop_ratio"):
        prepare_five_crop("cocostuff27", coco.root, crop_ratio=0, progress=False)
    with pytest.raises(HPSegError, match="five-crop sets exist for"):
        prepare_five_crop("folder", coco.root, progress=False)
    with pytest.raises(HPSegError, match="does not exist"):
        prepare_five_crop("cocostuff27", coco.root / "missing", progress=False)
    with pytest.raises(
        HPSegError,
        match=r"not found: expected .*cocostuff27_five_crop_0.5.*hpseg prepare --preset cocostuff27",
    ):
        CroppedDataset(coco.root, "cocostuff27", "train")
