"""How the HP loss is evaluated on a batch: memory budget, anchor chunk and path (dense, sparse or fused).

The loss processes its ``N`` anchors in chunks of whole images (:mod:`~.loss`). This module
decides, for one batch, which path evaluates the chunks (:data:`PATHS`, see
:mod:`~hpseg.hidden_positives.loss`) and how many images a chunk holds so that its working set
fits a memory budget (:func:`chunk_images_for_budget`). On the sparse path it also lists the
batch's positive pairs (:func:`~.masks.positive_pair_keys`), because their number decides both:
when positives turn out not to be rare, the dense path is cheaper and is used instead.

None of these choices changes the loss's value; they change only its time and memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from hpseg.hidden_positives.masks import positive_pair_keys
from hpseg.hidden_positives.sparse import BYTES_PER_PAIR

log = logging.getLogger(__name__)

#: Loss evaluation paths (see :mod:`~hpseg.hidden_positives.loss`).
PATHS = ("auto", "dense", "sparse", "fused")
#: Default memory budget of the loss's working set on CPU, GiB.
DEFAULT_CPU_MEMORY_GB = 1.0
#: Default memory budget of the loss on a GPU, GiB (at most :data:`DEFAULT_CUDA_MEMORY_FRACTION` of it).
DEFAULT_CUDA_MEMORY_GB = 6.0
#: ... and at most this fraction of the GPU's total memory.
DEFAULT_CUDA_MEMORY_FRACTION = 0.25
#: "auto" uses the sparse path only while the kept negatives are at most this dense.
SPARSE_MAX_KEEP_DENSITY = 0.1
#: ... and while the kept pairs (``ρ`` + positives) are at most this dense (else dense is cheaper).
SPARSE_MAX_PAIR_DENSITY = 0.15
#: Bytes held per ``(anchor, candidate)`` entry of a chunk by the dense path (masks, logits, products).
DENSE_BYTES_PER_ENTRY = 20
#: Bytes held per entry of a chunk by the fused path: the A, T and keep bit masks (:mod:`~.fused`).
FUSED_BYTES_PER_ENTRY = 3 / 8
#: Bytes held per entry of a chunk by the sparse path besides its pairs (the one-byte tag map).
SPARSE_BYTES_PER_ENTRY = 1
#: Anchor rows per tile of the sparse path's mask products (bounded by the budget too).
TILE_ROWS = 256

_logged_choices: set[tuple[Any, ...]] = set()


def default_memory_gb(device: torch.device) -> float:
    """The loss's default memory budget on ``device``, GiB.

    CUDA: :data:`DEFAULT_CUDA_MEMORY_GB`, at most :data:`DEFAULT_CUDA_MEMORY_FRACTION` of the
    GPU's total memory; elsewhere :data:`DEFAULT_CPU_MEMORY_GB`. It depends on the device alone —
    never on the memory free at the moment — so that the anchor chunk, and with it the order of
    the float additions, is the same in every step and after a resume (exact runs).
    """
    if device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return max(min(DEFAULT_CUDA_MEMORY_GB, DEFAULT_CUDA_MEMORY_FRACTION * total), 0.25)
    return DEFAULT_CPU_MEMORY_GB


def chunk_images_for_budget(
    path: str,
    *,
    num_images: int,
    per_image: int,
    n: int,
    memory_bytes: float,
    pairs_per_row: float = 0.0,
    fixed_bytes: float = 0.0,
) -> int:
    """Images per anchor chunk so that one chunk's working set fits in ``memory_bytes``.

    A chunk of ``M = images·S²`` anchors holds, on the dense path, about
    ``M·N·DENSE_BYTES_PER_ENTRY`` bytes (masks, logits, gradient products); on the sparse path
    ``M·N·SPARSE_BYTES_PER_ENTRY + M·pairs_per_row·BYTES_PER_PAIR`` (tag map and kept pairs); on
    the fused path ``M·N·FUSED_BYTES_PER_ENTRY`` (its bit masks: one chunk at paper scale).
    ``fixed_bytes`` (pair lists of the whole batch) is taken off the budget first. At least one
    image, at most ``num_images``; when one image does not fit, one image is used (the smallest
    unit: an image's anchors share their reweighting coefficients).
    """
    if path == "dense":
        per_row = float(n * DENSE_BYTES_PER_ENTRY)
    elif path == "fused":
        per_row = n * FUSED_BYTES_PER_ENTRY
    else:
        per_row = n * SPARSE_BYTES_PER_ENTRY + pairs_per_row * BYTES_PER_PAIR
    rows = max(0.0, memory_bytes - fixed_bytes) / max(per_row, 1.0)
    return int(max(1, min(num_images, rows // per_image)))


def resolve_path(path: str, rho: float, negative_keep: torch.Tensor | None, device: torch.device) -> str:
    """``"dense"``, ``"sparse"`` or ``"fused"`` for the option ``path`` before the positives are known.

    ``"auto"``: sparse on CPU while the kept negatives are sparse (density ≤
    :data:`SPARSE_MAX_KEEP_DENSITY`), dense elsewhere (CUDA: float16 tensor-core products). It never
    picks ``"fused"``: that path is opt-in until a GPU measurement shows it faster than dense.
    """
    if path != "auto":
        return path
    if device.type != "cpu":
        return "dense"
    if negative_keep is not None:
        n = negative_keep.shape[0]
        density = float(negative_keep.count_nonzero()) / max(n * n, 1)
    else:
        density = rho
    return "sparse" if density <= SPARSE_MAX_KEEP_DENSITY else "dense"


@dataclass(frozen=True)
class LossPlan:
    """How one batch is evaluated.

    Attributes:
        path: ``"dense"``, ``"sparse"`` or ``"fused"``.
        chunk_images: images per anchor chunk.
        agnostic_keys / specific_keys: on the sparse path, the batch's task-agnostic /
            task-specific positive pairs as sorted keys ``i·N + j`` (``specific_keys`` is None
            when λ = 0); None on the dense path.
    """

    path: str
    chunk_images: int
    agnostic_keys: torch.Tensor | None = None
    specific_keys: torch.Tensor | None = None


def plan_batch(
    path: str,
    f: torch.Tensor,
    s: torch.Tensor,
    thresholds: tuple[torch.Tensor, torch.Tensor],
    negative_keep: torch.Tensor | None,
    *,
    num_images: int,
    rho: float,
    with_specific: bool,
    memory_bytes: float,
    chunk_images: int | None,
    matmul_dtype: torch.dtype,
    anchor_rows: slice | None = None,
) -> LossPlan:
    """Choose the path and the anchor chunk for one batch (see the module docstring).

    Args:
        path: the option (:data:`PATHS`). f: backbone features ``(N, F)``; s: EMA codes ``(N, D')``.
        thresholds: per-patch thresholds ``(r_agnostic, r_specific)``, each ``(N,)``.
        negative_keep: explicit ``(N, N)`` keep matrix, or None for Bernoulli(``rho``).
        with_specific: whether task-specific positives are needed (λ ≠ 0).
        memory_bytes: the working-set budget. chunk_images: an explicit chunk (overrides it).
        anchor_rows: the anchors, whole images of the ``N`` candidates (a process's share of a
            global batch); None: all ``N`` (``num_images`` counts the candidates' images).
    """
    n = f.shape[0]
    per_image = n // num_images
    rows = anchor_rows if anchor_rows is not None else slice(0, n)
    m, triangle = rows.stop - rows.start, rows.stop - rows.start == n
    anchor_images = m // per_image
    chosen = resolve_path(path, rho, negative_keep, f.device)
    agnostic_keys = specific_keys = None
    pairs_per_row = 0.0
    if chosen == "sparse":
        # batch-wide lists: ~32 B per unordered pair of the triangle, ~16 B per ordered pair of a share
        budget_pairs = int(memory_bytes // (64 if triangle else 32))
        keep_density = rho if negative_keep is None else 0.0
        density_pairs = int(max(0.0, SPARSE_MAX_PAIR_DENSITY - keep_density) * m * n / (4 if triangle else 2))
        cap = None if path == "sparse" else min(budget_pairs, density_pairs)
        tile_rows = int(max(16, min(TILE_ROWS, memory_bytes / 4 // (n * 8))))
        agnostic_keys = positive_pair_keys(f, thresholds[0], tile_rows=tile_rows, matmul_dtype=matmul_dtype,
                                           max_pairs=cap, rows=rows)
        if agnostic_keys is not None and with_specific:
            specific_keys = positive_pair_keys(s, thresholds[1], tile_rows=tile_rows, matmul_dtype=matmul_dtype,
                                               max_pairs=cap, rows=rows)
            if specific_keys is None:
                agnostic_keys = None
        if agnostic_keys is None:
            chosen = "dense"  # positives are not rare in this batch: the dense path is cheaper
            log.debug("hidden-positive loss: positives are not rare in this batch; dense path")
        else:
            keep_per_row = float(negative_keep.count_nonzero()) / n if negative_keep is not None else rho * (n - 1)
            positives = agnostic_keys.numel() + (specific_keys.numel() if specific_keys is not None else 0)
            pairs_per_row = positives / m + keep_per_row
    if chunk_images is not None:
        chunk, how = min(chunk_images, anchor_images), "chunk_images given"
    else:
        fixed = 8.0 * sum(k.numel() for k in (agnostic_keys, specific_keys) if k is not None)
        chunk = chunk_images_for_budget(chosen, num_images=anchor_images, per_image=per_image, n=n,
                                        memory_bytes=memory_bytes, pairs_per_row=pairs_per_row, fixed_bytes=fixed)
        how = f"budget {memory_bytes / 2**30:.2f} GiB"
    _log_choice_once(chosen, chunk, anchor_images, n, f.device, how)
    return LossPlan(chosen, chunk, agnostic_keys, specific_keys)


def _log_choice_once(path: str, chunk: int, num_images: int, n: int, device: torch.device, how: str) -> None:
    key = (path, chunk, num_images, n, device.type, how)
    if key not in _logged_choices:
        _logged_choices.add(key)
        log.info("hidden-positive loss: %s path, anchor chunk of %d of %d images (N=%d, %s)",
                 path, chunk, num_images, n, how)
