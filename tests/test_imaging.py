"""Decoding images: every mode a user's folder may hold reads as the RGB pixels it shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpseg.errors import UnreadableFileError
from hpseg.imaging import ALPHA_BACKGROUND, check_image_file, open_rgb, to_image_tensor


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(open_rgb(path)).astype(np.int64)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    expected = np.array([[0, 100, 128, 255]])  # round(v / 257)
    got = _rgb(tmp_path / "grey16.png")
    assert got.shape == (1, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], expected)


def test_mode_i_is_taken_as_16_bit() -> None:
    image = Image.fromarray(np.array([[0, 257 * 200, 65535]], dtype=np.int32))
    assert image.mode == "I"
    got = (to_image_tensor(image) * 255).round().long()
    assert got[:, 0].tolist() == [[0, 200, 255]] * 3


def test_palette_without_and_with_transparency(tmp_path: Path) -> None:
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    pal = [10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * (3 * 253)
    plain = Image.fromarray(index, mode="P")
    plain.putpalette(pal)
    plain.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "p.png"),
                                  [[[10, 20, 30], [200, 100, 0]], [[0, 0, 255], [200, 100, 0]]])
    plain.save(tmp_path / "pt.png", transparency=1)  # colour 1 is transparent: the background shows
    bg = list(ALPHA_BACKGROUND)
    np.testing.assert_array_equal(_rgb(tmp_path / "pt.png"), [[[10, 20, 30], bg], [[0, 0, 255], bg]])


def test_cmyk_jpeg(tmp_path: Path) -> None:
    block = np.zeros((16, 48, 4), dtype=np.uint8)
    block[:, :16] = (255, 0, 0, 0)  # cyan
    block[:, 16:32] = (0, 0, 0, 0)  # white
    block[:, 32:] = (0, 0, 0, 255)  # black
    Image.fromarray(block, mode="CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    got = _rgb(tmp_path / "cmyk.jpg")
    expected = np.zeros((16, 48, 3))
    expected[:, :16] = (0, 255, 255)
    expected[:, 16:32] = (255, 255, 255)
    expected[:, 32:] = (0, 0, 0)
    assert np.abs(got[2:-2, 2:14] - expected[2:-2, 2:14]).max() <= 3
    assert np.abs(got[2:-2, 18:30] - expected[2:-2, 18:30]).max() <= 3
    assert np.abs(got[2:-2, 34:46] - expected[2:-2, 34:46]).max() <= 3


def test_alpha_is_composited_over_the_background(tmp_path: Path) -> None:
    la = np.array([[[0, 0], [0, 255], [0, 128], [200, 255]]], dtype=np.uint8)  # (1, 4, 2): grey, alpha
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    bg = ALPHA_BACKGROUND[0]
    expected = [bg, 0, round(bg * 127 / 255), 200]  # c·a + background·(1 − a)
    got = _rgb(tmp_path / "la.png")
    assert got[0, :, 0].tolist() == expected and (got[..., 0] == got[..., 2]).all()
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "rgba.png"), [[[255, 0, 0], list(ALPHA_BACKGROUND)]])
    # arrays with alpha follow the same rule as files
    assert (to_image_tensor(rgba) * 255).round().long()[:, 0, 1].tolist() == list(ALPHA_BACKGROUND)


def test_exif_rotated_jpeg_is_read_upright(tmp_path: Path) -> None:
    stored = np.zeros((16, 32, 3), dtype=np.uint8)  # stored sideways: left red, right blue
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    got = _rgb(tmp_path / "phone.jpg")
    assert got.shape == (32, 16, 3)  # upright: taller than wide, red on top
    assert np.abs(got[2:14, 2:14] - [255, 0, 0]).max() <= 8
    assert np.abs(got[18:30, 2:14] - [0, 0, 255]).max() <= 8


def test_uint16_arrays_use_the_16_bit_range() -> None:
    arr = np.full((2, 2, 3), 65535, dtype=np.uint16)
    assert torch.equal(to_image_tensor(arr), torch.ones(3, 2, 2))


def test_damaged_files_are_found_by_the_cheap_check(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    png = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    assert check_image_file(tmp_path / "ok.jpg") is None and check_image_file(tmp_path / "ok.png") is None
    for bad in ("cut.jpg", "text.jpg", "cut.png", "missing.png"):
        assert check_image_file(tmp_path / bad), bad
        with pytest.raises(UnreadableFileError):
            open_rgb(tmp_path / bad)
