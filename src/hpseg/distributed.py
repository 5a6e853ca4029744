"""Helpers for ``torchrun`` / DistributedDataParallel: rank, world size, gathers.

Every function also works in a plain single-process run (world size 1), so the training loop
has one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the process that logs, validates and writes files."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; 0 when not launched by it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: torch.device) -> bool:
    """Join the process group described by torchrun's environment, if any.

    Uses NCCL for CUDA devices and gloo otherwise. Returns True when distributed.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    log.info("distributed: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join torchrun's process group for the block (if launched by torchrun) and leave it after.

    Yields True when distributed. Only the entry layer opens it.
    """
    joined = not is_distributed() and init_from_env(device)
    try:
        yield is_distributed()
    finally:
        if joined:
            shutdown()


def shutdown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 across ranks, in rank order.

    The result is identical on every rank. ``(n, ...) -> (world·n, ...)``.
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` across ranks in place and return it."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s ``x`` to every rank in place and return it."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x
