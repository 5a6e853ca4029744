"""Helpers for ``torchrun`` / DistributedDataParallel: rank, world size, gathers, the batch share.

Every function also works in a plain single-process run (world size 1), so the training loop
has one code path.

Each process trains on its *share* of the global batch: rank ``r`` of ``w`` holds images
``[r·b, (r+1)·b)`` of the ``w·b`` images of every global batch (:class:`BatchShare`). The random
draws that change training (dropout masks, pool positions) are made for the whole global batch
on every rank, from generators whose states are the same on every rank
(:func:`broadcast_rng_state`), and each rank uses its rows: so 1, 2 or 4 processes draw what one
process with the global batch draws (docs/method.md, "Randomness and the number of processes").
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; ``x`` itself when not distributed)."""
    if not is_distributed():
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / world_size()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of the gathered tensor
    and hands each rank the slice of its own rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        return all_gather_cat(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()  # summed in place below; the incoming gradient stays untouched
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # gloo has no reduce-scatter
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows].clone()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """:func:`all_gather_cat` that keeps the graph: ``(n, ...) -> (world·n, ...)`` in rank order.

    The backward pass is a collective too (every rank must run it): the gradient of rank ``r``'s
    rows is the sum over ranks of the gradients their losses sent to those rows. On NCCL it is
    a reduce-scatter (each rank receives ``(world−1)/world`` of the gathered gradient), on gloo an
    all-reduce of the whole gradient. The identity when not distributed.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------
# this process's share of the global batch, and the random streams every rank shares
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchShare:
    """Rows ``[start, start + size)`` of a global batch of ``total`` images: this rank's images."""

    start: int
    size: int
    total: int


_share: contextvars.ContextVar[BatchShare | None] = contextvars.ContextVar("hpseg_batch_share", default=None)


def share_of(local_images: int) -> BatchShare:
    """This rank's share of a global batch made of ``local_images`` images on every rank."""
    return BatchShare(rank() * local_images, local_images, local_images * world_size())


def current_share() -> BatchShare | None:
    """The share set by :func:`batch_share` around the running step (None: the whole batch)."""
    return _share.get()


@contextlib.contextmanager
def batch_share(local_images: int) -> Iterator[BatchShare]:
    """Within the block, random draws per image are made for the global batch (see the module
    docstring); a no-op share in a single process."""
    token = _share.set(share_of(local_images) if world_size() > 1 else None)
    try:
        yield share_of(local_images)
    finally:
        _share.reset(token)


def broadcast_rng_state(device: torch.device) -> None:
    """Give every rank rank 0's global random streams (CPU, and ``device``'s on CUDA).

    The training loop calls it when the ranks' streams may have parted (at the start, after a
    validation that only rank 0 runs), so that per-image draws of every rank come from one
    stream. A no-op in a single process.
    """
    if not is_distributed():
        return
    on = device if device.type == "cuda" else torch.device("cpu")
    state = torch.get_rng_state().to(on)
    dist.broadcast(state, src=0)
    torch.set_rng_state(state.cpu())
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device).to(device)
        dist.broadcast(cuda_state, src=0)
        torch.cuda.set_rng_state(cuda_state.cpu(), device)
