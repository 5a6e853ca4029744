"""Segmenter and ``hpseg segment``: sizes, padding, sliding windows, files, CLI parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpseg.backbones import BackboneArch, backbone_from_arch
from hpseg.checkpoint import save_checkpoint
from hpseg.cli import main
from hpseg.errors import HPSegError
from hpseg.imaging import collect_inputs, normalize, pad_to_multiple
from hpseg.model import HPModel
from hpseg.segmenter import Segmenter
from hpseg.viz import read_label_png, save_label_png

CLASSES = ["sky", "tree", "road"]
ASSIGNMENT = [2, 0, 1, -1]  # cluster -> class; cluster 3 matched to no class
# input images: (relative path, height, width); the tiny model trains at 32 px (4x4 grid, patch 8)
IMAGES = [("a.png", 37, 29), ("sub/b.jpg", 16, 16), ("sub/deeper/c.png", 70, 45)]


def tiny_model(seed: int = 0) -> HPModel:
    """A 1-block, 64-wide DINO-layout ViT (patch 8, 4x4 position grid) with random heads."""
    torch.manual_seed(seed)
    bb = backbone_from_arch(BackboneArch("dino_custom", 8, 64, 1, 1, (4, 4)))
    return HPModel.create(bb, dim=16, n_classes=3, n_clusters=4, class_names=CLASSES).eval()


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colours (blocks), so that predictions vary across the image."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 6), max(1, w // 6), 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def model() -> HPModel:
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model: HPModel) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, model, extra={"metrics": {"unsupervised": {"assignment": ASSIGNMENT}}})
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, (rel, h, w) in enumerate(IMAGES):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_image(h, w, seed=i)).save(root / rel)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, checkpoint: Path, image_dir: Path) -> tuple[Path, Path, list[int]]:
    """``hpseg segment`` on the folder, twice (determinism)."""
    out = tmp_path_factory.mktemp("segment")
    codes = [
        main(["segment", str(checkpoint), str(image_dir), "--out", str(out / run), "--device", "cpu"])
        for run in ("run1", "run2")
    ]
    return out / "run1", out / "run2", codes


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------


def test_segment_folder_writes_label_maps_of_input_sizes(cli_runs) -> None:
    run1, _, codes = cli_runs
    assert codes == [0, 0]
    for rel, h, w in IMAGES:
        stem = Path(rel).with_suffix("")
        labels = run1 / f"{stem}.png"  # subfolders mirrored
        with Image.open(labels) as im:
            assert im.mode == "P" and im.size == (w, h)
        with Image.open(run1 / f"{stem}_overlay.jpg") as im:
            assert im.size == (w, h)
        values = set(np.unique(read_label_png(labels)).tolist())
        assert values <= {-1, 0, 1, 2}  # clusters mapped to classes through the assignment
    legend = json.loads((run1 / "legend.json").read_text())
    assert [row["name"] for row in legend["labels"]] == CLASSES and legend["assignment"] == ASSIGNMENT
    assert (run1 / "legend.png").is_file()
    assert not (run1 / "notes.png").exists()


def test_segment_is_deterministic(cli_runs) -> None:
    run1, run2, _ = cli_runs
    for rel, _, _ in IMAGES:
        name = f"{Path(rel).with_suffix('')}.png"
        assert (run1 / name).read_bytes() == (run2 / name).read_bytes()


def test_corrupted_file_is_reported_and_skipped(cli_runs, image_dir: Path) -> None:
    run1, _, codes = cli_runs
    assert codes[0] == 0
    skipped = (run1 / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(image_dir / "bad.png"))
    assert not (run1 / "bad.png").exists()
    assert "image list" not in skipped[0] and "replace it with a readable copy, or delete it" in skipped[0]


def test_api_and_cli_give_identical_label_pngs(cli_runs, checkpoint: Path, image_dir: Path, tmp_path) -> None:
    run1, _, _ = cli_runs
    seg = Segmenter.from_checkpoint(checkpoint, device="cpu")
    assert seg.assignment == ASSIGNMENT and seg.label_names == CLASSES
    for rel, _, _ in IMAGES:
        name = f"{Path(rel).with_suffix('')}.png"
        labels = seg.predict(Image.open(image_dir / rel))
        save_label_png(labels, tmp_path / "api.png", seg.n_labels)
        assert (tmp_path / "api.png").read_bytes() == (run1 / name).read_bytes()


def test_no_matching_input_exits_2(checkpoint: Path, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "segment",
            str(checkpoint),
            str(tmp_path / "empty"),
            str(tmp_path / "*.jpg"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    assert "no input images matched" in capsys.readouterr().err


def test_collect_inputs_files_globs_and_name_clashes(image_dir: Path, tmp_path) -> None:
    for ext in ("png", "jpg"):
        Image.fromarray(random_image(8, 8)).save(tmp_path / f"x.{ext}")
    found = collect_inputs([str(tmp_path / "x.png"), str(tmp_path / "*.jpg"), str(image_dir / "a.png")])
    rels = [str(rel) for _, rel in found]
    assert rels == ["x", "x_jpg", "a"]
    found = collect_inputs([str(image_dir)], exclude=image_dir / "sub")
    assert [str(rel) for _, rel in found] == ["a", "bad"]


# ------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "cluster"])
def test_window_covering_the_image_equals_whole_image_prediction(model: HPModel, head: str) -> None:
    img = random_image(45, 30, seed=3)  # not multiples of the patch size: padded to 48 x 32
    x = pad_to_multiple(normalize(torch.from_numpy(img).permute(2, 0, 1).float() / 255), 8)
    ref = model.predict(x.unsqueeze(0))[head][0].argmax(0)[:45, :30].numpy()
    for window in (48, 1000):
        seg = Segmenter(model, head=head, device="cpu", window=window, assignment=None, resolution=None)
        np.testing.assert_array_equal(seg.predict(img), ref)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_sliding_windows_cover_large_images_without_seams(model: HPModel, overlap: float) -> None:
    img = random_image(90, 75, seed=4)
    seg = Segmenter(model, head="linear", device="cpu", window=32, overlap=overlap, batch_size=3, resolution=None)
    labels = seg.predict(img)
    assert labels.shape == (90, 75) and labels.min() >= 0 and labels.max() < 3  # no ignore anywhere
    proba = seg.predict_proba(img)
    assert proba.shape == (3, 90, 75) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(0), 1.0, atol=1e-5)
    # the row-streamed argmax equals the argmax of the whole blended score map
    np.testing.assert_array_equal(labels, proba.argmax(0))
    # blending is local: far from the image border, most pixels agree with a whole-image pass
    whole = Segmenter(model, head="linear", device="cpu", window=1000, resolution=None).predict(img)
    assert (labels == whole).mean() > 0.5


def test_cluster_head_maps_clusters_through_the_assignment(model: HPModel) -> None:
    img = random_image(40, 40, seed=5)
    raw = Segmenter(model, device="cpu", assignment=None).predict(img)
    mapped = Segmenter(model, device="cpu", assignment=ASSIGNMENT).predict(img)
    np.testing.assert_array_equal(mapped, np.asarray(ASSIGNMENT)[raw])
    with pytest.raises(HPSegError, match="one class id"):
        Segmenter(model, device="cpu", assignment=[0, 1])


def test_input_types_give_the_same_labels(model: HPModel) -> None:
    img = random_image(20, 27, seed=6)
    seg = Segmenter(model, device="cpu", head="linear")
    ref = seg.predict(img)
    for variant in (
        Image.fromarray(img),
        img.astype(np.float32) / 255,
        torch.from_numpy(img).permute(2, 0, 1).float() / 255,
    ):
        np.testing.assert_array_equal(seg.predict(variant), ref)
    assert [p.shape for p in seg.predict_batch([img, img[:9, :5]])] == [(20, 27), (9, 5)]
    with pytest.raises(HPSegError, match="divide by 255"):
        seg.predict(img.astype(np.float32))


def test_normalised_or_out_of_range_floats_are_refused_not_clipped(model: HPModel) -> None:
    """``predict`` takes raw RGB: an ImageNet-normalised tensor, or floats a little above 1, would
    be segmented as another (clipped) image without a word."""
    from hpseg.imaging import normalize

    img = torch.from_numpy(random_image(20, 27, seed=6)).permute(2, 0, 1).float() / 255
    seg = Segmenter(model, device="cpu", head="linear")
    with pytest.raises(HPSegError, match="looks ImageNet-normalised; pass the image before normalisation"):
        seg.predict(normalize(img))
    with pytest.raises(HPSegError, match=r"raw RGB in \[0, 1\], got values up to 1.2"):
        seg.predict(img * 1.2)
    assert seg.predict(img * 1.01).shape == (20, 27)  # resampling overshoot is tolerated


def test_legends_have_a_no_class_row_only_when_a_pixel_can_take_it(model: HPModel, tmp_path) -> None:
    from hpseg.viz import save_legend

    raw = Segmenter(model, device="cpu", assignment=None)  # an unlabelled run's clusters
    assert "ignore" not in raw.legend() and not raw.has_no_class
    unmatched = Segmenter(model, device="cpu", assignment=ASSIGNMENT)  # cluster 3 matched to no class
    assert unmatched.legend()["ignore"]["png_value"] == 255
    heights = []
    for seg in (raw, unmatched):
        save_legend(seg.legend(), tmp_path)
        heights.append(Image.open(tmp_path / "legend.png").height)
    assert heights[0] == 22 * raw.n_labels + 8 and heights[1] == 22 * (unmatched.n_labels + 1) + 8


def test_resolution_resizes_and_returns_the_input_size(model: HPModel) -> None:
    img = random_image(30, 50, seed=7)
    labels = Segmenter(model, device="cpu", resolution=16).predict(img)
    assert labels.shape == (30, 50)


def test_crf_needs_the_extra(model: HPModel, monkeypatch) -> None:
    import hpseg.crf

    def missing():
        raise HPSegError(hpseg.crf.MISSING_MESSAGE)

    monkeypatch.setattr(hpseg.crf, "_import_densecrf", missing)
    with pytest.raises(HPSegError, match=r"pip install 'hpseg\[crf\]'"):
        Segmenter(model, device="cpu", crf=True)


def test_crf_writes_refined_maps(checkpoint: Path, image_dir: Path, tmp_path) -> None:
    from hpseg.crf import crf_available

    if not crf_available():
        pytest.skip("pydensecrf2 not installed (pip install 'hpseg[crf]')")
    code = main(
        [
            "segment",
            str(checkpoint),
            str(image_dir / "a.png"),
            "--out",
            str(tmp_path),
            "--crf",
            "--no-overlay",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert read_label_png(tmp_path / "a_crf.png").shape == (37, 29)
    assert (tmp_path / "a.png").is_file() and not (tmp_path / "a_overlay.jpg").exists()


# --- large images in bounded memory -------------------------------------------------------------


def test_resize_by_rows_is_one_antialiased_resize(monkeypatch) -> None:
    import hpseg.segmenter as segmenter_module
    from hpseg.segmenter import resize_rows

    monkeypatch.setattr(segmenter_module, "_CHUNK_VALUES", 3 * 700 * 17)  # 17 rows per chunk
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 300, 700), dtype=np.uint8))
    whole = torch.nn.functional.interpolate(x.float().div(255)[None], size=(41, 95), mode="bilinear",
                                            align_corners=False, antialias=True)[0].clamp(0, 1)
    assert torch.equal(resize_rows(x, (41, 95)), whole)


def test_upsampling_by_rows_matches_one_interpolation(monkeypatch) -> None:
    import hpseg.segmenter as segmenter_module
    from hpseg.segmenter import upsample_rows

    monkeypatch.setattr(segmenter_module, "_CHUNK_VALUES", 4 * 450 * 23)  # 23 rows per chunk
    scores = torch.randn(4, 13, 29, generator=torch.Generator().manual_seed(0))
    chunks = list(upsample_rows(scores, (200, 450)))
    assert [y0 for y0, _ in chunks] == list(range(0, 200, 23))
    whole = torch.nn.functional.interpolate(scores[None], size=(200, 450), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(torch.cat([c for _, c in chunks], dim=1), whole, atol=1e-5, rtol=0)


def test_a_large_image_is_segmented_in_memory_of_its_label_map() -> None:
    """Peak memory of predicting a 2,000 × 6,000 photo (in a fresh process): at most twice its
    int64 label map plus 64 MB. Full-size float copies of the image and the upsampled scores,
    as before, took about 5 × the label map."""
    import subprocess
    import sys

    script = (
        "import resource, numpy as np, torch\n"
        "torch.set_num_threads(1)\n"
        "from hpseg.backbones import BackboneArch, backbone_from_arch\n"
        "from hpseg.model import HPModel\n"
        "from hpseg.segmenter import Segmenter\n"
        "torch.manual_seed(0)\n"
        "bb = backbone_from_arch(BackboneArch('dino_custom', 8, 64, 1, 1, (4, 4)))\n"
        "seg = Segmenter(HPModel.create(bb, dim=16, n_classes=3, n_clusters=6, class_names=list('abc')),\n"
        "                device='cpu', resolution=32)\n"
        "image = np.zeros((2000, 6000, 3), np.uint8); image[:, :3000] = 200\n"
        "seg.predict(image[:64, :640])\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "labels = seg.predict(image)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, labels.nbytes)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    grown, label_bytes = (int(float(v)) for v in out.stdout.split())
    assert label_bytes == 2000 * 6000 * 8
    assert grown <= 2 * label_bytes + 64 * 2**20, f"peak grew by {grown / 2**20:.0f} MB"
