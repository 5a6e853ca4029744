"""Train / eval / photometric transforms (docs/method.md §7–8), on ``torchvision.transforms.v2``.

Geometry is the same in both modes: resize the shorter side to ``resolution`` and take the
centre ``resolution × resolution`` crop. The image is resampled with ``interpolation``
(bilinear by default, with antialiasing); the label, held as a :class:`tv_tensors.Mask`, always
by nearest neighbour with pixel-centre alignment (``NEAREST_EXACT``, the convention of PIL's
``NEAREST`` that the authors' loaders use), so labels never take interpolated values.

Training adds ``img_aug``: the same crop with the authors' photometric augmentation —
``ColorJitter(.3, .3, .3, .1)``, ``RandomGrayscale(.2)``, ``RandomApply([GaussianBlur(5×5,
sigma ∈ [0.1, 2])], p=0.5)`` (torchvision's defaults for ``RandomApply`` and the blur's sigma,
as in the authors' ``run.py``). Eval mode has no randomness: an item depends on its index only.

Differences from the authors' loaders, both selectable:

* they resize images with nearest neighbour (``interpolation="nearest"`` reproduces that);
* they apply the photometric augmentation to the already *normalised* tensor, where
  ColorJitter clamps values to [0, 1] (``aug_on_normalized=True`` reproduces that). By default
  the augmentation acts on the 8-bit image before normalisation, as the method describes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from hpseg.errors import HPSegError
from hpseg.imaging import IMAGENET_MEAN, IMAGENET_STD, as_rgb

MODES = ("train", "eval")

INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST_EXACT,
}


def photometric_augmentation() -> v2.Compose:
    """The authors' photometric augmentation for ``img_aug`` (uint8 or float images)."""
    return v2.Compose(
        [
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=(5, 5), sigma=(0.1, 2.0))], p=0.5),
        ]
    )


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``(3, H, W)`` (or float in [0, 1]) → float32 ImageNet-normalised ``(3, H, W)``."""
    x = F.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True)
    return F.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))


def check_mode(mode: str) -> None:
    """Raise :class:`HPSegError` unless ``mode`` is ``"train"`` or ``"eval"``."""
    if mode not in MODES:
        raise HPSegError(f"dataset mode {mode!r} is unknown: use 'train' or 'eval'")


def resize_center_crop(
    image: tv_tensors.Image,
    label: tv_tensors.Mask | None,
    resolution: int,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
) -> tuple[tv_tensors.Image, tv_tensors.Mask | None]:
    """Shorter side → ``resolution``, then the centre ``resolution²`` crop of image and label.

    Args:
        image: ``(3, H, W)`` uint8 image.
        label: ``(H, W)`` int64 mask or None.
    Returns:
        ``(3, R, R)`` image and ``(R, R)`` mask (or None), ``R = resolution``.
    """
    size = [resolution, resolution]
    image = F.resize(image, [resolution], interpolation=interpolation, antialias=True)
    image = F.center_crop(image, size)
    if label is not None:
        label = F.resize(label, [resolution], interpolation=InterpolationMode.NEAREST_EXACT)
        label = F.center_crop(label, size)
    return image, label


class SegmentationTransform:
    """Joint image/label transform producing the ``img``, ``label`` (and ``img_aug``) entries.

    Args:
        mode: ``"train"`` or ``"eval"``; training adds ``img_aug``.
        resolution: output side ``R`` (224 for training, 320 for evaluation in the paper).
        interpolation: ``"bilinear"`` | ``"bicubic"`` | ``"nearest"`` for the image.
        aug_on_normalized: augment after normalisation, like the authors' code.

    ``__call__(image, label)`` takes a PIL image (any size and mode; converted by
    :func:`hpseg.imaging.as_rgb`) and an ``(H, W)`` int label array (−1 = ignore) or None, and
    returns ``{"img": (3,R,R) float32, "label": (R,R) int64[, "img_aug": (3,R,R) float32]}``;
    without labels ``label`` is all −1.
    """

    def __init__(
        self,
        mode: str,
        resolution: int,
        *,
        interpolation: str = "bilinear",
        aug_on_normalized: bool = False,
    ) -> None:
        check_mode(mode)
        if int(resolution) < 1:
            raise HPSegError(f"resolution must be a positive number of pixels, got {resolution}")
        if interpolation not in INTERPOLATIONS:
            raise HPSegError(
                f"interpolation {interpolation!r} is unknown: use one of {', '.join(INTERPOLATIONS)}"
            )
        self.mode = mode
        self.resolution = int(resolution)
        self.interpolation = interpolation
        self.aug_on_normalized = aug_on_normalized
        self.augment = photometric_augmentation() if mode == "train" else None

    def __call__(self, image: Image.Image, label: np.ndarray | None) -> dict[str, Any]:
        img = F.to_image(as_rgb(image))
        mask = None if label is None else tv_tensors.Mask(torch.from_numpy(np.asarray(label, dtype=np.int64)))
        img, mask = resize_center_crop(img, mask, self.resolution, INTERPOLATIONS[self.interpolation])
        out: dict[str, Any] = {"img": normalize(img)}
        if mask is None:
            out["label"] = torch.full((self.resolution, self.resolution), -1, dtype=torch.int64)
        else:
            out["label"] = mask.as_subclass(torch.Tensor).to(torch.int64).contiguous()
        if self.augment is not None:
            if self.aug_on_normalized:
                out["img_aug"] = self.augment(out["img"]).as_subclass(torch.Tensor).contiguous()
            else:
                out["img_aug"] = normalize(self.augment(img)).contiguous()
        return out

    def __repr__(self) -> str:
        return (
            f"SegmentationTransform(mode={self.mode!r}, resolution={self.resolution}, "
            f"interpolation={self.interpolation!r}, aug_on_normalized={self.aug_on_normalized})"
        )
