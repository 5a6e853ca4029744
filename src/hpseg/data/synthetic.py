"""Embedded synthetic scenes: generated from a seed, exact per-pixel labels, no download.

Each scene is laid out like a photograph — a smooth "sky" band at the top, a grainy "ground"
band at the bottom, a textured background between them and a few textured objects (ellipses
and polygons) in front. Classes are defined by **texture** (orientation and frequency of stripes,
checks, dots, rings, grain, smooth gradients) and by layout priors, **not by colour**: every
region draws its two colours from the same distribution, whatever its class, so a pixel's
colour says nothing about its class. A backbone must see texture to separate them.

The scene of ``(seed, split, index)`` is always the same. The splits draw from disjoint seed
streams (``numpy.random.default_rng([seed, crc32(split) & 0xFFFF, index])``):

* ``train`` — the scenes HP trains on (labels used only by the probes);
* ``val`` — the held-out scenes every reported figure comes from; never used to choose settings;
* ``dev`` — a second held-out stream for *choosing* settings (demo hyper-parameters, backbone
  recipes), so that ``val`` stays untouched by selection (``data.val_split=dev``);
* ``pretrain`` — the stream ``scripts/pretrain_demo_backbone.py`` pretrains the demo backbone on.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from hpseg.data.common import SegmentationDataset
from hpseg.errors import HPSegError

#: texture of each class, in class order (the first ``n_classes`` are used)
CLASS_NAMES = [
    "sky (smooth gradient)",
    "ground (grain)",
    "horizontal stripes",
    "diagonal stripes",
    "checks",
    "dots",
    "vertical stripes",
    "rings",
]
SPLITS = ("train", "val", "dev", "pretrain")
_MAX_CACHED = 8192


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    stream = zlib.crc32(split.encode()) & 0xFFFF
    return np.random.default_rng([seed, stream, index])


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A colour from one distribution shared by all classes (RGB in [0, 1])."""
    return rng.uniform(0.05, 0.95, size=3)


def _texture(kind: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A texture pattern in [0, 1] over the grid ``(H, W)`` for class ``kind``."""
    h, w = yy.shape
    if kind == 0:  # smooth vertical gradient with a faint horizontal drift
        p = yy / max(h - 1, 1) + 0.15 * np.sin(xx / w * np.pi * rng.uniform(0.5, 1.5))
        return np.clip(p, 0, 1)
    if kind == 1:  # fine grain
        noise = rng.uniform(0, 1, size=(h, w))
        return 0.6 * noise + 0.4 * np.roll(noise, 1, axis=1)
    if kind in (2, 3, 6):  # stripes at a class-specific orientation
        theta = {2: 0.0, 3: np.pi / 4, 6: np.pi / 2}[kind] + rng.uniform(-0.12, 0.12)
        period = rng.uniform(5.0, 8.0)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (yy * np.cos(theta) + xx * np.sin(theta)) / period + phase)
        return (wave > 0).astype(np.float64)
    if kind == 4:  # checks
        cell = int(rng.integers(4, 7))
        oy, ox = rng.integers(0, cell, size=2)
        return (((yy + oy) // cell + (xx + ox) // cell) % 2).astype(np.float64)
    if kind == 5:  # dots on a lattice
        step = rng.uniform(6.0, 8.0)
        r = step * rng.uniform(0.22, 0.3)
        oy, ox = rng.uniform(0, step, size=2)
        dy = np.mod(yy + oy, step) - step / 2
        dx = np.mod(xx + ox, step) - step / 2
        return (dy * dy + dx * dx < r * r).astype(np.float64)
    # rings around a random centre
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    period = rng.uniform(6.0, 9.0)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return (np.sin(2 * np.pi * d / period) > 0).astype(np.float64)


def _region_shape(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A random ellipse or convex-ish polygon mask ``(H, W)`` bool."""
    h, w = yy.shape
    cy, cx = rng.uniform(0.3 * h, 0.75 * h), rng.uniform(0.1 * w, 0.9 * w)
    if rng.uniform() < 0.5:
        ry, rx = rng.uniform(0.12, 0.3) * h, rng.uniform(0.12, 0.3) * w
        a = rng.uniform(0, np.pi)
        y, x = yy - cy, xx - cx
        u = x * np.cos(a) + y * np.sin(a)
        v = -x * np.sin(a) + y * np.cos(a)
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    n = rng.integers(3, 7)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
    radius = rng.uniform(0.12, 0.3) * min(h, w) * rng.uniform(0.7, 1.3, size=n)
    py, px = cy + radius * np.sin(angles), cx + radius * np.cos(angles)
    inside = np.ones_like(yy, dtype=bool)
    for i in range(n):  # half-plane test per edge (counter-clockwise order)
        y0, x0, y1, x1 = py[i], px[i], py[(i + 1) % n], px[(i + 1) % n]
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def render_scene(rng: np.random.Generator, size: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` int64 labels in ``[0, n_classes)``."""
    if not 3 <= n_classes <= len(CLASS_NAMES):
        raise HPSegError(
            f"synthetic scenes have 3 to {len(CLASS_NAMES)} classes, not {n_classes}: "
            "set data.synthetic_classes accordingly"
        )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label = np.zeros((size, size), dtype=np.int64)
    # layout: sky band on top (class 0), ground band at the bottom (class 1), background between
    sky = rng.integers(int(0.15 * size), int(0.4 * size))
    ground = size - rng.integers(int(0.15 * size), int(0.35 * size))
    wobble = (rng.uniform(2, 5) * np.sin(xx[0] / size * 2 * np.pi * rng.uniform(0.5, 2))).astype(int)
    middle_classes = list(range(2, n_classes))
    background = int(rng.choice(middle_classes))
    label[:] = background
    label[yy < (sky + wobble)[None, :]] = 0
    label[yy >= (ground + wobble)[None, :]] = 1
    for _ in range(int(rng.integers(1, 4))):
        label[_region_shape(rng, yy, xx)] = int(rng.choice(middle_classes))
    image = np.zeros((size, size, 3), dtype=np.float64)
    for k in np.unique(label):
        mask = label == k
        p = _texture(int(k), rng, yy, xx)[..., None]
        c1, c2 = _random_colour(rng), _random_colour(rng)
        while np.abs(c1 - c2).sum() < 0.5:  # keep the texture visible
            c2 = _random_colour(rng)
        image[mask] = (c1 * (1 - p) + c2 * p)[mask]
    image += rng.normal(0, 0.02, size=image.shape)  # sensor noise
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


class SyntheticScenes(SegmentationDataset):
    """Procedural scenes with exact labels (see the module docstring).

    Args:
        split: ``"train"``, ``"val"``, ``"dev"`` or ``"pretrain"`` (disjoint scene streams; ``dev``
            is for choosing settings, ``val`` for reporting).
        mode: ``"train"`` (adds the photometric ``img_aug`` view) or ``"eval"``.
        resolution: output side in pixels.
        n_images: number of scenes in the split.
        seed: scene seed; the same seed gives the same scenes.
        n_classes: 3–8 texture classes.
        image_size: rendering size (default: ``resolution``).
        cache: keep rendered scenes in memory (about 37 kB each at 96 px) so that later epochs
            skip rendering; only used when ``n_images`` ≤ 8192.
        **transform_options: ``interpolation``, ``aug_on_normalized`` (see
            :class:`hpseg.data.common.SegmentationDataset`).

    Items follow the ``hpseg.data`` contract; ``label`` holds no ignore pixels.
    """

    def __init__(
        self,
        split: str = "train",
        mode: str = "eval",
        resolution: int = 96,
        n_images: int = 512,
        seed: int = 0,
        n_classes: int = 5,
        image_size: int | None = None,
        cache: bool = True,
        **transform_options: object,
    ) -> None:
        if split not in SPLITS:
            raise HPSegError(f"synthetic split {split!r} is unknown: use one of {', '.join(SPLITS)}")
        if not 3 <= n_classes <= len(CLASS_NAMES):
            raise HPSegError(
                f"synthetic scenes have 3 to {len(CLASS_NAMES)} classes, not {n_classes}: "
                "set data.synthetic_classes accordingly"
            )
        if n_images < 1:
            raise HPSegError("data.synthetic_*_images must be at least 1")
        super().__init__(mode, resolution, **transform_options)  # type: ignore[arg-type]
        self.split, self.seed, self.n_images = split, seed, n_images
        self.image_size = image_size or resolution
        self.class_names = CLASS_NAMES[:n_classes]
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = (
            {} if cache and n_images <= _MAX_CACHED else None
        )

    def __len__(self) -> int:
        return self.n_images

    def name(self, index: int) -> str:
        return f"{self.split}-{index:05d}"

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Scene ``index`` as ``(uint8 RGB (H,W,3), int64 labels (H,W))`` (never cached)."""
        return render_scene(_rng(self.seed, self.split, index), self.image_size, self.n_classes)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        if self._cache is None:
            rgb, label = self.render(index)
            return Image.fromarray(rgb), label
        if index not in self._cache:
            rgb, label = self.render(index)
            self._cache[index] = (rgb, label.astype(np.uint8))
        rgb, small = self._cache[index]
        return Image.fromarray(rgb), small.astype(np.int64)
