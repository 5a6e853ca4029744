"""The data side of a training run: the seeded loaders of the training images and their counts.

:class:`DataPlan` holds the training loader (one seeded order per epoch, resumable mid-epoch:
:class:`~hpseg.data.sampler.EpochSampler`) and the passes the reference pools are built from.
In a distributed run every rank loads its share of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from hpseg.config import TrainConfig
from hpseg.data.sampler import EpochSampler, SeededItems
from hpseg.errors import HPSegError
from hpseg.preemption import QuietWorkersLoader
from hpseg.runtime import Runtime

__all__ = ["DataPlan"]


def _loader(dataset: Dataset[Any], sampler: EpochSampler, batch: int, workers: int, runtime: Runtime) -> DataLoader:
    """A loader over ``(index, augmentation seed)`` keys; its own generator keeps the global
    random stream untouched (exact resume); its workers leave stop signals to the main process."""
    return QuietWorkersLoader(SeededItems(dataset), batch_size=batch, sampler=sampler, num_workers=workers,
                              drop_last=True, pin_memory=runtime.device.type == "cuda",
                              generator=torch.Generator().manual_seed(0))


@dataclass
class DataPlan:
    """The data side of a run: the training loader (one seeded order per epoch), the passes
    the reference pools are built from, and the counts."""

    sampler: EpochSampler
    loader: DataLoader
    pool_sampler: EpochSampler
    pool_loader: DataLoader
    per_rank: int
    iters_per_epoch: int
    max_iters: int

    @classmethod
    def create(cls, train_set: Dataset[Any], train: TrainConfig, runtime: Runtime, num_workers: int) -> DataPlan:
        n = len(train_set)  # type: ignore[arg-type]
        per_rank = train.batch_size // runtime.world_size
        if train.batch_size % runtime.world_size or per_rank < 2:
            raise HPSegError(f"train.batch_size={train.batch_size} is not divisible into {runtime.world_size} "
                             f"shares of at least 2 images: use a multiple of {runtime.world_size} (each process "
                             "takes batch_size / processes images)")
        sampler = EpochSampler(n, per_rank, train.seed, runtime.rank, runtime.world_size)
        per_epoch = sampler.batches_per_epoch()
        if n < 2 * runtime.world_size:
            raise HPSegError(f"training needs at least two images{' per process' if runtime.world_size > 1 else ''} "
                             f"(positives are mined across images) but the training set has {n}: add images")
        if per_epoch < 1:
            raise HPSegError(f"the training set has {n} images, fewer than one batch of {train.batch_size}: "
                             f"set train.batch_size={n // runtime.world_size * runtime.world_size} or lower")
        max_iters = per_epoch * train.epochs if train.max_iters is None else min(per_epoch * train.epochs,
                                                                                  train.max_iters)
        pool_sampler = EpochSampler(n, per_rank, train.seed + 1, runtime.rank, runtime.world_size)
        return cls(sampler, _loader(train_set, sampler, per_rank, num_workers, runtime), pool_sampler,
                   _loader(train_set, pool_sampler, per_rank, num_workers, runtime), per_rank, per_epoch, max_iters)

    def pool_pass(self, k: int) -> Iterator[dict[str, Any]]:
        """The ``k``-th pass over the training images for the pools (a fresh order each time)."""
        self.pool_sampler.set_epoch(k)
        return iter(self.pool_loader)

    def epoch(self, iteration: int) -> tuple[int, Iterator[dict[str, Any]]]:
        """``(epoch, batches)`` from global ``iteration`` on (mid-epoch when resuming)."""
        epoch, start = divmod(iteration, self.iters_per_epoch)
        self.sampler.set_epoch(epoch, start)
        return epoch, iter(self.loader)
