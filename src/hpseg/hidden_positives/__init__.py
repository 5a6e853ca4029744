"""Hidden Positives: the contrastive objective of HP (docs/method.md §3–7), as pure tensor functions.

Vocabulary: ``B`` images, ``S×S`` patches each, ``N = B·S²`` patches in the batch (rows
ordered image by image, row-major inside an image), ``F`` backbone width, ``D`` head width,
``P`` reference-pool size.

* :mod:`~hpseg.hidden_positives.pools` — pool entries and per-patch thresholds (§3);
* :mod:`~hpseg.hidden_positives.masks` — task-agnostic / task-specific positives (§4);
* :mod:`~hpseg.hidden_positives.loss` — the GHP + LHP contrastive loss (:class:`HiddenPositiveLoss`,
  :func:`hidden_positive_loss`) and the λ schedule (§5);
* :mod:`~hpseg.hidden_positives.budget` — per batch: memory budget, anchor chunk, dense or sparse path;
* :mod:`~hpseg.hidden_positives.dense` — the dense path: ``(M, N)`` masks, logits and products;
* :mod:`~hpseg.hidden_positives.sparse` — the sparse path: kept pairs and sampled products;
* :mod:`~hpseg.hidden_positives.fused` — the fused path: two tiled Triton passes, no ``(M, N)`` block
  (kernels in :mod:`~hpseg.hidden_positives.fused_kernels`, imported only when used);
* :mod:`~hpseg.hidden_positives.negatives` — the kept negatives, a counter-based Bernoulli(ρ) draw
  (a pure function of seed, step and pair) as index sets or as a mask;
* :mod:`~hpseg.hidden_positives.inputs` — validation of the loss's inputs;
* :mod:`~hpseg.hidden_positives.local` — LHP attention-weighted 3×3 propagation (§6);
* :mod:`~hpseg.hidden_positives.consistency` — the photometric consistency loss (§7).
"""

from hpseg.hidden_positives.budget import chunk_images_for_budget, default_memory_gb
from hpseg.hidden_positives.consistency import consistency_loss
from hpseg.hidden_positives.local import (
    LHP_QUANTILES,
    local_propagation,
    neighbourhood_counts,
    neighbourhood_mask,
)
from hpseg.hidden_positives.loss import (
    BASE_TEMPERATURE,
    CANDIDATES,
    DEFAULT_CHUNK_IMAGES,
    PATHS,
    HiddenPositiveLoss,
    hidden_positive_loss,
    lambda_schedule,
    loss_stats,
)
from hpseg.hidden_positives.masks import PositiveMasks, positive_masks, positive_pair_keys
from hpseg.hidden_positives.negatives import negative_keep_mask, negative_keys
from hpseg.hidden_positives.pools import pool_thresholds, sample_pool, sample_pool_entries

__all__ = [
    "BASE_TEMPERATURE",
    "CANDIDATES",
    "DEFAULT_CHUNK_IMAGES",
    "LHP_QUANTILES",
    "PATHS",
    "HiddenPositiveLoss",
    "PositiveMasks",
    "chunk_images_for_budget",
    "consistency_loss",
    "default_memory_gb",
    "hidden_positive_loss",
    "lambda_schedule",
    "local_propagation",
    "loss_stats",
    "negative_keep_mask",
    "negative_keys",
    "neighbourhood_counts",
    "neighbourhood_mask",
    "pool_thresholds",
    "positive_masks",
    "positive_pair_keys",
    "sample_pool",
    "sample_pool_entries",
]
