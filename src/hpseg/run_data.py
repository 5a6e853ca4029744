"""The datasets a run's :class:`~hpseg.config.Config` describes (entry layer, beside :mod:`~hpseg.pipeline`).

The training and evaluation sets of a run; for a folder with ``data.holdout``, the split into
training and held-out images (:mod:`hpseg.data.holdout`: per name, so that adding photos does not
move one), the smallest folder a run accepts (refused before anything is written), the held-out
files and the unreadable images a run left out (``skipped.txt``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from hpseg.config import PAPER_DATASETS, Config, require_data_root
from hpseg.data import build_dataset
from hpseg.data.holdout import MIN_FOLDER_IMAGES, MIN_HELD_OUT, MIN_TRAIN, holdout_indices
from hpseg.errors import HPSegError
from hpseg.io import atomic_write_text
from hpseg.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = [
    "Picked",
    "baseline_train_set",
    "build_train_set",
    "build_val_set",
    "held_out_files",
    "holds_out",
    "record_skipped",
    "require_enough_images",
    "subset",
    "validation_subset",
]


def _dataset_kwargs(cfg: Config, *, train: bool) -> dict[str, Any]:
    d = cfg.data
    if d.dataset == "synthetic":
        return {"n_classes": d.synthetic_classes, "seed": d.synthetic_seed,
                "n_images": d.synthetic_train_images if train else d.synthetic_val_images}
    kwargs: dict[str, Any] = {"interpolation": d.interpolation, "aug_on_normalized": d.aug_on_normalized}
    if d.dataset == "folder":
        kwargs.update(n_classes=d.n_classes, class_names=d.class_names, max_skipped_fraction=d.max_skipped_fraction)
    return kwargs


class Picked(Dataset):
    """The items ``indices`` of ``dataset``; other attributes (``class_names``, ``n_classes``,
    ``has_labels``) are the dataset's, ``name(i)`` is the name of the picked item. Unlike
    ``torch.utils.data.Subset`` it has no ``__getitems__``, which would bypass the seeded
    wrapper of the training loader (:class:`hpseg.data.sampler.SeededItems`)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    def name(self, index: int) -> str:
        return str(self.dataset.name(self.indices[index]))  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices"):  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def subset(ds: Dataset, indices: list[int]) -> Dataset:
    """The items ``indices`` of ``ds``, keeping its ``class_names`` and ``n_classes``."""
    return Picked(ds, indices)


def holds_out(cfg: Config) -> bool:
    """Whether training and validation images come from one folder split by ``data.holdout``."""
    d = cfg.data
    if d.dataset != "folder" or d.holdout <= 0 or not d.root:
        return False
    root = Path(d.root).expanduser()
    return d.train_split == d.val_split or not ((root / d.train_split).is_dir() or (root / d.val_split).is_dir())


def _split(cfg: Config, ds: Dataset, part: int) -> Dataset:
    """The training (``part=0``) or held-out (``part=1``) images of a folder with ``data.holdout``."""
    if not holds_out(cfg):
        return ds
    names = [ds.name(i) for i in range(len(ds))]  # type: ignore[attr-defined, arg-type]
    return subset(ds, holdout_indices(names, cfg.data.holdout)[part])


def build_train_set(cfg: Config) -> Dataset:
    """The training dataset (train transforms with the photometric view); without the held-out
    images of a folder with ``data.holdout``."""
    require_data_root(cfg)
    d = cfg.data
    kwargs = _dataset_kwargs(cfg, train=True)
    if d.dataset in PAPER_DATASETS:
        kwargs.update(five_crop=d.five_crop, crop_ratio=d.crop_ratio)
    return _split(cfg, build_dataset(d.dataset, d.root, d.train_split, mode="train", resolution=d.resolution,
                                     **kwargs), 0)


def build_val_set(cfg: Config, split: str | None = None) -> Dataset:
    """The evaluation dataset (resize + centre crop at ``data.eval_resolution``): the held-out
    images of a folder with ``data.holdout``, at most ``data.max_val_images``."""
    require_data_root(cfg)
    d = cfg.data
    ds = build_dataset(d.dataset, d.root, split or d.val_split, mode="eval", resolution=d.eval_resolution,
                       **_dataset_kwargs(cfg, train=False))
    ds = _split(cfg, ds, 1) if split is None or split == d.val_split else ds
    if d.max_val_images is not None and d.max_val_images < len(ds):  # type: ignore[arg-type]
        return subset(ds, list(range(d.max_val_images)))
    return ds


def baseline_train_set(cfg: Config) -> Dataset:
    """Training images with evaluation transforms (no augmentation): k-means fitting data."""
    d = cfg.data
    return _split(cfg, build_dataset(d.dataset, d.root, d.train_split, mode="eval", resolution=d.resolution,
                                     **_dataset_kwargs(cfg, train=True)), 0)


def validation_subset(val_set: Dataset, n: int | None) -> Dataset:
    """``n`` validation images spread evenly over ``val_set`` (all when ``n`` is None or larger)."""
    total = len(val_set)  # type: ignore[arg-type]
    if n is None or n >= total:
        return val_set
    return subset(val_set, sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(n)}))


def record_skipped(out_dir: Path, runtime: Runtime, *datasets: Dataset) -> None:
    """List the images ``datasets`` left out as unreadable in ``out_dir/skipped.txt``
    (``path<TAB>reason`` per line; removed when none was)."""
    skipped: dict[Path, str] = {}
    for ds in datasets:
        while not hasattr(ds, "skipped") and hasattr(ds, "dataset"):  # Subset, SeededItems
            ds = ds.dataset
        skipped.update(getattr(ds, "skipped", []))
    target = out_dir / "skipped.txt"
    if not runtime.is_main:
        return
    if skipped:
        atomic_write_text(target, "".join(f"{p}\t{r}\n" for p, r in skipped.items()))
        log.warning("%d unreadable image(s) left out, listed in %s", len(skipped), target)
    elif target.exists():
        target.unlink()


def held_out_files(val_set: Dataset) -> list[str]:
    """The files (relative to the folder) of every held-out image, before ``data.max_val_images``."""
    ds = val_set
    while isinstance(ds, Picked) and isinstance(ds.dataset, Picked):  # the cap of data.max_val_images
        ds = ds.dataset
    assert isinstance(ds, Picked)
    folder = ds.dataset
    return [Path(folder.image_files[i]).relative_to(folder.root).as_posix() for i in ds.indices]  # type: ignore[attr-defined]


def require_enough_images(cfg: Config, train_set: Dataset, val_set: Dataset) -> None:
    """Refuse, before anything is written, a folder too small to train on and evaluate."""
    n_train, n_val = len(train_set), len(val_set)  # type: ignore[arg-type]
    if cfg.data.dataset != "folder" or not holds_out(cfg) or (n_train >= MIN_TRAIN and n_val >= MIN_HELD_OUT):
        return
    source = train_set.dataset if isinstance(train_set, Picked) else train_set
    skipped = len(getattr(source, "skipped", []))
    unreadable = f" (and {skipped} that cannot be read)" if skipped else ""
    raise HPSegError(f"{cfg.data.root} has {len(source)} readable image(s){unreadable}, fewer than the "  # type: ignore[arg-type]
                     f"{MIN_FOLDER_IMAGES} a run needs ({MIN_TRAIN} to train on, {MIN_HELD_OUT} held out to evaluate "
                     "on): add images to the folder")
