"""Images in and out of tensors: ImageNet normalisation, decoding files, finding image files.

The one place that defines the ImageNet statistics every DINO-family backbone expects and the
image file types hpseg reads. Everything here is plain conversion; nothing depends on a model.

Every reader (datasets, the segmenter, ``hpseg segment``) decodes through :func:`open_rgb` /
:func:`as_rgb`, so an image means the same RGB pixels everywhere:

* the EXIF orientation is applied (a phone photo stored sideways is read upright);
* 16-bit greyscale (PIL modes ``I;16*``, and ``I``, taken as 16-bit) is scaled to 8 bits
  (``round(v / 257)``), not clipped at 255;
* transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent colour) is
  composited over **white** (:data:`ALPHA_BACKGROUND`), for files and ``(H, W, 4)`` arrays alike;
* palette, CMYK (JPEG, Adobe-inverted or not), 1-bit and other modes convert to RGB as PIL does.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError, UnreadableFileError

log = logging.getLogger(__name__)

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "as_rgb",
    "check_image_file",
    "collect_inputs",
    "denormalize",
    "find_images",
    "normalize",
    "open_rgb",
    "pad_to_multiple",
    "read_image_tensor",
    "to_image_tensor",
    "to_uint8_hwc",
]

#: ImageNet channel means and standard deviations (RGB), the normalisation of every backbone
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: file extensions read as images (lower case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: the colour transparent pixels are composited over (RGB, uint8): white
ALPHA_BACKGROUND = (255, 255, 255)

# errors PIL and numpy raise for damaged files (truncated data, bad headers, ...)
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
# PIL modes of 16-bit (or wider) single-channel images, scaled to 8 bits by 1/257
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_ORIENTATION = 0x0112  # the EXIF tag


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return mean, std


def normalize(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ``(..., 3, H, W)`` → ImageNet-normalised (same shape, float)."""
    rgb = rgb.float() if not rgb.is_floating_point() else rgb
    mean, std = _stats(rgb)
    return (rgb - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``(..., 3, H, W)`` → RGB in [0, 1] (clamped)."""
    mean, std = _stats(images)
    return (images * std + mean).clamp(0.0, 1.0)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Normalised ``(3, H, W)`` → ``(H, W, 3)`` uint8 RGB (for pictures)."""
    return (denormalize(images.detach().float().cpu()).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _over_background(rgba: np.ndarray) -> np.ndarray:
    """``(H, W, 4)`` uint8 RGBA → ``(H, W, 3)`` uint8 RGB composited over :data:`ALPHA_BACKGROUND`."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    background = np.asarray(ALPHA_BACKGROUND, dtype=np.float32)
    out = rgba[..., :3].astype(np.float32) * alpha + background * (1.0 - alpha)
    return np.asarray(out.round().clip(0, 255), dtype=np.uint8)


def as_rgb(image: Any) -> Any:
    """A PIL image of any mode as an RGB PIL image (the rules in the module docstring; the
    EXIF orientation is applied by :func:`open_rgb`, which knows the image came from a file)."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_GREY:
        wide = np.asarray(image).astype(np.float32)
        grey = np.asarray((wide / 257.0).round().clip(0, 255), dtype=np.uint8)
        return Image.fromarray(np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2)))
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        return Image.fromarray(_over_background(np.asarray(image.convert("RGBA"))))
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike[str]) -> Any:
    """Decode an image file fully into an RGB PIL image, upright (EXIF orientation applied) and
    converted by :func:`as_rgb`. The one decoder of image files in hpseg.

    Raises:
        UnreadableFileError: the file is missing, truncated or not an image (names the file).
    """
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError.for_file(path, "file not found")
    try:
        im = Image.open(path)
        try:
            im.load()  # closes the file of single-frame formats; the decoded image is kept, not copied
            if im.getexif().get(_ORIENTATION, 1) not in (0, 1):
                return as_rgb(ImageOps.exif_transpose(im))
            return as_rgb(im)
        except BaseException:
            im.close()
            raise
    except (*_READ_ERRORS, Image.DecompressionBombError) as err:
        raise UnreadableFileError.for_file(path, f"{type(err).__name__}: {err}") from err


def check_image_file(path: str | os.PathLike[str]) -> str | None:
    """Why an image file cannot be read, or None when it decodes: a cheap check.

    JPEGs are decoded at 1/8 scale (every compressed byte is still read, so truncation and
    corruption show), PNGs have every chunk's checksum verified (truncation and damaged bytes
    show; damage that keeps the checksums right shows only when decoded), other formats are
    decoded fully.
    """
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        return "file not found"
    try:
        with Image.open(p) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
            elif im.format == "PNG":
                im.verify()
            else:
                im.load()
    except (*_READ_ERRORS, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def read_image_tensor(path: str | os.PathLike[str]) -> torch.Tensor:
    """An image file as RGB float ``(3, H, W)`` in [0, 1]."""
    arr = np.asarray(open_rgb(path), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


#: how far float pixels may stray outside [0, 1] (resampling overshoot) before they are refused
UNIT_TOLERANCE = 0.02


def _unit_range(t: torch.Tensor) -> torch.Tensor:
    """Float RGB in [0, 1], clamped; refused when it is not: 0–255 values, or ImageNet-normalised
    ones (negative), which would otherwise be segmented as a different, clipped image."""
    if t.numel():
        low, high = float(t.min()), float(t.max())
        if low < -UNIT_TOLERANCE:
            raise HPSegError(
                f"float images must be raw RGB in [0, 1], got values down to {low:.2f}: this looks ImageNet-"
                "normalised; pass the image before normalisation (hpseg.imaging.denormalize undoes it)"
            )
        if high > 1.0 + UNIT_TOLERANCE:
            raise HPSegError(
                f"float images must be raw RGB in [0, 1], got values up to {high:.1f}: divide by 255 (or pass uint8)"
            )
    return t.clamp(0.0, 1.0)


def to_image_tensor(image: Any) -> torch.Tensor:
    """Any supported image as an RGB float tensor ``(3, H, W)`` in [0, 1] on the CPU.

    Accepts a PIL image (any mode; converted by :func:`as_rgb`), a numpy array ``(H, W, 3)`` /
    ``(H, W, 4)`` (composited over :data:`ALPHA_BACKGROUND`) / ``(H, W)`` (grey) of uint8,
    uint16 (16-bit range) or floats in [0, 1], a tensor ``(3, H, W)`` (float in [0, 1] or
    uint8), or a path to an image file (:func:`open_rgb`).

    Raises:
        HPSegError: unsupported type or shape.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        return read_image_tensor(image)
    if isinstance(image, Image.Image):
        arr = np.asarray(as_rgb(image), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint16:
            arr = np.asarray((arr.astype(np.float32) / 257.0).round(), dtype=np.uint8)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise HPSegError(f"numpy images must be (H, W, 3) RGB, got shape {arr.shape}: convert to RGB first")
        if arr.shape[2] == 4:
            arr = _over_background(arr if arr.dtype == np.uint8 else (_unit_range(
                torch.from_numpy(arr.astype(np.float32))).numpy() * 255.0).round().astype(np.uint8))
        arr = np.array(arr, copy=True)  # also makes read-only arrays (np.asarray(pil)) safe
        t = torch.from_numpy(arr).permute(2, 0, 1)
        return t.float().div_(255.0) if arr.dtype == np.uint8 else _unit_range(t.float())
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise HPSegError(f"image tensors must be (3, H, W) RGB in [0, 1], got shape {tuple(t.shape)}")
        return t.float().div(255.0) if t.dtype == torch.uint8 else _unit_range(t.float())
    raise HPSegError(
        f"cannot read a {type(image).__name__} as an image: pass a PIL image, an (H, W, 3) numpy array, "
        "a (3, H, W) tensor in [0, 1] or an image path"
    )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``(3, H, W)`` at the bottom/right to multiples of ``multiple`` (reflect; replicate
    where the image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x.unsqueeze(0), (0, pw, 0, ph), mode=mode).squeeze(0)


# ------------------------------------------------------------------------------------------
# finding image files
# ------------------------------------------------------------------------------------------


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def find_images(root: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under ``root`` (recursive, sorted by relative path), hidden files and
    ``exclude``'s subtree left out."""
    excl = exclude.resolve() if exclude is not None else None
    found = []
    for path in root.rglob("*"):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        rel = path.relative_to(root)
        if _is_hidden(rel) or (excl is not None and (excl == path.resolve() or excl in path.resolve().parents)):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def collect_inputs(inputs: Sequence[str], exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """Image files named by ``inputs`` (files, folders searched recursively, globs), in order.

    Returns ``(file, relative output path without extension)`` pairs: a file's stem, or its
    path below the folder it was found in (subfolders mirrored). Files under ``exclude`` (the
    output folder) are left out; duplicates are listed once; two inputs that would write the
    same output name get distinct names (``a_png``, ``a_2``).
    """
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    excl = exclude.resolve() if exclude is not None else None

    def add(path: Path, rel: Path) -> None:
        real = path.resolve()
        if real in seen or (excl is not None and excl in real.parents):
            return
        seen.add(real)
        found.append((path, rel.with_suffix("")))

    def add_folder(folder: Path) -> None:
        for f in find_images(folder):
            add(f, f.relative_to(folder))

    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            add(path, Path(path.name))
        elif glob.has_magic(spec):
            for m in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    add_folder(mp)
                elif mp.is_file() and mp.suffix.lower() in IMAGE_EXTENSIONS:
                    add(mp, Path(mp.name))
        else:
            log.warning("input %s does not exist", spec)
    names: set[Path] = set()
    out: list[tuple[Path, Path]] = []
    for path, rel in found:
        key = rel
        if key in names:
            key = rel.with_name(f"{rel.name}_{path.suffix.lstrip('.').lower()}")
            n = 2
            while key in names:
                key = rel.with_name(f"{rel.name}_{n}")
                n += 1
            log.warning("%s: output name %s is taken, writing %s instead", path, rel, key)
        names.add(key)
        out.append((path, key))
    return out
