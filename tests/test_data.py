"""Dataset readers: official layouts, label conversions, transforms, item contract, bad inputs."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fixtures_layouts import (
    CITYSCAPES_FILES,
    COCO_TRAIN,
    COCO_VAL,
    make_cityscapes_tree,
    make_cocostuff_tree,
    make_folder_tree,
    make_potsdam_tree,
)
from hpseg.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Cityscapes27,
    CocoStuff27,
    FolderDataset,
    Potsdam3,
    SegmentationTransform,
    UnreadableFileError,
    build_dataset,
    dataset_class_names,
    denormalize,
    label_maps,
)
from hpseg.errors import HPSegError


def check_item(item: dict, resolution: int, train: bool) -> None:
    """The hpseg.data item contract."""
    assert item["img"].shape == (3, resolution, resolution) and item["img"].dtype == torch.float32
    assert item["label"].shape == (resolution, resolution) and item["label"].dtype == torch.int64
    assert ("img_aug" in item) == train
    if train:
        assert item["img_aug"].shape == item["img"].shape and item["img_aug"].dtype == torch.float32
    assert isinstance(item["index"], int) and isinstance(item["name"], str)


# --- label maps ------------------------------------------------------------------------------


def test_label_maps_are_packaged_and_match_golden(golden_file) -> None:
    assert label_maps() == json.loads(golden_file("label_maps.json").read_text())


def test_class_names() -> None:
    assert len(dataset_class_names("cocostuff27")) == 27
    assert dataset_class_names("cityscapes27")[0] == "road" and len(dataset_class_names("cityscapes27")) == 27
    assert dataset_class_names("potsdam3") == [
        "roads and cars",
        "buildings and clutter",
        "trees and vegetation",
    ]
    with pytest.raises(HPSegError, match="class_names"):
        dataset_class_names("folder")
    with pytest.raises(HPSegError, match="unknown"):
        dataset_class_names("voc")


# --- COCO-Stuff-27 ---------------------------------------------------------------------------


def test_cocostuff_splits_and_coarse_labels(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    train = CocoStuff27(tree.root, "train")
    val = CocoStuff27(tree.root, "val")
    assert [train.name(i) for i in range(len(train))] == COCO_TRAIN
    assert [val.name(i) for i in range(len(val))] == COCO_VAL  # the _7 list, not Coarse.txt
    assert len(CocoStuff27(tree.root, "train+val")) == len(COCO_TRAIN) + len(COCO_VAL) + 1
    assert val.n_classes == 27 and val.class_names[9] == "person"
    for ds in (train, val):
        for i in range(len(ds)):
            image, label = ds.load(i)
            assert image.size == (32, 24) and image.mode == "RGB"
            np.testing.assert_array_equal(label, tree.expected[ds.name(i)])
    _, label = val.load(1)
    assert label[0, 0] == 9 and label[0, 31] == 17 and label[23, 0] == 24 and label[23, 31] == -1
    assert label[1, 2] == 5  # fine 50 → coarse 5 ("kitchen")


def test_cocostuff_accepts_dataset_folder_as_root(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    assert len(CocoStuff27(tree.dataset_dir, "val")) == len(COCO_VAL)  # the HP authors' data_path


def test_cocostuff_eval_items(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    ds = build_dataset("cocostuff27", tree.root, "val", mode="eval", resolution=12)
    item = ds[0]
    check_item(item, 12, train=False)
    # 24×32 → 12×16 → centre 12×12 (columns 2..13): quadrant boundary at column 8 - 2 = 6
    lab = item["label"]
    assert lab[0, 0] == 9 and lab[0, 11] == 17 and lab[11, 0] == 24 and lab[11, 11] == -1
    assert set(lab.unique().tolist()) <= {9, 17, 24, 5, -1}
    again = ds[0]
    assert torch.equal(item["img"], again["img"]) and torch.equal(item["label"], again["label"])
    assert ds[-1]["index"] == len(ds) - 1
    with pytest.raises(IndexError):
        ds[len(ds)]


# --- Cityscapes-27 ---------------------------------------------------------------------------


def test_cityscapes_labels_and_order(tmp_path: Path) -> None:
    tree = make_cityscapes_tree(tmp_path)
    train = Cityscapes27(tree.root, "train")
    assert [train.name(i) for i in range(len(train))] == tree.splits["train"]
    assert len(Cityscapes27(tree.root, "val")) == len(CITYSCAPES_FILES["val"])
    image, label = train.load(0)
    assert image.size == (32, 16)
    np.testing.assert_array_equal(label, tree.expected[train.name(0)])
    # stripes of labelIds 0, 6, 7, 8, 26, 33, 34, 255
    assert label[0, ::4].tolist() == [-1, -1, 0, 1, 19, 26, -1, -1]
    assert train.class_names[19] == "car" and train.class_names[26] == "bicycle"


def test_cityscapes_train_items(tmp_path: Path) -> None:
    tree = make_cityscapes_tree(tmp_path)
    ds = build_dataset("cityscapes27", tree.root, "train", mode="train", resolution=8)
    torch.manual_seed(0)
    item = ds[1]
    check_item(item, 8, train=True)
    assert not torch.allclose(item["img"], item["img_aug"])
    # 16×32 → 8×16 → centre columns 4..11 of the half-size stripes (2 columns each): stripes 2..5
    assert item["label"][0].tolist() == [0, 0, 1, 1, 19, 19, 26, 26]


def test_cityscapes_missing_labels(tmp_path: Path) -> None:
    tree = make_cityscapes_tree(tmp_path)
    for p in (tree.dataset_dir / "gtFine" / "val").rglob("*labelIds.png"):
        p.unlink()
    with pytest.raises(HPSegError, match="no label file"):
        Cityscapes27(tree.root, "val")


# --- Potsdam-3 -------------------------------------------------------------------------------


def test_potsdam_splits_rgb_and_labels(tmp_path: Path) -> None:
    tree = make_potsdam_tree(tmp_path)
    for split, names in tree.splits.items():
        ds = Potsdam3(tree.root, split)
        assert [ds.name(i) for i in range(len(ds))] == names
    ds = Potsdam3(tree.root, "all")
    for i in range(len(ds)):
        image, label = ds.load(i)
        assert image.mode == "RGB" and image.size == (28, 16)  # 4th (infra-red) channel dropped
        np.testing.assert_allclose(np.asarray(image, dtype=np.int16), tree.raw[f"{ds.name(i)}/rgb"], atol=1)
        expected = tree.expected[ds.name(i)]
        if ds.name(i) == "3":
            assert label is None  # unlabelled tile
        else:
            np.testing.assert_array_equal(label, expected)
            assert label[0, ::4].tolist() == [0, 1, 2, 2, 0, 1, -1]
    item = build_dataset("potsdam3", tree.root, "unlabelled_train", mode="eval", resolution=8)[0]
    check_item(item, 8, train=False)
    assert (item["label"] == -1).all()
    assert len(Potsdam3(tree.root, "train+val")) == 3


def test_potsdam_bad_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    tree = make_potsdam_tree(tmp_path)
    savemat(tree.images["2"], {"image": np.zeros((4, 4, 3))})
    with pytest.raises(HPSegError, match="no variable 'img'"):
        Potsdam3(tree.root, "val")[0]
    tree.images["0"].write_bytes(b"not a mat file at all")
    with pytest.raises(UnreadableFileError, match="0.mat"):
        Potsdam3(tree.root, "train")[0]


# --- transforms ------------------------------------------------------------------------------


def test_transform_geometry_and_nearest_labels() -> None:
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    label = np.zeros((20, 40), np.int64)
    label[:, 20:] = 3
    label[:, 19] = -1
    out = SegmentationTransform("eval", 10)(image, label)
    assert out["img"].shape == (3, 10, 10) and out["label"].shape == (10, 10)
    # 20×40 → 10×20 → centre columns 5..14: original columns 10..29, boundary at new column 5
    assert set(out["label"].unique().tolist()) <= {0, 3, -1}  # nearest: no interpolated classes
    assert out["label"][0, :4].tolist() == [0, 0, 0, 0] and out["label"][0, 5:].tolist() == [3] * 5
    # normalisation: a black image maps to −mean/std
    expected = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out["img"][:, 0, 0], expected)
    torch.testing.assert_close(denormalize(out["img"]), torch.zeros(3, 10, 10), atol=1e-6, rtol=0)


def test_transform_without_labels_and_modes() -> None:
    image = Image.fromarray(np.full((8, 8, 3), 128, np.uint8))
    out = SegmentationTransform("eval", 4)(image, None)
    assert (out["label"] == -1).all() and "img_aug" not in out
    for kwargs in ({"mode": "test"}, {"interpolation": "lanczos"}):
        with pytest.raises(HPSegError):
            SegmentationTransform(**{"mode": "eval", "resolution": 4, **kwargs})


def test_train_augmentation_is_photometric_only() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for on_normalized in (False, True):
        t = SegmentationTransform("train", 16, aug_on_normalized=on_normalized)
        torch.manual_seed(1)
        outs = [t(image, None) for _ in range(4)]
        assert all(not torch.allclose(o["img"], o["img_aug"]) for o in outs)
        assert all(torch.equal(o["img"], outs[0]["img"]) for o in outs)  # img itself not augmented
        # same geometry: the augmented view stays highly correlated with the original pixels
        a, b = outs[0]["img"].flatten(), outs[0]["img_aug"].flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.3


def test_nearest_interpolation_option(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    ds = build_dataset("cocostuff27", tree.root, "val", mode="eval", resolution=12, interpolation="nearest")
    img = ds[0]["img"]
    raw = np.asarray(Image.open(tree.images[COCO_VAL[0]]).convert("RGB"))
    # nearest of a 2× downscale picks pixel-centre samples: odd rows/columns of the source
    pixel = denormalize(img)[:, 0, 0] * 255
    np.testing.assert_allclose(pixel.numpy(), raw[1, 2 * 2 + 1], atol=1)


# --- folder datasets -------------------------------------------------------------------------


def test_folder_with_labels(tmp_path: Path) -> None:
    tree = make_folder_tree(tmp_path, with_labels=True)
    ds = FolderDataset(tree.root, "eval", 8)
    assert [ds.name(i) for i in range(len(ds))] == ["a", "c", "sub/b"]
    assert ds.n_classes == 3 and ds.class_names == ["class 0", "class 1", "class 2"] and ds.has_labels
    for i in range(len(ds)):
        _, label = ds.load(i)
        np.testing.assert_array_equal(label, tree.expected[ds.name(i)])
    check_item(ds[2], 8, train=False)
    named = FolderDataset(tree.root, n_classes=5, class_names=list("abcde"))
    assert named.n_classes == 5 and named.class_names[4] == "e"
    assert FolderDataset(tree.root, class_names=["x", "y", "z", "w"]).n_classes == 4
    with pytest.raises(HPSegError, match="2 class names given for 3 classes"):
        FolderDataset(tree.root, n_classes=3, class_names=["x", "y"])
    with pytest.raises(HPSegError, match="contains class 2"):
        FolderDataset(tree.root, n_classes=2)[0]


def test_folder_without_labels(tmp_path: Path) -> None:
    tree = make_folder_tree(tmp_path, with_labels=False)
    ds = build_dataset(
        "folder", tree.root, "train", mode="train", resolution=8, n_classes=4, class_names=None
    )
    assert len(ds) == 3 and ds.n_classes == 4 and not ds.has_labels
    item = ds[0]
    check_item(item, 8, train=True)
    assert (item["label"] == -1).all()
    with pytest.raises(HPSegError, match="data.n_classes"):
        FolderDataset(tree.root)


def test_folder_split_subfolders_and_label_dir(tmp_path: Path) -> None:
    make_folder_tree(tmp_path / "train", with_labels=True)
    make_folder_tree(tmp_path / "val", with_labels=False)
    assert build_dataset("folder", tmp_path, "train", mode="eval", resolution=8).n_classes == 3
    assert len(build_dataset("folder", tmp_path, "val", mode="eval", resolution=8, n_classes=2)) == 3
    # labels elsewhere, with another suffix
    images = tmp_path / "imgs"
    make_folder_tree(images, with_labels=True)
    (images / "labels").rename(tmp_path / "masks")
    for p in list((tmp_path / "masks").rglob("*.png")):
        p.rename(p.with_name(p.stem + "_mask.png"))
    ds = FolderDataset(images, label_dir=tmp_path / "masks", label_suffix="_mask.png")
    assert ds.has_labels and ds.n_classes == 3
    (tmp_path / "masks" / "c_mask.png").unlink()
    with pytest.raises(HPSegError, match="1 of 3 images have no label"):
        FolderDataset(images, label_dir=tmp_path / "masks", label_suffix="_mask.png")


# --- build_dataset ---------------------------------------------------------------------------


def test_build_dataset_dispatch_and_options(tmp_path: Path) -> None:
    tree = make_potsdam_tree(tmp_path)
    ds = build_dataset(
        "potsdam3", tree.root, "val", mode="eval", resolution=8, five_crop=True, crop_ratio=0.5
    )
    assert isinstance(ds, Potsdam3)  # five_crop only concerns training
    renamed = build_dataset(
        "potsdam3", tree.root, "val", mode="eval", resolution=8, class_names=["r", "b", "t"]
    )
    assert renamed.class_names == ["r", "b", "t"]
    with pytest.raises(HPSegError, match="unknown"):
        build_dataset("voc", tree.root, "val", mode="eval", resolution=8)
    with pytest.raises(HPSegError, match="mode"):
        build_dataset("potsdam3", tree.root, "val", mode="test", resolution=8)
    with pytest.raises(HPSegError, match="split"):
        build_dataset("potsdam3", tree.root, "test", mode="eval", resolution=8)
    with pytest.raises(HPSegError, match="has 3 classes"):
        build_dataset("potsdam3", tree.root, "val", mode="eval", resolution=8, n_classes=5)
    with pytest.raises(HPSegError, match="label_dir"):
        build_dataset("potsdam3", tree.root, "val", mode="eval", resolution=8, label_dir="x")
    with pytest.raises(HPSegError, match="prepare"):
        build_dataset("potsdam3", tree.root, "train", mode="train", resolution=8, five_crop=True)


def test_build_dataset_synthetic_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeScenes:
        def __init__(self, **kwargs):
            calls.append(kwargs)

    fake = types.ModuleType("hpseg.data.synthetic")
    fake.SyntheticScenes = FakeScenes  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hpseg.data.synthetic", fake)
    ds = build_dataset(
        "synthetic", None, "train", mode="train", resolution=32, n_classes=3, seed=0, class_names=None
    )
    assert isinstance(ds, FakeScenes)
    assert calls == [{"split": "train", "mode": "train", "resolution": 32, "n_classes": 3, "seed": 0}]


def test_items_collate(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    ds = build_dataset("cocostuff27", tree.root, "train", mode="train", resolution=8)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["img"].shape == (2, 3, 8, 8) and batch["img_aug"].shape == (2, 3, 8, 8)
    assert batch["label"].shape == (2, 8, 8) and batch["label"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1] and batch["name"] == COCO_TRAIN[:2]


# --- bad inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cocostuff27", "cityscapes27", "potsdam3"])
def test_missing_root_and_wrong_layout(tmp_path: Path, name: str) -> None:
    with pytest.raises(HPSegError, match="does not exist.*docs/datasets.md"):
        build_dataset(name, tmp_path / "nowhere", "val", mode="eval", resolution=8)
    folder = {"cocostuff27": "cocostuff", "cityscapes27": "cityscapes", "potsdam3": "potsdam"}[name]
    (tmp_path / folder).mkdir()
    with pytest.raises(HPSegError, match="expected .*" + folder) as err:
        build_dataset(name, tmp_path, "val", mode="eval", resolution=8)
    assert "docs/datasets.md" in str(err.value)
    with pytest.raises(HPSegError, match="data.root"):
        build_dataset(name, None, "val", mode="eval", resolution=8)


def test_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(HPSegError, match="does not exist"):
        FolderDataset(tmp_path / "nowhere", n_classes=2)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(HPSegError, match="no images found"):
        FolderDataset(tmp_path, n_classes=2)


def test_listed_image_missing_is_a_layout_error(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    tree.images[COCO_VAL[0]].unlink()
    with pytest.raises(HPSegError, match=f"layout mismatch.*{COCO_VAL[0]}.jpg"):
        CocoStuff27(tree.root, "val")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    bad = tree.images[COCO_TRAIN[1]]
    bad.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    ds = build_dataset("cocostuff27", tree.root, "train", mode="train", resolution=8)
    ds[0]  # the others still read
    with pytest.raises(UnreadableFileError) as err:
        ds[1]
    assert err.value.path == bad and str(bad) in str(err.value) and isinstance(err.value, HPSegError)
    # a truncated file is reported the same way
    data = tree.images[COCO_TRAIN[2]].read_bytes()
    tree.images[COCO_TRAIN[2]].write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match=COCO_TRAIN[2]):
        ds[2]


def test_wrong_size_label_names_both_sizes(tmp_path: Path) -> None:
    tree = make_cocostuff_tree(tmp_path)
    label_path = tree.dataset_dir / "annotations" / "val2017" / f"{COCO_VAL[0]}.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(label_path)
    with pytest.raises(HPSegError, match=r"12x10 .* 32x24") as err:
        build_dataset("cocostuff27", tree.root, "val", mode="eval", resolution=8)[0]
    assert str(label_path) in str(err.value)


def test_colour_label_is_rejected(tmp_path: Path) -> None:
    tree = make_folder_tree(tmp_path, with_labels=True)
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tree.root / "labels" / "a.png")
    with pytest.raises(HPSegError, match="single-channel"):
        FolderDataset(tree.root, n_classes=3)[0]


def test_unreadable_error_survives_pickling_and_workers(tmp_path: Path) -> None:
    import pickle

    err = UnreadableFileError.for_file(tmp_path / "x.jpg", "truncated")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, UnreadableFileError) and back.path == err.path and str(back) == str(err)
    tree = make_cocostuff_tree(tmp_path)
    tree.images[COCO_TRAIN[1]].unlink()  # vanished after the dataset was listed
    ds = build_dataset("cocostuff27", tree.root, "train", mode="eval", resolution=8)
    with pytest.raises(UnreadableFileError, match=f"{COCO_TRAIN[1]}.jpg.*not found"):
        ds[1]
    with pytest.raises(UnreadableFileError, match=f"{COCO_TRAIN[1]}.jpg"):
        list(DataLoader(ds, batch_size=1, num_workers=1))


def test_folder_leaves_out_unreadable_images_in_order(tmp_path: Path, caplog) -> None:
    tree = make_folder_tree(tmp_path, with_labels=False)
    data = tree.images["a"].read_bytes()
    (tmp_path / "b_cut.jpg").write_bytes(data[: len(data) // 3])  # sorts between a and c
    (tmp_path / "zz.png").write_text("a text file named .png")
    with caplog.at_level("WARNING", logger="hpseg"):
        ds = FolderDataset(tmp_path, n_classes=2, max_skipped_fraction=0.5)
    assert ds.ids == ["a", "c", "sub/b"]  # the readable ones, in their sorted order
    assert [p.name for p, _ in ds.skipped] == ["b_cut.jpg", "zz.png"]
    assert len([r for r in caplog.records if "cannot be read" in r.getMessage()]) == 1  # one line
    assert ds[1]["name"] == "c"
    with pytest.raises(HPSegError, match=r"2 of 5 images .*cannot be read .*first: b_cut.jpg.*max_skipped_fraction"):
        FolderDataset(tmp_path, n_classes=2, max_skipped_fraction=0.2)
