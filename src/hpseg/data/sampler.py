"""Data order and augmentation randomness that a resumed run replays exactly.

:class:`EpochSampler` draws one seeded permutation per epoch, cuts it into global batches (each
split across distributed ranks: rank ``r`` of ``w`` takes images ``[r·b, (r+1)·b)`` of every
global batch of ``w·b``, so global batch ``k`` holds the same images whatever the number of
processes) and can start in the middle of an epoch; with every index it yields an *augmentation seed*
drawn from the same per-epoch generator. :class:`SeededItems` wraps a dataset so that item
``(index, seed)`` is produced with the CPU random generator seeded by ``seed`` (and restored
afterwards). The photometric augmentation of an item therefore depends only on the run's seed,
the epoch and the item — not on how many items were loaded before, on DataLoader workers, or
on whether the run was interrupted and resumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochSampler", "SeededItems"]

_SEED_RANGE = 2**62


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, augmentation seed)`` pairs: a seeded permutation per epoch, cut into global
    batches of ``batch_size · world`` images of which this rank takes its share (``batch_size``
    images, rows ``[rank·batch_size, (rank+1)·batch_size)``), starting at any batch of the epoch.

    Resuming at batch ``k`` of an epoch replays exactly the items (and augmentation seeds) the
    interrupted run would have seen next, without loading the skipped images. Incomplete
    batches at the end of an epoch are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        """Full (global) batches per epoch: each rank sees its share of each."""
        return self.n // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's permutation and the first batch to yield."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        seeds = torch.randint(_SEED_RANGE, (self.n,), generator=g)
        batches = self.batches_per_epoch()
        shares = perm[: batches * self.batch_size * self.world].view(batches, self.world, self.batch_size)
        chosen = shares[self.start_batch :, self.rank].reshape(-1)
        return iter(zip(chosen.tolist(), seeds[chosen].tolist()))

    def __len__(self) -> int:
        return max(0, (self.batches_per_epoch() - self.start_batch) * self.batch_size)


class SeededItems(Dataset):
    """``dataset[(index, seed)]`` = ``dataset[index]`` computed under ``torch.manual_seed(seed)``.

    The global CPU generator is forked for the call, so loading an item consumes nothing from
    the caller's random stream. Plain integer keys are passed through unseeded. Other
    attributes (``class_names``, ``n_classes``, …) are those of the wrapped dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                return self.dataset[int(index)]
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:
        # "dataset": not yet set (unpickling); "__getitems__": a wrapped dataset's batch fetch
        # (torch's Subset has one) would let the DataLoader bypass the per-item seeding above
        if name in ("dataset", "__getitems__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
