"""Helpers for ``torchrun`` / DistributedDataParallel: rank, world size, gathers, the batch share.

Every function also works in a plain single-process run (world size 1), so the training loop
has one code path.

Each process trains on its *share* of the global batch: rank ``r`` of ``w`` holds images
``[r·b, (r+1)·b)`` of the ``w·b`` images of every global batch (:class:`BatchShare`). The random
draws that change training (dropout masks, pool positions) are made for the whole global batch
on every rank, from generators whose states are the same on every rank
(:func:`broadcast_rng_state`), and each rank uses its rows: so 1, 2 or 4 processes draw what one
process with the global batch draws (docs/method.md, "Randomness and the number of processes").

A failing process stops the group within a bounded time: every collective waits at most
``train.dist_timeout`` seconds (the process group's timeout), and :func:`collective` turns a
collective that timed out, or lost a process that died, into a one-line
:class:`~hpseg.errors.HPSegError` naming that collective. Waiting for rank 0's own work
(validation, the final files) is :func:`wait_for_main`, through the group's store with a longer
timeout (:data:`MAIN_WAIT`), so that a long validation does not count as a hung process.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hpseg.config import TrainConfig
from hpseg.errors import HPSegError

log = logging.getLogger(__name__)

#: how long the other processes wait for rank 0's validation and final files (at least the
#: group's timeout): its own work, not a hung process
MAIN_WAIT = datetime.timedelta(hours=1)
#: how long a process waits for the others to reach torchrun's store when joining
STORE_CONNECT = datetime.timedelta(minutes=5)
#: the open group's timeout in seconds; how many times :func:`wait_for_main` waited in it
_group: dict[str, Any] = {"timeout": None, "waits": 0}


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


def init_from_env(device: torch.device, timeout: float = TrainConfig.dist_timeout) -> bool:
    """Join the process group described by torchrun's environment, if any.

    Uses NCCL for CUDA devices and gloo otherwise; a collective waits at most ``timeout``
    seconds for the other processes (``train.dist_timeout``). Returns True when distributed.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    limit = datetime.timedelta(seconds=float(timeout))
    # torchrun keeps its store across restarts (--max-restarts) without separating the attempts:
    # the processes of a restart would read the keys of the failed one (the dead processes'
    # addresses) and fail to connect. Every attempt gets keys of its own, named by torchrun's
    # restart count (as torch's env:// rendezvous itself once did).
    store, rank_, world = next(dist.rendezvous("env://", timeout=max(limit, STORE_CONNECT)))
    store = dist.PrefixStore(f"hpseg/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=world, timeout=limit)
    _group.update(timeout=float(timeout), waits=0)
    log.info("distributed: rank %d of %d (%s, collectives time out after %g s)", rank(), world_size(), backend,
             float(timeout))
    return True


@contextlib.contextmanager
def process_group(device: torch.device, timeout: float = TrainConfig.dist_timeout) -> Iterator[bool]:
    """Join torchrun's process group for the block (if launched by torchrun) and leave it after;
    ``timeout``: seconds a collective waits for the other processes (``train.dist_timeout``).

    Yields True when distributed. Only the entry layer opens it.
    """
    joined = not is_distributed() and init_from_env(device, timeout)
    try:
        yield is_distributed()
    finally:
        if joined:
            shutdown()


def shutdown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()
    _group.update(timeout=None, waits=0)


#: what a failed collective's error says when another process died (gloo, NCCL, the store)
_LOST = re.compile(r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed? ?out", re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed? ?out", re.IGNORECASE)


def _lost_process(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process hung or died."""
    dist_error = getattr(dist, "DistError", None)
    return (dist_error is not None and isinstance(exc, dist_error)) or bool(_LOST.search(str(exc)))


def _reason(exc: BaseException) -> str:
    """The cause's first sentence, without the source location (``[…/pair.cc:545] ``)."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)
    return first.split(". ")[0].rstrip(".")[:200]


@contextlib.contextmanager
def collective(name: str, timeout: float | None = None) -> Iterator[None]:
    """Within the block, a collective that fails because another process hung (past the group's
    timeout) or died raises a one-line :class:`HPSegError` naming ``name`` (e.g. "the gradient
    all-reduce of iteration 7"), this rank and what to do; any other error passes unchanged.
    ``timeout``: the seconds the block's collective waits, when not the group's.

    Raises:
        HPSegError: the collective timed out or lost a process.
    """
    try:
        yield
    except RuntimeError as exc:
        if not (is_distributed() and _lost_process(exc)):
            raise
        where = f"rank {rank()}: {name}"
        if _TIMED_OUT.search(str(exc)):
            timeout = _group["timeout"] if timeout is None else timeout
            after = f" after {timeout:g} s" if timeout is not None else ""
            raise HPSegError(f"{where} timed out{after}: another process stopped answering (hung, or slower than "
                             "train.dist_timeout allows); see its log, raise train.dist_timeout if it was only slow, "
                             "and run the same command again to resume from last.pt") from exc
        raise HPSegError(f"{where} failed: another process left the run ({_reason(exc)}); see its log, then run "
                         "the same command again to resume from last.pt") from exc


def _named(name: str | None) -> contextlib.AbstractContextManager[None]:
    """:func:`collective` for ``name``; without one, the enclosing block names the collective."""
    return collective(name) if name is not None else contextlib.nullcontext()


def barrier(name: str = "a barrier") -> None:
    """Wait for every process (no-op when not distributed); ``name`` says which in an error."""
    if is_distributed():
        with collective(name):
            dist.barrier()


def wait_for_main(name: str) -> None:
    """Let the other processes wait while rank 0 does work of its own (validation, writing the
    final files): like :func:`barrier`, but waiting up to :data:`MAIN_WAIT` (at least the group's
    timeout), on a key rank 0 sets in the group's store. Every rank calls it at the same points."""
    if not is_distributed():
        return
    _group["waits"] += 1
    key = f"hpseg/rank0-done/{_group['waits']}"
    store, wait = dist.distributed_c10d._get_default_store(), max(MAIN_WAIT.total_seconds(), _group["timeout"] or 0)
    with collective(name, wait):
        if is_main():
            store.set(key, "1")
        else:
            store.wait([key], datetime.timedelta(seconds=wait))


def all_gather_cat(x: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) along dim 0 across ranks, in rank order.

    The result is identical on every rank. ``(n, ...) -> (world·n, ...)``; ``name`` says which
    collective failed in an error (:func:`collective`; None: the enclosing block's name, e.g. the
    training step's).
    """
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    with _named(name):
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Sum ``x`` across ranks in place and return it (``name``: as for :func:`all_gather_cat`)."""
    if is_distributed():
        with _named(name):
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast(x: torch.Tensor, src: int = 0, name: str | None = None) -> torch.Tensor:
    """Copy rank ``src``'s ``x`` to every rank in place and return it (``name``: as for :func:`all_gather_cat`)."""
    if is_distributed():
        with _named(name):
            dist.broadcast(x, src=src)
    return x


def max_over_ranks(values: list[int], name: str) -> list[int]:
    """The element-wise maximum of small host integers over ranks (one all-reduce, on the device
    the backend needs; a read back to the host). ``values`` itself when not distributed."""
    if not is_distributed():
        return list(values)
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = torch.tensor(values, dtype=torch.int64, device=on)
    with collective(name):
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return [int(v) for v in x.tolist()]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; ``x`` itself when not distributed)."""
    if not is_distributed():
        return x
    out = x.clone()
    with collective("the all-reduce of the logged values"):
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
    broadcast(state, src=0, name="the broadcast of rank 0's random streams")
    torch.set_rng_state(state.cpu())
    if device.type == "cuda":
        cuda_state = torch.cuda.get_rng_state(device).to(device)
        broadcast(cuda_state, src=0, name="the broadcast of rank 0's random streams")
        torch.cuda.set_rng_state(cuda_state.cpu(), device)
