"""The hidden-positive loss across processes: the global batch's candidates and statistics.

Candidates across processes (``candidates``, :data:`CANDIDATES`). ``"local"``: the anchors and
candidates are the rows given to this call. ``"global"`` (in a distributed process group of
``w > 1`` processes): each process gives its share of the global batch — whole images, the same
number on every rank — and keeps its anchors, while the candidates are the whole global batch:
``z`` and ``z_lhp`` are gathered with their graph (:func:`~hpseg.distributed.all_gather_with_grad`:
the gradient of every process's loss reaches the owner of each row), ``f`` and ``s`` in the
products' dtype, the pool thresholds (computed by each process for its rows) as they are. This
process's anchors are then the contiguous row range ``[rank·n, (rank+1)·n)`` of the gathered
arrays, and the loss (:mod:`~.loss`) runs on that range: the chunk loop over its images, the sparse
path's positive pairs of those rows (:func:`~.masks.positive_pair_keys` with ``rows``), the
negatives keyed by the *global* image index. Per-anchor and per-image normalisations are within
an image, the images' mean is over the global batch (the scale uses the global number of
images), and the value returned is ``w ×`` this process's share of the global loss: the mean
over processes — which DistributedDataParallel's gradient averaging takes — is the loss of one
process with the global batch, and so is the gradient. The loss's work per process is
``(N / w) × N``.

:func:`gather_candidates` gathers the candidates; :func:`summed_over_ranks` turns the processes'
statistics into the global batch's (at log time). The loss itself is
:mod:`~hpseg.hidden_positives.loss`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hpseg import distributed as dist

__all__ = ["CANDIDATES", "gather_candidates", "summed_over_ranks", "use_global_candidates"]

#: Which candidates an anchor sees in a distributed run (module docstring).
CANDIDATES = ("local", "global")


def use_global_candidates(candidates: str) -> bool:
    """Whether ``candidates`` means gathering: ``"global"`` in a process group of more than one."""
    return candidates == "global" and dist.world_size() > 1


def gather_candidates(
    z: torch.Tensor, z_lhp: torch.Tensor, f: torch.Tensor, s: torch.Tensor, r_ag: torch.Tensor, r_sp: torch.Tensor,
    num_images: int, dtype: torch.dtype,
) -> tuple[tuple[torch.Tensor, ...], int, tuple[int, int], int]:
    """The global batch's candidates from every process's share (module docstring):
    ``((z, z_lhp, f, s, r_ag, r_sp) gathered, images, this process's anchor images, world)``.

    ``z``, ``z_lhp`` keep their graph; ``f`` and ``s`` travel in the products' dtype (they enter
    nothing else, so the result is the same bits); the thresholds as float32.
    """
    world, rank = dist.world_size(), dist.rank()
    gathered = (
        dist.all_gather_with_grad(z),
        dist.all_gather_with_grad(z_lhp),
        dist.all_gather_cat(f.to(dtype)),
        dist.all_gather_cat(s.to(dtype)),
        *dist.all_gather_cat(torch.stack([r_ag, r_sp], dim=1)).unbind(1),
    )
    return gathered, num_images * world, (rank * num_images, (rank + 1) * num_images), world


def summed_over_ranks(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw record of the global batch from every process's share (a collective: every rank
    must call it; one small all-reduce). Records of a single process are returned as they are."""
    if not raw or not raw.get("distributed"):
        return raw
    pairs = raw["kept_pairs"]
    extra = [float("nan") if pairs is None else float(pairs), float(raw["anchors"])]
    total = dist.all_reduce_sum(torch.cat([raw["counts"], raw["counts"].new_tensor(extra)]),
                               name="the all-reduce of the loss statistics")
    pairs_sum, anchors = total[5:].tolist()
    return {**raw, "counts": total[:5], "anchors": int(anchors),
            "kept_pairs": None if math.isnan(pairs_sum) else int(pairs_sum), "distributed": False}
